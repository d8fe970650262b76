"""The request path end to end: real gateway, real PostgreSQL, real local upstream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway import proxy
from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.proxy import UpstreamBody, WriteThrough
from gateway.rules import Rules, parse_rules
from gateway.state import STATE
from tests.conftest import (
    ENVIRON,
    Clock,
    Gateway,
    bearer,
    cycles_of_requests,
    cyclic_garbage,
    rules_yaml,
    token,
)
from tests.relay import Relay
from tests.upstream import Upstream

PROBLEM = "application/problem+json"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def problem_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.headers["Content-Type"].startswith(PROBLEM)
    body: dict[str, Any] = json.loads(await resp.read())
    assert body["status"] == resp.status
    return body


@pytest.mark.parametrize(
    ("path", "token_type", "cost"),
    [
        ("/v1/leads/generate", "lead_generation", 5),
        ("/v1/goals/42/generate", "goal_generation", 3),
        ("/v1/strategy/analyze", "strategy_analysis", 2),
        ("/v1/forecasts", "forecast", 4),
        ("/v1/chat/completions", "general", 1),
    ],
)
async def test_pro_is_charged_the_routes_cost(
    gateway: Gateway, path: str, token_type: str, cost: int
) -> None:
    before = await gateway.available("acme", token_type)
    resp = await gateway.client.post(path, json={"q": 1}, headers=bearer())
    assert resp.status == 200
    assert resp.headers["X-Tokens-Charged"] == str(cost)
    assert resp.headers["X-Tokens-Remaining"] == str(before - cost)
    body = await resp.json()
    assert body["path_qs"] == path
    assert await gateway.available("acme", token_type) == before - cost
    kinds = await gateway.journal_kinds("acme")
    assert kinds[-2:] == ["reserve", "commit"]
    rid = resp.headers["X-Reservation-Id"]
    journal = await gateway.ledger.journal("acme")
    commit = journal[0]
    assert str(commit["reservation_id"]) == rid
    assert commit["reserved_delta"] == -cost and commit["route"] is not None


async def test_starter_is_refused_with_an_upgrade_hint_and_nothing_forwarded(
    gateway: Gateway,
) -> None:
    resp = await gateway.client.post(
        "/v1/leads/generate", json={}, headers=bearer("freeloader", "bob")
    )
    assert resp.status == 403
    problem = await problem_of(resp)
    assert problem["code"] == "plan_forbidden"
    assert problem["plan"] == "starter" and problem["upgrade_to"] == "pro"
    assert "upgrade to 'pro'" in problem["detail"]
    assert gateway.upstream.seen == []
    assert await gateway.journal_kinds("freeloader") == []


async def test_starter_may_spend_tokens_it_bought(gateway: Gateway) -> None:
    await gateway.ledger.grant("freeloader", "general", 2, reason="pack")
    resp = await gateway.client.post("/v1/chat/x", json=CHAT, headers=bearer("freeloader"))
    assert resp.status == 200
    assert resp.headers["X-Tokens-Remaining"] == "1"


async def test_route_restricted_to_plans(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/enterprise/x", json={}, headers=bearer("acme"))
    problem = await problem_of(resp)
    assert resp.status == 403 and problem["code"] == "plan_forbidden"
    assert "available on plans enterprise" in problem["detail"]
    resp = await gateway.client.post("/v1/enterprise/x", json={}, headers=bearer("bigco"))
    assert resp.status == 200
    assert len(gateway.upstream.seen) == 1


async def test_unknown_organization_is_refused_not_created(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/chat/x", json=CHAT, headers=bearer("ghost"))
    problem = await problem_of(resp)
    assert resp.status == 403 and problem["code"] == "unknown_organization"
    assert "'ghost'" in problem["detail"]
    assert await gateway.ledger.organization("ghost") is None
    assert gateway.upstream.seen == []


async def test_no_route(gateway: Gateway) -> None:
    resp = await gateway.client.get("/v1/nothing/here", headers=bearer())
    problem = await problem_of(resp)
    assert resp.status == 404 and problem["code"] == "no_route"
    assert "GET /v1/nothing/here" in problem["detail"]


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "missing"),
        ({"Authorization": "Basic dXNlcjpwdw=="}, "Bearer"),
        ({"Authorization": "Bearer not.a.jwt"}, ""),
        ({"Authorization": f"Bearer {token(ttl_seconds=-60)}"}, "expired"),
    ],
)
async def test_invalid_tokens_get_401(
    gateway: Gateway, headers: dict[str, str], detail: str
) -> None:
    resp = await gateway.client.post("/v1/chat/x", json=CHAT, headers=headers)
    problem = await problem_of(resp)
    assert resp.status == 401 and problem["code"] == "invalid_token"
    assert detail.lower() in problem["detail"].lower()
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert gateway.upstream.seen == []


async def test_insufficient_tokens_402_says_balance_cost_and_refresh(gateway: Gateway) -> None:
    await gateway.ledger.create_org("tiny", "starter")
    await gateway.ledger.grant("tiny", "lead_generation", 3)
    resp = await gateway.client.post("/v1/leads/generate", json={}, headers=bearer("tiny"))
    problem = await problem_of(resp)
    assert resp.status == 402 and problem["code"] == "insufficient_tokens"
    assert problem["balance"] == 3 and problem["cost"] == 5
    assert problem["token_type"] == "lead_generation"
    assert problem["refresh_at"] is not None
    assert gateway.upstream.seen == []
    assert await gateway.available("tiny", "lead_generation") == 3


@pytest.mark.parametrize("status", [400, 404, 429, 500, 503])
async def test_non_2xx_is_passed_through_and_refunded(gateway: Gateway, status: int) -> None:
    before = await gateway.available("acme", "forecast")
    resp = await gateway.client.post(f"/v1/forecasts?status={status}", json={}, headers=bearer())
    assert resp.status == status
    assert resp.headers["X-Tokens-Charged"] == "0"
    assert resp.headers["X-Tokens-Remaining"] == str(before)
    assert (await resp.json())["path_qs"] == f"/v1/forecasts?status={status}"
    # Settled before the client saw the end of the response: no waiting needed.
    assert await gateway.available("acme", "forecast") == before
    assert (await gateway.journal_kinds("acme"))[-2:] == ["reserve", "refund"]


async def test_timeout_is_504_and_refunded(gateway: Gateway) -> None:
    before = await gateway.available("acme", "forecast")
    resp = await gateway.client.post("/v1/forecasts?behave=hang", json={}, headers=bearer())
    problem = await problem_of(resp)
    assert resp.status == 504 and problem["code"] == "upstream_timeout"
    assert resp.headers["X-Tokens-Charged"] == "0"
    assert await gateway.available("acme", "forecast") == before
    journal = await gateway.ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "refund" and "in time" in journal[0]["reason"]


async def test_reset_is_502_and_refunded(gateway: Gateway) -> None:
    before = await gateway.available("acme", "forecast")
    resp = await gateway.client.post("/v1/forecasts?behave=reset", json={}, headers=bearer())
    problem = await problem_of(resp)
    assert resp.status == 502 and problem["code"] == "upstream_error"
    assert await gateway.available("acme", "forecast") == before
    assert (await gateway.journal_kinds("acme"))[-1] == "refund"


async def test_connection_refused_is_502_and_refunded(gateway: Gateway) -> None:
    before = await gateway.available("acme", "general")
    resp = await gateway.client.post("/v1/dead", json={}, headers=bearer())
    problem = await problem_of(resp)
    assert resp.status == 502 and problem["code"] == "upstream_error"
    assert "cannot connect to upstream 'nowhere'" in problem["detail"]
    assert await gateway.available("acme", "general") == before
    assert (await gateway.journal_kinds("acme"))[-2:] == ["reserve", "refund"]


async def test_reset_mid_body_is_refunded_and_the_client_sees_a_broken_response(
    gateway: Gateway,
) -> None:
    before = await gateway.available("acme", "general")
    resp = await gateway.client.post("/v1/chat/stream?behave=sse_reset", json={}, headers=bearer())
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()
    await gateway.settled()
    assert await gateway.available("acme", "general") == before
    journal = await gateway.ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "refund" and "mid-body" in journal[0]["reason"]


async def _cut_off_at_its_time_and_refunded(
    gateway: Gateway, resp: aiohttp.ClientResponse, started: float, before: int
) -> None:
    """The rest of ``resp`` breaks (never a complete-looking answer), not before the
    upstream's 1.5 s are spent, and the request is refunded for the upstream's lateness."""
    with pytest.raises(aiohttp.ClientError):
        await resp.read()
    assert time.monotonic() - started > 1.4
    await gateway.settled()
    assert await gateway.available("acme", "general") == before
    journal = await gateway.ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "refund"
    assert "did not answer in time mid-body" in journal[0]["reason"]


async def test_an_upstream_that_stalls_mid_stream_is_cut_off_at_its_timeout_and_refunded(
    gateway: Gateway,
) -> None:
    """The upstream answers, sends one event and then nothing (its gate is never opened):
    at its timeout (1.5 s) the client sees a broken response and nothing is charged. (The
    timer used to fail here: the client's response was left open until it gave up.)"""
    before = await gateway.available("acme", "general")
    started = time.monotonic()
    resp = await gateway.client.post("/v1/chat/stall?behave=sse", json={}, headers=bearer())
    assert resp.status == 200
    assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
    await asyncio.wait_for(_cut_off_at_its_time_and_refunded(gateway, resp, started, before), 10)


async def test_the_upstreams_time_is_counted_over_all_of_its_reads(gateway: Gateway) -> None:
    """Three pauses of 0.6 s, each shorter than the upstream's 1.5 s timeout, add up to
    more: the exchange is cut off in the third (before its end) and refunded."""
    before = await gateway.available("acme", "general")
    started = time.monotonic()
    resp = await gateway.client.post(
        "/v1/chat/paced?behave=usage&pause=0.6", json={"stream": True}, headers=bearer()
    )
    assert resp.status == 200
    await asyncio.wait_for(_cut_off_at_its_time_and_refunded(gateway, resp, started, before), 10)


async def test_a_read_runs_out_of_time_only_by_its_own_timer(
    upstream: tuple[Upstream, str],
) -> None:
    """``UpstreamBody`` over a stalled stream: past its time a read raises TimeoutError;
    cancelled by anything else (a shutdown) it stays cancelled."""
    async with aiohttp.ClientSession() as session:
        for wait_seconds, cancel_after in ((0.3, None), (30.0, 0.3)):
            async with session.post(f"{upstream[1]}/v1/x?behave=sse", json={}) as resp:
                started = time.monotonic()
                body = UpstreamBody(resp, wait_seconds, started, started + 60)

                async def read_all(body: AsyncIterator[bytes] = body) -> list[bytes]:
                    return [chunk async for chunk in body]

                reading = asyncio.create_task(read_all())
                if cancel_after is None:
                    with pytest.raises(TimeoutError):
                        await reading
                    assert 0.25 < time.monotonic() - started < 2
                else:
                    await asyncio.sleep(cancel_after)
                    reading.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await reading
                    assert reading.cancelling() == 1  # not taken back as a timeout


async def test_sse_reaches_the_client_before_the_upstream_finishes(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/chat/stream?behave=sse", json={}, headers=bearer())
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=5)
    assert first == b"data: first\n\n"
    # The upstream is still waiting for the gate: nothing has finished, nothing is charged.
    assert gateway.upstream.finished == []
    assert (await gateway.journal_kinds("acme"))[-1] == "reserve"
    gateway.upstream.sse_gate.set()
    rest = await resp.read()
    assert rest.endswith(b"data: [DONE]\n\n") and b"event 2" in rest
    assert (await gateway.journal_kinds("acme"))[-1] == "commit"


async def test_a_stream_is_written_through_as_it_comes_and_a_sized_answer_is_not(
    gateway: Gateway,
) -> None:
    """A stream's chunks go to the client as they arrive, without waking the relay (the
    body arrives whole, in order); a sized answer's are read by the relay, which holds
    back its last byte until the charge is recorded."""
    before, written = await gateway.available("acme", "general"), WriteThrough.chunks
    resp = await gateway.client.post("/v1/chat/x", json=CHAT, headers=bearer())
    assert resp.status == 200 and json.loads(await resp.read())["path_qs"] == "/v1/chat/x"
    assert WriteThrough.chunks == written
    resp = await gateway.client.post("/v1/chat/stream?behave=sse", json={}, headers=bearer())
    assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
    gateway.upstream.sse_gate.set()
    rest = await resp.read()
    assert rest == b"".join(f"data: event {i}\n\n".encode() for i in range(3)) + (
        b"data: [DONE]\n\n"
    )
    assert WriteThrough.chunks > written
    await gateway.settled()
    assert await gateway.available("acme", "general") == before - 2
    assert (await gateway.journal_kinds("acme"))[-4:] == ["reserve", "commit"] * 2
    assert proxy._SINKS == {}  # every body's sink went with its exchange


async def test_a_client_that_lags_gets_the_rest_through_the_relay_which_waits_for_it(
    gateway: Gateway,
) -> None:
    """What a client cannot take at once is not written through: it waits in the reader,
    the upstream is paused, and the relay writes it as the client reads. Were every chunk
    written through, 128 MiB would pile up in the gateway while the client stalls."""
    before, written, size = await gateway.available("acme", "general"), WriteThrough.chunks, 1 << 27
    async with (
        aiohttp.ClientSession(read_bufsize=2**16) as session,
        session.post(
            gateway.url(f"/v1/chat/big?size={size}&chunk=65536"), json={}, headers=bearer()
        ) as resp,
    ):
        assert resp.status == 200 and resp.content_length is None
        received = len(await resp.content.read(65536))
        await asyncio.sleep(0.5)  # stalls: the upstream must stall too
        assert gateway.upstream.sent < size // 2
        while chunk := await resp.content.read(1 << 20):
            assert chunk == b"x" * len(chunk)
            received += len(chunk)
    assert received == size
    assert WriteThrough.chunks > written
    await gateway.settled()
    assert await gateway.available("acme", "general") == before - 1
    assert (await gateway.journal_kinds("acme"))[-2:] == ["reserve", "commit"]
    assert proxy._SINKS == {}


async def test_client_hanging_up_mid_stream_is_still_charged(gateway: Gateway) -> None:
    before = await gateway.available("acme", "general")
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.url("/v1/chat/stream?behave=sse"), json={}, headers=bearer()
        )
        assert await resp.content.readuntil(b"\n\n") == b"data: first\n\n"
        resp.close()  # hang up mid-stream
    await asyncio.sleep(0.1)
    gateway.upstream.sse_gate.set()
    for _ in range(100):
        if gateway.upstream.finished:
            break
        await asyncio.sleep(0.05)
    await gateway.settled()
    assert gateway.upstream.finished == ["/v1/chat/stream"]
    assert await gateway.available("acme", "general") == before - 1
    journal = await gateway.ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "commit"
    assert "client disconnected" in (journal[0]["reason"] or "") or journal[0]["reason"] is None


async def test_client_hanging_up_before_a_failure_is_refunded(gateway: Gateway) -> None:
    before = await gateway.available("acme", "forecast")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(
                gateway.url("/v1/forecasts?slow=0.3&status=500"),
                json={},
                headers=bearer(),
                timeout=aiohttp.ClientTimeout(total=0.1),
            )
    for _ in range(100):
        if gateway.upstream.finished:
            break
        await asyncio.sleep(0.05)
    await gateway.settled()
    assert await gateway.available("acme", "forecast") == before
    assert (await gateway.journal_kinds("acme"))[-1] == "refund"


async def test_concurrent_requests_forward_exactly_what_the_balance_covers(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await gateway.ledger.create_org("race", "pro")  # general allowance: exactly 100
    headers = bearer("race")

    async def one() -> int:
        async with http.post(gateway.url("/v1/chat/x"), json=CHAT, headers=headers) as r:
            await r.read()
            return r.status

    statuses = await asyncio.gather(*(one() for _ in range(300)))
    assert Counter(statuses) == {200: 100, 402: 200}
    assert len(gateway.upstream.seen) == 100
    await gateway.settled()
    assert await gateway.available("race", "general") == 0
    kinds = await gateway.journal_kinds("race")
    assert kinds.count("reserve") == 100 and kinds.count("commit") == 100


async def test_headers_to_the_upstream(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/chat/x?a=1&b=two",
        data=b'{"x": 1}',
        headers={
            **bearer(),
            "Content-Type": "application/json",
            "X-Request-Id": "req-123",
            "X-Gateway-Organization": "forged",
            "X-Forwarded-For": "10.1.1.1",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "drop me",
            "X-Custom": "kept",
        },
    )
    assert resp.status == 200
    seen = gateway.upstream.seen[-1]
    assert seen.path_qs == "/v1/chat/x?a=1&b=two"
    assert seen.body == b'{"x": 1}'
    h = seen.headers
    assert "Authorization" not in h
    assert h["X-Gateway-Organization"] == "acme" and h["X-Gateway-User"] == "alice"
    assert h["X-Request-Id"] == "req-123" == resp.headers["X-Request-Id"]
    assert h["X-Forwarded-For"] == "10.1.1.1, 127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["X-Forwarded-Host"] == gateway.client.make_url("").authority
    assert h["Host"] == gateway.upstream_host
    assert "X-Secret-Hop" not in h
    assert h["X-Custom"] == "kept" and h["Content-Type"] == "application/json"
    # The upstream cannot forge what the gateway reports to the client.
    assert resp.headers["X-Tokens-Charged"] == "1"
    assert "X-Tokens-Held" not in resp.headers
    assert resp.headers["X-Upstream"] == "test"


async def test_authorization_is_forwarded_only_when_the_route_says_so(gateway: Gateway) -> None:
    headers = bearer()
    resp = await gateway.client.post("/v1/chat/auth-echo", json={}, headers=headers)
    assert resp.status == 200
    assert gateway.upstream.seen[-1].headers["Authorization"] == headers["Authorization"]


async def test_large_body_streams_through_intact(gateway: Gateway) -> None:
    body = bytes(range(256)) * 16384  # 4 MiB

    async def chunks() -> Any:
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    resp = await gateway.client.post("/v1/chat/upload", data=chunks(), headers=bearer())
    assert resp.status == 200
    assert (await resp.json())["body_length"] == len(body)
    assert gateway.upstream.seen[-1].body == body


async def test_query_string_is_ignored_for_matching(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/leads/generate?x=/v1/chat", json={}, headers=bearer())
    assert resp.headers["X-Tokens-Charged"] == "5"


async def test_generated_request_id_when_none_or_unsafe(gateway: Gateway) -> None:
    resp = await gateway.client.post(
        "/v1/chat/x", json=CHAT, headers={**bearer(), "X-Request-Id": "bad id\twith space"}
    )
    rid = resp.headers["X-Request-Id"]
    assert len(rid) == 32 and rid == gateway.upstream.seen[-1].headers["X-Request-Id"]


async def test_ledger_unreachable_is_503_and_nothing_is_forwarded(
    database_url: str,
    schema: str,
    rules: Rules,
    upstream: tuple[Upstream, str],
    limiter: Limiter,
) -> None:
    relay = Relay(database_url)
    await relay.start()
    ledger = await Ledger.connect(relay.dsn, schema=schema, timeout=2)
    await ledger.migrate()
    await ledger.sync_plans(rules.plan_allowances())
    await ledger.create_org("acme", "pro")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    backend = upstream[0]
    try:
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        assert resp.status == 200

        await relay.cut()
        for _ in range(3):
            resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
            problem = await problem_of(resp)
            assert resp.status == 503 and problem["code"] == "ledger_unavailable"
            assert "nothing was forwarded" in problem["detail"]
        assert len(backend.seen) == 1

        await relay.start()  # the ledger comes back: no restart needed
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        assert resp.status == 200 and resp.headers["X-Tokens-Remaining"] == "98"
        assert len(backend.seen) == 2
        assert await ledger.audit() == []
    finally:
        await client.close()
        await ledger.close()
        await relay.cut()


async def test_ledger_lost_after_forwarding_cuts_the_answer_and_the_sweeper_refunds(
    database_url: str,
    schema: str,
    rules: Rules,
    upstream: tuple[Upstream, str],
    clock: Clock,
    limiter: Limiter,
) -> None:
    relay = Relay(database_url)
    await relay.start()
    ledger = await Ledger.connect(relay.dsn, schema=schema, timeout=1, clock=clock)
    await ledger.migrate()
    await ledger.sync_plans(rules.plan_allowances())
    await ledger.create_org("acme", "pro")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        pending = asyncio.create_task(
            client.post("/v1/chat/x?slow=0.5", json=CHAT, headers=bearer())
        )
        await asyncio.wait_for(upstream[0].arrived.wait(), timeout=5)
        await relay.cut()  # the ledger goes away while the upstream works
        resp = await pending
        assert resp.status == 200  # the upstream's answer starts reaching the client...
        # ...but never completes: a paid answer whose charge did not land is cut off
        # before its last byte, so nobody gets a complete answer for free.
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        if app[STATE].inflight:
            _, pending = await asyncio.wait(list(app[STATE].inflight), timeout=5)
            assert not pending
        await relay.start()
        held = await ledger.reservation(uuid.UUID(resp.headers["X-Reservation-Id"]))
        assert held is not None and held.state == "held"
        clock.advance(seconds=rules.routes[0].upstream.timeout_seconds + 31)
        assert await ledger.expire_overdue() == 1
        expired = await ledger.reservation(held.id)
        assert expired is not None and expired.state == "expired"
        assert await ledger.audit() == []
    finally:
        await client.close()
        await ledger.close()
        await relay.cut()


async def test_license_grace_timeline(gateway: Gateway, clock: Clock) -> None:
    """Past due on day 0: lead_generation off at once; forecast and strategy_analysis off
    from day 7; everything off when the 14-day grace ends; payment restores everything."""
    license_section = """
license:
  grace_period_days: 14
  degradation_order:
    - {after_days: 0, token_types: [lead_generation]}
    - {after_days: 7, token_types: [forecast, strategy_analysis]}
"""
    from gateway.rules import parse_rules

    text = rules_yaml(gateway.upstream_url) + license_section
    gateway.app[STATE].active = dataclasses.replace(
        gateway.app[STATE].active, rules=parse_rules(text.encode())
    )
    await gateway.ledger.set_license("acme", "past_due", actor="billing")

    async def outcome(path: str) -> tuple[int, str]:
        resp = await gateway.client.post(path, json={}, headers=bearer())
        body = await resp.json()
        return resp.status, body.get("code", "ok")

    assert await outcome("/v1/leads/generate") == (403, "feature_degraded")
    resp = await gateway.client.post("/v1/leads/generate", json={}, headers=bearer())
    problem = await resp.json()
    assert "pay the open invoice" in problem["detail"] and problem["degraded_at"]
    assert await outcome("/v1/forecasts") == (200, "ok")
    assert await outcome("/v1/chat/x") == (200, "ok")
    clock.advance(days=7)
    assert await outcome("/v1/forecasts") == (403, "feature_degraded")
    assert await outcome("/v1/strategy/analyze") == (403, "feature_degraded")
    assert await outcome("/v1/chat/x") == (200, "ok")
    clock.advance(days=7)
    assert await outcome("/v1/chat/x") == (403, "license_suspended")
    assert await outcome("/v1/goals/1/generate") == (403, "license_suspended")
    await gateway.ledger.set_license("acme", "active", actor="billing")  # paid
    for path in ("/v1/leads/generate", "/v1/forecasts", "/v1/chat/x"):
        assert await outcome(path) == (200, "ok")
    await gateway.ledger.set_license("acme", "canceled", actor="billing")
    assert await outcome("/v1/chat/x") == (403, "license_suspended")
    assert len(gateway.upstream.seen) == 6  # nothing refused was forwarded


async def test_user_and_team_quotas_hold_under_concurrency(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    ledger = gateway.ledger
    await ledger.set_quota("acme", "user:alice", "general", 10, actor="test")
    await ledger.set_team("acme", "research", ["bob", "carol"], actor="test")
    await ledger.set_quota("acme", "team:research", "general", 5, actor="test")

    async def one(user: str) -> tuple[int, str]:
        async with http.post(
            gateway.url("/v1/chat/x"), json=CHAT, headers=bearer("acme", user)
        ) as resp:
            body = await resp.json()
            return resp.status, body.get("code", "ok")

    results = await asyncio.gather(*(one("alice") for _ in range(30)))
    assert Counter(results) == {(200, "ok"): 10, (402, "quota_exceeded"): 20}
    team = await asyncio.gather(*(one(u) for u in ["bob", "carol"] * 6))
    assert Counter(team) == {(200, "ok"): 5, (402, "quota_exceeded"): 7}
    assert await one("dave") == (200, "ok")  # no quota: the organization's balance rules
    resp = await gateway.client.post("/v1/chat/x", json=CHAT, headers=bearer("acme", "alice"))
    problem = await resp.json()
    assert (problem["quota"], problem["spent"], problem["subject"]) == (10, 10, "user:alice")
    assert "user 'alice' has used 10 of its quota of 10" in problem["detail"]
    await ledger.set_quota("acme", "user:alice", "general", None, actor="test")
    assert await one("alice") == (200, "ok")
    assert await gateway.available("acme", "general") == 100 - 10 - 5 - 1 - 1


async def test_a_slow_reader_is_charged_not_refunded(gateway: Gateway) -> None:
    """The upstream answers 8 MiB at once; the client takes longer than the upstream's
    1.5 s timeout to read it. The upstream was on time: the charge stands."""
    before = await gateway.available("acme", "general")
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url(f"/v1/chat/big?size={8 * 1024 * 1024}"), json={}, headers=bearer()
        ) as resp,
    ):
        assert resp.status == 200
        received = 0
        while chunk := await resp.content.read(256 * 1024):
            received += len(chunk)
            await asyncio.sleep(0.08)  # about 3 MB/s: some 2.6 s in all
    assert received == 8 * 1024 * 1024
    await gateway.settled()
    assert await gateway.available("acme", "general") == before - 1
    assert (await gateway.journal_kinds("acme"))[-1] == "commit"


async def test_a_client_that_stalls_is_dropped_and_the_answer_still_charged(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str], clock: Clock
) -> None:
    """A client that stops reading cannot hold the settlement until the reservation
    expires (the sweeper would then refund what it receives later)."""
    text = rules_yaml(upstream[1]).replace(
        "reservation_grace_seconds: 30", "reservation_grace_seconds: 1"
    )
    rules = parse_rules(text.encode())
    await ledger.create_org("acme", "pro")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1), read_bufsize=2**16
        ) as session:
            resp = await session.post(
                str(client.make_url(f"/v1/chat/big?size={32 * 1024 * 1024}")),
                json={},
                headers=bearer(),
            )
            assert resp.status == 200
            await resp.content.read(64 * 1024)
            await asyncio.sleep(3.0)  # stalls past the deadline (1.5 s + 0.5 s) ...
            # ... and past the reservation's expiry (2.5 s): had the gateway waited for this
            # client, the sweeper would refund the reservation now.
            assert await ledger.expire_overdue() == 0
            resp.close()
        for task in list(app[STATE].inflight):
            await asyncio.wait_for(task, timeout=10)
        kinds = [r["kind"] for r in reversed(await ledger.journal("acme", limit=10))]
        assert kinds[-2:] == ["reserve", "commit"]
        clock.advance(seconds=60)
        assert await ledger.expire_overdue() == 0
    finally:
        await client.close()


class _Exchange:
    """Stands in for an ``Exchange``: its ``run`` answers ``outcome`` after a while."""

    def __init__(self, outcome: object) -> None:
        self.request_id = "r1"
        self.outcome = outcome
        self.ended_at_turn: int | None = None
        self.turns = 0

    async def count_turns(self) -> None:
        while True:
            self.turns += 1
            await asyncio.sleep(0)

    async def run(self, state: object) -> object:
        await asyncio.sleep(0.01)
        self.ended_at_turn = self.turns
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


async def test_the_handler_has_the_exchanges_answer_one_turn_after_it_ends() -> None:
    from types import SimpleNamespace

    from gateway.pipeline import _run_shielded

    state: Any = SimpleNamespace(inflight=set())
    answer = object()
    exchange: Any = _Exchange(answer)
    counter = asyncio.create_task(exchange.count_turns())
    try:
        assert await _run_shielded(state, exchange) is answer
        # asyncio.shield took two turns of the event loop here, under load milliseconds.
        assert exchange.turns - exchange.ended_at_turn == 1
        # Its error reaches the handler (and so the problems middleware) as it was.
        with pytest.raises(RuntimeError, match="upstream gone"):
            await _run_shielded(state, _Exchange(RuntimeError("upstream gone")))  # type: ignore[arg-type]
        # A handler cancelled (its client hung up) leaves the exchange running to its end.
        slow: Any = _Exchange(answer)
        handler = asyncio.create_task(_run_shielded(state, slow))
        await asyncio.sleep(0)
        assert len(state.inflight) == 1
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        (task,) = state.inflight
        await task
        assert slow.ended_at_turn is not None and not task.cancelled()
        assert state.inflight == set()
    finally:
        counter.cancel()


async def test_an_exchange_leaves_no_reference_cycle(gateway: Gateway) -> None:
    """Every kind of exchange is freed by reference counting alone. A cycle keeps a finished
    request (its task, and what that holds) alive until a collection, and the collections
    it adds pause every request in flight: under 500 streams, one exchange timer's cycle
    made collections of 70,000-80,000 objects that each stopped the loop for 17-28 ms.
    (An upstream that breaks mid-body does leave one: aiohttp's reader keeps the error,
    whose traceback holds the frames that read it. That is rare; the collector frees it.)"""
    gateway.upstream.sse_gate.set()
    before = await gateway.available("acme", "general")
    with cyclic_garbage() as garbage:
        for path in (
            "/v1/chat/x",  # JSON
            "/v1/chat/x?behave=sse",  # a stream
            "/v1/chat/x?status=500",  # refunded
            "/v1/chat/x?behave=reset",  # refunded
        ):
            resp = await gateway.client.post(path, json=CHAT, headers=bearer())
            with contextlib.suppress(aiohttp.ClientError):
                await resp.read()
            resp.release()
        refused = await gateway.client.post("/v1/chat/x", json=CHAT)
        assert refused.status == 401
        await gateway.settled()
        await asyncio.sleep(0.05)
    assert cycles_of_requests(garbage) == []
    assert await gateway.available("acme", "general") == before - 2  # JSON and stream
