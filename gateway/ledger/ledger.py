"""The ledger's one seam to PostgreSQL (asyncpg).

Every operation is one round trip to one server-side function in ``sql/functions.sql``.
Driver and server failures are translated here into ``LedgerUnavailable``; refusals that
are part of the ledger's contract (already settled, over the held amount, ...) into
``LedgerError`` with a stable ``reason``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Literal

import asyncpg

from gateway.errors import LedgerError, LedgerUnavailable

log = logging.getLogger("gateway.ledger")

Clock = Callable[[], datetime]
ReserveStatus = Literal[
    "ok",
    "duplicate",
    "unknown_organization",
    "plan_forbidden",
    "insufficient",
    "license_suspended",
    "feature_degraded",
    "quota_exceeded",
]
LicenseState = Literal["active", "past_due", "suspended", "canceled"]

# Errors that mean "the ledger cannot answer now", as opposed to a refusal.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Connections go back to the pool as they are: the ledger keeps no session state (its
    advisory locks are transaction-scoped and its settings are fixed at connect), so
    asyncpg's default reset would only cost one more round trip per operation."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def _sql(name: str) -> str:
    return resources.files("gateway.ledger").joinpath("sql", name).read_text()


@dataclass(frozen=True)
class ReserveOutcome:
    status: ReserveStatus
    reservation_id: uuid.UUID | None
    from_allowance: int
    from_purchased: int
    allowance: int  # available after the reservation
    purchased: int
    plan: str | None
    period_end: datetime | None
    allocated: int
    license_date: datetime | None  # when the license gate closed (or closes) this
    detail: str | None  # JSON: the quota that refused it

    @property
    def remaining(self) -> int:
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Settlement:
    charged: int
    allowance: int
    purchased: int
    token_type: str
    org_id: str
    allocated: int
    period_start: datetime | None

    @property
    def remaining(self) -> int:
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Account:
    org_id: str
    token_type: str
    allowance: int
    purchased: int
    reserved: int
    allocated: int
    period_start: datetime
    period_end: datetime
    last_used_at: datetime | None

    @property
    def available(self) -> int:
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Reservation:
    id: uuid.UUID
    org_id: str
    token_type: str
    amount: int
    state: str
    charged: int | None
    route: str | None
    user_id: str | None
    created_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


class Ledger:
    """Balances, reservations and the journal. Safe to share between tasks; any number of
    gateway processes may use one database at once."""

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
    ) -> Ledger:
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

    # -- plumbing -------------------------------------------------------------------

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

    # -- schema ---------------------------------------------------------------------

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
                await conn.execute(_sql("functions.sql"))
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

    # -- the request path -------------------------------------------------------------

    async def reserve(
        self,
        org: str,
        token_type: str,
        amount: int,
        *,
        ttl_seconds: float,
        plans: Sequence[str] | None = None,
        route: str | None = None,
        user: str | None = None,
        request_id: str | None = None,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        grace_days: int = 14,
        degrade_after_days: int | None = None,
    ) -> ReserveOutcome:
        """Hold ``amount`` tokens (allowance first) until commit, refund or expiry after
        ``ttl_seconds``. Refusals come back as a status, never as an exception."""
        row = await self._fetchrow(
            "SELECT * FROM gw_reserve($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb,"
            " $12, $13)",
            org,
            token_type,
            amount,
            list(plans) if plans is not None else None,
            route,
            user,
            request_id,
            idempotency_key,
            ttl_seconds,
            self.clock(),
            json.dumps(metadata) if metadata is not None else None,
            grace_days,
            degrade_after_days,
        )
        return ReserveOutcome(**dict(row))

    async def commit(
        self, reservation_id: uuid.UUID, charged: int | None = None, *, actor: str = "gateway"
    ) -> Settlement:
        """Charge ``charged`` (default: the whole amount) and release the rest. Raises
        ``LedgerError`` if the reservation is unknown, already resolved, or ``charged`` is
        negative or above the held amount."""
        return await self._settle(reservation_id, "commit", charged, actor, None)

    async def refund(
        self, reservation_id: uuid.UUID, *, reason: str, actor: str = "gateway"
    ) -> Settlement:
        """Release everything held. Raises ``LedgerError`` as ``commit`` does."""
        return await self._settle(reservation_id, "refund", 0, actor, reason)

    async def _settle(
        self,
        reservation_id: uuid.UUID,
        outcome: str,
        charged: int | None,
        actor: str,
        reason: str | None,
    ) -> Settlement:
        row = await self._fetchrow(
            "SELECT * FROM gw_settle($1, $2, $3, $4, $5, $6)",
            reservation_id,
            outcome,
            charged,
            self.clock(),
            actor,
            reason,
        )
        status = row["status"]
        if status != "ok":
            messages = {
                "not_found": f"reservation {reservation_id} does not exist",
                "exceeds_amount": f"reservation {reservation_id}: cannot charge {charged}, "
                "more than the held amount or negative",
            }
            message = messages.get(status, f"reservation {reservation_id} is {status[8:]}")
            raise LedgerError(status, message)
        return Settlement(
            charged=row["charged"],
            allowance=row["allowance"],
            purchased=row["purchased"],
            token_type=row["token_type"],
            org_id=row["org_id"],
            allocated=row["allocated"],
            period_start=row["period_start"],
        )

    async def record_shadow(
        self,
        org: str,
        token_type: str,
        amount: int,
        *,
        charged: int,
        plans: Sequence[str] | None = None,
        route: str | None = None,
        user: str | None = None,
        request_id: str | None = None,
        journal: bool = True,
    ) -> str:
        """Journal a shadow-mode request (moving nothing) and return what a reserve of
        ``amount`` would have answered: ok, unknown_organization, plan_forbidden or
        insufficient. With ``journal=False`` only answer."""
        return str(
            await self._fetchval(
                "SELECT gw_shadow($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                org,
                token_type,
                amount,
                charged,
                list(plans) if plans is not None else None,
                route,
                user,
                request_id,
                self.clock(),
                journal,
            )
        )

    # -- maintenance ------------------------------------------------------------------

    async def expire_overdue(self, limit: int = 500) -> int:
        """Refund reservations held past their expiry. Returns how many were expired."""
        rows = await self._fetch("SELECT * FROM gw_expire_overdue($1, $2)", self.clock(), limit)
        return sum(int(r["reservations"]) for r in rows)

    async def expire_overdue_by_type(self, limit: int = 500) -> dict[str, int]:
        """Like ``expire_overdue``; returns the tokens released per token type."""
        rows = await self._fetch("SELECT * FROM gw_expire_overdue($1, $2)", self.clock(), limit)
        return {str(r["token_type"]): int(r["tokens"]) for r in rows}

    async def refresh_overdue(self, limit: int = 500) -> int:
        """Start the new period of accounts whose period has ended."""
        return int(await self._fetchval("SELECT gw_refresh_overdue($1, $2)", self.clock(), limit))

    # -- organizations and balances ------------------------------------------------------

    async def create_org(self, org: str, plan: str) -> None:
        """Raises ``LedgerError`` with reason ``exists`` or ``unknown_plan``."""
        status = await self._fetchval("SELECT gw_create_org($1, $2, $3)", org, plan, self.clock())
        if status == "exists":
            raise LedgerError("exists", f"organization '{org}' already exists")
        if status == "unknown_plan":
            raise LedgerError("unknown_plan", f"plan '{plan}' is not in rules.yaml")

    async def set_plan(self, org: str, plan: str, *, actor: str = "operator") -> bool:
        """Move ``org`` to ``plan`` now, re-basing this period's allowance in full. Returns
        False if it was already on it. Raises ``LedgerError`` (``unknown_organization``,
        ``unknown_plan``)."""
        status = await self._fetchval(
            "SELECT gw_set_plan($1, $2, $3, $4)", org, plan, self.clock(), actor
        )
        if status == "not_found":
            raise LedgerError("unknown_organization", f"organization '{org}' does not exist")
        if status == "unknown_plan":
            raise LedgerError("unknown_plan", f"plan '{plan}' is not in rules.yaml")
        return bool(status == "ok")

    async def set_license(self, org: str, state: LicenseState, *, actor: str) -> bool:
        """Set the organization's license state (past_due starts its grace period). Returns
        False if it was already so. Raises ``LedgerError`` (``unknown_organization``)."""
        status = await self._fetchval(
            "SELECT gw_set_license($1, $2, $3, $4)", org, state, actor, self.clock()
        )
        if status == "not_found":
            raise LedgerError("unknown_organization", f"organization '{org}' does not exist")
        return bool(status == "ok")

    async def set_quota(
        self, org: str, subject: str, token_type: str, amount: int | None, *, actor: str
    ) -> None:
        """Set (or, with ``amount`` None, clear) the quota of ``subject``: ``user:<id>`` or
        ``team:<name>``. Raises ``LedgerError`` (``unknown_organization``)."""
        status = await self._fetchval(
            "SELECT gw_set_quota($1, $2, $3, $4, $5, $6)",
            org,
            subject,
            token_type,
            amount,
            actor,
            self.clock(),
        )
        if status == "unknown_organization":
            raise LedgerError(status, f"organization '{org}' does not exist")

    async def set_team(self, org: str, team: str, users: Sequence[str], *, actor: str) -> None:
        """Make the team's members exactly ``users``."""
        status = await self._fetchval(
            "SELECT gw_set_team($1, $2, $3, $4, $5)", org, team, list(users), actor, self.clock()
        )
        if status == "unknown_organization":
            raise LedgerError(status, f"organization '{org}' does not exist")

    async def stripe_apply(
        self,
        event_id: str,
        event_type: str,
        *,
        org: str | None,
        customer: str | None,
        action: Literal["purchase", "license", "plan", "cancel"],
        event_at: datetime,
        token_type: str | None = None,
        amount: int | None = None,
        state: str | None = None,
        plan: str | None = None,
    ) -> str:
        """Apply one Stripe event exactly once (see gw_stripe_apply). Returns ok, duplicate,
        stale, unknown_organization or unknown_plan."""
        return str(
            await self._fetchval(
                "SELECT gw_stripe_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                event_id,
                event_type,
                org,
                customer,
                action,
                token_type,
                amount,
                state,
                plan,
                event_at,
                self.clock(),
            )
        )

    async def grant(
        self,
        org: str,
        token_type: str,
        amount: int,
        *,
        bucket: Literal["purchased", "allowance"] = "purchased",
        kind: Literal["grant", "purchase", "adjust"] = "grant",
        actor: str = "operator",
        reason: str | None = None,
    ) -> Account:
        """Add tokens to one bucket (``adjust`` may also remove them). Raises ``LedgerError``
        (``unknown_organization``; ``insufficient`` when an adjustment would go negative;
        ``invalid_amount``)."""
        if amount == 0 or (amount < 0 and kind != "adjust"):
            raise LedgerError("invalid_amount", f"cannot {kind} {amount} tokens")
        row = await self._fetchrow(
            "SELECT * FROM gw_grant($1, $2, $3, $4, $5, $6, $7, $8)",
            org,
            token_type,
            amount,
            bucket,
            kind,
            actor,
            reason,
            self.clock(),
        )
        if row["status"] == "unknown_organization":
            raise LedgerError("unknown_organization", f"organization '{org}' does not exist")
        if row["status"] == "insufficient":
            raise LedgerError(
                "insufficient",
                f"organization '{org}' has only {row['allowance']} allowance and "
                f"{row['purchased']} purchased {token_type} tokens",
            )
        return next(a for a in await self.balances(org) if a.token_type == token_type)

    async def organization(self, org: str) -> dict[str, Any] | None:
        row = await self._fetch("SELECT * FROM organizations WHERE id = $1", org)
        return dict(row[0]) if row else None

    async def balances(self, org: str) -> list[Account]:
        """The organization's accounts, refreshed to now. Raises ``LedgerError``
        (``unknown_organization``)."""
        if await self.organization(org) is None:
            raise LedgerError("unknown_organization", f"organization '{org}' does not exist")
        rows = await self._fetch("SELECT * FROM gw_balances($1, $2)", org, self.clock())
        return [Account(**dict(r)) for r in rows]

    async def reservation(self, reservation_id: uuid.UUID) -> Reservation | None:
        rows = await self._fetch(
            "SELECT id, org_id, token_type, amount, state, charged, route, user_id,"
            " created_at, expires_at FROM reservations WHERE id = $1",
            reservation_id,
        )
        return Reservation(**dict(rows[0])) if rows else None

    async def journal(
        self, org: str, *, limit: int = 100, before: int | None = None
    ) -> list[dict[str, Any]]:
        """The organization's journal, newest first; page with ``before`` (an entry id)."""
        rows = await self._fetch(
            "SELECT * FROM journal WHERE org_id = $1 AND ($3::bigint IS NULL OR id < $3)"
            " ORDER BY id DESC LIMIT $2",
            org,
            limit,
            before,
        )
        return [dict(r) for r in rows]

    async def held_reservations(self, org: str, *, limit: int = 500) -> list[Reservation]:
        rows = await self._fetch(
            "SELECT id, org_id, token_type, amount, state, charged, route, user_id,"
            " created_at, expires_at FROM reservations WHERE org_id = $1 AND state = 'held'"
            " ORDER BY created_at LIMIT $2",
            org,
            limit,
        )
        return [Reservation(**dict(r)) for r in rows]

    async def refund_charge(self, reservation_id: uuid.UUID, *, actor: str, reason: str) -> None:
        """Give back a committed reservation's charge, once (an ``adjust`` entry). Raises
        ``LedgerError`` (``not_found``, ``not_committed``, ``already_refunded``,
        ``nothing_charged``)."""
        status = await self._fetchval(
            "SELECT gw_refund_charge($1, $2, $3, $4)", reservation_id, actor, reason, self.clock()
        )
        if status != "ok":
            raise LedgerError(
                str(status), f"reservation {reservation_id}: {status.replace('_', ' ')}"
            )

    async def record_admin(self, org: str, actor: str, action: str, detail: dict[str, Any]) -> None:
        await self._fetch(
            "INSERT INTO admin_actions (at, org_id, actor, action, detail)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            self.clock(),
            org,
            actor,
            action,
            json.dumps(detail),
        )

    async def usage(self, org: str, *, since: datetime, burn_since: datetime) -> dict[str, Any]:
        """Committed use since ``since`` per token type, feature (route), user and day, and
        per token type since ``burn_since``; one indexed query."""
        raw = await self._fetchval(
            "SELECT gw_usage($1, $2, $3, $4)", org, since, burn_since, self.clock()
        )
        data: dict[str, Any] = json.loads(raw)
        return data

    async def threshold_crossed(
        self, org: str, token_type: str, period_start: datetime, threshold: float
    ) -> bool:
        """True the first time ``org`` is recorded past ``threshold`` in this period."""
        return bool(
            await self._fetchval(
                "SELECT gw_threshold_crossed($1, $2, $3, $4, $5)",
                org,
                token_type,
                period_start,
                threshold,
                self.clock(),
            )
        )

    async def dead_letter(self, url: str, body: dict[str, Any], attempts: int, error: str) -> None:
        await self._fetch(
            "INSERT INTO webhook_dead_letters (at, url, body, attempts, error)"
            " VALUES ($1, $2, $3::jsonb, $4, $5)",
            self.clock(),
            url,
            json.dumps(body),
            attempts,
            error,
        )

    async def audit(self) -> list[Violation]:
        """Check every invariant of the ledger; an empty list means it adds up."""
        rows = await self._fetch(_sql("audit.sql"))
        return [Violation(r["invariant"], r["detail"]) for r in rows]

    async def ping(self) -> None:
        await self._fetchval("SELECT 1")


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
