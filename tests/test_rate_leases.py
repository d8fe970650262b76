"""Leases of the limits (ledger.leases): admissions made ahead for a busy caller whose
limits are blocks and rates alone, so that its requests make no round trip to Redis before
they are forwarded. Against real Redis, PostgreSQL, a local upstream and, for the claim
across processes, two real ``gateway serve`` processes. Each test counts what reached the
upstream and what the rate's own log in Redis holds, not only the status codes."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.keys import Keys
from gateway.limits.limiter import Limiter
from gateway.rules import Rules, parse_rules
from gateway.runtime import free_port
from gateway.state import STATE
from tests.conftest import (
    ENVIRON,
    Clock,
    bearer,
    process_env,
    rules_yaml,
    start_serve,
    stop_serve,
)
from tests.upstream import Upstream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
NO_BLOCKS = "  blocks: {after: 1000, within_seconds: 60, cooldown_seconds: 60}\n"


def leased_limits_yaml(
    upstream_url: str, *, per_minute: int, seconds: float, limits: str = ""
) -> str:
    limits = limits or (
        f"limits:\n  default: {{rate: [{{limit: {per_minute}/minute, per: user}}], "
        f"min_interval: null}}\n" + NO_BLOCKS
    )
    leases = f"  leases: {{seconds: {seconds}, max_holds: 16}}\n"
    return rules_yaml(upstream_url, limits=limits).replace("ledger:\n", "ledger:\n" + leases, 1)


@dataclass
class Served:
    client: TestClient  # type: ignore[type-arg]
    limiter: Limiter
    rules: Rules
    redis: redis.asyncio.Redis
    keys: Keys
    upstream: Upstream

    async def chat(self, user: str = "user-1") -> aiohttp.ClientResponse:
        resp = await self.client.post("/v1/chat/x", json=CHAT, headers=bearer("acme", user))
        await resp.read()
        return resp

    async def hits(self, user: str = "user-1") -> int:
        """The hits the user's rate log counts now (leased ones included)."""
        rate = self.rules.document.limits.default.rate[0]
        return int(await self.redis.zcard(self.keys.rate("acme", user, rate)))

    async def ahead(self, admitted: int) -> int:
        """The admissions this process holds ahead, once the rate's log counts them besides
        the ``admitted`` requests (a lease being made may still be on its way); 0 if it
        never does within a second."""
        for _ in range(20):
            ahead = self.client.app[STATE].leases.admitted_ahead
            if await self.hits() == admitted + ahead:
                return ahead
            await asyncio.sleep(0.05)
        return 0

    def metric(self, event: str) -> float:
        body, _ = self.client.app[STATE].metrics.render()
        line = f'gateway_leased_admissions_total{{event="{event}"}} '.encode()
        found = [row for row in body.splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0


@pytest.fixture
async def serve(
    ledger: Ledger, redis_url: str, clock: Clock, upstream: tuple[Upstream, str]
) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    started: list[Served] = []

    async def start(*, per_minute: int = 40, seconds: float = 5.0, limits: str = "") -> Served:
        text = leased_limits_yaml(
            upstream[1], per_minute=per_minute, seconds=seconds, limits=limits
        )
        rules = parse_rules(text.encode(), "rules.yaml")
        prefix = f"t{uuid.uuid4().hex[:12]}:"
        limiter = Limiter.from_url(
            redis_url, rules.document.limits, prefix=prefix, clock_ms=clock.ms
        )
        app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        served = Served(
            client,
            limiter,
            rules,
            redis.asyncio.Redis.from_url(redis_url),
            Keys(prefix),
            upstream[0],
        )
        started.append(served)
        return served

    await ledger.create_org("acme", "pro")
    yield start
    for served in started:
        await served.client.close()
        await served.limiter.close()
        await served.redis.aclose()


async def test_a_busy_callers_admissions_come_from_leases_and_its_rate_holds_exactly(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """One at a time, 60 requests against 40 a minute: the first 40 are served, most of
    them by admissions made ahead, the rest refused as over the rate; the RateLimit
    headers count down as without leases, and once the lease is given back the rate's log
    holds exactly the 40 served."""
    served = await serve(per_minute=40)
    answers = [await served.chat() for _ in range(60)]
    # (A lease's answer can still be on its way when a request is refused: the order of
    # the last few may vary, never the count.)
    assert Counter(a.status for a in answers) == {200: 40, 429: 20}
    refused = [a for a in answers if a.status == 429]
    assert {(await a.json())["code"] for a in refused} == {"rate_limited"}
    assert len(served.upstream.seen) == 40
    assert served.metric("drawn") >= 20, "a busy caller's requests are admitted from leases"
    # Each admission took its own place in the window: 39 left after the first, 0 after
    # the 40th, whichever way it was admitted.
    answered = [a for a in answers if a.status == 200]
    left = sorted(int(a.headers["RateLimit"].split(";r=")[1].split(";")[0]) for a in answered)
    assert left == list(range(40))
    state = served.client.app[STATE]
    await state.leases.close()  # what shutdown does: undrawn admissions go back
    assert state.leases.admitted_ahead == 0
    assert await served.hits() == 40


async def test_admissions_not_drawn_in_time_are_given_back(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    served = await serve(per_minute=100, seconds=0.4)
    assert [(await served.chat()).status for _ in range(12)] == [200] * 12
    state = served.client.app[STATE]
    ahead = await served.ahead(12)
    assert ahead > 0  # and counted by the rate from the moment they are made
    await asyncio.sleep(1.0)  # past their time, and a sweep (every seconds / 2)
    assert state.leases.admitted_ahead == 0
    assert await served.hits() == 12
    assert served.metric("returned") >= ahead


async def test_a_block_reaches_leased_requests_within_the_lease(
    serve: Callable[..., Awaitable[Served]], clock: Clock
) -> None:
    served = await serve(per_minute=100, seconds=0.4)
    assert [(await served.chat()).status for _ in range(12)] == [200] * 12
    await asyncio.sleep(0.05)
    assert served.client.app[STATE].leases.admitted_ahead > 0
    block = served.keys.blocks("acme", "user-1")[0]
    await served.redis.set(block, clock.ms() + 60_000)
    await asyncio.sleep(0.5)  # the lease's admissions are past their time
    resp = await served.chat()
    assert (resp.status, (await resp.json())["code"]) == (429, "blocked")
    assert len(served.upstream.seen) == 12


async def test_limits_judged_request_by_request_are_never_leased(
    serve: Callable[..., Awaitable[Served]],
) -> None:
    """A minimum interval, a concurrency cap or a token rate needs each request's own
    judgement: such callers' requests each ask Redis, leases or not."""
    limits = (
        "limits:\n  default: {rate: [{limit: 100/minute, per: user}], min_interval: null, "
        "concurrency: {max: 50}}\n" + NO_BLOCKS
    )
    served = await serve(limits=limits)
    assert [(await served.chat()).status for _ in range(20)] == [200] * 20
    await asyncio.sleep(0.05)
    state = served.client.app[STATE]
    assert state.leases.held > 0, "the ledger's holds are still leased"
    assert (served.metric("made"), state.leases.admitted_ahead) == (0.0, 0)
    assert await served.hits() == 20


async def test_two_processes_never_exceed_a_rate_together(
    ledger: Ledger,
    database_url: str,
    redis_url: str,
    schema: str,
    upstream: tuple[Upstream, str],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Waves of simultaneous requests (the last of 200) of one user limited to 50 a
    minute, split over two gateway processes that lease admissions: at most 50 reach the
    upstream, each of them paid, and once both have stopped the rate's log holds exactly
    those that were served."""
    await ledger.create_org("acme", "pro")
    path = tmp_path / "rules.yaml"
    path.write_text(leased_limits_yaml(upstream[1], per_minute=50, seconds=1.0))
    env = process_env(database_url, redis_url, schema, path)
    ports = [free_port(), free_port()]
    procs = [await start_serve(env, port) for port in ports]
    drawn = 0.0
    served = Counter[int]()
    try:

        async def one(i: int) -> int:
            url = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/x"
            async with http.post(url, json=CHAT, headers=bearer("acme", "user-1")) as resp:
                await resp.read()
                return resp.status

        for size in (8, 8, 8, 8, 200):  # leases are made in the first waves, drawn after
            served.update(await asyncio.gather(*(one(i) for i in range(size))))
            await asyncio.sleep(0.02)
        for port in ports:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                for row in (await resp.text()).splitlines():
                    if row.startswith('gateway_leased_admissions_total{event="drawn"}'):
                        drawn += float(row.split()[-1])
    finally:
        for proc in procs:
            await stop_serve(proc)  # graceful: undrawn admissions go back
    assert set(served) <= {200, 429}, served
    forwarded = len([s for s in upstream[0].seen if s.headers.get("X-Gateway-Organization")])
    assert forwarded == served[200] <= 50
    assert drawn > 0, "the processes did not lease admissions"
    commits = await ledger.journal("acme", limit=5000)
    assert len([r for r in commits if r["kind"] == "commit"]) == forwarded
    keys = Keys(env["GATEWAY_REDIS_PREFIX"])
    rules = parse_rules(path.read_bytes(), "rules.yaml")
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        rate = rules.document.limits.default.rate[0]
        assert await client.zcard(keys.rate("acme", "user-1", rate)) == forwarded
    finally:
        await client.aclose()


async def test_a_gateway_clock_behind_redis_never_empties_a_rate(
    serve: Callable[..., Awaitable[Served]], clock: Clock
) -> None:
    """The rate log's expiry is set from now, not at a time of the gateway's clock: a
    gateway an hour behind Redis still keeps the lease's hits for their window."""
    clock.advance(hours=-1)
    served = await serve(per_minute=100)
    assert [(await served.chat()).status for _ in range(12)] == [200] * 12
    ahead = await served.ahead(12)
    assert ahead > 0
    rate = served.rules.document.limits.default.rate[0]
    ttl = await served.redis.pttl(served.keys.rate("acme", "user-1", rate))
    assert 60_000 <= ttl <= 65_000  # its window, plus the lease's 5 seconds


async def test_a_lease_call_run_twice_takes_its_admissions_once(
    redis_url: str, clock: Clock
) -> None:
    """A client that lost a lease call's answer and ran it again (a cluster client
    retries) leaves no hits of the first run behind, unknown to any process."""
    from gateway.limits import admission as judge
    from gateway.limits.config import LimitsConfig, effective
    from gateway.limits.store import Store, connect

    config = LimitsConfig.model_validate(
        {"default": {"rate": [{"limit": "10/minute", "per": "user"}], "min_interval": None}}
    )
    request = judge.Request("acme", "u", "general", effective(config, None, None), 0, True)
    keys = Keys(f"t{uuid.uuid4().hex[:12]}:")
    now = clock.ms()
    names, args = judge.lease_call(keys, request, now=now, prefix="p", take=4, until=now + 1000)
    store = Store(connect(redis_url))
    try:
        first = await store.run("lease", names, args)
        again = await store.run("lease", names, args)
        assert first[0] == again[0] == 4
        assert await store.client.zcard(names[-1]) == 4
        assert await store.client.delete(*names[-1:]) == 1
    finally:
        await store.close()


async def test_admissions_made_under_another_plan_are_not_drawn(
    serve: Callable[..., Awaitable[Served]], ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An organization moved to a plan with other limits is judged by them at once, not
    by admissions its old plan's limits made ahead."""
    monkeypatch.setattr("gateway.state.PLAN_CACHE_SECONDS", 0.0)
    limits = (
        "limits:\n  default: {rate: [{limit: 100/minute, per: user}], min_interval: null}\n"
        "  plans:\n    enterprise: {rate: [{limit: 1/minute, per: user}]}\n" + NO_BLOCKS
    )
    served = await serve(limits=limits)
    assert [(await served.chat()).status for _ in range(12)] == [200] * 12
    await asyncio.sleep(0.05)
    state = served.client.app[STATE]
    assert state.leases.admitted_ahead > 0
    assert await ledger.set_plan("acme", "enterprise")
    statuses = [(await served.chat()).status for _ in range(4)]
    assert statuses == [200, 429, 429, 429]
    assert len(served.upstream.seen) == 13
    await asyncio.sleep(0.05)
    assert served.metric("returned") > 0
