"""The ledger's one seam to PostgreSQL (asyncpg): the pool, the single point where driver
and server failures become ``LedgerUnavailable``, and the schema (migrations, then the
server-side functions in ``sql/*.sql``).

Behind a transaction pooler (PgBouncer's ``pool_mode = transaction``), consecutive
statements of one client connection may run on different server connections, so the
ledger relies on nothing that outlives a transaction. Every operation is one statement
(its own implicit transaction) or one explicit transaction; its advisory locks are
transaction-scoped (``pg_advisory_xact_lock``; a session lock would stay on whichever
server connection took it); ``connect`` with ``pooler=True`` turns off asyncpg's named
prepared statements and leaves the schema to the server (see ``connect``)."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any, Self

import asyncpg

from gateway.errors import LedgerUnavailable
from gateway.ledger.records import Clock, utcnow

log = logging.getLogger("gateway.ledger")

MIGRATION_TIMEOUT = 6 * 3600.0  # seconds
# A statement that reads a month or more of the journal (the archive's, the audit's): far
# beyond the request path's timeout, the more so on a busy server.
JOURNAL_STATEMENT_TIMEOUT = 3600.0  # seconds

# Errors that mean "the ledger cannot answer now", as opposed to a refusal.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

# The files of server-side functions, by area, in the order migrate applies them: periods
# first, since the others call gw_touch_account and gw_account_view.
FUNCTION_FILES = (
    "periods.sql",
    "gate_reserve.sql",
    "settle_sweep.sql",
    "batch.sql",
    "organizations.sql",
    "usage.sql",
    "billing.sql",
)


# asyncpg's own default: named prepared statements, one per distinct query and connection.
_STATEMENT_CACHE_SIZE = 100

# PgBouncer's answer when its max_client_conn is reached (SQLSTATE 08P01, as for any error
# of its own).
_PGBOUNCER_FULL = "no more connections allowed"
# PostgreSQL's words when it refuses a connection for want of a slot (SQLSTATE 53300), which
# PgBouncer passes on under 08P01 when it cannot open a server connection at all.
_SERVER_FULL = (
    "too many clients already",
    "too many connections for",
    "remaining connection slots are reserved",
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Connections go back to the pool as they are: the ledger keeps no session state (its
    advisory locks are transaction-scoped and its settings are fixed at connect), so
    asyncpg's default reset would only cost one more round trip per operation (and behind
    a transaction pooler would reset some other client's server connection)."""


def refusal(exc: BaseException | None, pool_max: int) -> str | None:
    """When ``exc`` is PostgreSQL or PgBouncer refusing a connection for want of a free
    slot: who refused, what it said, and how to size the pools (``pool_max`` being the
    connections one gateway process may hold). None for any other failure."""
    if not isinstance(exc, asyncpg.PostgresError):
        return None
    pools = (
        f"every gateway process may hold GATEWAY_DB_POOL_MAX ({pool_max}) connections, so "
        "workers x replicas x GATEWAY_DB_POOL_MAX must stay under"
    )
    server = (
        "the server's max_connections less its reserved slots (and under the role's or "
        "database's CONNECTION LIMIT)"
    )
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return (
            f"PostgreSQL refused a connection ({exc}): {pools} {server}; lower "
            "GATEWAY_DB_POOL_MAX, raise the limit, or put PgBouncer in front"
        )
    if _PGBOUNCER_FULL in str(exc):
        return (
            f"PgBouncer refused a connection ({exc}): {pools} PgBouncer's max_client_conn; "
            "lower GATEWAY_DB_POOL_MAX or raise max_client_conn"
        )
    if any(words in str(exc) for words in _SERVER_FULL):
        # PgBouncer queues its clients while it has server connections: this is none.
        return (
            f"PgBouncer could not open a server connection, PostgreSQL refused it ({exc}): "
            "PgBouncer's server connections (default_pool_size per database and user, or "
            f"max_db_connections) must stay under {server}"
        )
    return None


def _sql(name: str) -> str:
    return resources.files("gateway.ledger").joinpath("sql", name).read_text()


class LedgerSeam:
    """The pool and the schema. Every query goes through ``_fetch``."""

    def __init__(self, pool: asyncpg.Pool, *, clock: Clock = utcnow, timeout: float = 5.0) -> None:
        self._pool = pool
        self.clock = clock
        self._timeout = timeout
        self._session_args: tuple[str, dict[str, str], float] | None = None
        self._releasing: set[asyncio.Future[None]] = set()

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        schema: str | None = None,
        clock: Clock = utcnow,
        min_size: int = 2,
        max_size: int = 20,
        timeout: float = 5.0,  # noqa: ASYNC109 - passed on to asyncpg as its timeouts
        pooler: bool = False,
    ) -> Self:
        """Open a pool of ``min_size`` to ``max_size`` connections, in ``schema`` (else the
        server's search_path) and time zone UTC.

        With ``pooler``, ``dsn`` is a transaction pooler (PgBouncer) in front of PostgreSQL,
        which keeps per client only the parameters it tracks (time zone and application
        name among them, search_path not): queries then go as unnamed statements, parsed
        again with each execution, which any pooler passes in one piece; and the schema is
        the role's own search_path on the server, which must name ``schema`` first.

        Raises ``LedgerUnavailable`` when the server cannot be reached within ``timeout``
        seconds, when it (or the pooler) refuses connections for want of slots, saying how
        to size the pools, and with ``pooler``, when the server's connections are not in
        ``schema`` and UTC, saying how to make them so."""
        settings = {"timezone": "UTC", "application_name": "metering-gateway"}
        if schema is not None and not pooler:
            settings["search_path"] = schema
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                command_timeout=timeout,
                server_settings=settings,
                reset=_keep_session,
                # asyncpg's named statements live on the server connection that parsed
                # them, which a transaction pooler does not keep for us. Without its cache,
                # asyncpg sends Parse with each Bind and Execute: one more parse per query,
                # and no reliance on PgBouncer's max_prepared_statements (1.21 and later).
                statement_cache_size=0 if pooler else _STATEMENT_CACHE_SIZE,
            )
        except (*_UNAVAILABLE, ValueError) as exc:
            raise LedgerUnavailable(
                refusal(exc, max_size) or f"cannot connect to PostgreSQL: {exc}"
            ) from exc
        seam = cls(pool, clock=clock, timeout=timeout)
        seam._session_args = (dsn, settings, timeout)
        if pooler:
            try:
                await seam._check_pooled_session(schema)
            except BaseException:
                await pool.close()
                raise
        return seam

    async def open_session(self, application_name: str) -> asyncpg.Connection:
        """A connection of its own, outside the pool, to the pool's server, as its user, in
        its schema and time zone, named ``application_name``: for session state the pool
        must not carry (the sweeper's election lock). The caller closes it."""
        if self._session_args is None:
            raise LedgerUnavailable("this ledger was not opened with connect()")
        dsn, settings, timeout = self._session_args
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                dsn,
                timeout=timeout,
                command_timeout=timeout,
                server_settings={**settings, "application_name": application_name},
            )
        except (*_UNAVAILABLE, ValueError) as exc:
            raise LedgerUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return conn

    async def _check_pooled_session(self, schema: str | None) -> None:
        """Behind a pooler, the session settings are the server's: check the ones the
        ledger depends on (its schema; UTC, in which periods are computed)."""
        row = await self._fetchrow(
            "SELECT current_schema() AS schema, current_setting('TimeZone') AS timezone,"
            " format('ALTER ROLE %I SET search_path = %s', current_user, quote_ident($1)) AS fix",
            schema,
        )
        if schema is not None and row["schema"] != schema:
            found = f"'{row['schema']}'" if row["schema"] else "no existing schema"
            raise LedgerUnavailable(
                f"behind a pooler, the ledger's schema '{schema}' must come from the "
                f"server, and its connections' search_path puts {found} first: run "
                f"{row['fix']}, then have the pooler open new server connections "
                "(PgBouncer: RECONNECT on its admin console), or set GATEWAY_DB_SCHEMA to "
                "the schema in use"
            )
        if row["timezone"] != "UTC":
            raise LedgerUnavailable(
                f"the pooler's connections are in time zone '{row['timezone']}', not UTC: it "
                "drops the gateway's timezone parameter (PgBouncer keeps it unless "
                "ignore_startup_parameters lists it)"
            )

    async def close(self) -> None:
        if self._releasing:
            await asyncio.wait(self._releasing)
        await self._pool.close()

    def _release(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        """Give ``conn`` back to the pool without waiting for it. asyncpg releases in a task
        of its own (shielded from cancellation) and its caller waits for that task: one
        more turn of the event loop per query before the caller has its rows, and under
        load a turn is milliseconds (about 3 ms a query under 400 streams)."""
        task = asyncio.ensure_future(self._pool.release(conn))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # asyncpg has closed the connection; the pool opens another when needed.
            log.warning("could not return a connection to the pool: %s", exc)

    async def _fetch(
        self,
        query: str,
        *args: Any,
        timeout: float | None = None,  # noqa: ASYNC109 - the statement's own, for asyncpg
    ) -> list[asyncpg.Record]:
        """``query``'s rows, within ``timeout`` seconds (default: the request path's)."""
        try:
            conn = await self._pool.acquire(timeout=self._timeout)
            try:
                return list(await conn.fetch(query, *args, timeout=timeout or self._timeout))
            finally:
                self._release(conn)
        except _UNAVAILABLE as exc:
            log.error(
                "ledger unavailable: %s", self._refusal(exc) or f"{type(exc).__name__}: {exc}"
            )
            raise LedgerUnavailable(
                "the ledger is unavailable; nothing was forwarded or charged"
            ) from exc

    def _refusal(self, exc: BaseException) -> str | None:
        return refusal(exc, self._pool.get_max_size())

    async def _fetchrow(self, query: str, *args: Any) -> asyncpg.Record:
        rows = await self._fetch(query, *args)
        return rows[0]

    async def _fetchval(self, query: str, *args: Any) -> Any:
        return (await self._fetchrow(query, *args))[0]

    async def ping(self) -> None:
        await self._fetchval("SELECT 1")

    async def migrate(self) -> list[str]:
        """Apply pending migrations and (re)create the ledger's functions. Safe to run from
        several processes at once. Returns the migrations applied now."""
        migrations = sorted(
            (f.name, f.read_text())
            for f in resources.files("gateway.ledger").joinpath("sql", "migrations").iterdir()
            if f.name.endswith(".sql")
        )
        applied_now: list[str] = []
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                # Replicas starting together migrate one at a time.
                await conn.execute(
                    "SELECT pg_advisory_xact_lock("
                    "hashtext('metering-gateway:' || current_schema()))"
                )
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {
                    r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")
                }
                for name, text in migrations:
                    if name not in done:
                        # A migration may rewrite a large table (012 partitions the
                        # journal): not bounded by the request path's statement timeout.
                        await conn.execute(text, timeout=MIGRATION_TIMEOUT)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)", name
                        )
                        applied_now.append(name)
                for name in FUNCTION_FILES:
                    await conn.execute(_sql(name))
        except _UNAVAILABLE as exc:
            raise LedgerUnavailable(f"migration failed: {self._refusal(exc) or exc}") from exc
        return applied_now

    async def sync_plans(self, plans: dict[str, tuple[str, dict[str, int]]]) -> None:
        """Make the plans table match rules.yaml: {plan: (period, {token_type: allowance})}.
        New allowances take effect at each account's next period."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
                await conn.execute("LOCK TABLE plans IN EXCLUSIVE MODE")
                await conn.execute(
                    "DELETE FROM plans WHERE NOT (name = ANY($1::text[]))", list(plans)
                )
                await conn.executemany(
                    "INSERT INTO plans (name, period) VALUES ($1, $2)"
                    " ON CONFLICT (name) DO UPDATE SET period = EXCLUDED.period",
                    [(name, period) for name, (period, _) in plans.items()],
                )
                await conn.execute("DELETE FROM plan_allowances")
                await conn.executemany(
                    "INSERT INTO plan_allowances (plan, token_type, amount) VALUES ($1, $2, $3)",
                    [
                        (name, tt, amount)
                        for name, (_, allowance) in plans.items()
                        for tt, amount in allowance.items()
                    ],
                )
        except _UNAVAILABLE as exc:
            raise LedgerUnavailable(f"cannot sync plans: {self._refusal(exc) or exc}") from exc


async def wait_for_ledger(dsn: str, *, attempts: int = 30, delay: float = 0.5) -> None:
    """Wait until PostgreSQL accepts connections (used right after starting it)."""
    last: BaseException | None = None
    for _ in range(attempts):
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
            await conn.close()
            return
        except (*_UNAVAILABLE, ValueError) as exc:
            last = exc
            await asyncio.sleep(delay)
    raise LedgerUnavailable(f"PostgreSQL did not come up: {last}")
