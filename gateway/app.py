"""Builds the aiohttp application: wiring, startup and shutdown, health, metrics, reloads
and the operators' endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.api.admin import add_routes as add_admin_routes
from gateway.api.usage import Thresholds
from gateway.api.usage import add_routes as add_usage_routes
from gateway.auth import Authenticator
from gateway.billing.checkout import create_checkout
from gateway.billing.stripe_webhooks import stripe_webhook
from gateway.errors import ConfigError, GatewayError, LedgerUnavailable
from gateway.explain import explain
from gateway.ledger import Ledger
from gateway.limits.alerts import Alerter
from gateway.limits.limiter import Limiter
from gateway.metrics import Metrics
from gateway.pipeline import handle
from gateway.proxy import new_session
from gateway.rules import Rules, load_rules
from gateway.state import STATE, Active, GatewayState

log = logging.getLogger("gateway.app")

WATCH_INTERVAL_SECONDS = 1.0


class Forbidden(GatewayError):
    status = 403
    code = "admin_only"
    title = "Operators only"


def build_app(
    rules: Rules,
    ledger: Ledger,
    limiter: Limiter,
    *,
    environ: Mapping[str, str] | None = None,
    sweeper: bool = True,
    watch: Path | None = None,
) -> web.Application:
    """The gateway as an aiohttp application. Call with a running event loop. Raises
    ``ConfigError`` when the rules' keys cannot be loaded. The ledger and the limiter stay
    the caller's to close. With ``watch``, that rules file is reloaded when it changes."""
    env = os.environ if environ is None else environ
    app = web.Application()
    session = new_session()
    app[STATE] = GatewayState(
        active=_activate(rules, session, env),
        ledger=ledger,
        session=session,
        limiter=limiter,
        metrics=Metrics(),
        thresholds=Thresholds(ledger, session, env),
        environ=env,
    )
    app[ENVIRON] = env
    app.cleanup_ctx.append(_clients)
    if sweeper:
        app.cleanup_ctx.append(_sweeper)
    if watch is not None:
        app[WATCHED] = watch
        app.cleanup_ctx.append(_watcher)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/admin/rules", _admin_rules)
    app.router.add_get("/v1/admin/explain", _admin_explain)
    add_usage_routes(app)
    add_admin_routes(app)
    app.router.add_post("/v1/billing/stripe/webhook", stripe_webhook)
    app.router.add_post("/v1/billing/checkout", create_checkout)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


ENVIRON = web.AppKey("environ", Mapping[str, str])
WATCHED = web.AppKey("watched", Path)


def _activate(rules: Rules, session: aiohttp.ClientSession, env: Mapping[str, str]) -> Active:
    return Active(
        rules=rules,
        auth=Authenticator(rules.document.auth, environ=env),
        alerter=Alerter(rules.document.limits.spike, session, env),
        loaded_at=time.time(),
    )


async def reload_rules(app: web.Application, path: Path) -> dict[str, Any]:
    """Load ``path`` and put it in force for new requests; requests in flight finish under
    the rules they started with. A file with any error is refused whole and the rules in
    force stay. Returns (and keeps, for /v1/admin/rules) the outcome."""
    state = app[STATE]
    old = state.active
    try:
        rules = await asyncio.to_thread(load_rules, path)
        if rules.version == old.rules.version:
            return state.last_reload
        active = _activate(rules, state.session, app[ENVIRON])
        await state.ledger.sync_plans(rules.plan_allowances())
    except (ConfigError, LedgerUnavailable) as exc:
        errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
        state.metrics.reloads.labels("refused").inc()
        for error in errors:
            log.error("rules reload refused: %s: %s", path, error)
        log.error(
            "rules reload refused (%d error(s)); still serving version %s",
            len(errors),
            old.rules.version,
        )
        state.last_reload = {
            "outcome": "refused",
            "at": time.time(),
            "file": str(path),
            "errors": errors,
            "serving": old.rules.version,
        }
        return state.last_reload
    state.active = active
    state.limiter.config = rules.document.limits
    state.metrics.reloads.labels("ok").inc()
    log.info(
        "rules reloaded from %s: version %s -> %s, %d route(s)",
        path,
        old.rules.version,
        rules.version,
        len(rules.routes),
    )
    state.last_reload = {
        "outcome": "ok",
        "at": time.time(),
        "file": str(path),
        "errors": [],
        "serving": rules.version,
        "previous": old.rules.version,
    }

    async def retire() -> None:
        # Requests that authenticated under the old rules may still use its key cache.
        await asyncio.sleep(60)
        await old.auth.close()
        await old.alerter.close()

    task = asyncio.create_task(retire())
    state.retiring.add(task)
    task.add_done_callback(state.retiring.discard)
    return state.last_reload


def _fingerprint(path: Path) -> tuple[float, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime, stat.st_size


async def _watcher(app: web.Application) -> AsyncIterator[None]:
    path = app[WATCHED]

    async def watch() -> None:
        seen = _fingerprint(path)
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            now = _fingerprint(path)
            if now is not None and now != seen:
                seen = now
                await reload_rules(app, path)

    task = asyncio.create_task(watch(), name="rules-watcher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _healthz(request: web.Request) -> web.Response:
    """The process is up and serving."""
    return web.json_response({"status": "ok", "rules_version": request.app[STATE].rules.version})


async def _readyz(request: web.Request) -> web.Response:
    """Ready to meter: PostgreSQL and Redis reachable, rules loaded."""
    state = request.app[STATE]
    checks: dict[str, str] = {"rules": state.rules.version}
    ready = True
    try:
        await asyncio.wait_for(state.ledger.ping(), timeout=2)
        checks["postgres"] = "ok"
    except (LedgerUnavailable, TimeoutError) as exc:
        checks["postgres"] = f"unreachable: {exc}"
        ready = False
    try:
        await asyncio.wait_for(state.limiter.ping(), timeout=2)
        checks["redis"] = "ok"
    except (GatewayError, TimeoutError) as exc:
        checks["redis"] = f"unreachable: {exc}"
        ready = False
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def require_admin(request: web.Request) -> str:
    """The caller's name if it may use /v1/admin/: the GATEWAY_ADMIN_TOKEN, or a JWT with
    the configured admin role. Raises InvalidToken or Forbidden."""
    header = request.headers.get("Authorization", "")
    admin_token = request.app[ENVIRON].get("GATEWAY_ADMIN_TOKEN")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if admin_token and given and hmac.compare_digest(given.encode(), admin_token.encode()):
        return "admin-token"
    state = request.app[STATE]
    principal = await state.active.auth.authenticate(header or None)
    role = state.rules.document.auth.admin_role
    if role not in principal.roles:
        raise Forbidden(f"this endpoint needs the '{role}' role")
    return f"{principal.org}/{principal.user}"


async def _admin_rules(request: web.Request) -> web.Response:
    try:
        await require_admin(request)
    except GatewayError as exc:
        return exc.response(instance=request.path)
    state = request.app[STATE]
    rules = state.rules
    return web.json_response(
        {
            "version": rules.version,
            "source": rules.source,
            "loaded_at": state.active.loaded_at,
            "last_reload": state.last_reload or None,
            "rules": rules.document.model_dump(mode="json"),
        }
    )


async def _admin_explain(request: web.Request) -> web.Response:
    try:
        await require_admin(request)
    except GatewayError as exc:
        return exc.response(instance=request.path)
    state = request.app[STATE]
    method = request.query.get("method", "POST").upper()
    path = request.query.get("path")
    if not path:
        return InvalidQuery("give ?method=POST&path=/v1/...&token=<jwt>").response()
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


class InvalidQuery(GatewayError):
    status = 400
    code = "invalid_request"
    title = "Invalid request"


async def _clients(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    yield
    # Let every forwarded request settle before the connections it needs go away.
    if state.inflight:
        deadline = max((r.upstream.timeout_seconds for r in state.rules.routes), default=30)
        log.info("waiting for %d in-flight request(s) to settle", len(state.inflight))
        await asyncio.wait(list(state.inflight), timeout=deadline + 5)
    for task in list(state.retiring):
        task.cancel()
    await state.active.alerter.close()
    await state.thresholds.close()
    await state.session.close()
    await state.active.auth.close()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(state.rules.document.ledger.sweep_interval_seconds)
            try:
                expired = await state.ledger.expire_overdue_by_type()
                refreshed = await state.ledger.refresh_overdue()
            except LedgerUnavailable:
                state.metrics.store_errors.labels("ledger").inc()
                continue  # logged by the ledger; try again next round
            if expired:
                for token_type, tokens in expired.items():
                    state.metrics.tokens.labels(token_type, "expired").inc(tokens)
                log.warning(
                    "expired unsettled reservations and refunded them: %s",
                    ", ".join(f"{tokens} {tt} tokens" for tt, tokens in expired.items()),
                )
            if refreshed:
                log.info("started a new period for %d account(s)", refreshed)

    task = asyncio.create_task(sweep_forever(), name="ledger-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
