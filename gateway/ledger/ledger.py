"""The ledger: the request path (gate, reserve, commit, refund, shadow), the sweepers and
the reports, on top of the seam (``seam.py``) and the organization operations
(``admin.py``).

Every operation is one round trip to one server-side function in ``sql/*.sql``. Driver
and server failures become ``LedgerUnavailable`` (in ``LedgerSeam._fetch``); refusals that
are part of the ledger's contract (already settled, over the held amount, ...) become
``LedgerError`` with a stable ``reason``; a gate's or a reserve's refusal is a status.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from gateway.errors import LedgerError
from gateway.ledger.admin import LedgerAdmin
from gateway.ledger.batch import Coalescer, Kind, many
from gateway.ledger.records import (
    GateStatus,
    Reservation,
    ReserveOutcome,
    Settlement,
    Source,
    Violation,
)
from gateway.ledger.seam import JOURNAL_STATEMENT_TIMEOUT, _sql

_RESERVATION_COLUMNS = (
    "id, org_id, token_type, amount, state, charged, route, user_id, created_at, expires_at, source"
)


_RESERVE = Kind(
    "reserve",
    "SELECT * FROM gw_reserve($1, $2, $3, string_to_array($4, ','), $5, $6, $7, $8, $9, $10,"
    " $11::jsonb, $12, $13, $14, $15)",
    many(
        "gw_reserve_many",
        (
            "text[]", "text[]", "bigint[]", "text[]", "text[]", "text[]", "text[]", "text[]",
            "float8[]", "timestamptz[]", "text[]", "int[]", "int[]", "text[]", "text[]",
        ),
    ),
)  # fmt: skip
_SETTLE = Kind(
    "settle",
    "SELECT * FROM gw_settle($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb)",
    many(
        "gw_settle_many",
        (
            "uuid[]", "text[]", "bigint[]", "timestamptz[]", "text[]", "text[]", "text[]",
            "text[]", "text[]",
        ),
    ),
)  # fmt: skip


def _reserve_args(
    org: str,
    token_type: str,
    amount: int,
    ttl_seconds: float,
    now: datetime,
    gate: tuple[str | None, int, int | None],  # route plans (comma-joined), grace, degrade
    route: str | None,
    user: str | None,
    request_id: str | None,
    idempotency_key: str | None,
    metadata: dict[str, Any] | None,
    source: Source,
    fingerprint: str | None,
) -> tuple[Any, ...]:
    """One reserve's arguments, in the order of gw_reserve (and of gw_reserve_many's
    arrays)."""
    plans, grace_days, degrade_after_days = gate
    return (
        org, token_type, amount, plans, route, user, request_id, idempotency_key,
        ttl_seconds, now, json.dumps(metadata) if metadata is not None else None,
        grace_days, degrade_after_days, source, fingerprint,
    )  # fmt: skip


class Ledger(LedgerAdmin):
    """Balances, reservations and the journal. Safe to share between tasks; any number of
    gateway processes may use one database at once. Reserves and settlements made at the
    same time are grouped into shared transactions (see ``gateway.ledger.batch``)."""

    _coalescer: Coalescer | None = None

    @property
    def batches(self) -> Coalescer:
        if self._coalescer is None:
            self._coalescer = Coalescer(self._fetch)
        return self._coalescer

    # -- the request path -------------------------------------------------------------

    async def gate(
        self,
        org: str,
        token_type: str,
        amount: int,
        *,
        plans: Sequence[str] | None = None,
        user: str | None = None,
        grace_days: int = 14,
        degrade_after_days: int | None = None,
    ) -> ReserveOutcome:
        """What a reserve of ``amount`` would answer now (plan, route ``plans``, license and
        degradation, quotas, balance), writing and locking nothing. The status is a
        ``GateStatus``; ``reservation_id`` is None. An account not created yet, or whose
        period has ended, is judged as the reserve's refresh would make it."""
        row = await self._fetchrow(
            "SELECT * FROM gw_gate($1, $2, $3, $4, $5, $6, $7, $8)",
            org,
            token_type,
            amount,
            list(plans) if plans is not None else None,
            user,
            self.clock(),
            grace_days,
            degrade_after_days,
        )
        return ReserveOutcome(
            status=row["status"],
            reservation_id=None,
            from_allowance=0,
            from_purchased=0,
            allowance=row["allowance"],
            purchased=row["purchased"],
            plan=row["plan"],
            period_end=row["period_end"],
            allocated=row["allocated"],
            license_date=row["license_date"],
            detail=row["detail"],
        )

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
        source: Source = "proxy",
        idempotency_fingerprint: str | None = None,
    ) -> ReserveOutcome:
        """Hold ``amount`` tokens (allowance first) until commit, refund or expiry after
        ``ttl_seconds``, if the gate (see ``gate``) lets it; quotas and balance are judged
        under the account's lock. Refusals come back as a status, never as an exception.

        ``source`` records who may settle it (see ``commit``). An ``idempotency_key`` used
        before in this organization answers ``duplicate`` with the first reservation when
        ``idempotency_fingerprint`` (the caller's digest of its request) is the same, and
        ``idempotency_key_reused`` without one when it differs; concurrent first uses of a
        key make one reservation."""
        gate = (",".join(plans) if plans is not None else None, grace_days, degrade_after_days)
        args = _reserve_args(
            org, token_type, amount, ttl_seconds, self.clock(), gate, route, user, request_id,
            idempotency_key, metadata, source, idempotency_fingerprint,
        )  # fmt: skip
        row = await self.batches.call(_RESERVE, args, (org, token_type))
        return ReserveOutcome(**dict(row))

    async def reserve_holds(
        self,
        count: int,
        org: str,
        token_type: str,
        amount: int,
        *,
        ttl_seconds: float,
        plans: Sequence[str] | None = None,
        route: str | None = None,
        user: str | None = None,
        request_id: str | None = None,
        grace_days: int = 14,
        degrade_after_days: int | None = None,
    ) -> list[ReserveOutcome]:
        """``count`` reserves of ``amount`` for one caller in one round trip and one
        transaction, each exactly as ``reserve`` would answer it run one after another
        (the account is locked once): the holds a lease draws on. The list stops before
        the first that did not pass."""
        gate = (",".join(plans) if plans is not None else None, grace_days, degrade_after_days)
        one = _reserve_args(
            org, token_type, amount, ttl_seconds, self.clock(), gate, route, user, request_id,
            None, None, "proxy", None,
        )  # fmt: skip
        columns = [[value] * count for value in one]
        rows = await self._fetch(_RESERVE.many, *columns)
        outcomes = [ReserveOutcome(**dict(row)) for row in rows]
        passed = next((i for i, o in enumerate(outcomes) if o.status != "ok"), len(outcomes))
        return outcomes[:passed]

    async def commit(
        self,
        reservation_id: uuid.UUID,
        charged: int | None = None,
        *,
        actor: str = "gateway",
        org: str | None = None,
        source: Source | None = None,
        usage: dict[str, Any] | None = None,
        reason: str | None = None,
        linger: float = 0,
    ) -> Settlement:
        """Charge ``charged`` (default: the whole amount) and release the rest (``reason``:
        the journal's note on the commit; ``linger``: seconds the commit may wait to share
        a transaction with others, when nobody waits for it). With ``org``
        or ``source``, a reservation of another organization or made through another source
        is treated as unknown. With ``usage`` (what the backend reported, kept with the
        reservation) ``charged`` may exceed the hold: the excess is taken from the balance,
        never below zero, and what it cannot cover comes back as ``unbilled``. Raises
        ``LedgerError``: ``not_found``, ``already_committed``, ``already_refunded``,
        ``already_expired``, ``exceeds_amount`` (``charged`` negative, or above the held
        amount without ``usage``)."""
        return await self._settle(
            reservation_id, "commit", charged, actor, reason, org, source, usage, linger
        )

    async def refund(
        self,
        reservation_id: uuid.UUID,
        *,
        reason: str,
        actor: str = "gateway",
        org: str | None = None,
        source: Source | None = None,
    ) -> Settlement:
        """Release everything held. ``org``, ``source`` and ``LedgerError`` as for
        ``commit``."""
        return await self._settle(reservation_id, "refund", 0, actor, reason, org, source)

    async def _settle(
        self,
        reservation_id: uuid.UUID,
        outcome: str,
        charged: int | None,
        actor: str,
        reason: str | None,
        org: str | None,
        source: Source | None,
        usage: dict[str, Any] | None = None,
        linger: float = 0,
    ) -> Settlement:
        args = (
            reservation_id,
            outcome,
            charged,
            self.clock(),
            actor,
            reason,
            org,
            source,
            json.dumps(usage) if usage is not None else None,
        )
        row = await self.batches.call(_SETTLE, args, linger=linger)
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
            unbilled=row["unbilled"],
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
        grace_days: int = 14,
        degrade_after_days: int | None = None,
    ) -> GateStatus:
        """Journal a shadow-mode request (moving nothing) and return the gate's status for
        a reserve of ``amount`` now (see ``gate``). With ``journal=False`` only answer."""
        status = await self._fetchval(
            "SELECT gw_shadow($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
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
            grace_days,
            degrade_after_days,
        )
        return cast(GateStatus, status)

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

    async def audit(self) -> list[Violation]:
        """Check every invariant of the ledger; an empty list means it adds up. It reads the
        whole journal since the last checkpoint, so it may take far longer than a request's
        statements (``JOURNAL_STATEMENT_TIMEOUT``)."""
        rows = await self._fetch(_sql("audit.sql"), timeout=JOURNAL_STATEMENT_TIMEOUT)
        return [Violation(r["invariant"], r["detail"]) for r in rows]

    # -- reads and reports --------------------------------------------------------------

    async def reservation(self, reservation_id: uuid.UUID) -> Reservation | None:
        rows = await self._fetch(
            "SELECT id, org_id, token_type, amount, state, charged, route, user_id,"
            " created_at, expires_at, source, unbilled, usage FROM reservations WHERE id = $1",
            reservation_id,
        )
        if not rows:
            return None
        row = dict(rows[0])
        row["usage"] = json.loads(row["usage"]) if row["usage"] is not None else None
        return Reservation(**row)

    async def held_reservations(self, org: str, *, limit: int = 500) -> list[Reservation]:
        rows = await self._fetch(
            "SELECT id, org_id, token_type, amount, state, charged, route, user_id,"
            " created_at, expires_at, source FROM reservations"
            " WHERE org_id = $1 AND state = 'held' ORDER BY created_at LIMIT $2",
            org,
            limit,
        )
        return [Reservation(**dict(r)) for r in rows]

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
