"""Limits on a real Redis Cluster (three masters, three replicas, on loopback ports; see
``tests/redis_cluster.py``): every kind of limit behaves exactly as on one Redis, a request
is judged by one command, and a master killed under load leaves requests admitted
(``open``) or refused 503 (``closed``), never 500, until its replica takes over; then the
limits hold again, without restarting anything."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.app import build_app
from gateway.errors import Blocked, ConfigError, RateLimited, TooFrequent, TooManyInFlight
from gateway.ledger import Ledger
from gateway.limits.config import (
    Blocks,
    Concurrency,
    Effective,
    LimitsConfig,
    MinInterval,
    RateLimit,
    Spike,
    TokenRate,
)
from gateway.limits.limiter import Admission, Limiter
from gateway.limits.store import connect
from tests.conftest import ENVIRON, Clock, bearer, load_test_rules
from tests.redis_cluster import Cluster, start_cluster
from tests.upstream import Upstream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
MakeLimiter = Callable[..., Limiter]


def only(
    rate: tuple[RateLimit, ...] = (),
    min_interval: MinInterval | None = None,
    concurrency: Concurrency | None = None,
    tokens: tuple[TokenRate, ...] = (),
) -> Effective:
    return Effective(rate, min_interval, concurrency, tokens)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    started = start_cluster()
    yield started
    started.stop()


@pytest.fixture(params=["redis", "cluster"])
async def limiters(
    request: pytest.FixtureRequest, redis_url: str, clock: Clock
) -> AsyncIterator[MakeLimiter]:
    """Makes limiters sharing one fresh key prefix, as gateway replicas share a store: on
    one Redis, then on the cluster, with the same test."""
    url = redis_url if request.param == "redis" else request.getfixturevalue("cluster").url
    prefix = f"t{os.urandom(6).hex()}:"
    made: list[Limiter] = []

    def make(config: LimitsConfig | None = None) -> Limiter:
        limiter = Limiter.from_url(url, config or LimitsConfig(), prefix=prefix, clock_ms=clock.ms)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()
    if request.param == "redis":  # the cluster is thrown away with its module
        client = redis.asyncio.Redis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


# --- the same limits, exactly ------------------------------------------------------------


async def test_rates(limiters: MakeLimiter, clock: Clock) -> None:
    limiter = limiters()
    limits = only(rate=(RateLimit(limit="30/minute"),))
    for _ in range(10):
        await limiter.admit("acme", "alice", "general", limits, 10)
    clock.advance(seconds=40)
    for _ in range(20):
        admission = await limiter.admit("acme", "alice", "general", limits, 10)
    assert admission.headers["RateLimit"] == '"user-30-per-60s";r=0;t=20'
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", "alice", "general", limits, 10)
    assert refused.value.headers["Retry-After"] == "20"
    clock.advance(seconds=20, milliseconds=1)
    for _ in range(10):
        await limiter.admit("acme", "alice", "general", limits, 10)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", "alice", "general", limits, 10)
    assert refused.value.headers["Retry-After"] == "40"
    shared = only(rate=(RateLimit(limit="3/hour", per="organization"),))
    for user in ("a", "b", "c"):
        await limiter.admit("globex", user, "general", shared, 10)
    with pytest.raises(RateLimited):
        await limiter.admit("globex", "d", "general", shared, 10)


async def test_admissions_leased_by_replicas_share_a_rate_exactly(
    limiters: MakeLimiter, clock: Clock
) -> None:
    """Two replicas take admissions ahead (half of what is left at most), one more admits
    request by request: together they admit exactly the rate's 30, and what a replica
    gives back is free again."""
    one, two, exact = limiters(), limiters(), limiters()
    limits = only(rate=(RateLimit(limit="30/minute"),))
    first = await one.lease("acme", "alice", "general", limits, 64, 1.0)
    second = await two.lease("acme", "alice", "general", limits, 64, 1.0)
    assert (len(first), len(second)) == (15, 7)
    assert [a.admission.headers["RateLimit"] for a in first[:2]] == [
        '"user-30-per-60s";r=29;t=60',
        '"user-30-per-60s";r=28;t=60',
    ]
    admitted = 0
    with pytest.raises(RateLimited):
        while True:
            await exact.admit("acme", "alice", "general", limits, 10)
            admitted += 1
    assert admitted == 30 - 15 - 7
    assert await two.give_back(second) == 7
    for _ in range(7):
        await exact.admit("acme", "alice", "general", limits, 10)
    with pytest.raises(RateLimited):
        await exact.admit("acme", "alice", "general", limits, 10)
    clock.advance(seconds=62)  # the window, plus the lease's second, has passed
    assert len(await one.lease("acme", "alice", "general", limits, 64, 1.0)) == 15


async def test_the_minimum_interval(limiters: MakeLimiter, clock: Clock) -> None:
    limiter = limiters()
    limits = only(min_interval=MinInterval(seconds=3))
    await limiter.admit("acme", "alice", "forecast", limits, 10)
    clock.advance(seconds=1)
    with pytest.raises(TooFrequent) as refused:
        await limiter.admit("acme", "alice", "forecast", limits, 10)
    assert refused.value.headers["Retry-After"] == "2"
    await limiter.admit("acme", "alice", "general", limits, 10)
    clock.advance(seconds=2)
    await limiter.admit("acme", "alice", "forecast", limits, 10)


async def test_50_simultaneous_requests_through_four_replicas_take_5_slots(
    limiters: MakeLimiter,
) -> None:
    replicas = [limiters() for _ in range(4)]
    limits = only(concurrency=Concurrency(max=5, per="organization"))

    async def one(i: int) -> Admission | None:
        try:
            return await replicas[i % 4].admit("acme", f"u{i}", "general", limits, 10)
        except TooManyInFlight:
            return None

    admitted = [a for a in await asyncio.gather(*(one(i) for i in range(50))) if a]
    assert len(admitted) == 5
    for admission in admitted:
        await replicas[0].finish(admission, 1)
    again = await asyncio.gather(*(one(i) for i in range(5)))
    assert all(again)


async def test_token_rates(limiters: MakeLimiter, clock: Clock) -> None:
    replicas = [limiters() for _ in range(4)]
    per_user = only(tokens=(TokenRate(limit="100/minute"),))
    holds = [await replicas[0].admit("acme", "alice", "general", per_user, 10, tokens=10)]
    holds += [await replicas[1].admit("acme", "alice", "general", per_user, 10, tokens=30)]
    await replicas[2].settle_tokens(holds[1], 80)  # charged more than it held
    with pytest.raises(RateLimited) as refused:
        await replicas[3].admit("acme", "alice", "general", per_user, 10, tokens=11)
    assert refused.value.detail == "more than 100 tokens per 60s (user limit)"
    await replicas[3].admit("acme", "alice", "general", per_user, 10, tokens=10)
    verdicts = await replicas[0].peek("acme", "alice", "general", per_user)
    assert verdicts[-1].detail == "0 of 100 tokens left per 60s; retry in 60s"
    clock.advance(seconds=60)
    org_wide = only(tokens=(TokenRate(limit="500/minute", per="organization"),))

    async def one(i: int) -> bool:
        try:
            await replicas[i % 4].admit("acme", f"u{i}", "general", org_wide, 10, tokens=10)
        except RateLimited:
            return False
        return True

    outcomes = await asyncio.gather(*(one(i) for i in range(100)))
    assert Counter(outcomes) == {True: 50, False: 50}


async def test_blocks_peek_and_unblock(limiters: MakeLimiter) -> None:
    limiter = limiters(LimitsConfig(blocks=Blocks(after=3, within_seconds=60)))
    limits = only(rate=(RateLimit(limit="30/minute"),), concurrency=Concurrency(max=1))
    for expected in (False, False, True):
        assert await limiter.record_refusal("acme", "alice", None) is expected
    verdicts = await limiter.peek("acme", "alice", "general", limits)
    assert [(v.limit, v.detail) for v in verdicts] == [
        ("blocks", "blocked for 900s"),
        ("rate 30/minute per user", "30 of 30 left per 60s"),
        ("concurrency 1 per user", "0 in flight"),
    ]
    with pytest.raises(Blocked):
        await limiter.admit("acme", "alice", "general", limits, 10)
    assert await limiter.unblock("acme", "alice") == 1
    await limiter.admit("acme", "alice", "general", limits, 10)


async def test_spend_of_organizations_on_every_node_is_flushed_at_once(
    limiters: MakeLimiter,
) -> None:
    spike = Spike(window_minutes=5, baseline_minutes=60, factor=3, min_tokens=10)
    limiter = limiters(LimitsConfig(spike=spike))
    # Organizations whose keys fall on each of the three masters' slot ranges.
    orgs = [next(f"org{i}" for i in range(999) if lo <= key_slot(f"{{org{i}}}".encode()) < hi)
            for lo, hi in ((0, 5461), (5461, 10922), (10922, 16384))]  # fmt: skip
    async with limiter.flushing_spend(lambda alert: None, every_seconds=60):
        for org in orgs:
            await limiter.record_spend(org, 12)
        alerts = await limiter.flush_spend()
    assert sorted((a.org, a.recent) for a in alerts) == [(org, 12) for org in sorted(orgs)]


# --- one round trip per request -------------------------------------------------------------


async def test_a_request_is_one_round_trip_on_the_cluster(
    cluster: Cluster, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: Counter[int] = Counter()  # writes by port: one per command or pipeline
    send = redis.asyncio.Connection.send_packed_command

    async def counted(self: redis.asyncio.Connection, *args: Any, **kwargs: Any) -> None:
        sent[self.port] += 1
        await send(self, *args, **kwargs)

    monkeypatch.setattr(redis.asyncio.Connection, "send_packed_command", counted)
    limiter = Limiter.from_url(
        cluster.url, LimitsConfig(), prefix=f"t{os.urandom(6).hex()}:", clock_ms=clock.ms
    )
    every = only(
        rate=(RateLimit(limit="30/minute"), RateLimit(limit="100/hour", per="organization")),
        min_interval=MinInterval(seconds=3),
        concurrency=Concurrency(max=2),
        tokens=(TokenRate(limit="1000/minute"),),
    )
    node = cluster.master_of("acme").port
    try:
        warm = await limiter.admit("acme", "warm", "general", every, 10, tokens=1)
        await limiter.finish(warm, 1)  # the layout learnt and the scripts loaded
        sent.clear()
        admission = await limiter.admit("acme", "alice", "general", every, 10, tokens=5)
        assert sent == {node: 1}
        await limiter.peek("acme", "alice", "general", every)
        assert sent == {node: 2}
        await limiter.finish(admission, 5)  # settle and release: one pipeline, one node
        assert sent == {node: 3}
    finally:
        await limiter.close()


# --- a master dies -----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_master_killed_under_load_fails_open_or_closed_then_limits_hold_again(
    ledger: Ledger, upstream: tuple[Upstream, str], clock: Clock
) -> None:
    failing = await asyncio.to_thread(start_cluster)
    master = failing.master_of("org0")
    # Organizations of the master that dies: one per gateway.
    orgs = [f"org{i}" for i in range(200) if failing.master_of(f"org{i}") is master][:2]
    made: list[tuple[TestClient[web.Request, web.Application], Limiter]] = []
    try:
        for mode, org in zip(("open", "closed"), orgs, strict=True):
            await ledger.create_org(org, "pro")
            await ledger.grant(org, "general", 1000, kind="purchase", reason="the load")
            rules = load_test_rules(
                upstream[1],
                limits=f"limits:\n  on_store_error: {mode}\n  blocks: null\n"
                "  default: {rate: {limit: 3/minute, per: user}, min_interval: null}\n",
            )
            limiter = Limiter.from_url(failing.url, rules.document.limits, clock_ms=clock.ms)
            app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
            client = TestClient(TestServer(app, host="127.0.0.1"))
            await client.start_server()
            made.append((client, limiter))
        seen: dict[str, list[tuple[float, int, str]]] = {"open": [], "closed": []}
        stop = asyncio.Event()

        async def load(
            mode: str, worker: int, client: TestClient[web.Request, web.Application]
        ) -> None:
            org = orgs[0 if mode == "open" else 1]
            i = 0
            while not stop.is_set():
                i += 1  # a new user each time: the rate limit itself never refuses
                user = f"{mode}-{worker}-{i}"
                resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer(org, user))
                problem = await resp.json() if resp.status >= 400 else {}
                await resp.read()
                seen[mode].append((time.monotonic(), resp.status, problem.get("code", "")))
                await asyncio.sleep(0.05)

        loads = [  # three clients at a time on each gateway
            asyncio.create_task(load(mode, worker, client))
            for mode, (client, _) in zip(seen, made, strict=True)
            for worker in range(3)
        ]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        failing.kill(master)
        await asyncio.to_thread(failing.wait_for_failover, master)
        recovered_at = time.monotonic()
        await asyncio.sleep(2.5)
        stop.set()
        await asyncio.gather(*loads)

        for mode in ("open", "closed"):
            outcomes = Counter((status, code) for _, status, code in seen[mode])
            allowed = {(200, "")} | ({(503, "limits_unavailable")} if mode == "closed" else set())
            assert set(outcomes) <= allowed, f"{mode}: {outcomes}"
            during = [s for t, s, _ in seen[mode] if killed_at + 0.1 < t < recovered_at - 0.1]
            assert during, f"{mode}: no request during the outage"
            if mode == "closed":
                assert 503 in during
            # The client learns the new layout from its next failures, within a second or
            # so of the cluster's own failover on these machines.
            last = [s for t, s, _ in seen[mode] if t > recovered_at + 2.0]
            assert last and set(last) == {200}, f"{mode}: {last}"

        # The replica holds the limits now: exactly 3 a minute, as before.
        for (client, limiter), org in zip(made, orgs, strict=True):
            statuses = []
            for _ in range(4):
                resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer(org, "after"))
                await resp.read()
                statuses.append(resp.status)
            assert statuses == [200, 200, 200, 429]
            assert limiter.store_errors > 0  # the outage was met, and recovered from
    finally:
        for client, limiter in made:
            await client.close()
            await limiter.close()
        failing.stop()


# --- naming a cluster --------------------------------------------------------------------


async def test_a_cluster_url_names_its_startup_nodes() -> None:
    client = connect("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert isinstance(client, RedisCluster)
    assert [(n.host, n.port) for n in client.startup_nodes] == [
        ("127.0.0.1", 7000),
        ("127.0.0.1", 7001),
    ]
    await client.aclose()
    client = connect("rediss+cluster://gw:s%40cret@redis-a:7000,redis-b/0?ssl_cert_reqs=none")
    assert isinstance(client, RedisCluster)
    assert [(n.host, n.port) for n in client.startup_nodes] == [
        ("redis-a", 7000),
        ("redis-b", 6379),
    ]
    kwargs = client.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["ssl_cert_reqs"]) == (
        "gw",
        "s@cret",
        "none",
    )
    assert kwargs["connection_class"].__name__ == "SSLConnection"
    await client.aclose()


def test_a_bad_cluster_url_is_refused_with_every_reason() -> None:
    with pytest.raises(ConfigError) as refused:
        connect("redis+cluster://gw:secret@h1:x,:7000/3")
    assert refused.value.source == "REDIS_URL"
    assert refused.value.errors == [
        "'redis+cluster://gw:***@h1:x,:7000/3': 'h1:x' is not a host:port",
        "'redis+cluster://gw:***@h1:x,:7000/3': ':7000' is not a host:port",
        "'redis+cluster://gw:***@h1:x,:7000/3': a cluster has only database 0, not '3'",
    ]
