"""Leases (ledger.leases): holds made ahead of a busy caller's requests and charges
committed just after the answer. Against real PostgreSQL, Redis, a local upstream and, for
the concurrency and crash claims, real ``gateway serve`` processes; each test asserts who
paid for what, not only that the journal adds up (the ledger fixture audits it too)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules, parse_rules
from gateway.runtime import free_port
from gateway.state import STATE
from tests.conftest import (
    ENVIRON,
    Clock,
    Gateway,
    bearer,
    cycles_of_requests,
    cyclic_garbage,
    process_env,
    rules_yaml,
    start_serve,
    stop_serve,
)
from tests.upstream import Upstream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
SECONDS = 0.4  # how long a leased hold may wait to be drawn, in these tests
LEASES = f"  leases: {{seconds: {SECONDS}, max_holds: 16}}\n"


def leased_rules_yaml(upstream_url: str, *, limits: str | None = None) -> str:
    return rules_yaml(upstream_url, limits=limits).replace("ledger:\n", "ledger:\n" + LEASES, 1)


@pytest.fixture
def rules(upstream: tuple[Upstream, str]) -> Rules:
    return parse_rules(leased_rules_yaml(upstream[1]).encode(), "tests/rules_test.yaml")


async def chat(gateway: Gateway, path: str = "/v1/chat/x", **headers: str) -> tuple[int, Any]:
    resp = await gateway.client.post(path, json=CHAT, headers={**bearer(), **headers})
    body = await resp.json()
    return resp.status, (resp.headers, body)


async def burst(gateway: Gateway, count: int = 8) -> int:
    """``count`` requests one after another, then a moment for the lease's holds being
    made; how many were answered 200."""
    served = 0
    for _ in range(count):
        served += (await chat(gateway))[0] == 200
    await gateway.settled()
    await asyncio.sleep(0.05)
    return served


async def settled_journal(ledger: Ledger, org: str) -> list[dict[str, Any]]:
    """The organization's reserve/commit/refund/expire rows, oldest first."""
    rows = await ledger.journal(org, limit=5000)
    kinds = {"reserve", "commit", "refund", "expire"}
    return [r for r in reversed(rows) if r["kind"] in kinds]


async def test_a_busy_caller_draws_leased_holds_and_pays_each_answer_once(
    gateway: Gateway,
) -> None:
    before = await gateway.available("acme", "general")
    request_ids = []
    for _ in range(30):
        status, (headers, _) = await chat(gateway)
        assert status == 200
        assert headers["X-Tokens-Charged"] == "1"
        request_ids.append(headers["X-Request-Id"])
    await gateway.settled()
    state = gateway.app[STATE]
    await state.leases.close()  # what shutdown does: undrawn holds go back

    assert await gateway.available("acme", "general") == before - 30
    assert await gateway.ledger.held_reservations("acme") == []
    assert len(gateway.upstream.seen) == 30
    rows = await settled_journal(gateway.ledger, "acme")
    commits = [r for r in rows if r["kind"] == "commit"]
    # Each answer is charged exactly once, and its commit names its request.
    assert sorted(r["reason"].split()[1].rstrip(",") for r in commits) == sorted(request_ids)
    assert all(r["allowance_delta"] == 0 and r["reserved_delta"] == -1 for r in commits)
    leased = [r for r in commits if r["reason"].endswith("a leased hold")]
    assert len(leased) >= 20, f"a busy caller draws holds made ahead; {len(leased)} did"
    assert all(r["request_id"].startswith("lease-") for r in leased)
    refunds = [r for r in rows if r["kind"] == "refund"]
    assert all(r["reason"].startswith("lease: ") for r in refunds)
    assert len(refunds) == len([r for r in rows if r["kind"] == "reserve"]) - 30


async def test_a_lone_request_leaves_no_lease_behind(gateway: Gateway) -> None:
    status, (headers, _) = await chat(gateway)
    assert status == 200
    await gateway.settled()
    await asyncio.sleep(0.05)
    rows = await settled_journal(gateway.ledger, "acme")
    assert [r["kind"] for r in rows] == ["reserve", "commit"]
    assert rows[0]["request_id"] == headers["X-Request-Id"]
    assert gateway.app[STATE].leases.held == 0


async def test_commits_of_delivered_answers_share_transactions(
    gateway: Gateway, database_url: str, schema: str
) -> None:
    """Ten leased requests started 4 ms apart: their commits, which nobody waits for, wait
    up to 20 ms for each other and share a few transactions instead of one each; every
    answer is still charged exactly once."""
    assert await burst(gateway, 6) == 6  # a lease is drawn
    before = len(await settled_journal(gateway.ledger, "acme"))

    async def request(n: int) -> str:
        await asyncio.sleep(0.004 * n)
        status, (headers, _) = await chat(gateway)
        assert status == 200
        return str(headers["X-Request-Id"])

    request_ids = await asyncio.gather(*(request(n) for n in range(10)))
    await gateway.settled()
    rows = (await settled_journal(gateway.ledger, "acme"))[before:]
    commits = [r for r in rows if r["kind"] == "commit"]
    assert sorted(r["reason"].split()[1].rstrip(",") for r in commits) == sorted(request_ids)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        transactions = await conn.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM reservations WHERE id = ANY($1::uuid[])",
            [r["reservation_id"] for r in commits],
        )
    finally:
        await conn.close()
    assert transactions <= 4, f"{transactions} transactions settled 10 commits"


async def test_a_leased_exchange_leaves_no_reference_cycle(gateway: Gateway) -> None:
    """Answered from a leased hold and committed after the answer, a request is still
    freed by reference counting alone (see test_pipeline's test of the same name)."""
    before = await gateway.available("acme", "general")
    assert await burst(gateway, 6) == 6  # a lease is drawn
    request_ids = []
    with cyclic_garbage() as garbage:
        for _ in range(5):
            status, (headers, _) = await chat(gateway)
            assert status == 200
            request_ids.append(headers["X-Request-Id"])
        await gateway.settled()
        await asyncio.sleep(0.05)
    assert cycles_of_requests(garbage) == []
    await gateway.app[STATE].leases.close()
    assert await gateway.available("acme", "general") == before - 11
    rows = await settled_journal(gateway.ledger, "acme")
    leased = {r["reason"].split()[1].rstrip(",") for r in rows if r["kind"] == "commit"}
    assert set(request_ids) <= leased and len(leased) == 11


async def test_a_lease_never_refuses_its_caller_the_last_tokens(gateway: Gateway) -> None:
    await gateway.ledger.create_org("tiny", "daily")  # 10 'general' tokens a day
    statuses = []
    for _ in range(12):
        resp = await gateway.client.post("/v1/chat/x", json=CHAT, headers=bearer("tiny"))
        await resp.read()
        statuses.append(resp.status)
    await gateway.settled()
    await gateway.app[STATE].leases.close()
    # Every token was served in the end: none stayed stranded in a lease.
    assert statuses == [200] * 10 + [402] * 2
    assert await gateway.available("tiny", "general") == 0


async def test_holds_not_drawn_in_time_are_given_back(gateway: Gateway) -> None:
    before = await gateway.available("acme", "general")
    assert await burst(gateway, 6) == 6
    state = gateway.app[STATE]
    leased = state.leases.held
    assert leased > 0
    assert await gateway.available("acme", "general") == before - 6 - leased
    await asyncio.sleep(SECONDS * 2.5)  # past their time, and a sweep (every SECONDS / 2)
    assert state.leases.held == 0
    assert await gateway.ledger.held_reservations("acme") == []
    assert await gateway.available("acme", "general") == before - 6
    refunds = [r for r in await settled_journal(gateway.ledger, "acme") if r["kind"] == "refund"]
    assert len(refunds) >= leased
    assert {r["reason"] for r in refunds} == {f"lease: not drawn within {SECONDS:g}s"}


async def test_an_answer_whose_charge_cannot_land_is_delivered_unpaid(
    gateway: Gateway, clock: Clock
) -> None:
    """The trade-off leases make, and the README states: the answer is completed before
    its commit, so a commit refused afterwards (here the sweeper expired the hold, as
    after a crash) leaves it unpaid. Nobody is charged for it; the hold is refunded."""
    before = await gateway.available("acme", "general")
    pending = asyncio.create_task(
        gateway.client.post("/v1/chat/x?slow=0.6", json=CHAT, headers=bearer())
    )
    await asyncio.wait_for(gateway.upstream.arrived.wait(), timeout=5)
    clock.advance(seconds=3600)
    assert await gateway.ledger.expire_overdue() == 1
    resp = await pending
    assert resp.status == 200 and (await resp.json())["path_qs"] == "/v1/chat/x?slow=0.6"
    await gateway.settled()
    assert await gateway.available("acme", "general") == before
    kinds = [r["kind"] for r in await settled_journal(gateway.ledger, "acme")]
    assert kinds == ["reserve", "expire"]
    body, _ = gateway.app[STATE].metrics.render()
    assert b'gateway_tokens_total{movement="unpaid",token_type="general"} 1.0' in body


async def test_a_license_suspension_reaches_leased_requests_within_the_lease(
    gateway: Gateway,
) -> None:
    before = await gateway.available("acme", "general")
    served = await burst(gateway)
    assert gateway.app[STATE].leases.held > 0
    await gateway.ledger.set_license("acme", "suspended", actor="test")
    await asyncio.sleep(SECONDS * 1.25)
    status, (_, problem) = await chat(gateway)
    assert (status, problem["code"]) == (403, "license_suspended")
    await asyncio.sleep(SECONDS)  # the sweep gives the rest back
    assert await gateway.ledger.held_reservations("acme") == []
    assert await gateway.available("acme", "general") == before - served


async def test_explain_says_which_routes_leases_serve(gateway: Gateway) -> None:
    from gateway.explain import explain

    rules = gateway.app[STATE].rules
    chat = await explain(rules, "POST", "/v1/chat/x")
    assert chat["route"]["lease_seconds"] == SECONDS
    plain = parse_rules(rules_yaml(gateway.upstream_url).encode(), "rules.yaml")
    assert (await explain(plain, "POST", "/v1/chat/x"))["route"]["lease_seconds"] is None


async def test_idempotent_and_usage_priced_requests_reserve_on_their_own(
    gateway: Gateway,
) -> None:
    assert await burst(gateway) == 8
    assert gateway.app[STATE].leases.held > 0
    status, (headers, _) = await chat(gateway, **{"Idempotency-Key": "k-1"})
    assert status == 200
    await gateway.settled()
    rows = await settled_journal(gateway.ledger, "acme")
    reserve = next(r for r in rows if r["reservation_id"] == uuid.UUID(headers["X-Reservation-Id"]))
    assert reserve["kind"] == "reserve" and reserve["request_id"] == headers["X-Request-Id"]
    commit = next(
        r
        for r in rows
        if r["kind"] == "commit" and r["reservation_id"] == reserve["reservation_id"]
    )
    assert commit["reason"] is None  # committed before its answer, as without leases


async def test_a_concurrency_cap_of_one_holds_for_a_sequential_client(
    ledger: Ledger, redis_url: str, clock: Clock, upstream: tuple[Upstream, str]
) -> None:
    """The answer is completed before its commit, but never before its concurrency slot
    is free: a client sending one request at a time is never refused 429."""
    limits = "limits:\n  default: {rate: [], min_interval: null, concurrency: {max: 1}}\n"
    rules = parse_rules(leased_rules_yaml(upstream[1], limits=limits).encode(), "rules.yaml")
    await ledger.create_org("acme", "pro")
    limiter = Limiter.from_url(
        redis_url, rules.document.limits, prefix=f"t{os.urandom(6).hex()}:", clock_ms=clock.ms
    )
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as one:
            statuses = []
            for _ in range(40):
                async with one.post(
                    client.make_url("/v1/chat/x"), json=CHAT, headers=bearer()
                ) as r:
                    await r.read()
                    statuses.append(r.status)
        assert statuses == [200] * 40
    finally:
        await client.close()
        await limiter.close()
    assert {a.token_type: a for a in await ledger.balances("acme")}["general"].available == 60


def _write_rules(tmp_path: Path, upstream_url: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(leased_rules_yaml(upstream_url))
    return path


async def test_two_processes_serving_one_account_never_overspend_it(
    ledger: Ledger,
    database_url: str,
    redis_url: str,
    schema: str,
    upstream: tuple[Upstream, str],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Waves of simultaneous requests (the last of 200) of six users of one organization
    with 100 tokens, split over two gateway processes leasing holds: exactly the answers
    delivered are paid, no more than the balance, and after both stop nothing is held."""
    await ledger.create_org("acme", "pro")
    env = process_env(database_url, redis_url, schema, _write_rules(tmp_path, upstream[1]))
    ports = [free_port(), free_port()]
    procs = [await start_serve(env, port) for port in ports]
    try:

        async def one(i: int) -> int:
            port = ports[i % 2]
            headers = bearer("acme", f"user-{i % 6}")
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/x", json=CHAT, headers=headers
            ) as resp:
                await resp.read()
                return resp.status

        for size in (24, 24, 24, 200):  # leases are made in the first waves, drawn after
            statuses = Counter(await asyncio.gather(*(one(i) for i in range(size))))
            assert set(statuses) <= {200, 402}, statuses
    finally:
        for proc in procs:
            await stop_serve(proc, signal.SIGTERM)  # graceful: undrawn holds go back
    rows = await settled_journal(ledger, "acme")
    commits = [r for r in rows if r["kind"] == "commit"]
    paid = len([s for s in upstream[0].seen if s.headers.get("X-Gateway-Organization")])
    assert len(commits) == paid <= 100
    assert paid >= 50  # a lease never takes more than half of what is left
    assert any(r["reason"].endswith("a leased hold") for r in commits), "leases were not used"
    assert await ledger.held_reservations("acme") == []
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert general.available == 100 - paid


async def test_a_crashed_process_never_charges_more_than_it_delivered(
    ledger: Ledger,
    database_url: str,
    redis_url: str,
    schema: str,
    upstream: tuple[Upstream, str],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    clock: Clock,
) -> None:
    """The crash story: a process killed while leasing leaves its holds, drawn or not,
    held; the sweeper refunds them at their expiry. What was charged is at most what was
    delivered, and every token not charged is back."""
    await ledger.create_org("acme", "pro")
    env = process_env(database_url, redis_url, schema, _write_rules(tmp_path, upstream[1]))
    port = free_port()
    proc = await start_serve(env, port)
    delivered = 0
    try:
        for _ in range(40):
            async with http.post(
                f"http://127.0.0.1:{port}/v1/chat/x", json=CHAT, headers=bearer()
            ) as resp:
                await resp.read()
                delivered += resp.status == 200
    finally:
        await stop_serve(proc, signal.SIGKILL)
    assert delivered == 40
    clock.advance(hours=1)
    # A statement the killed process had sent may still commit after it died (holds it
    # was making): the sweeper, run again, refunds those at their expiry too.
    for _ in range(50):
        await ledger.expire_overdue()
        if not await ledger.held_reservations("acme"):
            break
        await asyncio.sleep(0.1)
    assert await ledger.held_reservations("acme") == []
    commits = [r for r in await settled_journal(ledger, "acme") if r["kind"] == "commit"]
    assert len(commits) <= delivered
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert general.available == 100 - len(commits)


async def test_a_rules_reload_that_switches_leases_off_gives_the_holds_back(
    gateway: Gateway, upstream: tuple[Upstream, str], tmp_path: Path
) -> None:
    from gateway.app import reload_rules

    before = await gateway.available("acme", "general")
    assert await burst(gateway) == 8
    state = gateway.app[STATE]
    assert state.leases.held > 0
    path = tmp_path / "rules.yaml"
    path.write_text(rules_yaml(upstream[1]))
    assert (await reload_rules(gateway.app, path))["outcome"] == "ok"
    status, (headers, _) = await chat(gateway)
    assert status == 200
    await gateway.settled()
    await asyncio.sleep(1.5)  # the next sweep (every second with leases off)
    assert state.leases.held == 0
    assert await gateway.ledger.held_reservations("acme") == []
    assert await gateway.available("acme", "general") == before - 9
    rows = await settled_journal(gateway.ledger, "acme")
    last = [r for r in rows if r["reservation_id"] == uuid.UUID(headers["X-Reservation-Id"])]
    assert [r["kind"] for r in last] == ["reserve", "commit"]
    assert last[1]["reason"] is None
