"""The operators' API under ``/v1/admin/``: organizations, plans, licenses, grants, quotas,
held reservations, charge refunds, the journal, the rules in force and explain.

It is an aiohttp sub-application whose middleware admits only an admin (the
``GATEWAY_ADMIN_TOKEN`` or a JWT with the admin role) and turns the ledger's refusals into
the contract's errors; handlers raise. Every change is recorded with the admin's identity."""

from __future__ import annotations

import hmac
import uuid
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.api.stats import organization_stats
from gateway.errors import (
    AdminOnly,
    Conflict,
    GatewayError,
    InvalidRequest,
    LedgerError,
    NoReservation,
    NotFound,
)
from gateway.explain import explain
from gateway.middleware import MAX_TOKENS, PRINCIPAL, json_body, whole_tokens
from gateway.state import STATE

ACTOR = web.RequestKey("actor", str)


async def require_admin(request: web.Request) -> str:
    """The caller's name if it may use /v1/admin/: the GATEWAY_ADMIN_TOKEN, or a JWT with
    the configured admin role. Raises InvalidToken or AdminOnly."""
    state = request.config_dict[STATE]
    header = request.headers.get("Authorization", "")
    admin_token = state.environ.get("GATEWAY_ADMIN_TOKEN")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if admin_token and given and hmac.compare_digest(given.encode(), admin_token.encode()):
        return "admin-token"
    principal = await state.active.auth.authenticate(header or None)
    request[PRINCIPAL] = principal
    role = state.rules.document.auth.admin_role
    if role not in principal.roles:
        raise AdminOnly(f"this endpoint needs the '{role}' role")
    return f"{principal.org}/{principal.user}"


@web.middleware
async def _admins_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[ACTOR] = f"admin:{await require_admin(request)}"
    try:
        return await handler(request)
    except LedgerError as exc:
        error: GatewayError
        if exc.reason in ("unknown_organization", "not_found"):
            error = NotFound(str(exc))
        elif exc.reason in ("invalid_amount", "unknown_plan"):
            error = InvalidRequest(str(exc))
        else:
            error = Conflict(str(exc), reason=exc.reason)
        raise error from exc


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a {kind.__name__}")
    return value


async def create_organization(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
    body = await json_body(request)
    org, plan = _field(body, "id", str), _field(body, "plan", str)
    await state.ledger.create_org(org, plan)
    await state.ledger.record_admin(org, actor, "create_organization", {"plan": plan})
    return web.json_response(await organization_stats(state, org), status=201)


async def read_organization(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    return web.json_response(await organization_stats(state, request.match_info["org"]))


async def set_plan(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
    body = await json_body(request)
    org = request.match_info["org"]
    changed = await state.ledger.set_plan(org, _field(body, "plan", str), actor=actor)
    return web.json_response({"changed": changed, **await organization_stats(state, org)})


async def set_license(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
    body = await json_body(request)
    license_state = _field(body, "state", str)
    if license_state not in ("active", "past_due", "suspended", "canceled"):
        raise InvalidRequest("'state' must be active, past_due, suspended or canceled")
    changed = await state.ledger.set_license(request.match_info["org"], license_state, actor=actor)
    return web.json_response({"changed": changed, "state": license_state})


async def grant(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
    body = await json_body(request)
    org = request.match_info["org"]
    token_type = _field(body, "token_type", str)
    if token_type not in state.rules.document.token_types:
        raise InvalidRequest(f"unknown token type '{token_type}'")
    amount = _field(body, "amount", int)
    if amount == 0 or abs(amount) > MAX_TOKENS:
        raise InvalidRequest(f"'amount' must be a non-zero whole number within ±{MAX_TOKENS}")
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


async def set_quota(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
    body = await json_body(request)
    org = request.match_info["org"]
    user, team = body.get("user"), body.get("team")
    if (user is None) == (team is None) or not isinstance(user or team, str):
        raise InvalidRequest("give exactly one of 'user' or 'team'")
    token_type = _field(body, "token_type", str)
    if token_type not in state.rules.document.token_types:
        raise InvalidRequest(f"unknown token type '{token_type}'")
    amount = _field(body, "amount", int, required=False)
    if amount is not None:
        whole_tokens(amount, "amount")
    subject = f"user:{user}" if user else f"team:{team}"
    await state.ledger.set_quota(org, subject, token_type, amount, actor=actor)
    return web.json_response({"subject": subject, "token_type": token_type, "amount": amount})


async def set_team(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
    body = await json_body(request)
    users = body.get("users")
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise InvalidRequest("'users' must be a list of user ids")
    await state.ledger.set_team(
        request.match_info["org"], request.match_info["team"], users, actor=actor
    )
    return web.json_response({"team": request.match_info["team"], "users": users})


async def unbilled(request: web.Request) -> web.Response:
    """What the organization used but was never charged for, for an operator to settle:
    packs refunded or disputed after being spent, and usage beyond the balance."""
    state = request.config_dict[STATE]
    org = request.match_info["org"]
    if await state.ledger.organization(org) is None:
        raise NotFound(f"organization '{org}' does not exist")
    found = await state.ledger.unbilled(org)
    stripe = [
        {
            "payment_intent": r["payment_intent"],
            "charge": r["charge"],
            "token_type": r["token_type"],
            "pack_tokens": r["tokens"],
            "paid": r["paid"],
            "refunded": r["refunded"],
            "disputed": r["disputed"],
            "unbilled": r["unbilled"],
        }
        for r in found["stripe"]
    ]
    usage = [
        {
            "reservation_id": str(r["id"]),
            "token_type": r["token_type"],
            "route": r["route"],
            "user": r["user_id"],
            "held": r["amount"],
            "charged": r["charged"],
            "unbilled": r["unbilled"],
            "settled_at": r["settled_at"].isoformat() if r["settled_at"] else None,
        }
        for r in found["usage"]
    ]
    totals: dict[str, int] = {}
    for row in (*stripe, *usage):
        totals[str(row["token_type"])] = totals.get(str(row["token_type"]), 0) + int(
            row["unbilled"]
        )
    return web.json_response({"totals": totals, "stripe": stripe, "usage": usage})


async def held_reservations(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
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


async def refund_charge(request: web.Request) -> web.Response:
    state, actor = request.config_dict[STATE], request[ACTOR]
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


async def journal(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
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


async def rules_in_force(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    rules = state.rules
    return web.json_response(
        {
            "version": rules.version,
            "source": rules.source,
            "loaded_at": state.active.loaded_at,
            "last_reload": state.last_reload or None,
            "rules": rules.public(),
        }
    )


async def explain_request(request: web.Request) -> web.Response:
    state = request.config_dict[STATE]
    method = request.query.get("method", "POST").upper()
    path = request.query.get("path")
    if not path:
        raise InvalidRequest("give ?method=POST&path=/v1/...&token=<jwt>")
    report = await explain(
        state.rules,
        method,
        path,
        token=request.query.get("token"),
        auth=state.active.auth,
        ledger=state.ledger,
        limiter=state.limiter,
        limits_for=state.limits_for,
    )
    return web.json_response(report)


def admin_app() -> web.Application:
    """The admin API, to mount at ``/v1/admin/``."""
    app = web.Application(middlewares=[_admins_only])
    r = app.router
    r.add_post("/organizations", create_organization)
    r.add_get("/organizations/{org}", read_organization)
    r.add_put("/organizations/{org}/plan", set_plan)
    r.add_put("/organizations/{org}/license", set_license)
    r.add_post("/organizations/{org}/grants", grant)
    r.add_put("/organizations/{org}/quotas", set_quota)
    r.add_put("/organizations/{org}/teams/{team}", set_team)
    r.add_get("/organizations/{org}/reservations", held_reservations)
    r.add_get("/organizations/{org}/unbilled", unbilled)
    r.add_get("/organizations/{org}/journal", journal)
    r.add_post("/reservations/{id}/refund-charge", refund_charge)
    r.add_get("/rules", rules_in_force)
    r.add_get("/explain", explain_request)
    return app
