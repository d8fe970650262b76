"""The ledger's one seam to PostgreSQL (asyncpg): the pool, the single point where driver
and server failures become ``LedgerUnavailable``, and the schema (migrations, then the
server-side functions in ``sql/*.sql``)."""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import Any, Self

import asyncpg

from gateway.errors import LedgerUnavailable
from gateway.ledger.records import Clock, utcnow

log = logging.getLogger("gateway.ledger")

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
    "organizations.sql",
    "usage.sql",
    "billing.sql",
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Connections go back to the pool as they are: the ledger keeps no session state (its
    advisory locks are transaction-scoped and its settings are fixed at connect), so
    asyncpg's default reset would only cost one more round trip per operation."""


def _sql(name: str) -> str:
    return resources.files("gateway.ledger").joinpath("sql", name).read_text()


class LedgerSeam:
    """The pool and the schema. Every query goes through ``_fetch``."""

    def __init__(self, pool: asyncpg.Pool, *, clock: Clock = utcnow, timeout: float = 5.0) -> None:
        self._pool = pool
        self.clock = clock
        self._timeout = timeout

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
    ) -> Self:
        """Open a connection pool. Raises ``LedgerUnavailable`` when the server cannot be
        reached within ``timeout`` seconds."""
        settings = {"timezone": "UTC", "application_name": "metering-gateway"}
        if schema is not None:
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
            )
        except (*_UNAVAILABLE, ValueError) as exc:
            raise LedgerUnavailable(f"cannot connect to PostgreSQL: {exc}") from exc
        return cls(pool, clock=clock, timeout=timeout)

    async def close(self) -> None:
        await self._pool.close()

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                return list(await conn.fetch(query, *args, timeout=self._timeout))
        except _UNAVAILABLE as exc:
            log.error("ledger unavailable: %s: %s", type(exc).__name__, exc)
            raise LedgerUnavailable(
                "the ledger is unavailable; nothing was forwarded or charged"
            ) from exc

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
                        await conn.execute(text)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version) VALUES ($1)", name
                        )
                        applied_now.append(name)
                for name in FUNCTION_FILES:
                    await conn.execute(_sql(name))
        except _UNAVAILABLE as exc:
            raise LedgerUnavailable(f"migration failed: {exc}") from exc
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
            raise LedgerUnavailable(f"cannot sync plans: {exc}") from exc


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
