"""The request path, in order: match, authenticate, limit, gate and reserve, forward, settle.

The invariant this module keeps: nothing is forwarded without a held reservation, and
every held reservation is settled exactly once by the upstream's outcome (2xx read to the
end commits; anything else refunds), whatever the client does meanwhile. Forwarding and
settlement run in their own task, shielded from the client's handler being cancelled when
it hangs up; the app waits for these tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.auth import Principal
from gateway.errors import (
    GatewayError,
    LedgerError,
    LedgerUnavailable,
    NoRoute,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.gate import record_shadow, reserve
from gateway.ledger import Ledger, ReserveOutcome, Settlement
from gateway.limits.limiter import Admission
from gateway.middleware import ROUTE_NAME, authenticate, request_id
from gateway.proxy import client_response_headers, map_client_error, open_upstream
from gateway.rules import Route, Rules
from gateway.state import STATE, GatewayState

log = logging.getLogger("gateway.pipeline")

# Retries for a settlement that fails because the ledger is briefly unreachable; after
# them the reservation stays held (the sweeper refunds it at its expiry) and the client
# is cut off before the end of the answer.
_SETTLE_RETRY_DELAYS = (0.05, 0.25, 1.0, 2.0)
_CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError)


async def handle(request: web.Request) -> web.StreamResponse:
    """The catch-all handler for metered routes. Refusals raise; the ``problems``
    middleware answers them."""
    state = request.app[STATE]
    active = state.active  # one snapshot for the whole request, whatever reloads meanwhile
    rules = active.rules
    rid = request_id(request)
    started = time.monotonic()
    limiter = state.limiter
    route = rules.match(request.method, request.path)
    if route is None:
        raise NoRoute(f"no route in rules.yaml matches {request.method} {request.path}")
    request[ROUTE_NAME] = route.name
    if not route.config.enforce:
        return await _shadow(request, state, route, rid, started)
    try:
        principal = await authenticate(request)
    except GatewayError:
        # An address blocked for repeated invalid tokens is refused as such; a valid
        # token is never refused for its address (many tenants share proxies).
        await limiter.check_address(request.remote or "")
        raise
    limits = await state.limits_for(principal.org, route, rules)
    # Limits before the ledger: a request refused by a limit is never charged.
    with state.metrics.redis_seconds.time():
        admission = await limiter.admit(
            principal.org, principal.user, route.token_type, limits, route.upstream.timeout_seconds
        )
    try:
        with state.metrics.ledger_seconds.labels("reserve").time():
            outcome = await reserve(state.ledger, rules.document, route, principal, rid)
    except GatewayError as exc:
        await limiter.release(admission)
        exc.headers.update(admission.headers)
        raise

    state.metrics.tokens.labels(route.token_type, "reserved").inc(route.cost)
    exchange = Exchange(
        request,
        route,
        principal,
        rid,
        state.ledger,
        started,
        admission,
        outcome,
        *_deadlines(rules, route, started),
    )
    return await _run_shielded(state, exchange)


async def _run_shielded(state: GatewayState, exchange: Exchange) -> web.StreamResponse:
    task = asyncio.create_task(exchange.run(state), name=f"exchange-{exchange.request_id}")
    state.inflight.add(task)
    task.add_done_callback(state.inflight.discard)
    # If the client hangs up and this handler is cancelled, the exchange goes on.
    return await asyncio.shield(task)


async def _shadow(
    request: web.Request, state: GatewayState, route: Route, rid: str, started: float
) -> web.StreamResponse:
    """A route with ``enforce: false``: every gate is evaluated and what it would refuse is
    logged and counted, then the request is forwarded anyway and journaled as a shadow
    entry that moves no balance."""
    would: list[str] = []
    principal = Principal(org="", user="")
    try:
        principal = await authenticate(request)
    except GatewayError as exc:
        would.append(exc.code)
    if principal.org:
        try:
            limits = await state.limits_for(principal.org, route)
            verdicts = await state.limiter.peek(
                principal.org, principal.user, route.token_type, limits
            )
            would.extend(v.refusal.code for v in verdicts if v.refusal is not None)
        except GatewayError as exc:
            would.append(exc.code)
    exchange = Exchange(
        request,
        route,
        principal,
        rid,
        state.ledger,
        started,
        Admission(),
        None,
        *_deadlines(state.rules, route, started),
        would_refuse=would,
    )
    return await _run_shielded(state, exchange)


def _deadlines(rules: Rules, route: Route, started: float) -> tuple[float, float]:
    """When a client that does not read is dropped, and when the whole exchange must be
    over: both before the reservation's expiry, leaving time to settle (with retries), so
    the sweeper never expires the hold of a live exchange."""
    timeout = route.upstream.timeout_seconds
    grace = rules.document.ledger.reservation_grace_seconds
    client_deadline = started + timeout + max(grace - 5, grace / 2)
    return client_deadline, started + timeout + grace - min(4.5, grace / 4)


class ExchangeOverdue(Exception):
    """The exchange reached its deadline before the upstream finished."""


@dataclass
class Exchange:
    """One forwarded request, from its held reservation (none in shadow mode) to its
    settlement."""

    request: web.Request
    route: Route
    caller: Principal
    request_id: str
    ledger: Ledger
    started: float
    admission: Admission
    outcome: ReserveOutcome | None  # None: a shadow-mode route
    client_deadline: float  # monotonic: past it, a client that does not read counts as gone
    deadline: float  # monotonic: the exchange is over by then, settled, before its expiry
    would_refuse: list[str] = field(default_factory=list)  # shadow mode: what gates said
    client_gone: bool = False
    charged: int = 0
    settled_as: str = "refunded"
    settlement: Settlement | None = None
    warning: str | None = None  # low balance, for the X-Tokens-Warning header

    @property
    def shadow(self) -> bool:
        return self.outcome is None

    def _gateway_headers(self, charged: bool) -> dict[str, str]:
        if self.outcome is None:
            return {"X-Tokens-Charged": "0", "X-Request-Id": self.request_id}
        cost = self.route.cost
        headers = {
            "X-Tokens-Charged": str(cost if charged else 0),
            "X-Tokens-Remaining": str(self.outcome.remaining + (0 if charged else cost)),
            "X-Reservation-Id": str(self.outcome.reservation_id),
            "X-Request-Id": self.request_id,
            **self.admission.headers,
        }
        if charged and self.warning:
            headers["X-Tokens-Warning"] = self.warning
        return headers

    async def run(self, state: GatewayState) -> web.StreamResponse:
        metrics = state.metrics
        metrics.in_flight.inc()
        if self.outcome is not None:
            self.warning = state.thresholds.warning(
                state.rules.document.alerts, self.route.token_type, self.outcome
            )
        status = 0
        try:
            response = await self._run(state)
            status = response.status
            return response
        finally:
            metrics.in_flight.dec()
            outcome = "shadow" if self.shadow else self.settled_as
            metrics.requests.labels(self.route.name, outcome, str(status or "")).inc()
            metrics.request_seconds.labels(self.route.name).observe(time.monotonic() - self.started)
            await state.limiter.release(self.admission)
            if self.settlement is not None:
                try:
                    await state.thresholds.after_commit(
                        state.rules.document.alerts, self.settlement
                    )
                except GatewayError as exc:
                    log.warning("could not check usage thresholds: %s", exc.detail)
            if self.charged:
                alert = await state.limiter.record_spend(self.caller.org, self.charged)
                if alert is not None:
                    state.alert(alert)

    async def _run(self, state: GatewayState) -> web.StreamResponse:
        upstream_started = time.monotonic()
        upstream_seconds = state.metrics.upstream_seconds.labels(self.route.config.upstream)
        try:
            upstream = await open_upstream(
                state.session, self.request, self.route, self.caller, self.request_id
            )
        except (UpstreamError, UpstreamTimeout) as exc:
            upstream_seconds.observe(time.monotonic() - upstream_started)
            await self._settle(state, ok=False, reason=exc.detail)
            self._log(exc.status, charged=False, note=exc.code)
            return exc.response(
                instance=self.request.path, headers=self._gateway_headers(charged=False)
            )
        except BaseException:
            await self._settle(state, ok=False, reason="gateway error before the upstream answered")
            raise
        try:
            return await self._relay(state, upstream, upstream_started)
        finally:
            upstream.release()

    async def _relay(
        self, state: GatewayState, upstream: aiohttp.ClientResponse, upstream_started: float
    ) -> web.StreamResponse:
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
        # The upstream's timeout counts only the time spent waiting for the upstream, never
        # the time spent waiting for the client to read.
        upstream_left = self.route.upstream.timeout_seconds - (time.monotonic() - upstream_started)
        chunks = upstream.content.iter_any().__aiter__()
        try:
            while True:
                waited = time.monotonic()
                if self.deadline - waited < upstream_left:
                    # The client's slowness has used up the exchange's time: past its
                    # deadline the reservation could expire under a live exchange.
                    upstream_left = self.deadline - waited
                    if upstream_left <= 0:
                        raise ExchangeOverdue()
                try:
                    async with asyncio.timeout(max(upstream_left, 0.001)):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                upstream_left -= time.monotonic() - waited
                if to_go is not None:
                    to_go -= len(chunk)
                    if to_go <= 0:
                        chunk, held_back = chunk[:-1], chunk[-1:]
                await self._send(response.write(chunk))
        except ExchangeOverdue:
            failure = "the exchange reached its deadline (the client read too slowly)"
        except (aiohttp.ClientError, TimeoutError) as exc:
            if time.monotonic() >= self.deadline:
                failure = "the exchange reached its deadline (the client read too slowly)"
            else:
                failure = map_client_error(exc, self.route.config.upstream).detail + " mid-body"
        except BaseException:
            await self._settle(state, ok=False, reason="gateway error while relaying the body")
            raise
        state.metrics.upstream_seconds.labels(self.route.config.upstream).observe(
            time.monotonic() - upstream_started
        )
        if failure is None:
            settled = await self._settle(
                state, ok=ok, reason=f"upstream answered {upstream.status}"
            )
            if ok and not settled:
                # Never a complete-looking paid answer whose charge did not land.
                self._log(upstream.status, charged=False, note="commit failed; answer cut off")
                if self.request.transport is not None:
                    self.request.transport.abort()
                return response
            if held_back:
                await self._send(response.write(held_back))
            await self._send(response.write_eof())
            self._log(upstream.status, charged=ok and not self.shadow)
        else:
            await self._settle(state, ok=False, reason=failure)
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
            # A client that stops reading must not hold the settlement past the
            # reservation's expiry (the sweeper would refund what it then receives).
            await asyncio.wait_for(
                write, timeout=max(self.client_deadline - time.monotonic(), 0.001)
            )
        except TimeoutError:
            self.client_gone = True
            log.warning(
                "client stopped reading request_id=%s; dropping it and settling by the upstream",
                self.request_id,
            )
            if self.request.transport is not None:
                self.request.transport.abort()
        except _CLIENT_GONE as exc:
            self.client_gone = True
            log.info(
                "client went away request_id=%s: %s; reading the upstream to the end to settle",
                self.request_id,
                type(exc).__name__,
            )

    async def _settle(self, state: GatewayState, *, ok: bool, reason: str) -> bool:
        """Settle by the upstream's outcome; False when the ledger did not take it (then
        the reservation stays held and expires as a refund)."""
        if self.outcome is None:
            await self._settle_shadow(state, ok=ok)
            return True
        reservation_id = self.outcome.reservation_id
        assert reservation_id is not None
        if self.client_gone:
            reason += " (client disconnected before the end)"
        metrics = state.metrics
        token_type = self.route.token_type
        for delay in (*_SETTLE_RETRY_DELAYS, None):
            try:
                with metrics.ledger_seconds.labels("commit" if ok else "refund").time():
                    if ok:
                        settled = await self.ledger.commit(reservation_id, actor=self.caller.user)
                        self.charged, self.settled_as = settled.charged, "committed"
                        self.settlement = settled
                        metrics.tokens.labels(token_type, "committed").inc(settled.charged)
                    else:
                        await self.ledger.refund(reservation_id, reason=reason, actor="gateway")
                        metrics.tokens.labels(token_type, "refunded").inc(self.route.cost)
                return True
            except LedgerError as exc:
                # Settled already (the sweeper expired it during a long outage): the
                # ledger's word is final and the tokens are accounted for either way.
                log.warning("settlement of %s refused: %s", reservation_id, exc)
                return False
            except LedgerUnavailable:
                metrics.store_errors.labels("ledger").inc()
                if delay is None:
                    log.error(
                        "could not settle reservation %s (%s); it stays held and the "
                        "sweeper refunds it at its expiry",
                        reservation_id,
                        "commit" if ok else "refund",
                    )
                    return False
                await asyncio.sleep(delay)
        return False

    async def _settle_shadow(self, state: GatewayState, *, ok: bool) -> None:
        would = list(self.would_refuse)
        if self.caller.org and not would:
            try:
                refused = await record_shadow(
                    self.ledger,
                    state.rules.document,
                    self.route,
                    self.caller,
                    self.request_id,
                    charged=self.route.cost if ok else 0,
                )
            except LedgerUnavailable as exc:
                refused = exc
            if refused is not None:
                would.append(refused.code)
            elif ok:
                state.metrics.tokens.labels(self.route.token_type, "shadow").inc(self.route.cost)
        for code in would:
            state.metrics.shadow_refusals.labels(self.route.name, code).inc()
        if would:
            log.warning(
                "shadow route %s would have refused request_id=%s org=%s: %s",
                self.route.name,
                self.request_id,
                self.caller.org or "-",
                ", ".join(would),
                extra={"request_id": self.request_id, "would_refuse": would},
            )

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
            self.request_id,
            (time.monotonic() - self.started) * 1000,
            f" ({note})" if note else "",
            extra={
                "request_id": self.request_id,
                "org": self.caller.org,
                "user": self.caller.user,
                "route": self.route.name,
                "status": status,
                "charged": self.route.cost if charged else 0,
                "shadow": self.shadow,
            },
        )
