"""The one gate: may this caller spend this route now?

The decision is made by the ledger's write-free gate (``gw_gate``: plan, route plans,
license and degradation, quotas, balance), which the reserve itself calls under the
account's lock. This module turns its status into the contract's error, in one table
(``refusal``). Every path that judges a request goes through here: the proxy's reserve
(``reserve``), shadow mode, check-balance ``check`` and both explains (``judge``), so none
of them can say something the others would not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.auth import Principal
from gateway.errors import (
    FeatureDegraded,
    GatewayError,
    IdempotencyKeyReused,
    InsufficientTokens,
    InvalidRequest,
    LedgerUnavailable,
    LicenseSuspended,
    PlanForbidden,
    QuotaExceeded,
    UnknownOrganization,
)
from gateway.ledger import Ledger, ReserveOutcome
from gateway.ledger.records import Source
from gateway.metrics import Metrics
from gateway.rules import Route, RulesDocument

log = logging.getLogger("gateway.pipeline")

# Statuses of the ledger's gate (and of its reserve) that let a request through.
PASSING = frozenset({"ok", "duplicate"})
IDEMPOTENCY_KEY_MAX = 200


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= IDEMPOTENCY_KEY_MAX):
        raise InvalidRequest(f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters")
    return key


def fingerprint(principal: Principal, action: str, route: Route, **what: Any) -> str:
    """What an idempotency key is bound to: the caller, the action, the feature and its
    amount, and the rest of the request. The same key with anything else is refused."""
    material = {
        "user": principal.user,
        "action": action,
        "feature": route.name,
        "amount": route.cost,
        **what,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _license_suspended(
    o: ReserveOutcome, route: Route, org: str, _: RulesDocument, cost: int
) -> GatewayError:
    when = o.license_date
    return LicenseSuspended(
        f"the license of organization '{org}' is suspended"
        + (f" since {when:%Y-%m-%d} (the payment grace period ended)" if when else "")
        + "; all AI features are off until the account is paid",
        suspended_at=when.isoformat() if when else None,
    )


def _quota_exceeded(
    o: ReserveOutcome, route: Route, org: str, _: RulesDocument, cost: int
) -> GatewayError:
    quota = json.loads(o.detail or "{}")
    kind, _sep, name = str(quota.get("subject", ":")).partition(":")
    whom = f"user '{name}'" if kind == "user" else f"team '{name}'"
    return QuotaExceeded(
        f"{route.name} costs {cost} {route.token_type} tokens and {whom} has used "
        f"{quota.get('spent')} of its quota of {quota.get('quota')} this period",
        token_type=route.token_type,
        cost=cost,
        quota=quota.get("quota"),
        spent=quota.get("spent"),
        subject=quota.get("subject"),
    )


def _feature_degraded(
    o: ReserveOutcome, route: Route, org: str, _: RulesDocument, cost: int
) -> GatewayError:
    when = o.license_date
    return FeatureDegraded(
        f"{route.token_type} has been switched off"
        + (f" since {when:%Y-%m-%d}" if when else "")
        + " because a payment failed; pay the open invoice to restore it at once",
        token_type=route.token_type,
        degraded_at=when.isoformat() if when else None,
    )


def unknown_organization(org: str) -> UnknownOrganization:
    return UnknownOrganization(
        f"organization '{org}' is not known to the gateway; an operator must "
        "create it (gateway org create)",
        organization=org,
    )


def _unknown_organization(
    o: ReserveOutcome, route: Route, org: str, _: RulesDocument, cost: int
) -> GatewayError:
    return unknown_organization(org)


def _plan_forbidden(
    o: ReserveOutcome, route: Route, org: str, doc: RulesDocument, cost: int
) -> GatewayError:
    plan = o.plan or "unknown"
    plan_config = doc.plans.get(plan)
    upgrade = plan_config.upgrade_to if plan_config else None
    if route.config.plans is not None and plan not in route.config.plans:
        detail = (
            f"route '{route.name}' is available on plans {', '.join(route.config.plans)}; "
            f"organization '{org}' is on plan '{plan}'"
        )
    else:
        detail = f"plan '{plan}' does not include {route.token_type}"
    if upgrade:
        detail += f"; upgrade to '{upgrade}' to use it"
    return PlanForbidden(detail, plan=plan, token_type=route.token_type, upgrade_to=upgrade)


def _insufficient(
    o: ReserveOutcome, route: Route, org: str, _: RulesDocument, cost: int
) -> GatewayError:
    refresh = o.period_end.isoformat() if o.period_end else None
    return InsufficientTokens(
        f"{route.name} costs {cost} {route.token_type} tokens and "
        f"organization '{org}' has {o.remaining}"
        + (f"; the allowance refreshes at {refresh}" if refresh else ""),
        token_type=route.token_type,
        cost=cost,
        balance=o.remaining,
        refresh_at=refresh,
    )


def _key_reused(
    o: ReserveOutcome, route: Route, org: str, _: RulesDocument, cost: int
) -> GatewayError:
    return IdempotencyKeyReused(
        "this Idempotency-Key was first used for a different request; "
        "use a new key for a new request"
    )


_Refusal = Callable[[ReserveOutcome, Route, str, RulesDocument, int], GatewayError]

# The gate's statuses and the contract's errors: the one table.
REFUSALS: dict[str, _Refusal] = {
    "unknown_organization": _unknown_organization,
    "license_suspended": _license_suspended,
    "feature_degraded": _feature_degraded,
    "plan_forbidden": _plan_forbidden,
    "quota_exceeded": _quota_exceeded,
    "insufficient": _insufficient,
    "idempotency_key_reused": _key_reused,
}


def refusal(
    outcome: ReserveOutcome,
    route: Route,
    org: str,
    doc: RulesDocument,
    amount: int | None = None,
) -> GatewayError:
    """The contract's error for a gate status that does not pass; ``amount`` is what the
    request would hold (default: the route's cost)."""
    make = REFUSALS.get(outcome.status)
    if make is None:
        return LedgerUnavailable(f"unexpected gate status {outcome.status!r}")
    return make(outcome, route, org, doc, amount if amount is not None else route.cost)


def _gate_args(route: Route, doc: RulesDocument) -> dict[str, Any]:
    return {
        "plans": route.config.plans,
        "grace_days": doc.license.grace_period_days,
        "degrade_after_days": next(
            (
                s.after_days
                for s in doc.license.degradation_order
                if route.token_type in s.token_types
            ),
            None,
        ),
    }


async def reserve(
    ledger: Ledger,
    doc: RulesDocument,
    route: Route,
    principal: Principal,
    request_id: str,
    *,
    source: Source = "proxy",
    ttl_seconds: float | None = None,
    idempotency_key: str | None = None,
    idempotency_fingerprint: str | None = None,
    metadata: dict[str, Any] | None = None,
    amount: int | None = None,
) -> ReserveOutcome:
    """Hold ``amount`` (default: the route's cost) for the caller (status ``ok``, or
    ``duplicate`` for a repeated idempotency key); every other gate status raises its
    error."""
    outcome = await ledger.reserve(
        principal.org,
        route.token_type,
        amount if amount is not None else route.cost,
        ttl_seconds=ttl_seconds
        or route.upstream.timeout_seconds + doc.ledger.reservation_grace_seconds,
        route=route.name,
        user=principal.user,
        request_id=request_id,
        idempotency_key=idempotency_key,
        idempotency_fingerprint=idempotency_fingerprint,
        metadata=metadata,
        source=source,
        **_gate_args(route, doc),
    )
    if outcome.status in PASSING:
        return outcome
    raise refusal(outcome, route, principal.org, doc, amount)


async def reserve_holds(
    ledger: Ledger,
    doc: RulesDocument,
    route: Route,
    principal: Principal,
    request_id: str,
    *,
    count: int,
    lease_seconds: float,
) -> list[ReserveOutcome]:
    """Up to ``count`` holds of the route's cost for the caller, made ahead of its requests
    through the same gate as ``reserve`` (the list stops at the first it refuses). Each
    lives ``lease_seconds`` longer than a request's own, the time it may wait to be
    drawn."""
    return await ledger.reserve_holds(
        count,
        principal.org,
        route.token_type,
        route.cost,
        ttl_seconds=route.upstream.timeout_seconds
        + doc.ledger.reservation_grace_seconds
        + lease_seconds,
        route=route.name,
        user=principal.user,
        request_id=request_id,
        **_gate_args(route, doc),
    )


async def judge(
    ledger: Ledger, doc: RulesDocument, route: Route, principal: Principal
) -> tuple[ReserveOutcome, GatewayError | None]:
    """What the reserve would answer now, writing nothing: the gate's outcome and the
    error the proxy would refuse with (None when it would pass)."""
    outcome = await ledger.gate(
        principal.org, route.token_type, route.cost, user=principal.user, **_gate_args(route, doc)
    )
    if outcome.status in PASSING:
        return outcome, None
    return outcome, refusal(outcome, route, principal.org, doc)


async def record_shadow(
    ledger: Ledger,
    doc: RulesDocument,
    route: Route,
    principal: Principal,
    request_id: str,
    *,
    charged: int,
) -> GatewayError | None:
    """Shadow mode: journal what the reserve would have done (moving nothing) and return
    the error it would have refused with."""
    status = await ledger.record_shadow(
        principal.org,
        route.token_type,
        route.cost,
        charged=charged,
        route=route.name,
        user=principal.user,
        request_id=request_id,
        **_gate_args(route, doc),
    )
    if status in PASSING:
        return None
    only_status = ReserveOutcome(status, None, 0, 0, 0, 0, None, None, 0, None, None)
    return refusal(only_status, route, principal.org, doc)


async def settle_shadow(
    ledger: Ledger,
    doc: RulesDocument,
    metrics: Metrics,
    route: Route,
    caller: Principal,
    request_id: str,
    would_refuse: list[str],
    *,
    ok: bool,
) -> None:
    """The end of a shadow-mode request: journaled (``record_shadow``) when no earlier
    check would have refused it; what any check would have refused is counted and
    logged."""
    would = list(would_refuse)
    if caller.org and not would:
        try:
            refused = await record_shadow(
                ledger, doc, route, caller, request_id, charged=route.cost if ok else 0
            )
        except LedgerUnavailable as exc:
            refused = exc
        if refused is not None:
            would.append(refused.code)
        elif ok:
            metrics.tokens.labels(route.token_type, "shadow").inc(route.cost)
    for code in would:
        metrics.shadow_refusals.labels(route.name, code).inc()
    if would:
        log.warning(
            "shadow route %s would have refused request_id=%s org=%s: %s",
            route.name,
            request_id,
            caller.org or "-",
            ", ".join(would),
            extra={"request_id": request_id, "would_refuse": would},
        )
