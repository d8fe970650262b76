"""The two-phase API: ``POST /v1/tokens/reservations`` holds a feature's cost for the
caller's own work; ``.../{id}/commit`` (for the whole amount or less) or ``.../{id}/refund``
settles it. Only reservations made through this API, by the caller's organization, can be
settled here: the proxy's reservations belong to the proxy's exchanges."""

from __future__ import annotations

import uuid

from aiohttp import web

from gateway.api.tokens import api_hold, available, feature, settled
from gateway.errors import (
    InvalidCharge,
    InvalidRequest,
    LedgerError,
    NoReservation,
    ReservationSettled,
)
from gateway.middleware import authenticate, json_body, request_id, whole_tokens
from gateway.state import STATE

MAX_TTL_SECONDS = 86400


async def create_reservation(request: web.Request) -> web.Response:
    """``{"feature": F, "ttl_seconds": 300}``: 201 with the held reservation (200 with
    ``replayed`` for a repeated ``Idempotency-Key``)."""
    state = request.config_dict[STATE]
    principal = await authenticate(request)
    body = await json_body(request)
    route = feature(request, state, body.get("feature"))
    ttl = body.get("ttl_seconds", 300)
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL_SECONDS:
        raise InvalidRequest(f"'ttl_seconds' must be a number from 1 to {MAX_TTL_SECONDS}")
    outcome = await api_hold(state, request, principal, route, body, "reserve", ttl)
    assert outcome.reservation_id is not None
    reservation = await state.ledger.reservation(outcome.reservation_id)
    assert reservation is not None
    if outcome.status == "ok":
        state.metrics.tokens.labels(route.token_type, "reserved").inc(route.cost)
    return web.json_response(
        {
            "reservation_id": str(reservation.id),
            "feature": route.name,
            "token_type": route.token_type,
            "amount": reservation.amount,
            "state": reservation.state,
            "expires_at": reservation.expires_at.isoformat(),
            "remaining": outcome.remaining,
            "replayed": outcome.status == "duplicate",
        },
        status=200 if outcome.status == "duplicate" else 201,
        headers={"X-Request-Id": request_id(request)},
    )


async def settle_reservation(request: web.Request) -> web.Response:
    """``.../commit`` (``{"charged": n}`` optional) or ``.../refund`` (``{"reason": "..."}``
    optional). Settling twice the same way answers the same; the other way is 409."""
    state = request.config_dict[STATE]
    action = request.match_info["action"]
    principal = await authenticate(request)
    body = await json_body(request)
    try:
        reservation_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NoReservation("no such reservation") from None
    charged = body.get("charged")
    if charged is not None:
        whole_tokens(charged, "charged")
    reason = body.get("reason") or "refunded by the caller"
    if not isinstance(reason, str):
        raise InvalidRequest("'reason' must be a string")
    # Another organization's reservation, or one the proxy made, is indistinguishable
    # from none at all: the ledger checks both in the settling statement itself.
    try:
        if action == "commit":
            settlement = await state.ledger.commit(
                reservation_id, charged, actor=principal.user, org=principal.org, source="api"
            )
            await settled(state, settlement)
        else:
            await state.ledger.refund(
                reservation_id,
                reason=reason[:500],
                actor=principal.user,
                org=principal.org,
                source="api",
            )
        replayed = False
    except LedgerError as exc:
        if exc.reason == "not_found":
            raise NoReservation(f"no reservation {request.match_info['id']}") from exc
        if exc.reason == "exceeds_amount":
            held = await state.ledger.reservation(reservation_id)
            amount = held.amount if held else None
            raise InvalidCharge(
                f"cannot charge {charged}: the reservation holds {amount}", amount=amount
            ) from exc
        same = {"commit": "already_committed", "refund": "already_refunded"}[action]
        if exc.reason != same:
            raise ReservationSettled(str(exc), state=exc.reason.removeprefix("already_")) from exc
        replayed = True
    final = await state.ledger.reservation(reservation_id)
    assert final is not None
    if action == "refund" and not replayed:
        state.metrics.tokens.labels(final.token_type, "refunded").inc(final.amount)
    return web.json_response(
        {
            "reservation_id": str(final.id),
            "state": final.state,
            "charged": final.charged or 0,
            "remaining": await available(state, principal.org, final.token_type),
            "replayed": replayed,
        },
        headers={"X-Request-Id": request_id(request)},
    )


async def show_reservation(request: web.Request) -> web.Response:
    """``GET .../{id}``: any reservation of the caller's organization, the proxy's
    included: what it held, its state and, once settled, its exact charge (and, priced by
    usage, what the backend reported and what went unbilled)."""
    state = request.config_dict[STATE]
    principal = await authenticate(request)
    try:
        reservation_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NoReservation("no such reservation") from None
    found = await state.ledger.reservation(reservation_id)
    if found is None or found.org_id != principal.org:
        # Another organization's reservation is indistinguishable from none at all.
        raise NoReservation(f"no reservation {request.match_info['id']}")
    return web.json_response(
        {
            "reservation_id": str(found.id),
            "feature": found.route,
            "token_type": found.token_type,
            "amount": found.amount,
            "state": found.state,
            "charged": found.charged or 0,
            "unbilled": found.unbilled,
            "usage": found.usage,
            "user": found.user_id,
            "created_at": found.created_at.isoformat(),
            "expires_at": found.expires_at.isoformat(),
        },
        headers={"X-Request-Id": request_id(request)},
    )
