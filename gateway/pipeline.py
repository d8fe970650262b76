"""The request path, in order: match, authenticate, limit, gate and reserve, forward, settle.

The invariant this module keeps: nothing is forwarded without a held reservation, and
every held reservation is settled exactly once by the upstream's outcome (2xx read to the
end commits; anything else refunds), whatever the client does meanwhile. Forwarding and
settlement run in their own task, which the client's handler being cancelled (when it hangs
up) does not cancel; the app waits for these tasks at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from aiohttp import web

from gateway.auth import Principal
from gateway.errors import (
    DuplicateRequest,
    GatewayError,
    NoRoute,
    PayloadTooLarge,
    RequestTimeout,
)
from gateway.exchange import Exchange
from gateway.gate import fingerprint, idempotency_key, reserve
from gateway.limits.limiter import Admission
from gateway.metering import inspect_request
from gateway.middleware import ROUTE_NAME, authenticate, request_id
from gateway.rules import Route, Rules
from gateway.state import STATE, GatewayState

log = logging.getLogger("gateway.pipeline")


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
    key = idempotency_key(request)
    usage = None
    if route.config.usage is not None:
        body = await _read_body(
            request, route.config.usage.max_request_bytes, route.upstream.timeout_seconds
        )
        usage = inspect_request(
            route.config.usage, body, request.headers.get("Content-Encoding", "")
        )
    amount = usage.hold if usage is not None else route.cost
    limits = await state.limits_for(principal.org, route, rules)
    # Leases: a fixed-cost request without an idempotency key draws an admission and a
    # hold made ahead for its caller (if there are) and is charged just after its answer.
    leases = rules.document.ledger.leases
    deferred = leases is not None and key is None and usage is None
    # Limits before the ledger: a request refused by a limit is never charged.
    admission = (
        state.leases.admit(leases, rules, route, principal, limits) if leases and deferred else None
    )
    if admission is None:
        with state.metrics.redis_seconds.time():
            admission = await limiter.admit(
                principal.org,
                principal.user,
                route.token_type,
                limits,
                route.upstream.timeout_seconds,
                tokens=amount,
            )
    leased = (
        await state.leases.draw(leases, rules, route, principal) if leases and deferred else None
    )
    try:
        if leased is not None:
            outcome = leased
        else:
            with state.metrics.ledger_seconds.labels("reserve").time():
                outcome = await reserve(
                    state.ledger,
                    rules.document,
                    route,
                    principal,
                    rid,
                    amount=amount,
                    idempotency_key=key,
                    idempotency_fingerprint=fingerprint(principal, "proxy", route) if key else None,
                )
            if outcome.status == "duplicate":
                raise await _duplicate(state, outcome.reservation_id)
            state.metrics.tokens.labels(route.token_type, "reserved").inc(amount)
            if leases and deferred:
                state.leases.reserved(leases, rules, route, principal, outcome)
    except GatewayError as exc:
        await limiter.finish(admission, 0)
        exc.headers.update(admission.headers)
        raise

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
        usage_request=usage,
        deferred=deferred,
        leased=leased is not None,
    )
    return await _run_shielded(state, exchange)


async def _read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    """The request's body, refused with 413 beyond ``limit`` bytes (before reading it when
    its Content-Length says so) and with 408 when it takes longer than ``seconds``."""
    too_large = PayloadTooLarge(
        f"this route is priced by usage and reads its request body to find the model; "
        f"bodies over {limit} bytes are refused (usage.max_request_bytes)"
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {seconds:g}s (the upstream's timeout)"
        ) from None
    return b"".join(chunks)


async def _duplicate(state: GatewayState, reservation_id: uuid.UUID | None) -> DuplicateRequest:
    """The refusal of a request repeating an Idempotency-Key: the earlier request is not
    forwarded again, and its reservation and charge are named."""
    assert reservation_id is not None
    earlier = await state.ledger.reservation(reservation_id)
    assert earlier is not None
    charge = (
        f"charged {earlier.charged}"
        if earlier.state == "committed"
        else {"held": "still in flight", "refunded": "refunded", "expired": "refunded (expired)"}[
            earlier.state
        ]
    )
    return DuplicateRequest(
        f"this Idempotency-Key was already used for reservation {earlier.id} ({charge}); "
        "the request was not forwarded again",
        reservation_id=str(earlier.id),
        state=earlier.state,
        charged=earlier.charged or 0,
    )


async def _run_shielded(state: GatewayState, exchange: Exchange) -> web.StreamResponse:
    # If the client hangs up and this handler is cancelled, only its wait for the answer
    # is: the exchange goes on in its own task. The exchange hands its answer over itself,
    # so that the handler (and the next request on a kept-alive connection) resumes one
    # turn of the event loop after the exchange ends, not two as through asyncio.shield.
    answer: asyncio.Future[web.StreamResponse] = asyncio.get_running_loop().create_future()
    exchange.answer = answer
    task = asyncio.create_task(
        _exchange(state, exchange, answer), name=f"exchange-{exchange.request_id}"
    )
    state.inflight.add(task)
    task.add_done_callback(state.inflight.discard)
    return await answer


async def _exchange(
    state: GatewayState, exchange: Exchange, answer: asyncio.Future[web.StreamResponse]
) -> None:
    try:
        response = await exchange.run(state)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except BaseException as exc:
        if not answer.done():
            answer.set_exception(exc)
        elif isinstance(exc, Exception) and not isinstance(exc, GatewayError):
            log.exception("exchange %s failed after its client had gone", exchange.request_id)
        if not isinstance(exc, Exception):
            raise
        return
    if not answer.done():
        answer.set_result(response)


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
