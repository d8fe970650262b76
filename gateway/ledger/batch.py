"""Group commit: concurrent reserves (and settlements) share one round trip and one
transaction.

A call made while a batch is in flight waits for the next batch, which takes every call
that arrived meanwhile; a call made when nothing is in flight goes at once, alone. Each
call still runs its own server-side function (``gw_reserve``, ``gw_settle``) with its own
rows and its own answer, and nobody's future resolves before the batch's transaction has
committed: a reservation is durable before anything is forwarded. The batch's account
locks are taken in one order (reserves sorted by account), and one batch runs at a time
per process, so batches of one process never deadlock each other; a batch the server
refuses as a whole (a deadlock with another process, one call's own error) is run again
call by call, so one call's failure is never another's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from gateway.errors import LedgerUnavailable

log = logging.getLogger("gateway.ledger")

# Calls of one account in one transaction each leave a row version that the next call
# walks past (none can be pruned before the commit): per-call cost grows with the batch.
# Measured here, it is lowest around 50 calls to one account.
MAX_BATCH = 64

# Failures of the connection or the server as a whole: every call of the batch gets them.
_WHOLE_BATCH = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.CannotConnectNowError,
)

Fetch = Callable[..., Awaitable[list[asyncpg.Record]]]


@dataclass(frozen=True)
class Kind:
    """One batched function: its query for one call, and its query for many (one array per
    argument: see ``many``)."""

    name: str
    single: str
    many: str


@dataclass
class _Call:
    args: tuple[Any, ...]
    order: tuple[str, ...]
    future: asyncio.Future[asyncpg.Record] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Coalescer:
    """Batches calls of each ``Kind``; one batch in flight at a time."""

    def __init__(self, fetch: Fetch, *, max_batch: int = MAX_BATCH) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._pending: dict[str, tuple[Kind, list[_Call]]] = {}
        self._runner: asyncio.Task[None] | None = None
        self.batches = 0  # batches of more than one call, for tests and the benchmark
        self.calls = 0

    async def call(self, kind: Kind, args: tuple[Any, ...], order: tuple[str, ...] = ()) -> Any:
        """Run one call of ``kind`` in the next batch and return its row."""
        call = _Call(args, order)
        self._pending.setdefault(kind.name, (kind, []))[1].append(call)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._drain(), name="ledger-batches")
        return await call.future

    async def _drain(self) -> None:
        while self._pending:
            name = next(iter(self._pending))  # the kind waiting longest
            kind, calls = self._pending[name]
            batch, rest = calls[: self._max_batch], calls[self._max_batch :]
            if rest:
                del self._pending[name]
                self._pending[name] = (kind, rest)  # behind the other kinds now
            else:
                del self._pending[name]
            await self._run(kind, batch)

    async def _run(self, kind: Kind, batch: list[_Call]) -> None:
        self.calls += len(batch)
        if len(batch) == 1:
            await self._one(kind, batch[0])
            return
        self.batches += 1
        batch.sort(key=lambda c: c.order)
        columns = [list(column) for column in zip(*(c.args for c in batch), strict=True)]
        try:
            rows = await self._fetch(kind.many, *columns)
        except LedgerUnavailable as exc:
            if isinstance(exc.__cause__, asyncpg.PostgresError) and not isinstance(
                exc.__cause__, _WHOLE_BATCH
            ):
                log.info(
                    "a batch of %d %s calls was refused as a whole (%s); running them one by one",
                    len(batch),
                    kind.name,
                    type(exc.__cause__).__name__,
                )
                for call in batch:
                    await self._one(kind, call)
                return
            for call in batch:
                _fail(call, exc)
            return
        except BaseException as exc:  # never leave a caller waiting forever
            for call in batch:
                _fail(call, exc)
            raise
        for call, row in zip(batch, rows, strict=True):
            if not call.future.done():
                call.future.set_result(row)

    async def _one(self, kind: Kind, call: _Call) -> None:
        try:
            rows = await self._fetch(kind.single, *call.args)
        except BaseException as exc:
            _fail(call, exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not call.future.done():
            call.future.set_result(rows[0])


def _fail(call: _Call, exc: BaseException) -> None:
    if call.future.done():
        return
    if isinstance(exc, LedgerUnavailable):
        # Each caller raises its own exception object (one traceback each).
        copy = LedgerUnavailable(exc.detail)
        copy.__cause__ = exc.__cause__
        exc = copy
    call.future.set_exception(exc)


def many(function: str, array_types: Sequence[str], arguments: Sequence[str]) -> str:
    """The query running ``function`` once per row of the argument arrays, in their order:
    ``arguments`` are SQL expressions over the unnested columns ``a1``, ``a2``, ..."""
    n = len(array_types)
    params = ", ".join(f"${i}::{t}" for i, t in enumerate(array_types, 1))
    names = ", ".join(f"a{i}" for i in range(1, n + 1))
    return (
        f"SELECT f.* FROM unnest({params}) WITH ORDINALITY AS u({names}, ord) "
        f"CROSS JOIN LATERAL {function}({', '.join(arguments)}) f ORDER BY u.ord"
    )
