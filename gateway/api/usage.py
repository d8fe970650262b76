"""Usage visibility: the stats API, the balance-check API, the two-phase reservation API for
work that does not pass through the proxy, usage threshold alerts, and the dashboard page.

The APIs run the same gates, limits, errors and journal as the proxy path: a deduction is
a reservation committed at once, and a caller-run reservation is the proxy's reservation
with the caller deciding the outcome.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web

from gateway.auth import Principal
from gateway.errors import (
    GatewayError,
    InvalidCharge,
    InvalidRequest,
    LedgerError,
    NoReservation,
    ReservationSettled,
)
from gateway.ledger import Ledger, ReserveOutcome, Settlement
from gateway.limits.limiter import Admission
from gateway.pipeline import refuse, request_id_of, reserve
from gateway.proxy import Caller
from gateway.rules import AlertsConfig, Route
from gateway.state import STATE, GatewayState
from gateway.webhooks import deliver

log = logging.getLogger("gateway.usage")

BURN_WINDOW_DAYS = 7
MAX_TTL_SECONDS = 86400
_IDEMPOTENCY_KEY_MAX = 200


class Thresholds:
    """Announces, once per threshold per token type per period, that an organization has
    used that fraction of its allowance: a log event and, when configured, a signed
    webhook (retried, then dead-lettered in the ledger)."""

    def __init__(
        self, ledger: Ledger, session: aiohttp.ClientSession, environ: Mapping[str, str]
    ) -> None:
        self._ledger = ledger
        self._session = session
        self._environ = environ
        self._announced: set[tuple[str, str, datetime, float]] = set()
        self._tasks: set[asyncio.Task[bool]] = set()
        self.events: list[dict[str, Any]] = []  # the latest, for tests and debugging

    @staticmethod
    def used_fraction(allocated: int, allowance: int) -> float:
        return (allocated - allowance) / allocated if allocated > 0 else 0.0

    def warning(self, config: AlertsConfig, token_type: str, outcome: ReserveOutcome) -> str | None:
        """The low-balance header's value for a proxied call, if any threshold is reached."""
        if not config.thresholds:
            return None
        used = self.used_fraction(outcome.allocated, outcome.allowance)
        if outcome.allocated <= 0 or used < min(config.thresholds):
            return None
        return f"{token_type}: {used:.0%} of this period's allowance used"

    async def after_commit(self, config: AlertsConfig, settlement: Settlement) -> None:
        if settlement.allocated <= 0 or settlement.period_start is None:
            return
        used = self.used_fraction(settlement.allocated, settlement.allowance)
        for threshold in sorted(config.thresholds):
            if used < threshold:
                break
            key = (settlement.org_id, settlement.token_type, settlement.period_start, threshold)
            if key in self._announced:
                continue
            first = await self._ledger.threshold_crossed(
                settlement.org_id, settlement.token_type, settlement.period_start, threshold
            )
            self._announced.add(key)
            if first:
                self._announce(config, settlement, threshold, used)

    def _announce(
        self, config: AlertsConfig, settlement: Settlement, threshold: float, used: float
    ) -> None:
        event = {
            "type": "usage_threshold",
            "organization": settlement.org_id,
            "token_type": settlement.token_type,
            "threshold": threshold,
            "used_fraction": round(used, 4),
            "allocated": settlement.allocated,
            "available": settlement.allowance + settlement.purchased,
            "period_start": settlement.period_start.isoformat()
            if settlement.period_start
            else None,
        }
        self.events.append(event)
        del self.events[:-100]
        log.warning(
            "organization '%s' has used %.0f%% of its %s allowance (threshold %.0f%%)",
            settlement.org_id,
            used * 100,
            settlement.token_type,
            threshold * 100,
            extra={"event": "usage_threshold", **event},
        )
        if config.webhook_url:
            task = asyncio.create_task(
                deliver(
                    self._session,
                    config.webhook_url,
                    event,
                    secret=self._environ.get(config.webhook_secret_env),
                    retries=config.retries,
                    dead_letter=self._ledger.dead_letter,
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)


# -- helpers -------------------------------------------------------------------------


async def _principal(request: web.Request) -> Principal:
    return await request.app[STATE].active.auth.authenticate(request.headers.get("Authorization"))


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


def _feature(state: GatewayState, name: object) -> Route:
    rules = state.rules
    if not isinstance(name, str) or not name:
        raise InvalidRequest("'feature' must name a route of rules.yaml")
    for route in rules.routes:
        if route.name == name:
            return route
    known = ", ".join(r.name for r in rules.routes)
    raise InvalidRequest(f"unknown feature '{name}'; features are the routes: {known}")


def _metadata(body: dict[str, Any]) -> dict[str, Any] | None:
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequest("'metadata' must be a JSON object")
    return metadata


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (0 < len(key) <= _IDEMPOTENCY_KEY_MAX):
        raise InvalidRequest(f"Idempotency-Key must be 1 to {_IDEMPOTENCY_KEY_MAX} characters")
    return key


async def _admit(state: GatewayState, caller: Caller, route: Route, ttl: float) -> Admission:
    limits = await state.limits_for(caller.org, route)
    admission = await state.limiter.admit(caller.org, caller.user, route.token_type, limits, ttl)
    # Concurrency caps are for requests the gateway forwards; a caller-run reservation
    # outlives this HTTP request, so its slot is not kept.
    await state.limiter.release(admission)
    return admission


async def _settled(state: GatewayState, settlement: Settlement) -> None:
    if settlement.charged:
        state.metrics.tokens.labels(settlement.token_type, "committed").inc(settlement.charged)
        await state.thresholds.after_commit(state.rules.document.alerts, settlement)


# -- stats -------------------------------------------------------------------------------


async def stats(request: web.Request) -> web.Response:
    """``GET /v1/tokens/stats``: the caller's organization (an admin may add ?org=)."""
    state = request.app[STATE]
    request_id = request_id_of(request)
    try:
        principal = await _principal(request)
        org = principal.org
        asked = request.query.get("org")
        if asked and asked != org:
            if state.rules.document.auth.admin_role not in principal.roles:
                raise NoAccess("only an admin may read another organization's stats")
            org = asked
        return web.json_response(await organization_stats(state, org))
    except GatewayError as exc:
        return exc.response(instance=request.path, headers={"X-Request-Id": request_id})
    except LedgerError as exc:
        return NotKnown(str(exc)).response(instance=request.path)


class NoAccess(GatewayError):
    status = 403
    code = "admin_only"
    title = "Operators only"


class NotKnown(GatewayError):
    status = 404
    code = "unknown_organization"
    title = "Unknown organization"


async def organization_stats(state: GatewayState, org: str) -> dict[str, Any]:
    ledger = state.ledger
    found = await ledger.organization(org)
    if found is None:
        raise LedgerError("unknown_organization", f"organization '{org}' does not exist")
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


# -- check and deduct ------------------------------------------------------------------


async def check_balance(request: web.Request) -> web.Response:
    """``POST /v1/tokens/check-balance`` with ``{"action": "check"|"deduct", "feature": F}``."""
    state = request.app[STATE]
    request_id = request_id_of(request)
    caller: Caller | None = None
    route: Route | None = None
    try:
        principal = await _principal(request)
        caller = Caller(principal.org, principal.user, principal.roles, request_id)
        body = await _json_body(request)
        route = _feature(state, body.get("feature"))
        action = body.get("action")
        if action == "check":
            return web.json_response(await _check(state, caller, route))
        if action != "deduct":
            raise InvalidRequest("'action' must be 'check' or 'deduct'")
        metadata = _metadata(body)
        key = _idempotency_key(request)
        await _admit(state, caller, route, route.upstream.timeout_seconds)
        outcome = await reserve(
            state.ledger, state.rules, route, caller, idempotency_key=key, metadata=metadata
        )
        assert outcome.reservation_id is not None
        replay = outcome.status == "duplicate"
        try:
            settlement = await state.ledger.commit(outcome.reservation_id, actor=caller.user)
            await _settled(state, settlement)
        except LedgerError as exc:
            if exc.reason != "already_committed":
                raise ReservationSettled(str(exc)) from exc
            replay = True
        reservation = await state.ledger.reservation(outcome.reservation_id)
        assert reservation is not None
        balance = next(
            a for a in await state.ledger.balances(caller.org) if a.token_type == route.token_type
        )
        return web.json_response(
            {
                "feature": route.name,
                "token_type": route.token_type,
                "charged": reservation.charged or 0,
                "remaining": balance.available,
                "reservation_id": str(reservation.id),
                "replayed": replay,
            },
            headers={"X-Request-Id": request_id},
        )
    except GatewayError as exc:
        return await refuse(request, state, exc, caller, route, request_id)


async def _check(state: GatewayState, caller: Caller, route: Route) -> dict[str, Any]:
    refusals: list[dict[str, Any]] = []
    limits = await state.limits_for(caller.org, route)
    try:
        for name, ok, detail in await state.limiter.peek(
            caller.org, caller.user, route.token_type, limits
        ):
            if not ok:
                refusals.append({"status": 429, "limit": name, "detail": detail})
    except GatewayError:
        pass  # Redis down: the ledger still answers for the money
    verdict = await state.ledger.record_shadow(
        caller.org,
        route.token_type,
        route.cost,
        charged=0,
        plans=route.config.plans,
        route=route.name,
        user=caller.user,
        journal=False,
    )
    if verdict != "ok":
        status = 402 if verdict == "insufficient" else 403
        code = {"insufficient": "insufficient_tokens"}.get(verdict, verdict)
        refusals.append({"status": status, "code": code})
    available = 0
    if verdict != "unknown_organization":
        available = next(
            (
                a.available
                for a in await state.ledger.balances(caller.org)
                if a.token_type == route.token_type
            ),
            0,
        )
    return {
        "feature": route.name,
        "token_type": route.token_type,
        "cost": route.cost,
        "available": available,
        "allowed": not refusals,
        "refusals": refusals,
    }


# -- two-phase reservations ---------------------------------------------------------------


async def create_reservation(request: web.Request) -> web.Response:
    """``POST /v1/tokens/reservations`` with ``{"feature": F, "ttl_seconds": 300}``."""
    state = request.app[STATE]
    request_id = request_id_of(request)
    caller: Caller | None = None
    route: Route | None = None
    try:
        principal = await _principal(request)
        caller = Caller(principal.org, principal.user, principal.roles, request_id)
        body = await _json_body(request)
        route = _feature(state, body.get("feature"))
        ttl = body.get("ttl_seconds", 300)
        if (
            not isinstance(ttl, int | float)
            or isinstance(ttl, bool)
            or not 0 < ttl <= MAX_TTL_SECONDS
        ):
            raise InvalidRequest(f"'ttl_seconds' must be a number from 1 to {MAX_TTL_SECONDS}")
        metadata = _metadata(body)
        key = _idempotency_key(request)
        await _admit(state, caller, route, float(ttl))
        outcome = await reserve(
            state.ledger,
            state.rules,
            route,
            caller,
            ttl_seconds=float(ttl),
            idempotency_key=key,
            metadata=metadata,
        )
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
            headers={"X-Request-Id": request_id},
        )
    except GatewayError as exc:
        return await refuse(request, state, exc, caller, route, request_id)


async def settle_reservation(request: web.Request) -> web.Response:
    """``POST /v1/tokens/reservations/{id}/commit`` (``{"charged": n}`` optional) or
    ``.../refund`` (``{"reason": "..."}`` optional). Settling twice the same way answers
    the same; settling the other way is 409."""
    state = request.app[STATE]
    request_id = request_id_of(request)
    action = request.match_info["action"]
    try:
        principal = await _principal(request)
        body = await _json_body(request)
        try:
            reservation_id = uuid.UUID(request.match_info["id"])
        except ValueError:
            raise NoReservation("no such reservation") from None
        reservation = await state.ledger.reservation(reservation_id)
        # Another organization's reservation is indistinguishable from none at all.
        if reservation is None or reservation.org_id != principal.org:
            raise NoReservation(f"no reservation {request.match_info['id']}")
        charged = body.get("charged")
        if charged is not None and (not isinstance(charged, int) or isinstance(charged, bool)):
            raise InvalidRequest("'charged' must be a whole number of tokens")
        reason = body.get("reason") or "refunded by the caller"
        try:
            if action == "commit":
                settlement = await state.ledger.commit(
                    reservation_id, charged, actor=principal.user
                )
                await _settled(state, settlement)
            else:
                settlement = await state.ledger.refund(
                    reservation_id, reason=str(reason)[:500], actor=principal.user
                )
                state.metrics.tokens.labels(settlement.token_type, "refunded").inc(
                    reservation.amount
                )
            replayed = False
        except LedgerError as exc:
            if exc.reason == "exceeds_amount":
                raise InvalidCharge(
                    f"cannot charge {charged}: the reservation holds {reservation.amount}",
                    amount=reservation.amount,
                ) from exc
            same = {"commit": "already_committed", "refund": "already_refunded"}[action]
            if exc.reason != same:
                raise ReservationSettled(
                    str(exc), state=exc.reason.removeprefix("already_")
                ) from exc
            replayed = True
        final = await state.ledger.reservation(reservation_id)
        assert final is not None
        balance = next(
            a
            for a in await state.ledger.balances(principal.org)
            if a.token_type == final.token_type
        )
        return web.json_response(
            {
                "reservation_id": str(final.id),
                "state": final.state,
                "charged": final.charged or 0,
                "remaining": balance.available,
                "replayed": replayed,
            },
            headers={"X-Request-Id": request_id},
        )
    except GatewayError as exc:
        return exc.response(instance=request.path, headers={"X-Request-Id": request_id})


# -- the dashboard ------------------------------------------------------------------------

_STATIC = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}


async def dashboard(request: web.Request) -> web.Response:
    page = resources.files("gateway.api").joinpath("dashboard.html").read_bytes()
    return web.Response(
        body=page,
        content_type="text/html",
        headers={"Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"},
    )


async def dashboard_asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound()
    body = resources.files("gateway.api").joinpath(name)
    if not body.is_file():
        raise web.HTTPNotFound()
    return web.Response(body=body.read_bytes(), content_type=_STATIC[name])


def checkout_enabled(billing: Any, environ: Mapping[str, str]) -> bool:
    return bool(billing.packs) and bool(environ.get(billing.api_key_env))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/tokens/stats", stats)
    app.router.add_post("/v1/tokens/check-balance", check_balance)
    app.router.add_post("/v1/tokens/reservations", create_reservation)
    app.router.add_post(r"/v1/tokens/reservations/{id}/{action:commit|refund}", settle_reservation)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard/{name}", dashboard_asset)
