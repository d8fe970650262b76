"""The operators' API under ``/v1/admin/``: organizations, plans, licenses, grants, quotas,
held reservations, charge refunds and the journal. Every call needs an admin (the
``GATEWAY_ADMIN_TOKEN`` or a JWT with the admin role) and every change is recorded with
the admin's identity."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.api.usage import _json_body as json_body
from gateway.api.usage import organization_stats
from gateway.errors import GatewayError, InvalidRequest, LedgerError, NoReservation
from gateway.state import STATE, GatewayState

Handler = Callable[[web.Request, GatewayState, str], Awaitable[web.Response]]


class NotFound(GatewayError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"
    title = "Conflict"


def admin_only(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def wrapped(request: web.Request) -> web.Response:
        from gateway.app import require_admin

        state = request.app[STATE]
        try:
            actor = await require_admin(request)
            return await handler(request, state, f"admin:{actor}")
        except LedgerError as exc:
            error: GatewayError
            if exc.reason in ("unknown_organization", "not_found"):
                error = NotFound(str(exc))
            elif exc.reason in ("invalid_amount", "unknown_plan"):
                error = InvalidRequest(str(exc))
            else:
                error = Conflict(str(exc), reason=exc.reason)
            return error.response(instance=request.path)
        except GatewayError as exc:
            return exc.response(instance=request.path)

    return wrapped


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a {kind.__name__}")
    return value


@admin_only
async def create_organization(
    request: web.Request, state: GatewayState, actor: str
) -> web.Response:
    body = await json_body(request)
    org, plan = _field(body, "id", str), _field(body, "plan", str)
    await state.ledger.create_org(org, plan)
    await state.ledger.record_admin(org, actor, "create_organization", {"plan": plan})
    return web.json_response(await organization_stats(state, org), status=201)


@admin_only
async def read_organization(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    return web.json_response(await organization_stats(state, request.match_info["org"]))


@admin_only
async def set_plan(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    body = await json_body(request)
    org = request.match_info["org"]
    changed = await state.ledger.set_plan(org, _field(body, "plan", str), actor=actor)
    return web.json_response({"changed": changed, **await organization_stats(state, org)})


@admin_only
async def set_license(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    body = await json_body(request)
    license_state = _field(body, "state", str)
    if license_state not in ("active", "past_due", "suspended", "canceled"):
        raise InvalidRequest("'state' must be active, past_due, suspended or canceled")
    changed = await state.ledger.set_license(request.match_info["org"], license_state, actor=actor)
    return web.json_response({"changed": changed, "state": license_state})


@admin_only
async def grant(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    body = await json_body(request)
    org = request.match_info["org"]
    token_type = _field(body, "token_type", str)
    if token_type not in state.rules.document.token_types:
        raise InvalidRequest(f"unknown token type '{token_type}'")
    amount = _field(body, "amount", int)
    reason = _field(body, "reason", str)
    bucket = body.get("bucket", "purchased")
    if bucket not in ("purchased", "allowance"):
        raise InvalidRequest("'bucket' must be purchased or allowance")
    account = await state.ledger.grant(
        org,
        token_type,
        amount,
        bucket=bucket,
        kind="grant" if amount > 0 else "adjust",
        actor=actor,
        reason=reason,
    )
    return web.json_response(
        {"token_type": token_type, "available": account.available, "purchased": account.purchased},
        status=201,
    )


@admin_only
async def set_quota(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    body = await json_body(request)
    org = request.match_info["org"]
    user, team = body.get("user"), body.get("team")
    if (user is None) == (team is None) or not isinstance(user or team, str):
        raise InvalidRequest("give exactly one of 'user' or 'team'")
    token_type = _field(body, "token_type", str)
    if token_type not in state.rules.document.token_types:
        raise InvalidRequest(f"unknown token type '{token_type}'")
    amount = _field(body, "amount", int, required=False)
    if amount is not None and amount < 0:
        raise InvalidRequest("'amount' cannot be negative (null clears the quota)")
    subject = f"user:{user}" if user else f"team:{team}"
    await state.ledger.set_quota(org, subject, token_type, amount, actor=actor)
    return web.json_response({"subject": subject, "token_type": token_type, "amount": amount})


@admin_only
async def set_team(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    body = await json_body(request)
    users = body.get("users")
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise InvalidRequest("'users' must be a list of user ids")
    await state.ledger.set_team(
        request.match_info["org"], request.match_info["team"], users, actor=actor
    )
    return web.json_response({"team": request.match_info["team"], "users": users})


@admin_only
async def held_reservations(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    org = request.match_info["org"]
    if await state.ledger.organization(org) is None:
        raise NotFound(f"organization '{org}' does not exist")
    held = await state.ledger.held_reservations(org)
    return web.json_response(
        {
            "reservations": [
                {
                    "id": str(r.id),
                    "token_type": r.token_type,
                    "amount": r.amount,
                    "route": r.route,
                    "user": r.user_id,
                    "created_at": r.created_at.isoformat(),
                    "expires_at": r.expires_at.isoformat(),
                }
                for r in held
            ]
        }
    )


@admin_only
async def refund_charge(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    body = await json_body(request)
    reason = _field(body, "reason", str)
    try:
        reservation_id = uuid.UUID(request.match_info["id"])
    except ValueError:
        raise NoReservation("no such reservation") from None
    await state.ledger.refund_charge(reservation_id, actor=actor, reason=reason)
    reservation = await state.ledger.reservation(reservation_id)
    assert reservation is not None
    return web.json_response(
        {"reservation_id": str(reservation_id), "refunded": reservation.charged}
    )


@admin_only
async def journal(request: web.Request, state: GatewayState, actor: str) -> web.Response:
    org = request.match_info["org"]
    if await state.ledger.organization(org) is None:
        raise NotFound(f"organization '{org}' does not exist")
    try:
        limit = min(max(int(request.query.get("limit", "100")), 1), 1000)
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        raise InvalidRequest("'limit' and 'before' must be whole numbers") from None
    rows = await state.ledger.journal(org, limit=limit, before=before)
    entries = [
        {
            k: (
                v.isoformat()
                if hasattr(v, "isoformat")
                else str(v)
                if isinstance(v, uuid.UUID)
                else v
            )
            for k, v in row.items()
        }
        for row in rows
    ]
    next_before = rows[-1]["id"] if len(rows) == limit else None
    return web.json_response({"entries": entries, "next_before": next_before})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/admin/organizations", create_organization)
    r.add_get("/v1/admin/organizations/{org}", read_organization)
    r.add_put("/v1/admin/organizations/{org}/plan", set_plan)
    r.add_put("/v1/admin/organizations/{org}/license", set_license)
    r.add_post("/v1/admin/organizations/{org}/grants", grant)
    r.add_put("/v1/admin/organizations/{org}/quotas", set_quota)
    r.add_put("/v1/admin/organizations/{org}/teams/{team}", set_team)
    r.add_get("/v1/admin/organizations/{org}/reservations", held_reservations)
    r.add_get("/v1/admin/organizations/{org}/journal", journal)
    r.add_post("/v1/admin/reservations/{id}/refund-charge", refund_charge)
