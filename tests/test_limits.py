"""Abuse limits against a real Redis: exact boundaries with an injected clock, concurrency
with real simultaneous requests, blocks, spike alerts, Redis outages, and three gateway
processes sharing one Redis and one PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.alerts import Alerter, verify
from gateway.app import build_app
from gateway.errors import (
    Blocked,
    ConfigError,
    GatewayError,
    LimiterUnavailable,
    RateLimited,
    TooFrequent,
    TooManyInFlight,
)
from gateway.ledger import Ledger
from gateway.limits.config import (
    Concurrency,
    Effective,
    LimitsConfig,
    MinInterval,
    RateLimit,
    Spike,
    TokenRate,
    effective,
    parse_rate,
)
from gateway.limits.limiter import Admission, Limiter, SpikeAlert
from gateway.limits.store import STORE_ERRORS
from gateway.rules import Rules
from gateway.runtime import free_port
from tests.conftest import (
    ENVIRON,
    Clock,
    bearer,
    load_test_rules,
    process_env,
    rules_yaml,
    start_serve,
)
from tests.relay import Relay
from tests.upstream import Upstream

REPO = Path(__file__).parent.parent
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def only(**kinds: object) -> Effective:
    rate, tokens = kinds.get("rate"), kinds.get("tokens")
    return Effective(
        rate=tuple(rate) if isinstance(rate, list) else (),
        min_interval=kinds.get("min_interval"),  # type: ignore[arg-type]
        concurrency=kinds.get("concurrency"),  # type: ignore[arg-type]
        tokens=tuple(tokens) if isinstance(tokens, list) else (),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30/minute", (30, 60)),
        ("30/min", (30, 60)),
        ("1000/day", (1000, 86400)),
        ("5/second", (5, 1)),
        ("100/hours", (100, 3600)),
        ("10/5m", (10, 300)),
    ],
)
def test_rate_syntax(text: str, expected: tuple[int, int]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["30", "30/fortnight", "0/minute", "-1/minute", "x/minute"])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a rate|must be positive"):
        parse_rate(text)


def test_most_specific_level_wins_kind_by_kind() -> None:
    config = LimitsConfig.model_validate(
        {
            "default": {"rate": "30/minute", "min_interval": {"seconds": 3}},
            "plans": {"enterprise": {"rate": "300/minute"}},
        }
    )
    route = LimitsConfig.model_validate({"default": {"min_interval": None}}).default
    pro = effective(config, "pro", None)
    assert [r.limit for r in pro.rate] == ["30/minute"] and pro.min_interval is not None
    ent = effective(config, "enterprise", None)
    assert [r.limit for r in ent.rate] == ["300/minute"] and ent.min_interval is not None
    ent_route = effective(config, "enterprise", route)
    assert [r.limit for r in ent_route.rate] == ["300/minute"] and ent_route.min_interval is None
    builtin = effective(LimitsConfig(), None, None)
    assert [r.limit for r in builtin.rate] == ["30/minute"]
    assert builtin.min_interval == MinInterval(seconds=3)


async def test_rate_boundary_and_sliding_window(limiter: Limiter, clock: Clock) -> None:
    limits = only(rate=[RateLimit(limit="30/minute")])
    for _ in range(10):
        await limiter.admit("acme", "alice", "general", limits, 10)
    clock.advance(seconds=40)
    for _ in range(20):  # the 30th within the minute is admitted
        admission = await limiter.admit("acme", "alice", "general", limits, 10)
    assert admission.headers["RateLimit-Policy"] == '"user-30-per-60s";q=30;w=60'
    assert admission.headers["RateLimit"] == '"user-30-per-60s";r=0;t=20'
    with pytest.raises(RateLimited) as refused:  # the 31st is not
        await limiter.admit("acme", "alice", "general", limits, 10)
    assert refused.value.headers["Retry-After"] == "20"
    # Another user of the same organization has a quota of their own.
    await limiter.admit("acme", "bob", "general", limits, 10)
    clock.advance(seconds=20, milliseconds=1)  # the first 10 leave the window
    for _ in range(10):
        await limiter.admit("acme", "alice", "general", limits, 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", "alice", "general", limits, 10)
    # The next hit to leave the window is one of the 20 taken at t=40s: 40 s from now.
    assert refused.value.headers["Retry-After"] == "40"


async def test_organization_rate_is_shared_by_its_users(limiter: Limiter) -> None:
    limits = only(rate=[RateLimit(limit="3/hour", per="organization")])
    for user in ("a", "b", "c"):
        await limiter.admit("acme", user, "general", limits, 10)
    with pytest.raises(RateLimited):
        await limiter.admit("acme", "d", "general", limits, 10)
    await limiter.admit("other", "a", "general", limits, 10)


async def test_min_interval(limiter: Limiter, clock: Clock) -> None:
    limits = only(min_interval=MinInterval(seconds=3))
    await limiter.admit("acme", "alice", "forecast", limits, 10)
    clock.advance(seconds=1)
    with pytest.raises(TooFrequent) as refused:
        await limiter.admit("acme", "alice", "forecast", limits, 10)
    assert refused.value.headers["Retry-After"] == "2"
    await limiter.admit("acme", "alice", "general", limits, 10)  # another feature
    await limiter.admit("acme", "bob", "forecast", limits, 10)  # another user
    clock.advance(seconds=2)
    await limiter.admit("acme", "alice", "forecast", limits, 10)


async def test_a_dead_holders_slot_frees_after_its_lease(limiter: Limiter, clock: Clock) -> None:
    limits = only(concurrency=Concurrency(max=1))
    held = await limiter.admit("acme", "alice", "general", limits, lease_seconds=5)
    assert len(held.leases) == 1
    with pytest.raises(Exception, match="at most 1 requests in flight"):
        await limiter.admit("acme", "alice", "general", limits, lease_seconds=5)
    # Its gateway died: nobody releases. The lease (5 s + 30 s grace) runs out.
    clock.advance(seconds=35, milliseconds=1)
    again = await limiter.admit("acme", "alice", "general", limits, lease_seconds=5)
    await limiter.release(again)
    await limiter.admit("acme", "alice", "general", limits, lease_seconds=5)


def limits_rules(upstream: tuple[Upstream, str], limits_yaml: str) -> Rules:
    return load_test_rules(upstream[1], limits=limits_yaml)


@pytest.fixture
async def make_gateway(
    ledger: Ledger, redis_url: str, clock: Clock, upstream: tuple[Upstream, str]
) -> AsyncIterator[object]:
    made: list[tuple[TestClient[web.Request, web.Application], Limiter]] = []
    await ledger.create_org("acme", "pro")
    await ledger.create_org("freeloader", "starter")

    async def make(
        limits_yaml: str, url: str | None = None
    ) -> tuple[TestClient[web.Request, web.Application], Limiter]:
        rules = limits_rules(upstream, limits_yaml)
        limiter = Limiter.from_url(
            url or redis_url,
            rules.document.limits,
            prefix=f"t{os.urandom(6).hex()}:",
            clock_ms=clock.ms,
        )
        app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        made.append((client, limiter))
        return client, limiter

    yield make
    for client, limiter in made:
        await client.close()
        await limiter.close()


async def test_gateway_refuses_the_31st_request_uncharged(
    make_gateway: object, ledger: Ledger, upstream: tuple[Upstream, str]
) -> None:
    client, _ = await make_gateway(
        "limits:\n  default: {rate: 30/minute, min_interval: null}\n  blocks: null\n"
    )  # type: ignore[operator]
    statuses = []
    for _ in range(31):
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        statuses.append(resp.status)
        assert resp.headers["RateLimit-Policy"] == '"user-30-per-60s";q=30;w=60'
    assert statuses == [200] * 30 + [429]
    problem = await resp.json()
    assert problem["code"] == "rate_limited"
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.headers["RateLimit"].startswith('"user-30-per-60s";r=0;t=')
    assert len(upstream[0].seen) == 30
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert general.available == 70


async def test_concurrency_cap_with_50_simultaneous_requests(
    make_gateway: object,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
    http: aiohttp.ClientSession,
) -> None:
    client, _ = await make_gateway(  # type: ignore[operator]
        "limits:\n  default: {rate: [], min_interval: null, concurrency: {max: 5}}\n"
        "  blocks: null\n"
    )
    url = str(client.make_url("/v1/chat/x?slow=0.5"))

    async def one() -> int:
        async with http.post(url, json=CHAT, headers=bearer()) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(one() for _ in range(50)))
    assert Counter(statuses) == {200: 5, 429: 45}
    assert upstream[0].max_in_flight == 5
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert general.available == 95
    # The slots were released: five more fit now.
    statuses = await asyncio.gather(*(one() for _ in range(5)))
    assert statuses == [200] * 5


async def test_repeated_refusals_block_until_lifted_or_expired(
    make_gateway: object, clock: Clock
) -> None:
    client, limiter = await make_gateway(  # type: ignore[operator]
        "limits:\n  default: {rate: [], min_interval: null}\n"
        "  blocks: {after: 3, within_seconds: 60, cooldown_seconds: 600}\n"
    )
    starter = bearer("freeloader", "bob")
    codes = []
    for _ in range(4):
        resp = await client.post("/v1/leads/generate", json={}, headers=starter)
        codes.append((resp.status, (await resp.json())["code"]))
    assert codes == [(403, "plan_forbidden")] * 3 + [(429, "blocked")]
    assert resp.headers["Retry-After"] == "600"
    # Blocked for everything, even what the plan allows after a purchase.
    resp = await client.post("/v1/chat/x", json=CHAT, headers=starter)
    assert resp.status == 429
    # Another user of the organization is not blocked.
    resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer("freeloader", "carol"))
    assert resp.status == 403
    assert await limiter.unblock("freeloader", "bob") == 1
    resp = await client.post("/v1/leads/generate", json={}, headers=starter)
    assert (resp.status, (await resp.json())["code"]) == (403, "plan_forbidden")
    for _ in range(2):
        await client.post("/v1/leads/generate", json={}, headers=starter)
    resp = await client.post("/v1/chat/x", json=CHAT, headers=starter)
    assert resp.status == 429
    clock.advance(seconds=601)  # the block expires
    resp = await client.post("/v1/chat/x", json=CHAT, headers=starter)
    assert resp.status == 403


async def test_invalid_tokens_block_the_address(make_gateway: object) -> None:
    client, limiter = await make_gateway(  # type: ignore[operator]
        "limits:\n  blocks: {after: 5, within_seconds: 60, cooldown_seconds: 60}\n"
    )
    for _ in range(5):
        resp = await client.post("/v1/chat/x", json=CHAT, headers={"Authorization": "Bearer x"})
        assert resp.status == 401
    bad = {"Authorization": "Bearer x"}
    resp = await client.post("/v1/chat/x", json=CHAT, headers=bad)
    assert resp.status == 429 and (await resp.json())["code"] == "blocked"
    # A valid token is never refused for its address: tenants share proxies and NATs.
    resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
    assert resp.status == 200
    assert await limiter.unblock(address="127.0.0.1") == 1
    resp = await client.post("/v1/chat/x", json=CHAT, headers=bad)
    assert resp.status == 401


async def test_spend_spike_alerts_with_a_signed_webhook(limiter: Limiter, clock: Clock) -> None:
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers.get("X-Gateway-Signature", "")))
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/alerts", hook)
    server = TestServer(receiver, host="127.0.0.1")
    await server.start_server()
    spike = Spike(
        window_minutes=5,
        baseline_minutes=60,
        factor=4,
        min_tokens=20,
        block=True,
        webhook_url=str(server.make_url("/alerts")),
        webhook_secret_env="ALERT_SECRET",
    )
    limiter.config = LimitsConfig(spike=spike)
    try:
        # An hour of steady use: 2 tokens a minute (10 per 5-minute window).
        for _ in range(60):
            assert await limiter.record_spend("acme", 2) is None
            clock.advance(minutes=1)
        for _ in range(4):  # 8 in this window: normal
            assert await limiter.record_spend("acme", 2) is None
        alert = None
        for _ in range(10):  # then a burst: 40+ in the window, over 4 x 10
            alert = alert or await limiter.record_spend("acme", 5)
        assert alert is not None and alert.org == "acme" and alert.blocked
        assert alert.recent > 40 and 9 <= alert.baseline <= 11
        assert await limiter.record_spend("acme", 50) is None  # one alert per cooldown
        with pytest.raises(Blocked):
            await limiter.admit("acme", "alice", "general", only(), 10)

        async with aiohttp.ClientSession() as session:
            alerter = Alerter(spike, session, {"ALERT_SECRET": "s3cret"})
            alerter.spike(alert)
            await alerter.close()
        assert alerter.sent == 1
        body, signature = received[0]
        assert verify("s3cret", body, signature)
        assert not verify("wrong", body, signature)
        assert json.loads(body)["organization"] == "acme"
    finally:
        await server.close()


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_outage_fails_open_or_closed_and_recovers(
    make_gateway: object,
    redis_url: str,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = Relay(redis_url)
    await relay.start()
    redis_via_relay = f"redis://127.0.0.1:{relay.port}/0"
    try:
        client, limiter = await make_gateway(  # type: ignore[operator]
            f"limits:\n  on_store_error: {mode}\n  default: {{rate: 2/hour, min_interval: null}}\n"
            "  blocks: null\n",
            redis_via_relay,
        )
        assert (await client.post("/v1/chat/x", json=CHAT, headers=bearer())).status == 200
        await relay.cut()
        statuses = [
            (await client.post("/v1/chat/x", json=CHAT, headers=bearer())).status for _ in range(3)
        ]
        outage_logs = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(outage_logs) == 1  # once per outage, not per request
        assert limiter.store_errors >= 3
        general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
        if mode == "open":
            assert statuses == [200, 200, 200]  # the ledger still guards the money
            assert general.available == 96
        else:
            assert statuses == [503, 503, 503]
            assert general.available == 99
            assert len(upstream[0].seen) == 1
        await relay.start()  # Redis is back: no restart needed
        await asyncio.sleep(0.1)
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        assert resp.status == 200  # the second of 2/hour (outage requests were not counted)
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        assert resp.status == 429
    finally:
        await relay.cut()


async def test_limiter_unavailable_is_a_problem_in_closed_mode(redis_url: str) -> None:
    limiter = Limiter.from_url(
        f"redis://127.0.0.1:{free_port()}/0", LimitsConfig(on_store_error="closed")
    )
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.admit(
                "acme", "alice", "general", only(rate=[RateLimit(limit="1/minute")]), 1
            )
    finally:
        await limiter.close()


async def test_a_request_no_limit_applies_to_asks_redis_nothing() -> None:
    """No blocks and no limit for the route: admitted without a round trip, so even an
    unreachable Redis in closed mode refuses nothing."""
    limiter = Limiter.from_url(
        f"redis://127.0.0.1:{free_port()}/0", LimitsConfig(on_store_error="closed", blocks=None)
    )
    try:
        admission = await limiter.admit("acme", "alice", "general", only(), 1)
        assert (admission.leases, admission.headers, admission.token_entries) == ([], {}, [])
        with pytest.raises(LimiterUnavailable):  # a limit that applies still asks
            await limiter.admit(
                "acme", "alice", "general", only(rate=[RateLimit(limit="1/minute")]), 1
            )
    finally:
        await limiter.close()


async def test_a_redis_that_never_answers_is_given_half_a_second() -> None:
    """A store that accepts the connection and then says nothing (a hung server) is not
    waited for: each call is bounded as a whole, then on_store_error decides."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limits = only(rate=[RateLimit(limit="1/minute")])
    try:
        for mode in ("closed", "open"):
            limiter = Limiter.from_url(
                f"redis://127.0.0.1:{port}/0",
                LimitsConfig(on_store_error=mode),  # type: ignore[arg-type]
            )
            started = time.monotonic()
            try:
                if mode == "closed":
                    with pytest.raises(LimiterUnavailable):
                        await limiter.admit("acme", "alice", "general", limits, 1)
                else:
                    admission = await limiter.admit("acme", "alice", "general", limits, 1)
                    assert admission.leases == [] and admission.headers == {}
                assert 0.4 < time.monotonic() - started < 2.0
                assert limiter.store_errors == 1
            finally:
                await limiter.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_three_gateways_share_one_limit_and_one_balance(
    database_url: str,
    redis_url: str,
    schema: str,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    await ledger.create_org("shared", "starter")
    await ledger.grant("shared", "general", 40, kind="purchase", reason="exactly 40 requests")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        rules_yaml(
            upstream[1],
            limits="limits:\n  default: {rate: {limit: 60/hour, per: organization},"
            " min_interval: null}\n  blocks: null\n",
        )
    )
    env = process_env(database_url, redis_url, schema, rules_file)
    ports = [free_port() for _ in range(3)]
    procs = list(await asyncio.gather(*(start_serve(env, port) for port in ports)))
    try:
        headers = bearer("shared", "u")

        async def one(i: int) -> int:
            port = ports[i % 3]
            # The patient upstream (20 s timeout): a loaded machine must not turn a slow
            # answer into a refunded 504 and so change the count.
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/stream", json=CHAT, headers=headers
            ) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(150)))
    finally:
        for proc in procs:
            proc.terminate()
        await asyncio.gather(*(p.wait() for p in procs))
    # 60 admitted by the shared limit; of those the shared balance covers exactly 40.
    assert Counter(statuses) == {200: 40, 402: 20, 429: 90}
    assert len(upstream[0].seen) == 40
    general = {a.token_type: a for a in await ledger.balances("shared")}["general"]
    assert (general.available, general.reserved) == (0, 0)


async def test_spike_through_the_gateway_alerts_and_blocks_the_organization(
    ledger: Ledger, redis_url: str, clock: Clock, upstream: tuple[Upstream, str]
) -> None:
    received: list[tuple[bytes, str]] = []
    got_alert = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers["X-Gateway-Signature"]))
        got_alert.set()
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/alerts", hook)
    hook_server = TestServer(receiver, host="127.0.0.1")
    await hook_server.start_server()
    rules = limits_rules(
        upstream,
        "limits:\n  default: {rate: [], min_interval: null}\n  blocks: null\n"
        "  spike: {window_minutes: 5, baseline_minutes: 60, factor: 3, min_tokens: 10,\n"
        f"          block: true, webhook_url: '{hook_server.make_url('/alerts')}'}}\n",
    )
    await ledger.create_org("acme", "pro")
    limiter = Limiter.from_url(
        redis_url, rules.document.limits, prefix=f"t{os.urandom(6).hex()}:", clock_ms=clock.ms
    )
    app = build_app(
        rules,
        ledger,
        limiter,
        environ={**ENVIRON, "GATEWAY_ALERT_SECRET": "hook-secret"},
        sweeper=False,
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        for _ in range(2):  # 5 + 5 lead_generation tokens: the second reaches min_tokens
            resp = await client.post("/v1/leads/generate", json={}, headers=bearer())
            assert resp.status == 200
        await asyncio.wait_for(got_alert.wait(), timeout=10)
        body, signature = received[0]
        assert verify("hook-secret", body, signature)
        alert = json.loads(body)
        assert alert["organization"] == "acme" and alert["recent_tokens"] == 10
        assert alert["blocked"] is True
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer("acme", "other"))
        assert resp.status == 429 and (await resp.json())["code"] == "blocked"
        assert await limiter.unblock("acme") == 1
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        assert resp.status == 200
    finally:
        await client.close()
        await limiter.close()
        await hook_server.close()


# --- one script, one round trip ------------------------------------------------------

EVERY_KIND = only(
    rate=[RateLimit(limit="3/minute"), RateLimit(limit="100/hour", per="organization")],
    min_interval=MinInterval(seconds=3),
    concurrency=Concurrency(max=1),
    tokens=[TokenRate(limit="100/minute")],
)


async def test_a_refused_request_uses_up_no_limit(limiter: Limiter, clock: Clock) -> None:
    first = await limiter.admit("acme", "alice", "general", EVERY_KIND, 10, tokens=10)
    assert first.headers["RateLimit"] == (
        '"user-3-per-60s";r=2;t=60, "organization-100-per-3600s";r=99;t=3600'
    )
    # Refused by the minimum interval, then by the concurrency cap, then by the token rate:
    # none of them takes a hit from the rates that passed, a slot or a minimum interval.
    with pytest.raises(TooFrequent) as refused:
        await limiter.admit("acme", "alice", "general", EVERY_KIND, 10, tokens=10)
    assert refused.value.headers["RateLimit"] == (
        '"user-3-per-60s";r=2;t=60, "organization-100-per-3600s";r=99;t=3600'
    )
    clock.advance(seconds=3)
    with pytest.raises(TooManyInFlight):
        await limiter.admit("acme", "alice", "general", EVERY_KIND, 10, tokens=10)
    await limiter.finish(first, 10)
    with pytest.raises(RateLimited, match="tokens per 60s"):
        await limiter.admit("acme", "alice", "general", EVERY_KIND, 10, tokens=91)
    verdicts = await limiter.peek("acme", "alice", "general", EVERY_KIND, tokens=10)
    assert [v.detail for v in verdicts] == [
        "none",
        "2 of 3 left per 60s",
        "99 of 100 left per 3600s",
        "free",
        "0 in flight",
        "90 of 100 tokens left per 60s",
    ]
    second = await limiter.admit("acme", "alice", "general", EVERY_KIND, 10, tokens=10)
    assert second.headers["RateLimit"] == (
        '"user-3-per-60s";r=1;t=57, "organization-100-per-3600s";r=98;t=3597'
    )


@pytest.mark.parametrize("kind", ["blocks", "rate", "min_interval", "concurrency", "tokens"])
async def test_peek_reports_the_refusal_admit_raises(limiter: Limiter, kind: str) -> None:
    now = limiter.clock_ms()
    limiter.clock_ms = lambda: now  # the same instant for both, to the millisecond
    per_minute = [RateLimit(limit="30/minute")]
    limits = {
        "blocks": only(rate=per_minute),
        "rate": only(rate=[RateLimit(limit="1/minute")]),
        "min_interval": only(rate=per_minute, min_interval=MinInterval(seconds=3)),
        "concurrency": only(rate=per_minute, concurrency=Concurrency(max=1)),
        "tokens": only(rate=per_minute, tokens=[TokenRate(limit="10/minute")]),
    }[kind]
    if kind == "blocks":
        limiter.config = LimitsConfig.model_validate({"blocks": {"after": 1}})
        assert await limiter.record_refusal("acme", "alice", None)
    else:
        await limiter.admit("acme", "alice", "general", limits, 10, tokens=10)
    verdicts = await limiter.peek("acme", "alice", "general", limits, tokens=5)
    judged = next(v.refusal for v in verdicts if v.refusal is not None)
    with pytest.raises(GatewayError) as refused:
        await limiter.admit("acme", "alice", "general", limits, 10, tokens=5)
    assert (type(judged), judged.detail, judged.headers, judged.extra) == (
        type(refused.value),
        refused.value.detail,
        refused.value.headers,
        refused.value.extra,
    )
    assert refused.value.headers["Retry-After"]
    if kind != "blocks":
        assert refused.value.headers["RateLimit-Policy"].startswith('"user-')


class CountingConnection(redis.asyncio.Connection):
    """Counts what it sends: one write per command, one per pipeline, each a round trip."""

    writes = 0

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def counted(redis_url: str, clock: Clock) -> AsyncIterator[Limiter]:
    """A limiter whose connections count their round trips in ``CountingConnection``."""
    prefix = f"t{os.urandom(6).hex()}:"
    client = redis.asyncio.Redis.from_url(
        redis_url, connection_class=CountingConnection, decode_responses=True
    )
    spike = Spike(window_minutes=5, baseline_minutes=60, factor=3, min_tokens=10)
    limiter = Limiter(client, LimitsConfig(spike=spike), prefix=prefix, clock_ms=clock.ms)
    yield limiter
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await limiter.close()


async def test_admit_peek_and_finish_take_one_round_trip_each(counted: Limiter) -> None:
    limiter = counted
    warm = await limiter.admit("acme", "warm", "general", EVERY_KIND, 10, tokens=1)
    await limiter.finish(warm, 1)  # connected, and the scripts are loaded

    async def trips(call: Awaitable[object]) -> int:
        before = CountingConnection.writes
        with contextlib.suppress(GatewayError):
            await call
        return CountingConnection.writes - before

    # Blocks, two rates, the minimum interval, the concurrency cap and a token rate.
    before = CountingConnection.writes
    admission = await limiter.admit("acme", "alice", "general", EVERY_KIND, 10, tokens=10)
    assert CountingConnection.writes - before == 1
    assert await trips(limiter.admit("acme", "bob", "general", EVERY_KIND, 10, tokens=10)) == 1
    assert await trips(limiter.admit("acme", "alice", "general", EVERY_KIND, 10)) == 1  # refused
    assert await trips(limiter.peek("acme", "alice", "general", EVERY_KIND, tokens=10)) == 1
    assert await trips(limiter.finish(admission, 4)) == 1  # settles the tokens, frees the slot
    assert [e.amount for e in admission.token_entries] == [4] and admission.leases == []
    verdicts = await limiter.peek("acme", "alice", "general", EVERY_KIND)
    assert [v.detail for v in verdicts][-2:] == ["0 in flight", "96 of 100 tokens left per 60s"]

    alerts: list[SpikeAlert] = []
    async with limiter.flushing_spend(alerts.append, every_seconds=60):
        for org in ("acme", "globex", "initech"):
            assert await trips(limiter.record_spend(org, 20)) == 0
        before = CountingConnection.writes
        flushed = await limiter.flush_spend()  # every organization at once
        assert CountingConnection.writes - before == 1
    assert sorted((a.org, a.recent) for a in flushed) == [
        ("acme", 20),
        ("globex", 20),
        ("initech", 20),
    ]
    assert alerts == []  # flush_spend returned them; nothing was left to flush on the way out


async def test_spend_is_counted_in_memory_and_spikes_arrive_within_a_flush(
    limiter: Limiter,
) -> None:
    spike = Spike(window_minutes=5, baseline_minutes=60, factor=3, min_tokens=10, block=True)
    limiter.config = LimitsConfig(spike=spike)
    alerts: list[SpikeAlert] = []
    async with limiter.flushing_spend(alerts.append, every_seconds=0.05):
        for _ in range(4):
            assert await limiter.record_spend("acme", 5) is None
        for _ in range(200):
            if alerts:
                break
            await asyncio.sleep(0.01)
        assert [(a.org, a.recent, a.blocked) for a in alerts] == [("acme", 20, True)]
        with pytest.raises(Blocked):  # the block came with the flush
            await limiter.admit("acme", "bob", "general", only(), 10)
        await limiter.record_spend("globex", 7)
    # Leaving the context flushed the 7: three more make a spike of 10.
    alert = await limiter.record_spend("globex", 3)
    assert alert is not None and (alert.org, alert.recent) == ("globex", 10)
    assert len(alerts) == 1


@pytest.mark.parametrize("prefix", ["{}", "gw:{all}:"])
def test_a_prefix_that_breaks_the_hash_tag_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Limiter.from_url("redis://127.0.0.1:9/0", LimitsConfig(), prefix=prefix)
    assert refused.value.source == "GATEWAY_REDIS_PREFIX"
    assert all(e.startswith(f"'{prefix}': ") for e in refused.value.errors)
    assert refused.value.errors[-1].endswith("; use a prefix without braces")


def test_every_driver_error_is_a_store_error() -> None:
    import redis.exceptions

    # Not the store's answer: a forked child's deadlock (sync client only), and a bug of
    # the driver's command table.
    not_answers = {"ChildDeadlockedError", "IncorrectPolicyType"}
    unmapped = [
        name
        for name, cls in vars(redis.exceptions).items()
        if isinstance(cls, type) and issubclass(cls, BaseException) and name not in not_answers
        if not issubclass(cls, STORE_ERRORS)
    ]
    assert unmapped == []


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_driver_bug_is_answered_by_on_store_error(
    limiter: Limiter, mode: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: object) -> None:  # as redis-py's cluster client once did
        raise AttributeError("'NoneType' object has no attribute 'writelines'")

    monkeypatch.setattr(redis.asyncio.Redis, "evalsha", broken)
    limiter.config = LimitsConfig(on_store_error=mode)  # type: ignore[arg-type]
    limits = only(rate=[RateLimit(limit="1/minute")])
    if mode == "open":
        assert await limiter.admit("acme", "alice", "general", limits, 10) == Admission()
    else:
        with pytest.raises(LimiterUnavailable, match="writelines"):
            await limiter.admit("acme", "alice", "general", limits, 10)
    assert "redis-py failed" in caplog.text
    assert limiter.store_errors == 1
