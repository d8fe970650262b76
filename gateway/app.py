"""Builds the aiohttp application: wiring, startup and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping

from aiohttp import web

from gateway.auth import Authenticator
from gateway.errors import LedgerUnavailable
from gateway.ledger import Ledger
from gateway.limits.alerts import Alerter
from gateway.limits.limiter import Limiter
from gateway.pipeline import handle
from gateway.proxy import new_session
from gateway.rules import Rules
from gateway.state import STATE, GatewayState

log = logging.getLogger("gateway.app")


def build_app(
    rules: Rules,
    ledger: Ledger,
    limiter: Limiter,
    *,
    environ: Mapping[str, str] | None = None,
    sweeper: bool = True,
) -> web.Application:
    """The gateway as an aiohttp application. Call with a running event loop. Raises
    ``ConfigError`` when the rules' keys cannot be loaded. The ledger and the limiter stay
    the caller's to close."""
    env = os.environ if environ is None else environ
    app = web.Application()
    session = new_session()
    app[STATE] = GatewayState(
        rules=rules,
        ledger=ledger,
        auth=Authenticator(rules.document.auth, environ=env),
        session=session,
        limiter=limiter,
        alerter=Alerter(rules.document.limits.spike, session, env),
    )
    app.cleanup_ctx.append(_clients)
    if sweeper:
        app.cleanup_ctx.append(_sweeper)
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "rules_version": request.app[STATE].rules.version})


async def _clients(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    yield
    # Let every forwarded request settle before the connections it needs go away.
    if state.inflight:
        deadline = max((r.upstream.timeout_seconds for r in state.rules.routes), default=30)
        log.info("waiting for %d in-flight request(s) to settle", len(state.inflight))
        await asyncio.wait(list(state.inflight), timeout=deadline + 5)
    await state.alerter.close()
    await state.session.close()
    await state.auth.close()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(state.rules.document.ledger.sweep_interval_seconds)
            try:
                expired = await state.ledger.expire_overdue()
                refreshed = await state.ledger.refresh_overdue()
            except LedgerUnavailable:
                continue  # logged by the ledger; try again next round
            if expired:
                log.warning("expired %d unsettled reservation(s) and refunded them", expired)
            if refreshed:
                log.info("started a new period for %d account(s)", refreshed)

    task = asyncio.create_task(sweep_forever(), name="ledger-sweeper")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
