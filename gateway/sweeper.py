"""The ledger's sweeper: every ``ledger.sweep_interval_seconds`` it expires reservations held
past their expiry (their gateway died mid-request), refunding them, and starts the new
period of accounts nobody has used since theirs ended.

One process sweeps at a time. Every gateway process (each worker of each replica) runs a
``Sweeper``, and they elect one through a PostgreSQL session-level advisory lock, one per
schema, taken with ``pg_try_advisory_lock`` on a connection of the sweeper's own and held
for as long as it leads. Not a pooled connection: those go back to the pool as they are
(``ledger.seam._keep_session``), so a lock taken on one would outlive the sweeper that
took it. The others try again every interval. The lock is the session's: when the leader
stops, dies or loses its connection, PostgreSQL releases it, and another process takes
over at its next try, within one interval. The sweep itself goes through the ledger's
pool like any other ledger call.

Session locks need a session of one's own. Behind a pooler in transaction mode (PgBouncer
``pool_mode = transaction``) the lock is taken on whichever server connection runs the
statement and stays there. With such a pooler (``GATEWAY_DB_POOLER`` set) the sweeper is
``shared`` (``GATEWAY_SWEEPER=shared``): every process sweeps, and ``FOR UPDATE SKIP
LOCKED`` in the sweep's SQL hands each row to one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Literal

import asyncpg
from prometheus_client import Gauge

from gateway.errors import ConfigError, LedgerUnavailable
from gateway.ledger import Ledger
from gateway.ledger.archive import JournalArchive
from gateway.metrics import Metrics

log = logging.getLogger("gateway.sweeper")

Mode = Literal["leader", "shared"]
MODE_ENV = "GATEWAY_SWEEPER"
PARTITIONS_EVERY_SECONDS = 3600.0
# Names the transaction pooler between the gateway and PostgreSQL, if any (see Settings).
POOLER_ENV = "GATEWAY_DB_POOLER"

# Rows per sweep statement, and statements of each kind per round. There is one sweeper,
# not one per process, so it clears a backlog (a replica died with many requests in flight)
# in one round rather than 500 rows an interval; the bound keeps a round short.
BATCH = 500
MAX_BATCHES = 20

# The election lock. Its two-key form can never be the one-key lock migrate takes; its
# second key is the schema, so that gateways sharing a database in separate schemas (and
# tests running side by side) elect one sweeper each.
TRY_LEAD = (
    "SELECT pg_try_advisory_lock(hashtext('metering-gateway'),"
    " hashtext('sweeper:' || current_schema())) AS acquired, pg_backend_pid() AS pid"
)
SESSION_PID = "SELECT pg_backend_pid()"
# A leader whose host vanishes without closing its connection (power loss, partition)
# keeps the lock until PostgreSQL notices the peer is gone: by default after two hours of
# TCP silence, with these after about 25 seconds. Over a Unix socket they are ignored.
KEEPALIVES = (
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
)
APPLICATION_NAME = "metering-gateway sweeper"

# What a lost or unreachable session raises: it is dropped, and reopened next round.
_SESSION_ERRORS = (
    LedgerUnavailable,
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

Opener = Callable[[], Awaitable["asyncpg.Connection"]]


def sweeper_mode(environ: Mapping[str, str]) -> Mode:
    """``GATEWAY_SWEEPER``: ``leader`` or ``shared``; unset, ``shared`` behind a transaction
    pooler (``GATEWAY_DB_POOLER`` set) and ``leader`` otherwise. Raises ``ConfigError``
    naming the variable for anything else, and for ``leader`` behind a transaction
    pooler."""
    pooled = (environ.get(POOLER_ENV) or "none").strip().lower() != "none"
    raw = environ.get(MODE_ENV) or ""
    value = raw.strip().lower() or ("shared" if pooled else "leader")
    if value == "shared":
        return "shared"
    if value != "leader":
        raise ConfigError(MODE_ENV, [f"must be 'leader' or 'shared', got '{raw}'"])
    if pooled:
        raise ConfigError(
            MODE_ENV,
            [
                f"'leader' needs a PostgreSQL session of its own, which {POOLER_ENV}="
                f"{environ[POOLER_ENV]} (a transaction pooler) does not give; use 'shared'"
            ],
        )
    return "leader"


def session_opener(ledger: Ledger) -> Opener:
    """Opens connections as the ledger's pool opens its own (server, credentials, schema,
    time zone), named ``metering-gateway sweeper`` in ``pg_stat_activity``, with TCP
    keepalives so that a vanished leader's lock is freed within about 25 s."""

    async def open_session() -> asyncpg.Connection:
        conn = await ledger.open_session(APPLICATION_NAME)
        try:
            await conn.execute(KEEPALIVES)
        except BaseException:
            conn.terminate()
            raise
        return conn

    return open_session


class Sweeper:
    """Sweeps ``ledger`` every ``interval()`` seconds while this process is the sweeper:
    always with ``mode="shared"``; with ``mode="leader"``, while it holds its schema's
    sweeper lock. ``open_session`` opens the connection that holds the lock (default:
    ``session_opener(ledger)``). Registers ``gateway_sweeper_leader`` in ``metrics``, so
    one sweeper per ``Metrics``."""

    def __init__(
        self,
        ledger: Ledger,
        metrics: Metrics,
        *,
        interval: Callable[[], float],
        mode: Mode = "leader",
        open_session: Opener | None = None,
    ) -> None:
        self.mode = mode
        self._ledger = ledger
        self._partitions_due = 0.0  # loop time of the next partitions-ahead check
        self._metrics = metrics
        self._interval = interval
        self._open = open_session or session_opener(ledger)
        self._session: asyncpg.Connection | None = None
        self._pid: int | None = None  # the server process holding our lock
        self._reachable = True
        self._leading = False
        self._gauge = Gauge(
            "gateway_sweeper_leader",
            "1 while this process is the ledger sweeper (the elected one; every process "
            "with GATEWAY_SWEEPER=shared)",
            registry=metrics.registry,
            multiprocess_mode="livesum",
        )

    @property
    def leading(self) -> bool:
        """Whether this process sweeps now."""
        return self._leading

    async def run(self) -> None:
        """Stand for election at once, then each interval: keep or seek the role and sweep
        while holding it. Runs until cancelled; then closes its session, handing the role
        over."""
        try:
            if self.mode == "shared":
                self._become("every process sweeps (GATEWAY_SWEEPER=shared)")
            else:
                await self._elect()
            while True:
                await asyncio.sleep(self._interval())
                await self._elect()
                if self._leading:
                    await self.sweep()
        finally:
            await self._step_down("shutting down")

    async def sweep(self) -> None:
        """One round: expire overdue reservations and refresh ended periods, in batches, at
        most ``MAX_BATCHES`` of each. A ledger that cannot be reached is counted in
        ``gateway_store_errors_total{store="ledger"}`` and left to the next round."""
        expired: Counter[str] = Counter()
        refreshed = 0
        try:
            for _ in range(MAX_BATCHES):
                batch = await self._ledger.expire_overdue_by_type(BATCH)
                if not batch:
                    break
                for token_type, tokens in batch.items():
                    self._metrics.tokens.labels(token_type, "expired").inc(tokens)
                expired.update(batch)
            for _ in range(MAX_BATCHES):
                count = await self._ledger.refresh_overdue(BATCH)
                refreshed += count
                if count < BATCH:
                    break
        except LedgerUnavailable:
            self._metrics.store_errors.labels("ledger").inc()  # the ledger logged it
        if expired:
            log.warning(
                "expired unsettled reservations and refunded them: %s",
                ", ".join(f"{tokens} {tt} tokens" for tt, tokens in sorted(expired.items())),
            )
        if refreshed:
            log.info("started a new period for %d account(s)", refreshed)
        await self._partitions_ahead()

    async def _partitions_ahead(self) -> None:
        """Once an hour, the journal's monthly partitions for the months ahead (the default
        partition takes any row meanwhile, so a missed hour loses nothing)."""
        now = asyncio.get_running_loop().time()
        if now < self._partitions_due:
            return
        try:
            created = await JournalArchive.of(self._ledger).ensure_partitions()
        except LedgerUnavailable as exc:
            log.info("could not create the journal's partitions ahead now: %s", exc.detail)
            return
        self._partitions_due = now + PARTITIONS_EVERY_SECONDS
        if created:
            log.info("created %d monthly partition(s) of the journal ahead", created)

    async def _elect(self) -> None:
        if self.mode == "shared":
            return
        try:
            if self._session is None:
                self._session = await self._open()
            if self._leading:
                pid = await self._session.fetchval(SESSION_PID)
                if pid != self._pid:
                    log.error(
                        "the sweeper's PostgreSQL session moved from server process %s to %s: "
                        "its connection goes through a pooler in transaction mode, where "
                        "advisory locks do not hold; set GATEWAY_DB_POOLER=pgbouncer (or "
                        "GATEWAY_SWEEPER=shared)",
                        self._pid,
                        pid,
                    )
                    await self._step_down("its PostgreSQL session changed")
                return
            row = await self._session.fetchrow(TRY_LEAD)
        except _SESSION_ERRORS as exc:
            self._metrics.store_errors.labels("ledger").inc()
            if self._reachable:
                log.warning(
                    "sweeper election: lost or cannot open its PostgreSQL session (%s: %s); "
                    "trying again every interval",
                    type(exc).__name__,
                    exc,
                )
            self._reachable = False
            await self._step_down("it lost its PostgreSQL session")
            return
        self._reachable = True
        if row is not None and row["acquired"]:
            self._pid = row["pid"]
            self._become(f"holds the sweeper lock in PostgreSQL server process {self._pid}")

    def _become(self, how: str) -> None:
        self._leading = True
        self._gauge.set(1)
        log.info("this process is now the ledger sweeper: %s", how)

    async def _step_down(self, why: str) -> None:
        session, self._session = self._session, None
        if session is not None:
            # Ending the session releases the lock; no unlock needed.
            try:
                # A broken connection cannot say goodbye: dropping it is all that is left.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(session.close(), timeout=2)
            finally:
                if not session.is_closed():
                    session.terminate()
        if self._leading:
            self._leading = False
            self._gauge.set(0)
            log.info("this process is no longer the ledger sweeper: %s", why)
