"""Organizations and their balances: creation, plan, license, quotas, teams, grants,
Stripe events and charges given back. Each operation is one server-side function
(``sql/organizations.sql``, ``sql/billing.sql``, ``sql/settle_sweep.sql``)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from gateway.errors import LedgerError
from gateway.ledger.records import Account, LicenseState
from gateway.ledger.seam import LedgerSeam


class LedgerAdmin(LedgerSeam):
    """What operators, billing and the admin API do to an organization."""

    async def create_org(self, org: str, plan: str) -> None:
        """Raises ``LedgerError`` with reason ``exists`` or ``unknown_plan``."""
        status = await self._fetchval("SELECT gw_create_org($1, $2, $3)", org, plan, self.clock())
        if status == "exists":
            raise LedgerError("exists", f"organization '{org}' already exists")
        if status == "unknown_plan":
            raise LedgerError("unknown_plan", f"plan '{plan}' is not in rules.yaml")

    async def set_plan(self, org: str, plan: str, *, actor: str = "operator") -> bool:
        """Move ``org`` to ``plan`` now, re-basing this period's allowance in full: the new
        plan's allowance minus what was used of allowance this period, charged or held.
        Allowance later released by holds never takes it above that. Returns False if it
        was already on it. Raises ``LedgerError`` (``unknown_organization``,
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
        payment_intent: str | None = None,
        paid: int | None = None,
    ) -> dict[str, Any]:
        """Apply one Stripe event exactly once (see gw_stripe_apply). Returns ``status`` (ok,
        duplicate, stale, unknown_organization or unknown_plan; a purchase for an unknown
        organization is not recorded), ``org`` and ``customer_org``, the organization the
        Stripe customer belongs to."""
        return dict(
            await self._fetchrow(
                "SELECT * FROM gw_stripe_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
                " $12, $13)",
                event_id,
                event_type,
                org,
                customer,
                action,
                token_type,
                amount,
                state,
                plan,
                payment_intent,
                paid,
                event_at,
                self.clock(),
            )
        )

    async def stripe_reverse(
        self,
        event_id: str,
        event_type: str,
        *,
        payment_intent: str | None,
        charge: str | None,
        paid: int | None = None,
        refunded: int | None = None,
        disputed: int | None = None,
        dispute: str | None = None,
        won: bool = False,
    ) -> dict[str, Any]:
        """Apply one refund or dispute (``dispute``: its id; ``won`` once the merchant won
        it) of a Stripe payment exactly once (see gw_stripe_reverse): its pack loses the
        share refunded or disputed, from what is left of the purchased bucket, or gets it
        back when a dispute is won. Returns ``status`` (ok, shortfall, restored, unchanged,
        duplicate or unknown_payment), ``org``, ``token_type``, ``taken`` (negative: given
        back) and ``unbilled`` (tokens already spent, recorded in stripe_clawbacks)."""
        return dict(
            await self._fetchrow(
                "SELECT * FROM gw_stripe_reverse($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                event_id,
                event_type,
                payment_intent,
                charge,
                paid,
                refunded,
                disputed,
                self.clock(),
                dispute,
                won,
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

    async def refund_charge(self, reservation_id: uuid.UUID, *, actor: str, reason: str) -> None:
        """Give back a committed reservation's charge, once (a ``reversal`` entry). Raises
        ``LedgerError`` (``not_found``, ``not_committed``, ``already_refunded``,
        ``nothing_charged``)."""
        status = await self._fetchval(
            "SELECT gw_refund_charge($1, $2, $3, $4)", reservation_id, actor, reason, self.clock()
        )
        if status != "ok":
            raise LedgerError(
                str(status), f"reservation {reservation_id}: {status.replace('_', ' ')}"
            )

    async def unbilled(self, org: str, *, limit: int = 500) -> dict[str, list[dict[str, Any]]]:
        """What ``org`` used but could not be charged, newest first: Stripe packs refunded
        or disputed after their tokens were spent (``stripe``), and usage above a hold
        that the balance could not cover (``usage``)."""
        stripe = await self._fetch(
            "SELECT payment_intent, charge, token_type, tokens, refunded, disputed, paid,"
            " unbilled FROM stripe_payments WHERE org_id = $1 AND unbilled > 0"
            " ORDER BY payment_intent LIMIT $2",
            org,
            limit,
        )
        usage = await self._fetch(
            "SELECT id, token_type, route, user_id, amount, charged, unbilled, settled_at"
            " FROM reservations WHERE org_id = $1 AND unbilled > 0"
            " ORDER BY settled_at DESC LIMIT $2",
            org,
            limit,
        )
        return {"stripe": [dict(r) for r in stripe], "usage": [dict(r) for r in usage]}

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
