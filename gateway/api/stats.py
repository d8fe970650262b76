"""``GET /v1/tokens/stats``: an organization's balances, use and forecast."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from aiohttp import web

from gateway.errors import AdminOnly, NotFound
from gateway.gate import unknown_organization
from gateway.middleware import authenticate, request_id
from gateway.state import STATE, GatewayState

BURN_WINDOW_DAYS = 7


async def stats(request: web.Request) -> web.Response:
    """The caller's organization (an admin, by role, may add ``?org=``)."""
    state = request.config_dict[STATE]
    principal = await authenticate(request)
    org = principal.org
    asked = request.query.get("org")
    if asked and asked != org:
        if state.rules.document.auth.admin_role not in principal.roles:
            raise AdminOnly("only an admin may read another organization's stats")
        org = asked
    try:
        document = await organization_stats(state, org)
    except NotFound:
        if org != principal.org:
            raise
        raise unknown_organization(org) from None
    return web.json_response(document, headers={"X-Request-Id": request_id(request)})


async def organization_stats(state: GatewayState, org: str) -> dict[str, Any]:
    ledger = state.ledger
    found = await ledger.organization(org)
    if found is None:
        raise NotFound(f"organization '{org}' does not exist")
    accounts = await ledger.balances(org)
    now = ledger.clock()
    period_start = min((a.period_start for a in accounts), default=now)
    created = found["created_at"]
    burn_days = max(1.0, min(BURN_WINDOW_DAYS, (now - created).total_seconds() / 86400))
    usage = await ledger.usage(org, since=period_start, burn_since=now - timedelta(days=burn_days))
    doc = state.rules.document
    plan = str(found["plan"])
    plan_config = doc.plans.get(plan)
    token_types: dict[str, Any] = {}
    for a in accounts:
        used = int(usage["used"].get(a.token_type, 0))
        burn = int(usage["burn"].get(a.token_type, 0)) / burn_days
        runs_out = now + timedelta(days=a.available / burn) if burn > 0 else None
        token_types[a.token_type] = {
            "description": doc.token_types[a.token_type].description
            if a.token_type in doc.token_types
            else "",
            "available": a.available,
            "allowance": a.allowance,
            "purchased": a.purchased,
            "reserved": a.reserved,
            "allocated": a.allocated,
            "used": used,
            "used_fraction": round(used / a.allocated, 4) if a.allocated else 0.0,
            "period_start": a.period_start.isoformat(),
            "refresh_at": a.period_end.isoformat(),
            "last_used_at": a.last_used_at.isoformat() if a.last_used_at else None,
            "forecast": {
                "burn_per_day": round(burn, 2),
                "runs_out_at": runs_out.isoformat() if runs_out else None,
                "before_refresh": runs_out is not None and runs_out < a.period_end,
            },
        }
    packs = [
        {"name": name, "token_type": p.token_type, "amount": p.amount}
        for name, p in doc.billing.packs.items()
    ]
    return {
        "organization": org,
        "plan": plan,
        "upgrade_to": plan_config.upgrade_to if plan_config else None,
        "billing": {"checkout": checkout_enabled(doc.billing, state.environ), "packs": packs},
        "generated_at": now.isoformat(),
        "token_types": token_types,
        "features": usage["features"],
        "users": usage["users"],
        "daily": usage["daily"],
    }


def checkout_enabled(billing: Any, environ: Mapping[str, str]) -> bool:
    return bool(billing.packs) and bool(environ.get(billing.api_key_env))
