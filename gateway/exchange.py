"""One forwarded request, from its held reservation to its settlement.

The invariant kept here: every held reservation is settled exactly once by the upstream's
outcome (2xx read to the end commits; anything else refunds), whatever the client does
meanwhile, and the client never sees a complete paid answer whose charge did not land.

A route priced by usage commits what the backend reported at the route's rates: a JSON
answer is read whole first (so its exact charge goes out in ``X-Tokens-Charged``), an SSE
stream is relayed as it comes while its usage events are read on the way, its charge sent
after the last event as the comment ``: tokens-charged=N``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.auth import Principal
from gateway.errors import (
    GatewayError,
    LedgerError,
    LedgerUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.gate import settle_shadow
from gateway.leases import COMMIT_LINGER
from gateway.ledger import Ledger, ReserveOutcome, Settlement
from gateway.limits.limiter import Admission
from gateway.metering import UsageReader, UsageRequest
from gateway.proxy import (
    ExchangeOverdue,
    UpstreamBody,
    client_response_headers,
    map_client_error,
    open_upstream,
    prefixed,
    write_through,
)
from gateway.rules import Route, charge
from gateway.state import GatewayState

log = logging.getLogger("gateway.pipeline")

# Retries of a settlement while the ledger is unreachable; after them the reservation
# stays held (refunded at its expiry) and the client is cut off before the answer's end.
_SETTLE_RETRY_DELAYS = (0.05, 0.25, 1.0, 2.0)
_CLIENT_GONE = (ConnectionError, aiohttp.ClientConnectionResetError, RuntimeError)
_OVERDUE = "the exchange reached its deadline (the client read too slowly)"


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
    usage_request: UsageRequest | None = None  # a route priced by usage: its read request
    # Leases: a 2xx answer is committed after it is complete, handed to the handler first
    # (``answer``); ``leased``: the hold was drawn from a lease (gateway.leases).
    deferred: bool = False
    leased: bool = False
    answer: asyncio.Future[web.StreamResponse] | None = None
    client_gone: bool = False
    charged: int = 0
    settled_as: str = "refunded"
    settlement: Settlement | None = None
    warning: str | None = None  # low balance, for the X-Tokens-Warning header
    limits_finished: bool = False

    @property
    def shadow(self) -> bool:
        return self.outcome is None

    @property
    def held(self) -> int:
        """The tokens held for this request: the route's cost, or its usage hold."""
        return self.usage_request.hold if self.usage_request is not None else self.route.cost

    def _gateway_headers(self, charged: int | None) -> dict[str, str]:
        """The gateway's headers; ``charged`` None: not known yet (a usage-priced stream)."""
        if self.outcome is None:
            return {"X-Tokens-Charged": "0", "X-Request-Id": self.request_id}
        headers = {"X-Reservation-Id": str(self.outcome.reservation_id)}
        if charged is None:
            headers["X-Tokens-Held"] = str(self.held)
        else:
            headers["X-Tokens-Charged"] = str(charged)
            remaining = self.outcome.remaining + self.held - charged
            if self.settlement is not None:
                remaining = self.settlement.remaining
            headers["X-Tokens-Remaining"] = str(remaining)
        headers |= {"X-Request-Id": self.request_id, **self.admission.headers}
        if charged and self.warning:
            headers["X-Tokens-Warning"] = self.warning
        return headers

    def _client_too_slow(self) -> None:
        """At the client deadline a client still being written to is dropped: its pending
        write fails, and the upstream's answer is still read to the end to settle."""
        if not self.client_gone:
            self.client_gone = True
            log.warning(
                "client stopped reading request_id=%s; dropping it and settling by the upstream",
                self.request_id,
            )
            self._abort()

    async def run(self, state: GatewayState) -> web.StreamResponse:
        metrics = state.metrics
        metrics.in_flight.inc()
        # One timer for the client's whole exchange (not one per write): a client that
        # stops reading must not hold the settlement past the reservation's expiry.
        watchdog = asyncio.get_running_loop().call_later(
            self.client_deadline - time.monotonic(), self._client_too_slow
        )
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
            watchdog.cancel()
            metrics.in_flight.dec()
            outcome = "shadow" if self.shadow else self.settled_as
            metrics.requests.labels(self.route.name, outcome, str(status or "")).inc()
            metrics.request_seconds.labels(self.route.name).observe(time.monotonic() - self.started)
            await self._finish_limits(state)
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

    async def _finish_limits(self, state: GatewayState) -> None:
        """Once per exchange: token-rate windows count what was charged, not what was
        held; one round trip with the concurrency release."""
        if not self.limits_finished:
            self.limits_finished = True
            await state.limiter.finish(self.admission, self.charged)

    async def _run(self, state: GatewayState) -> web.StreamResponse:
        upstream_started = time.monotonic()
        try:
            upstream = await open_upstream(
                state.session,
                self.request,
                self.route,
                self.caller,
                self.request_id,
                body=self.usage_request.body if self.usage_request is not None else None,
            )
        except (UpstreamError, UpstreamTimeout) as exc:
            self._observe(state, upstream_started)
            await self._settle(state, ok=False, reason=exc.detail)
            self._log(exc.status, note=exc.code)
            return exc.response(instance=self.request.path, headers=self._gateway_headers(0))
        except BaseException:
            await self._settle(state, ok=False, reason="gateway error before the upstream answered")
            raise
        # Its timeout counts only the time spent waiting for the upstream (not a slow
        # client); past the exchange's deadline it raises ExchangeOverdue.
        timeout = self.route.upstream.timeout_seconds
        chunks = UpstreamBody(upstream, timeout, upstream_started, self.deadline)
        try:
            ok = 200 <= upstream.status < 300
            if not ok or self.usage_request is None:
                return await self._relay(state, upstream, upstream_started, chunks, None)
            config = self.route.config.usage
            assert config is not None
            stream = upstream.content_type == "text/event-stream"
            meter = UsageReader(
                config.format,
                self.usage_request.model,
                stream=stream,
                content_encoding=upstream.headers.get("Content-Encoding", ""),
                max_body_bytes=config.max_response_bytes,
            )
            if stream:
                return await self._relay(state, upstream, upstream_started, chunks, meter)
            return await self._buffered(state, upstream, upstream_started, chunks, meter)
        finally:
            chunks.close()
            upstream.release()

    def _failure(self, exc: BaseException) -> str:
        if isinstance(exc, ExchangeOverdue) or time.monotonic() >= self.deadline:
            return _OVERDUE
        return map_client_error(exc, self.route.config.upstream).detail + " mid-body"

    async def _buffered(
        self,
        state: GatewayState,
        upstream: aiohttp.ClientResponse,
        upstream_started: float,
        chunks: AsyncIterator[bytes],
        meter: UsageReader,
    ) -> web.StreamResponse:
        """A usage-priced JSON answer: read whole (up to ``max_response_bytes``), settled by
        its usage, then sent with its exact charge. A larger one is relayed as a stream."""
        body: list[bytes] = []
        size = 0
        try:
            async for chunk in chunks:
                meter.feed(chunk)
                body.append(chunk)
                size += len(chunk)
                if meter.unreadable:  # too large (or encoded unreadably) to read: relay it
                    rest = prefixed(body, chunks)
                    return await self._relay(state, upstream, upstream_started, rest, meter)
        except (ExchangeOverdue, aiohttp.ClientError, TimeoutError) as exc:
            failure = self._failure(exc)
            await self._settle(state, ok=False, reason=failure)
            error = (
                UpstreamTimeout(failure)
                if failure == _OVERDUE
                else map_client_error(exc, self.route.config.upstream)
            )
            self._log(error.status, note="upstream failed mid-body")
            return error.response(instance=self.request.path, headers=self._gateway_headers(0))
        except BaseException:
            await self._settle(state, ok=False, reason="gateway error while reading the body")
            raise
        self._observe(state, upstream_started)
        if not await self._settle(
            state, ok=True, reason=f"upstream answered {upstream.status}", meter=meter
        ):
            # Not charged: the answer is not handed out (the hold expires as a refund).
            self._log(503, note="commit failed; answer withheld")
            unavailable = LedgerUnavailable(
                "the charge could not be recorded, so the answer is withheld; you were not charged"
            )
            return unavailable.response(
                instance=self.request.path, headers=self._gateway_headers(0)
            )
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(client_response_headers(upstream))
        response.headers.update(self._gateway_headers(self.charged))
        response.content_length = size
        await self._send(response.prepare(self.request))
        await self._send(response.write(b"".join(body)))
        await self._send(response.write_eof())
        self._log(upstream.status)
        return response

    async def _relay(
        self,
        state: GatewayState,
        upstream: aiohttp.ClientResponse,
        upstream_started: float,
        chunks: AsyncIterator[bytes],
        meter: UsageReader | None,
    ) -> web.StreamResponse:
        """Relay the answer as it comes, settling at its end; ``meter`` reads a
        usage-priced answer's usage on the way."""
        ok = 200 <= upstream.status < 300
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(client_response_headers(upstream))
        known = meter is None or not ok  # the charge is known before the body: cost or 0
        response.headers.update(self._gateway_headers((self.held if ok else 0) if known else None))
        await self._send(response.prepare(self.request))
        failure: str | None = None
        # The client must not see the response complete before the ledger has settled it
        # (it may check its balance next). A chunked body ends with write_eof, after the
        # settlement; a sized body ends with its last byte, so that byte is held back.
        # (A deferred commit settles after the answer: nothing is held back.)
        to_go = None if self.deferred else upstream.content_length
        if upstream.content_length is None and not self.client_gone:  # writer prepared above
            write_through(chunks, await response.prepare(self.request), meter)
        held_back = b""
        try:
            async for chunk in chunks:
                if meter is not None:
                    meter.feed(chunk)
                if to_go is not None:
                    to_go -= len(chunk)
                    if to_go <= 0:
                        chunk, held_back = chunk[:-1], chunk[-1:]
                await self._send(response.write(chunk))
        except (ExchangeOverdue, aiohttp.ClientError, TimeoutError) as exc:
            failure = self._failure(exc)
        except BaseException:
            await self._settle(state, ok=False, reason="gateway error while relaying the body")
            raise
        self._observe(state, upstream_started)
        if failure is not None:
            await self._settle(state, ok=False, reason=failure)
            self._log(upstream.status, note="upstream failed mid-body")
            # The client must see a broken response, not a complete-looking short one.
            self._abort()
            return response
        if ok and self.deferred:
            assert meter is None, "a usage-priced answer is settled before it completes"
            return await self._answer_then_commit(state, response, upstream.status)
        settled = await self._settle(
            state, ok=ok, reason=f"upstream answered {upstream.status}", meter=meter
        )
        if ok and not settled:
            # Never a complete-looking paid answer whose charge did not land.
            self._log(upstream.status, note="commit failed; answer cut off")
            self._abort()
            return response
        if held_back:
            await self._send(response.write(held_back))
        elif meter is not None and meter.stream and upstream.content_length is None:
            # SSE clients ignore comment lines: the stream's exact charge, after its end.
            await self._send(response.write(f": tokens-charged={self.charged}\n\n".encode()))
        await self._send(response.write_eof())
        self._log(upstream.status)
        return response

    async def _answer_then_commit(
        self, state: GatewayState, response: web.StreamResponse, status: int
    ) -> web.StreamResponse:
        """A deferred commit: the limits are finished (the concurrency slot is free before
        the client can send its next request), the answer completed and handed to the
        handler, then the charge committed. A commit that does not land leaves the hold to
        expire as a refund: the answer went unpaid, in the customer's favour."""
        self.charged, self.settled_as = self.held, "committed"
        await self._finish_limits(state)
        await self._send(response.write_eof())
        self._log(status)
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(response)
        reason = f"request {self.request_id}" + (", a leased hold" if self.leased else "")
        if not await self._settle(state, ok=True, reason=reason):
            self.charged, self.settled_as = 0, "unpaid"
            state.metrics.tokens.labels(self.route.token_type, "unpaid").inc(self.held)
            log.error(
                "the charge of a delivered answer did not land request_id=%s org=%s "
                "reservation=%s: its hold expires as a refund (ledger.leases)",
                self.request_id,
                self.caller.org,
                self.outcome.reservation_id if self.outcome else None,
            )
        return response

    def _observe(self, state: GatewayState, started: float) -> None:
        state.metrics.upstream_seconds.labels(self.route.config.upstream).observe(
            time.monotonic() - started
        )

    def _abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()

    async def _send(self, write: Coroutine[Any, Any, Any]) -> None:
        """Await a write to the client; a client that went away is noted, not fatal: the
        upstream's answer is still read to the end and decides the settlement."""
        if self.client_gone:
            write.close()
            return
        try:
            await write  # bounded by the exchange's watchdog (see run)
        except _CLIENT_GONE as exc:
            self.client_gone = True
            log.info(
                "client went away request_id=%s: %s; reading the upstream to the end to settle",
                self.request_id,
                type(exc).__name__,
            )

    async def _settle(
        self, state: GatewayState, *, ok: bool, reason: str, meter: UsageReader | None = None
    ) -> bool:
        """Settle by the upstream's outcome (and, priced by usage, by what ``meter`` read);
        False when the ledger did not take it (then the reservation stays held and expires
        as a refund). A deferred commit, its answer delivered, may linger (COMMIT_LINGER)."""
        if self.outcome is None:
            await settle_shadow(
                self.ledger,
                state.rules.document,
                state.metrics,
                self.route,
                self.caller,
                self.request_id,
                self.would_refuse,
                ok=ok,
            )
            return True
        reservation_id = self.outcome.reservation_id
        assert reservation_id is not None
        if self.client_gone:
            reason += " (client disconnected before the end)"
        charged, usage = None, None  # None: the whole hold
        if ok and meter is not None:
            config = self.route.config.usage
            assert config is not None
            reported = meter.usage()
            if reported is not None:
                charged, usage = charge(config, reported), reported.as_json()
            elif config.on_missing_usage == "refund":
                ok, reason = False, f"{reason}, with no usage reported (on_missing_usage: refund)"
            else:
                log.warning(
                    "route %s: upstream reported no usage request_id=%s; charging the hold %d",
                    self.route.name,
                    self.request_id,
                    self.held,
                )
        metrics = state.metrics
        token_type = self.route.token_type
        for delay in (*_SETTLE_RETRY_DELAYS, None):
            try:
                with metrics.ledger_seconds.labels("commit" if ok else "refund").time():
                    if ok:
                        settled = await self.ledger.commit(
                            reservation_id,
                            charged,
                            actor=self.caller.user,
                            usage=usage,
                            reason=reason if self.deferred else None,
                            linger=COMMIT_LINGER if self.deferred else 0,
                        )
                        self.charged, self.settled_as = settled.charged, "committed"
                        self.settlement = settled
                        metrics.tokens.labels(token_type, "committed").inc(settled.charged)
                        if settled.unbilled:
                            metrics.tokens.labels(token_type, "unbilled").inc(settled.unbilled)
                            log.warning(
                                "route %s: usage beyond the balance request_id=%s org=%s: "
                                "%d tokens unbilled",
                                self.route.name,
                                self.request_id,
                                self.caller.org,
                                settled.unbilled,
                            )
                    else:
                        await self.ledger.refund(reservation_id, reason=reason, actor="gateway")
                        metrics.tokens.labels(token_type, "refunded").inc(self.held)
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

    def _log(self, status: int, *, note: str = "") -> None:
        charged = self.charged if self.settled_as == "committed" else 0
        log.info(
            "%s %s status=%d org=%s user=%s route=%s charged=%d request_id=%s ms=%.1f%s",
            self.request.method,
            self.request.path,
            status,
            self.caller.org,
            self.caller.user,
            self.route.name,
            charged,
            self.request_id,
            (time.monotonic() - self.started) * 1000,
            f" ({note})" if note else "",
            extra={
                "request_id": self.request_id,
                "org": self.caller.org,
                "user": self.caller.user,
                "route": self.route.name,
                "status": status,
                "charged": charged,
                "shadow": self.shadow,
            },
        )
