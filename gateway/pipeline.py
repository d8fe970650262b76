"""The request path, in order: match, authenticate, limit, gate and reserve, forward, settle.

The invariant this module keeps: nothing is forwarded without a held reservation, and
every held reservation is settled exactly once by the upstream's outcome (2xx read to the
end commits; anything else refunds), whatever the client does meanwhile. Forwarding and
settlement run in their own task, shielded from the client's handler being cancelled when
it hangs up; the app waits for these tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import (
    FeatureDegraded,
    GatewayError,
    InsufficientTokens,
    LedgerError,
    LedgerUnavailable,
    LicenseSuspended,
    NoRoute,
    PlanForbidden,
    QuotaExceeded,
    UnknownOrganization,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.ledger import Ledger, ReserveOutcome, Settlement
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
    active = state.active  # one snapshot for the whole request, whatever reloads meanwhile
    rules = active.rules
    metrics = state.metrics
    request_id = request_id_of(request)
    started = time.monotonic()
    limiter = state.limiter
    address = request.remote or ""
    caller: Caller | None = None
    route: Route | None = None
    admission = Admission()
    try:
        route = rules.match(request.method, request.path)
        if route is None:
            raise NoRoute(f"no route in rules.yaml matches {request.method} {request.path}")
        if not route.config.enforce:
            return await _shadow(request, state, route, request_id, started)
        try:
            principal = await active.auth.authenticate(request.headers.get("Authorization"))
        except GatewayError:
            # An address blocked for repeated invalid tokens is refused as such; a valid
            # token is never refused for its address (many tenants share proxies).
            await limiter.check_address(address)
            raise
        caller = Caller(principal.org, principal.user, principal.roles, request_id)
        limits = await state.limits_for(caller.org, route, rules)
        # Limits before the ledger: a request refused by a limit is never charged.
        with metrics.redis_seconds.time():
            admission = await limiter.admit(
                caller.org, caller.user, route.token_type, limits, route.upstream.timeout_seconds
            )
        with metrics.ledger_seconds.labels("reserve").time():
            outcome = await reserve(state.ledger, rules, route, caller)
    except GatewayError as exc:
        await limiter.release(admission)
        return await refuse(request, state, exc, caller, route, request_id, admission.headers)

    metrics.tokens.labels(route.token_type, "reserved").inc(route.cost)
    exchange = Exchange(
        request,
        route,
        caller,
        state.ledger,
        started,
        admission,
        outcome,
        client_deadline=_client_deadline(rules, route, started),
    )
    return await _run_shielded(state, exchange)


async def refuse(
    request: web.Request,
    state: GatewayState,
    exc: GatewayError,
    caller: Caller | None,
    route: Route | None,
    request_id: str,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Log, count and answer a refusal; refusals that suggest abuse count toward a block."""
    metrics = state.metrics
    log.info(
        "refused %s %s status=%d code=%s request_id=%s: %s",
        request.method,
        request.path,
        exc.status,
        exc.code,
        request_id,
        exc.detail,
        extra={"request_id": request_id, "status": exc.status, "code": exc.code},
    )
    metrics.refusals.labels(exc.code).inc()
    metrics.requests.labels(route.name if route else "", "refused", str(exc.status)).inc()
    if exc.code == "ledger_unavailable":
        metrics.store_errors.labels("ledger").inc()
    elif exc.code == "limits_unavailable":
        metrics.store_errors.labels("redis").inc()
    if exc.status in _COUNTED_REFUSALS and exc.code != "blocked":
        await state.limiter.record_refusal(
            caller.org if caller else None, caller.user if caller else None, request.remote
        )
    return exc.response(
        instance=request.path, headers={"X-Request-Id": request_id, **(headers or {})}
    )


async def _run_shielded(state: GatewayState, exchange: Exchange) -> web.StreamResponse:
    task = asyncio.create_task(exchange.run(state), name=f"exchange-{exchange.caller.request_id}")
    state.inflight.add(task)
    task.add_done_callback(state.inflight.discard)
    # If the client hangs up and this handler is cancelled, the exchange goes on.
    return await asyncio.shield(task)


async def _shadow(
    request: web.Request, state: GatewayState, route: Route, request_id: str, started: float
) -> web.StreamResponse:
    """A route with ``enforce: false``: every gate is evaluated and what it would refuse is
    logged and counted, then the request is forwarded anyway and journaled as a shadow
    entry that moves no balance."""
    would: list[str] = []
    org = user = ""
    roles: frozenset[str] = frozenset()
    try:
        principal = await state.active.auth.authenticate(request.headers.get("Authorization"))
        org, user, roles = principal.org, principal.user, principal.roles
    except GatewayError as exc:
        would.append(exc.code)
    admission = Admission()
    if org:
        try:
            limits = await state.limits_for(org, route)
            verdicts = await state.limiter.peek(org, user, route.token_type, limits)
            would.extend(_limit_code(name) for name, ok, _ in verdicts if not ok)
        except GatewayError as exc:
            would.append(exc.code)
    caller = Caller(org, user, roles, request_id)
    exchange = Exchange(
        request,
        route,
        caller,
        state.ledger,
        started,
        admission,
        None,
        client_deadline=_client_deadline(state.rules, route, started),
        would_refuse=would,
    )
    return await _run_shielded(state, exchange)


def _client_deadline(rules: Rules, route: Route, started: float) -> float:
    """Shortly before the reservation's expiry: by then the response must be delivered."""
    grace = rules.document.ledger.reservation_grace_seconds
    return started + route.upstream.timeout_seconds + max(grace - 5, grace / 2)


def _limit_code(limit: str) -> str:
    kind = limit.split(" ", 1)[0]
    return {
        "blocks": "blocked",
        "rate": "rate_limited",
        "min_interval": "too_frequent",
        "concurrency": "too_many_in_flight",
    }.get(kind, kind)


async def reserve(
    ledger: Ledger,
    rules: Rules,
    route: Route,
    caller: Caller,
    *,
    ttl_seconds: float | None = None,
    idempotency_key: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> ReserveOutcome:
    """Hold the route's cost for the caller; refusals raise the contract's errors."""
    doc = rules.document
    degrade_after = next(
        (s.after_days for s in doc.license.degradation_order if route.token_type in s.token_types),
        None,
    )
    outcome = await ledger.reserve(
        caller.org,
        route.token_type,
        route.cost,
        ttl_seconds=ttl_seconds
        or route.upstream.timeout_seconds + doc.ledger.reservation_grace_seconds,
        plans=route.config.plans,
        route=route.name,
        user=caller.user,
        request_id=caller.request_id,
        idempotency_key=idempotency_key,
        metadata=metadata,
        grace_days=doc.license.grace_period_days,
        degrade_after_days=degrade_after,
    )
    if outcome.status in ("ok", "duplicate"):
        return outcome
    if outcome.status == "license_suspended":
        when = outcome.license_date
        raise LicenseSuspended(
            f"the license of organization '{caller.org}' is suspended"
            + (f" since {when:%Y-%m-%d} (the payment grace period ended)" if when else "")
            + "; all AI features are off until the account is paid",
            suspended_at=when.isoformat() if when else None,
        )
    if outcome.status == "quota_exceeded":
        quota = json.loads(outcome.detail or "{}")
        kind, _, name = str(quota.get("subject", ":")).partition(":")
        whom = f"user '{name}'" if kind == "user" else f"team '{name}'"
        raise QuotaExceeded(
            f"{route.name} costs {route.cost} {route.token_type} tokens and {whom} has used "
            f"{quota.get('spent')} of its quota of {quota.get('quota')} this period",
            token_type=route.token_type,
            cost=route.cost,
            quota=quota.get("quota"),
            spent=quota.get("spent"),
            subject=quota.get("subject"),
        )
    if outcome.status == "feature_degraded":
        when = outcome.license_date
        assert when is not None
        raise FeatureDegraded(
            f"{route.token_type} has been switched off since {when:%Y-%m-%d} because a "
            "payment failed; pay the open invoice to restore it at once",
            token_type=route.token_type,
            degraded_at=when.isoformat(),
        )
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
    """One forwarded request, from its held reservation (none in shadow mode) to its
    settlement."""

    request: web.Request
    route: Route
    caller: Caller
    ledger: Ledger
    started: float
    admission: Admission
    outcome: ReserveOutcome | None  # None: a shadow-mode route
    client_deadline: float  # monotonic: past it, a client that does not read counts as gone
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
            return {"X-Tokens-Charged": "0", "X-Request-Id": self.caller.request_id}
        cost = self.route.cost
        headers = {
            "X-Tokens-Charged": str(cost if charged else 0),
            "X-Tokens-Remaining": str(self.outcome.remaining + (0 if charged else cost)),
            "X-Reservation-Id": str(self.outcome.reservation_id),
            "X-Request-Id": self.caller.request_id,
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
            upstream = await open_upstream(state.session, self.request, self.route, self.caller)
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
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = map_client_error(exc, self.route.config.upstream).detail + " mid-body"
        except BaseException:
            await self._settle(state, ok=False, reason="gateway error while relaying the body")
            raise
        state.metrics.upstream_seconds.labels(self.route.config.upstream).observe(
            time.monotonic() - upstream_started
        )
        if failure is None:
            await self._settle(state, ok=ok, reason=f"upstream answered {upstream.status}")
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
                self.caller.request_id,
            )
            if self.request.transport is not None:
                self.request.transport.abort()
        except _CLIENT_GONE as exc:
            self.client_gone = True
            log.info(
                "client went away request_id=%s: %s; reading the upstream to the end to settle",
                self.caller.request_id,
                type(exc).__name__,
            )

    async def _settle(self, state: GatewayState, *, ok: bool, reason: str) -> None:
        if self.outcome is None:
            await self._settle_shadow(state, ok=ok)
            return
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
                return
            except LedgerError as exc:
                # Settled already (the sweeper expired it during a long outage): the
                # ledger's word is final and the tokens are accounted for either way.
                log.warning("settlement of %s refused: %s", reservation_id, exc)
                return
            except LedgerUnavailable:
                metrics.store_errors.labels("ledger").inc()
                if delay is None:
                    log.error(
                        "could not settle reservation %s (%s); it stays held and the "
                        "sweeper refunds it at its expiry",
                        reservation_id,
                        "commit" if ok else "refund",
                    )
                    return
                await asyncio.sleep(delay)

    async def _settle_shadow(self, state: GatewayState, *, ok: bool) -> None:
        would = list(self.would_refuse)
        if self.caller.org and not would:
            try:
                verdict = await self.ledger.record_shadow(
                    self.caller.org,
                    self.route.token_type,
                    self.route.cost,
                    charged=self.route.cost if ok else 0,
                    plans=self.route.config.plans,
                    route=self.route.name,
                    user=self.caller.user,
                    request_id=self.caller.request_id,
                )
            except LedgerUnavailable:
                verdict = "ledger_unavailable"
            if verdict != "ok":
                would.append(_SHADOW_CODES.get(verdict, verdict))
            elif ok:
                state.metrics.tokens.labels(self.route.token_type, "shadow").inc(self.route.cost)
        for code in would:
            state.metrics.shadow_refusals.labels(self.route.name, code).inc()
        if would:
            log.warning(
                "shadow route %s would have refused request_id=%s org=%s: %s",
                self.route.name,
                self.caller.request_id,
                self.caller.org or "-",
                ", ".join(would),
                extra={"request_id": self.caller.request_id, "would_refuse": would},
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
            self.caller.request_id,
            (time.monotonic() - self.started) * 1000,
            f" ({note})" if note else "",
            extra={
                "request_id": self.caller.request_id,
                "org": self.caller.org,
                "user": self.caller.user,
                "route": self.route.name,
                "status": status,
                "charged": self.route.cost if charged else 0,
                "shadow": self.shadow,
            },
        )


_SHADOW_CODES = {
    "insufficient": "insufficient_tokens",
    "plan_forbidden": "plan_forbidden",
    "unknown_organization": "unknown_organization",
}
