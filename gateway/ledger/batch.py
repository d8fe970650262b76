"""Group commit: concurrent reserves (and settlements) share one round trip and one
transaction.

A call made while a batch of its kind is in flight waits for the next one, which takes
every call of that kind that arrived meanwhile; a call made when none is in flight goes
after one turn of the event loop, with the calls made in that turn (alone if none was: at
concurrency 1 nothing waits for a timer or for another call). A call that nobody waits
for (the commit of an answer already delivered) may ``linger``: it goes when it has waited
that long, or with the first call that may not wait, or once ``LINGERING_BATCH`` calls
wait, so that such calls share fewer, larger transactions. A batch is one call of a
set-based server-side function (``gw_reserve_many``, ``gw_settle_many`` in
``sql/batch.sql``) that gives each call the answer and the rows its single function
(``gw_reserve``, ``gw_settle``) would, while locking and writing each account once per
batch. Nobody's future resolves before the batch's transaction has committed: a
reservation is durable before anything is forwarded.

A reserve batch and a settle batch may be in flight at once (on two connections): one
prepares its rows while the other waits for its WAL flush. Both lock accounts in one order
(sorted by organization and token type) and a settle batch locks its reservations before
any account, so they never deadlock each other; a batch the server refuses as a whole (a
deadlock with another process, one call's own error) is run again call by call, so one
call's failure is never another's.
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

MAX_BATCH = 128
# Calls that linger go when this many wait, whatever their linger: a batch's answers wake
# all of its callers in one turn of the event loop, which holds up every other request
# meanwhile (at one connection, batches of about 20 lingering commits added about half a
# millisecond to the 99th percentile of the latency; batches of 8 kept most of the gain).
LINGERING_BATCH = 8

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
    due: float  # loop time: it goes with the first batch from then (its linger's end)
    future: asyncio.Future[asyncpg.Record] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Coalescer:
    """Batches calls of each ``Kind``; one batch of each kind in flight at a time."""

    def __init__(
        self, fetch: Fetch, *, max_batch: int = MAX_BATCH, lingering_batch: int = LINGERING_BATCH
    ) -> None:
        self._fetch = fetch
        self._max_batch = max_batch
        self._lingering_batch = min(lingering_batch, max_batch)
        self._pending: dict[str, list[_Call]] = {}
        self._busy: set[str] = set()  # kinds with a call or a batch in flight
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._lingering: dict[str, asyncio.Future[None]] = {}  # set: the batch goes now
        # For tests and the benchmark: batches of more than one call, calls that went
        # alone in their caller's task, and all calls.
        self.batches = 0
        self.alone = 0
        self.calls = 0

    async def call(
        self, kind: Kind, args: tuple[Any, ...], order: tuple[str, ...] = (), linger: float = 0
    ) -> Any:
        """Run one call of ``kind`` in the next batch of its kind and return its row. When
        none of its kind is in flight, the call waits one turn of the event loop (no timer:
        only the callbacks already due run) for the calls made in that same turn, and goes
        with them; alone, it goes in the caller's own task. With ``linger`` (seconds) it
        may wait that long for others to go with, until ``lingering_batch`` calls wait; a
        call without linger takes the waiting ones along at once."""
        loop = asyncio.get_running_loop()
        call = _Call(args, order, loop.time() + linger)
        pending = self._pending.setdefault(kind.name, [])
        pending.append(call)
        if kind.name in self._busy:
            lingering = self._lingering.get(kind.name)
            if lingering is not None and (not linger or len(pending) >= self._lingering_batch):
                _go(lingering)
            return await call.future
        if linger:
            self._busy.add(kind.name)
            self._next(kind)
            return await call.future
        # The turn. The answers of a batch wake all of its callers in one turn: without it
        # the first of them went alone (a round trip and a flush of its own) and the rest
        # waited behind it.
        self._busy.add(kind.name)
        try:
            await asyncio.sleep(0)
        except BaseException:  # cancelled: the calls that joined it go without it
            self._pending[kind.name].remove(call)
            self._next(kind)
            raise
        if len(self._pending[kind.name]) > 1:
            self._next(kind)
            return await call.future
        del self._pending[kind.name]
        self.calls += 1
        self.alone += 1
        try:
            return (await self._fetch(kind.single, *args))[0]
        finally:
            self._next(kind)

    def _next(self, kind: Kind) -> None:
        """After a call or batch: the calls that arrived meanwhile go as the next batch."""
        if self._pending.get(kind.name):
            self._runners[kind.name] = asyncio.create_task(
                self._drain(kind), name=f"ledger-batches-{kind.name}"
            )
        else:
            self._busy.discard(kind.name)

    async def _drain(self, kind: Kind) -> None:
        loop = asyncio.get_running_loop()
        try:
            while calls := self._pending.get(kind.name):
                wait = min(c.due for c in calls) - loop.time()
                if wait > 0 and len(calls) < self._lingering_batch:
                    # Every call waiting may linger: until the first of them has, unless
                    # a call that may not wait, or enough to go, come first (``call``).
                    lingering = self._lingering[kind.name] = loop.create_future()
                    timer = loop.call_later(wait, _go, lingering)
                    try:
                        await lingering
                    except BaseException:
                        # Cancelled (the loop is closing): no caller is left waiting forever.
                        for call in self._pending.pop(kind.name, []):
                            call.future.cancel()
                        raise
                    finally:
                        timer.cancel()
                        del self._lingering[kind.name]
                    continue
                del self._pending[kind.name]
                batch, rest = calls[: self._max_batch], calls[self._max_batch :]
                if rest:
                    self._pending[kind.name] = rest
                await self._run(kind, batch)
        finally:
            self._busy.discard(kind.name)

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


def _go(lingering: asyncio.Future[None]) -> None:
    """The lingering batch goes now (its timer, or a call that ends its wait)."""
    if not lingering.done():
        lingering.set_result(None)


def _fail(call: _Call, exc: BaseException) -> None:
    if call.future.done():
        return
    if isinstance(exc, LedgerUnavailable):
        # Each caller raises its own exception object (one traceback each).
        copy = LedgerUnavailable(exc.detail)
        copy.__cause__ = exc.__cause__
        exc = copy
    call.future.set_exception(exc)


def many(function: str, array_types: Sequence[str]) -> str:
    """The query calling ``function``, a set-based server-side function, with one array per
    argument (the calls' values, in the batch's order): it answers one row per call."""
    params = ", ".join(f"${i}::{t}" for i, t in enumerate(array_types, 1))
    return f"SELECT * FROM {function}({params})"
