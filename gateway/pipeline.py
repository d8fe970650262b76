"""The request path, in order: authenticate, match, gate and reserve, forward, settle.

The invariant this module keeps: nothing is forwarded without a held reservation, and
every held reservation is settled exactly once by the upstream's outcome (2xx read to the
end commits; anything else refunds), whatever the client does meanwhile. Forwarding and
settlement run in their own task, shielded from the client's handler being cancelled when
it hangs up; the app waits for these tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import (
    GatewayError,
    InsufficientTokens,
    LedgerError,
    LedgerUnavailable,
    NoRoute,
    PlanForbidden,
    UnknownOrganization,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.ledger import Ledger, ReserveOutcome
from gateway.limits.limiter import Admission
from gateway.proxy import Caller, client_response_headers, map_client_error, open_upstream
from gateway.rules import Route, Rules
from gateway.state import STATE, GatewayState

log = logging.getLogger("gateway.pipeline")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Retries for a settlement that fails because the ledger is briefly unreachable; after
# them the reservation stays held and the sweeper refunds it at its expiry.
_SETTLE_RETRY_DELAYS = (0.05, 0.25, 1.0, 2.0)
# Refusals that count toward blocking a principal (or an address, for 401s).
_COUNTED_REFUSALS = frozenset({401, 402, 403, 429})
_CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError)


def request_id_of(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def handle(request: web.Request) -> web.StreamResponse:
    """The catch-all handler for metered routes."""
    state = request.app[STATE]
    rules = state.rules  # one snapshot for the whole request, whatever reloads meanwhile
    request_id = request_id_of(request)
    started = time.monotonic()
    limiter = state.limiter
    address = request.remote or ""
    caller: Caller | None = None
    admission = Admission()
    try:
        await limiter.check_address(address)
        principal = await state.auth.authenticate(request.headers.get("Authorization"))
        caller = Caller(principal.org, principal.user, principal.roles, request_id)
        route = rules.match(request.method, request.path)
        if route is None:
            raise NoRoute(f"no route in rules.yaml matches {request.method} {request.path}")
        limits = await state.limits_for(caller.org, route)
        # Limits before the ledger: a request refused by a limit is never charged.
        admission = await limiter.admit(
            caller.org, caller.user, route.token_type, limits, route.upstream.timeout_seconds
        )
        outcome = await _reserve(state.ledger, rules, route, caller)
    except GatewayError as exc:
        await limiter.release(admission)
        log.info(
            "refused %s %s status=%d code=%s request_id=%s: %s",
            request.method,
            request.path,
            exc.status,
            exc.code,
            request_id,
            exc.detail,
        )
        if exc.status in _COUNTED_REFUSALS and exc.code != "blocked":
            await limiter.record_refusal(
                caller.org if caller else None, caller.user if caller else None, address
            )
        return exc.response(
            instance=request.path, headers={"X-Request-Id": request_id, **admission.headers}
        )

    exchange = Exchange(request, route, caller, outcome, state.ledger, started, admission)
    task = asyncio.create_task(exchange.run(state), name=f"exchange-{request_id}")
    state.inflight.add(task)
    task.add_done_callback(state.inflight.discard)
    # If the client hangs up and this handler is cancelled, the exchange goes on.
    return await asyncio.shield(task)


async def _reserve(ledger: Ledger, rules: Rules, route: Route, caller: Caller) -> ReserveOutcome:
    doc = rules.document
    outcome = await ledger.reserve(
        caller.org,
        route.token_type,
        route.cost,
        ttl_seconds=route.upstream.timeout_seconds + doc.ledger.reservation_grace_seconds,
        plans=route.config.plans,
        route=route.name,
        user=caller.user,
        request_id=caller.request_id,
    )
    if outcome.status == "ok":
        return outcome
    if outcome.status == "unknown_organization":
        raise UnknownOrganization(
            f"organization '{caller.org}' is not known to the gateway; an operator must "
            "create it (gateway org create)",
            organization=caller.org,
        )
    if outcome.status == "plan_forbidden":
        plan = outcome.plan or "unknown"
        plan_config = doc.plans.get(plan)
        upgrade = plan_config.upgrade_to if plan_config else None
        if route.config.plans is not None and plan not in route.config.plans:
            detail = (
                f"route '{route.name}' is available on plans {', '.join(route.config.plans)}; "
                f"organization '{caller.org}' is on plan '{plan}'"
            )
        else:
            detail = f"plan '{plan}' does not include {route.token_type}"
        if upgrade:
            detail += f"; upgrade to '{upgrade}' to use it"
        raise PlanForbidden(detail, plan=plan, token_type=route.token_type, upgrade_to=upgrade)
    if outcome.status == "insufficient":
        refresh = outcome.period_end.isoformat() if outcome.period_end else None
        raise InsufficientTokens(
            f"{route.name} costs {route.cost} {route.token_type} tokens and "
            f"organization '{caller.org}' has {outcome.remaining}"
            + (f"; the allowance refreshes at {refresh}" if refresh else ""),
            token_type=route.token_type,
            cost=route.cost,
            balance=outcome.remaining,
            refresh_at=refresh,
        )
    raise LedgerUnavailable(f"unexpected reserve status {outcome.status!r}")


@dataclass
class Exchange:
    """One forwarded request, from its held reservation to its settlement."""

    request: web.Request
    route: Route
    caller: Caller
    outcome: ReserveOutcome
    ledger: Ledger
    started: float
    admission: Admission
    client_gone: bool = False
    charged: int = 0

    @property
    def reservation_id(self) -> uuid.UUID:
        assert self.outcome.reservation_id is not None
        return self.outcome.reservation_id

    def _gateway_headers(self, charged: bool) -> dict[str, str]:
        cost = self.route.cost
        return {
            "X-Tokens-Charged": str(cost if charged else 0),
            "X-Tokens-Remaining": str(self.outcome.remaining + (0 if charged else cost)),
            "X-Reservation-Id": str(self.reservation_id),
            "X-Request-Id": self.caller.request_id,
            **self.admission.headers,
        }

    async def run(self, state: GatewayState) -> web.StreamResponse:
        try:
            return await self._run(state.session)
        finally:
            await state.limiter.release(self.admission)
            if self.charged:
                alert = await state.limiter.record_spend(self.caller.org, self.charged)
                if alert is not None:
                    state.alert(alert)

    async def _run(self, session: aiohttp.ClientSession) -> web.StreamResponse:
        try:
            upstream = await open_upstream(session, self.request, self.route, self.caller)
        except (UpstreamError, UpstreamTimeout) as exc:
            await self._settle(ok=False, reason=exc.detail)
            self._log(exc.status, charged=False, note=exc.code)
            return exc.response(
                instance=self.request.path, headers=self._gateway_headers(charged=False)
            )
        except BaseException:
            await self._settle(ok=False, reason="gateway error before the upstream answered")
            raise
        try:
            return await self._relay(upstream)
        finally:
            upstream.release()

    async def _relay(self, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        ok = 200 <= upstream.status < 300
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(client_response_headers(upstream))
        response.headers.update(self._gateway_headers(charged=ok))
        await self._send(response.prepare(self.request))
        failure: str | None = None
        # The client must not see the response complete before the ledger has settled it
        # (it may check its balance next). A chunked body ends with write_eof, after the
        # settlement; a sized body ends with its last byte, so that byte is held back.
        to_go = upstream.content_length
        held_back = b""
        try:
            async for chunk in upstream.content.iter_any():
                if to_go is not None:
                    to_go -= len(chunk)
                    if to_go <= 0:
                        chunk, held_back = chunk[:-1], chunk[-1:]
                await self._send(response.write(chunk))
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = map_client_error(exc, self.route.config.upstream).detail + " mid-body"
        except BaseException:
            await self._settle(ok=False, reason="gateway error while relaying the body")
            raise
        if failure is None:
            await self._settle(ok=ok, reason=f"upstream answered {upstream.status}")
            if held_back:
                await self._send(response.write(held_back))
            await self._send(response.write_eof())
            self._log(upstream.status, charged=ok)
        else:
            await self._settle(ok=False, reason=failure)
            self._log(upstream.status, charged=False, note="upstream failed mid-body")
            # The client must see a broken response, not a complete-looking short one.
            if self.request.transport is not None:
                self.request.transport.abort()
        return response

    async def _send(self, write: Coroutine[Any, Any, Any]) -> None:
        """Await a write to the client; a client that went away is noted, not fatal: the
        upstream's answer is still read to the end and decides the settlement."""
        if self.client_gone:
            write.close()
            return
        try:
            await write
        except _CLIENT_GONE as exc:
            self.client_gone = True
            log.info(
                "client went away request_id=%s reservation=%s: %s; reading the upstream to "
                "the end to settle",
                self.caller.request_id,
                self.reservation_id,
                type(exc).__name__,
            )

    async def _settle(self, *, ok: bool, reason: str) -> None:
        if self.client_gone:
            reason += " (client disconnected before the end)"
        for delay in (*_SETTLE_RETRY_DELAYS, None):
            try:
                if ok:
                    settled = await self.ledger.commit(self.reservation_id, actor=self.caller.user)
                    self.charged = settled.charged
                else:
                    await self.ledger.refund(self.reservation_id, reason=reason, actor="gateway")
                return
            except LedgerError as exc:
                # Settled already (the sweeper expired it during a long outage): the
                # ledger's word is final and the tokens are accounted for either way.
                log.warning("settlement of %s refused: %s", self.reservation_id, exc)
                return
            except LedgerUnavailable:
                if delay is None:
                    log.error(
                        "could not settle reservation %s (%s); it stays held and the "
                        "sweeper refunds it at its expiry",
                        self.reservation_id,
                        "commit" if ok else "refund",
                    )
                    return
                await asyncio.sleep(delay)

    def _log(self, status: int, *, charged: bool, note: str = "") -> None:
        log.info(
            "%s %s status=%d org=%s user=%s route=%s charged=%d request_id=%s ms=%.1f%s",
            self.request.method,
            self.request.path,
            status,
            self.caller.org,
            self.caller.user,
            self.route.name,
            self.route.cost if charged else 0,
            self.caller.request_id,
            (time.monotonic() - self.started) * 1000,
            f" ({note})" if note else "",
        )
