"""``POST /v1/tokens/check-balance``: for AI features that do not pass through the proxy.

``check`` asks the same gate and limits as the proxy, consuming nothing; ``deduct`` is a
reservation committed at once. A feature is a route's ``name`` in rules.yaml.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.auth import Principal
from gateway.errors import InvalidRequest, LedgerError, LimiterUnavailable, ReservationSettled
from gateway.gate import fingerprint, idempotency_key, judge, reserve
from gateway.ledger import ReserveOutcome, Settlement
from gateway.limits.limiter import Admission
from gateway.middleware import ROUTE_NAME, authenticate, json_body, request_id
from gateway.rules import Route
from gateway.state import STATE, GatewayState


def feature(request: web.Request, state: GatewayState, name: object) -> Route:
    """The route named ``name`` (a feature is a route's name)."""
    rules = state.rules
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'feature' must name a route of rules.yaml")
    for route in rules.routes:
        if route.name == name:
            request[ROUTE_NAME] = route.name
            return route
    known = ", ".join(r.name for r in rules.routes)
    raise InvalidRequest(f"unknown feature '{name}'; features are the routes: {known}")


def metadata_of(body: dict[str, Any]) -> dict[str, Any] | None:
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be a JSON object")
    return metadata


async def api_hold(
    state: GatewayState,
    request: web.Request,
    principal: Principal,
    route: Route,
    body: dict[str, Any],
    action: str,
    ttl: float | None = None,
) -> ReserveOutcome:
    """The hold of a deduct or a two-phase reservation: the route's limits, then the gate's
    reserve, made by the API (only the API settles it) and bound to the request's
    Idempotency-Key by what it asks for (``action``, ``ttl``, its metadata)."""
    metadata = metadata_of(body)
    await admit(state, principal, route, route.upstream.timeout_seconds if ttl is None else ttl)
    return await reserve(
        state.ledger,
        state.rules.document,
        route,
        principal,
        request_id(request),
        source="api",
        ttl_seconds=None if ttl is None else float(ttl),
        idempotency_key=idempotency_key(request),
        idempotency_fingerprint=fingerprint(
            principal, action, route, metadata=metadata, **({} if ttl is None else {"ttl": ttl})
        ),
        metadata=metadata,
    )


async def admit(state: GatewayState, principal: Principal, route: Route, ttl: float) -> Admission:
    """The route's limits, as for a proxied request."""
    limits = await state.limits_for(principal.org, route)
    admission = await state.limiter.admit(
        principal.org, principal.user, route.token_type, limits, ttl, tokens=route.cost
    )
    # Concurrency caps are for requests the gateway forwards; a caller-run reservation
    # outlives this HTTP request, so its slot is not kept.
    await state.limiter.release(admission)
    return admission


async def settled(state: GatewayState, settlement: Settlement) -> None:
    if settlement.charged:
        state.metrics.tokens.labels(settlement.token_type, "committed").inc(settlement.charged)
        await state.thresholds.after_commit(state.rules.document.alerts, settlement)


async def check_balance(request: web.Request) -> web.Response:
    """``{"action": "check"|"deduct", "feature": F}``."""
    state = request.config_dict[STATE]
    principal = await authenticate(request)
    body = await json_body(request)
    route = feature(request, state, body.get("feature"))
    action = body.get("action")
    if action == "check":
        return web.json_response(await check(state, principal, route))
    if action != "deduct":
        raise InvalidRequest("'action' must be 'check' or 'deduct'")
    outcome = await api_hold(state, request, principal, route, body, "deduct")
    assert outcome.reservation_id is not None
    replay = outcome.status == "duplicate"
    try:
        settlement = await state.ledger.commit(
            outcome.reservation_id, actor=principal.user, org=principal.org, source="api"
        )
        await settled(state, settlement)
    except LedgerError as exc:
        # A concurrent retry of this key may have committed the held reservation first:
        # one charge either way, and the first use of the key still answers replayed=false.
        if exc.reason != "already_committed":
            raise ReservationSettled(str(exc)) from exc
    reservation = await state.ledger.reservation(outcome.reservation_id)
    assert reservation is not None
    return web.json_response(
        {
            "feature": route.name,
            "token_type": route.token_type,
            "charged": reservation.charged or 0,
            "remaining": await available(state, principal.org, route.token_type),
            "reservation_id": str(reservation.id),
            "replayed": replay,
        },
        headers={"X-Request-Id": request_id(request)},
    )


async def available(state: GatewayState, org: str, token_type: str) -> int:
    return next(
        (a.available for a in await state.ledger.balances(org) if a.token_type == token_type),
        0,
    )


async def check(state: GatewayState, principal: Principal, route: Route) -> dict[str, Any]:
    """Would the proxy forward this now? The same limits and the same gate, consuming
    nothing; each refusal with the status and code the proxy would answer."""
    refusals: list[dict[str, Any]] = []
    limits = await state.limits_for(principal.org, route)
    try:
        verdicts = await state.limiter.peek(
            principal.org, principal.user, route.token_type, limits, tokens=route.cost
        )
    except LimiterUnavailable as exc:
        # As the proxy: with on_store_error open the ledger alone answers for the money.
        verdicts = []
        if state.rules.document.limits.on_store_error == "closed":
            refusals.append({"status": exc.status, "code": exc.code, "detail": exc.detail})
    for verdict in verdicts:
        if verdict.refusal is not None:
            refusals.append(
                {
                    "status": verdict.refusal.status,
                    "code": verdict.refusal.code,
                    "limit": verdict.limit,
                    "detail": verdict.refusal.detail,
                }
            )
    outcome, refused = await judge(state.ledger, state.rules.document, route, principal)
    if refused is not None:
        refusals.append({"status": refused.status, "code": refused.code})
    return {
        "feature": route.name,
        "token_type": route.token_type,
        "cost": route.cost,
        "available": outcome.remaining,
        "allowed": not refusals,
        "refusals": refusals,
    }
