"""Builds the aiohttp application: wiring, startup and shutdown, health, metrics, reloads
and the operators' endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.alerts import Thresholds
from gateway.api.admin import admin_app
from gateway.api.dashboard import dashboard, dashboard_asset
from gateway.api.reservations import create_reservation, settle_reservation, show_reservation
from gateway.api.stats import stats
from gateway.api.tokens import check_balance
from gateway.billing.checkout import create_checkout
from gateway.billing.stripe_webhooks import stripe_webhook
from gateway.errors import ConfigError, GatewayError, LedgerUnavailable
from gateway.leases import Leases
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.metrics import Metrics
from gateway.middleware import problems
from gateway.pipeline import handle
from gateway.proxy import new_session
from gateway.rules import Rules, load_rules
from gateway.runtime import build_active
from gateway.state import STATE, GatewayState
from gateway.sweeper import Sweeper, sweeper_mode

log = logging.getLogger("gateway.app")

WATCH_INTERVAL_SECONDS = 1.0


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
    app = web.Application(middlewares=[problems])
    session = new_session()
    try:
        active = build_active(rules, env, session)
    except ConfigError:
        session.detach()  # nothing went through it: closed without awaiting, no warning
        raise
    metrics = Metrics()
    app[STATE] = GatewayState(
        active=active,
        ledger=ledger,
        session=session,
        limiter=limiter,
        metrics=metrics,
        thresholds=Thresholds(ledger, session, env),
        leases=Leases(ledger, limiter, metrics),
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
    app.router.add_get("/v1/tokens/stats", stats)
    app.router.add_post("/v1/tokens/check-balance", check_balance)
    app.router.add_post("/v1/tokens/reservations", create_reservation)
    app.router.add_get("/v1/tokens/reservations/{id}", show_reservation)
    app.router.add_post(r"/v1/tokens/reservations/{id}/{action:commit|refund}", settle_reservation)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/dashboard/{name}", dashboard_asset)
    app.router.add_post("/v1/billing/stripe/webhook", stripe_webhook)
    app.router.add_post("/v1/billing/checkout", create_checkout)
    app.add_subapp("/v1/admin/", admin_app())
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


ENVIRON = web.AppKey("environ", Mapping[str, str])
WATCHED = web.AppKey("watched", Path)


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
        active = build_active(rules, app[ENVIRON], state.session)
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


async def _clients(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    # Leases: holds not drawn in time are given back by this task (see gateway.leases).
    leases = asyncio.create_task(
        state.leases.run(lambda: state.rules.document.ledger.leases), name="leases"
    )
    # Spend for spike detection is counted in memory and added to Redis once a second,
    # off the request path (an alert is at most a second late).
    async with state.limiter.flushing_spend(state.alert):
        with state.metrics.gc_pauses():
            yield
        # Let every forwarded request settle before the connections it needs go away.
        if state.inflight:
            deadline = max((r.upstream.timeout_seconds for r in state.rules.routes), default=30)
            log.info("waiting for %d in-flight request(s) to settle", len(state.inflight))
            await asyncio.wait(list(state.inflight), timeout=deadline + 5)
        leases.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leases
        await state.leases.close()
    for task in list(state.retiring):
        task.cancel()
    await state.active.alerter.close()
    await state.thresholds.close()
    await state.session.close()
    await state.active.auth.close()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    sweeper = Sweeper(
        state.ledger,
        state.metrics,
        # Read each round: a rules reload may change it.
        interval=lambda: state.rules.document.ledger.sweep_interval_seconds,
        mode=sweeper_mode(app[ENVIRON]),
    )
    task = asyncio.create_task(sweeper.run(), name="ledger-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
