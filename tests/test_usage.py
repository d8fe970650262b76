"""Usage visibility: stats against hand-computed figures, forecasts on synthetic usage, the
balance-check and two-phase APIs with idempotent retries, and thresholds that fire once."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.alerts import verify
from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from tests.conftest import ENVIRON, Clock, Gateway, bearer, load_test_rules
from tests.upstream import Upstream


async def test_stats_after_a_scripted_run(gateway: Gateway) -> None:
    c = gateway.client
    alice, bob = bearer("acme", "alice"), bearer("acme", "bob")

    async def status(path: str, headers: dict[str, str]) -> int:
        resp = await c.post(path, json={}, headers=headers)
        await resp.read()  # settled once the answer has been read
        return resp.status

    for _ in range(2):
        assert await status("/v1/leads/generate", alice) == 200
    assert await status("/v1/goals/9/generate", alice) == 200
    for _ in range(3):
        assert await status("/v1/chat/x", bob) == 200
    assert await status("/v1/forecasts?status=500", bob) == 500

    resp = await c.get("/v1/tokens/stats", headers=alice)
    assert resp.status == 200
    s = await resp.json()
    assert (s["organization"], s["plan"], s["upgrade_to"]) == ("acme", "pro", "enterprise")
    tt = s["token_types"]
    expected = {  # token type: (allocated, used, available)
        "lead_generation": (50, 10, 40),
        "goal_generation": (20, 3, 17),
        "general": (100, 3, 97),
        "forecast": (30, 0, 30),
        "strategy_analysis": (100, 0, 100),
    }
    for name, (allocated, used, available) in expected.items():
        assert (tt[name]["allocated"], tt[name]["used"], tt[name]["available"]) == (
            allocated,
            used,
            available,
        ), name
    assert tt["lead_generation"]["used_fraction"] == 0.2
    assert tt["lead_generation"]["reserved"] == 0 and tt["forecast"]["last_used_at"] is not None
    assert s["features"] == [
        {"route": "leads", "token_type": "lead_generation", "tokens": 10, "requests": 2},
        {"route": "chat", "token_type": "general", "tokens": 3, "requests": 3},
        {"route": "goals", "token_type": "goal_generation", "tokens": 3, "requests": 1},
    ]
    assert s["users"] == [
        {"user": "alice", "tokens": 13, "requests": 3},
        {"user": "bob", "tokens": 3, "requests": 3},
    ]
    assert s["daily"] == [{"date": datetime.now().astimezone().date().isoformat(), "tokens": 16}]

    # Another organization sees only its own; an admin may ask for any.
    other = await (await c.get("/v1/tokens/stats", headers=bearer("bigco"))).json()
    assert other["organization"] == "bigco" and other["features"] == []
    resp = await c.get("/v1/tokens/stats?org=acme", headers=bearer("bigco"))
    assert resp.status == 403
    resp = await c.get(
        "/v1/tokens/stats?org=acme", headers=bearer("bigco", "ops", roles=["gateway-admin"])
    )
    assert (await resp.json())["organization"] == "acme"
    assert (await c.get("/v1/tokens/stats")).status == 401


async def test_forecast_on_synthetic_usage(ledger: Ledger, clock: Clock, gateway: Gateway) -> None:
    await ledger.create_org("steady", "pro")
    for day in range(7):
        clock.advance(days=1)
        for _ in range(2):  # 10 general tokens a day
            held = await ledger.reserve("steady", "general", 5, ttl_seconds=60)
            await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
        if day == 3:
            held = await ledger.reserve("steady", "forecast", 1, ttl_seconds=60)
            await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    s = await (await gateway.client.get("/v1/tokens/stats", headers=bearer("steady"))).json()
    general = s["token_types"]["general"]
    assert general["available"] == 30 and general["forecast"]["burn_per_day"] == 10.0
    runs_out = datetime.fromisoformat(general["forecast"]["runs_out_at"])
    assert abs((runs_out - clock()).total_seconds() - 3 * 86400) < 60
    assert general["forecast"]["before_refresh"] is True
    forecast = s["token_types"]["forecast"]["forecast"]
    assert forecast["burn_per_day"] == round(1 / 7, 2)
    assert forecast["before_refresh"] is False  # 29 tokens at 1/7 a day: not before refresh
    idle = s["token_types"]["strategy_analysis"]["forecast"]
    assert idle == {"burn_per_day": 0.0, "runs_out_at": None, "before_refresh": False}


@pytest.mark.slow
async def test_stats_query_plan_on_a_million_journal_rows(database_url: str) -> None:
    """The usage query reads one organization's commits through an index, whatever the
    size of the journal. (Its own schema: auditing a million rows is not this test's job.)"""
    schema = f"t_usage_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(database_url)
    await conn.execute(f'CREATE SCHEMA "{schema}"')
    await conn.close()
    ledger = await Ledger.connect(database_url, schema=schema, timeout=60)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        await ledger.migrate()
        await conn.execute(
            "INSERT INTO journal (at, org_id, token_type, kind, route, user_id)"
            " SELECT now() - (g % 30) * interval '1 day', 'org' || (g % 5000), 'general',"
            " 'commit', 'chat', 'u' || (g % 50) FROM generate_series(1, 1000000) g"
        )
        await conn.execute("ANALYZE journal")
        scan_sql = (
            "EXPLAIN (FORMAT JSON) SELECT * FROM journal j WHERE j.org_id = 'org7'"
            " AND j.kind = 'commit' AND j.at >= now() - interval '30 days' AND j.at <= now()"
        )
        indexed = json.loads(await conn.fetchval(scan_sql))[0]["Plan"]
        await conn.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
        sequential = json.loads(await conn.fetchval(scan_sql))[0]["Plan"]
        await conn.execute("RESET enable_indexscan; RESET enable_bitmapscan")
        started = time.perf_counter()
        usage = json.loads(
            await conn.fetchval(
                "SELECT gw_usage('org7', now() - interval '30 days',"
                " now() - interval '7 days', now())"
            )
        )
        elapsed = time.perf_counter() - started
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()
        await ledger.close()
    assert usage["features"][0]["requests"] == 200  # 1,000,000 / 5,000 organizations
    # The journal is partitioned by month: each partition the window touches is read
    # through its copy of the index.
    scans = indexed["Plans"] if indexed["Node Type"] in ("Append", "Merge Append") else [indexed]
    assert scans and all(
        scan["Node Type"] in ("Index Scan", "Bitmap Heap Scan", "Index Only Scan") for scan in scans
    ), json.dumps(indexed)
    # Through an index on the organization (the partitions' copies of journal_by_account or
    # journal_commits_by_org_time, whichever the planner prefers).
    plan_text = json.dumps(indexed)
    assert "_org_id_" in plan_text or "journal_commits_by_org_time" in plan_text, plan_text
    # A few hundred rows through the index, against a million through a scan. (The
    # estimates move with ANALYZE's sample and with how the 30 days fall across the
    # monthly partitions: 17.6x on 7 December, so the margin asked is 10x.)
    assert indexed["Total Cost"] * 10 < sequential["Total Cost"]
    print(
        f"\ngw_usage over 1,000,000 journal rows: {elapsed * 1000:.1f} ms; planner cost "
        f"{indexed['Total Cost']:.0f} with the index, {sequential['Total Cost']:.0f} without"
    )


async def test_check_and_idempotent_deduct(gateway: Gateway) -> None:
    c = gateway.client
    check = await c.post(
        "/v1/tokens/check-balance", json={"action": "check", "feature": "leads"}, headers=bearer()
    )
    body = await check.json()
    assert body == {
        "feature": "leads",
        "token_type": "lead_generation",
        "cost": 5,
        "available": 50,
        "allowed": True,
        "refusals": [],
    }
    deduct = {"action": "deduct", "feature": "leads", "metadata": {"job": "import-42"}}
    headers = {**bearer(), "Idempotency-Key": "job-42"}
    first = await (await c.post("/v1/tokens/check-balance", json=deduct, headers=headers)).json()
    assert (first["charged"], first["remaining"], first["replayed"]) == (5, 45, False)
    again = await (await c.post("/v1/tokens/check-balance", json=deduct, headers=headers)).json()
    assert (again["charged"], again["remaining"], again["replayed"]) == (5, 45, True)
    assert again["reservation_id"] == first["reservation_id"]
    assert await gateway.available("acme", "lead_generation") == 45
    kinds = await gateway.journal_kinds("acme")
    assert kinds.count("reserve") == 1 and kinds.count("commit") == 1
    # Without a key, each deduction is its own.
    await c.post("/v1/tokens/check-balance", json=deduct, headers=bearer())
    assert await gateway.available("acme", "lead_generation") == 40
    # Same gates and errors as the proxy.
    starter = await c.post(
        "/v1/tokens/check-balance",
        json={"action": "check", "feature": "leads"},
        headers=bearer("freeloader"),
    )
    assert (await starter.json())["refusals"] == [{"status": 403, "code": "plan_forbidden"}]
    refused = await c.post(
        "/v1/tokens/check-balance",
        json={"action": "deduct", "feature": "leads"},
        headers=bearer("freeloader"),
    )
    assert refused.status == 403 and (await refused.json())["code"] == "plan_forbidden"
    unknown = await c.post(
        "/v1/tokens/check-balance", json={"action": "check", "feature": "nope"}, headers=bearer()
    )
    problem = await unknown.json()
    assert unknown.status == 400 and "unknown feature 'nope'" in problem["detail"]
    bad = await c.post("/v1/tokens/check-balance", data=b"{not json", headers=bearer())
    assert bad.status == 400 and (await bad.json())["code"] == "invalid_request"


async def test_two_phase_reservations(gateway: Gateway) -> None:
    c = gateway.client
    headers = {**bearer(), "Idempotency-Key": "run-1"}
    created = await c.post(
        "/v1/tokens/reservations", json={"feature": "leads", "ttl_seconds": 120}, headers=headers
    )
    assert created.status == 201
    r = await created.json()
    assert (r["amount"], r["state"], r["remaining"]) == (5, "held", 45)
    again = await c.post(
        "/v1/tokens/reservations", json={"feature": "leads", "ttl_seconds": 120}, headers=headers
    )
    assert again.status == 200 and (await again.json())["reservation_id"] == r["reservation_id"]
    rid = r["reservation_id"]
    # Another organization cannot see it, let alone settle it.
    stranger = await c.post(f"/v1/tokens/reservations/{rid}/refund", headers=bearer("bigco"))
    assert stranger.status == 404
    too_much = await c.post(
        f"/v1/tokens/reservations/{rid}/commit", json={"charged": 6}, headers=bearer()
    )
    assert too_much.status == 422 and (await too_much.json())["code"] == "invalid_charge"
    done = await c.post(
        f"/v1/tokens/reservations/{rid}/commit", json={"charged": 3}, headers=bearer()
    )
    d = await done.json()
    assert (d["state"], d["charged"], d["remaining"], d["replayed"]) == ("committed", 3, 47, False)
    retry = await c.post(
        f"/v1/tokens/reservations/{rid}/commit", json={"charged": 3}, headers=bearer()
    )
    assert retry.status == 200 and (await retry.json())["replayed"] is True
    late = await c.post(f"/v1/tokens/reservations/{rid}/refund", headers=bearer())
    assert late.status == 409 and (await late.json())["code"] == "reservation_settled"
    assert await gateway.available("acme", "lead_generation") == 47

    second = await (
        await c.post("/v1/tokens/reservations", json={"feature": "goals"}, headers=bearer())
    ).json()
    refunded = await c.post(
        f"/v1/tokens/reservations/{second['reservation_id']}/refund",
        json={"reason": "the job failed"},
        headers=bearer(),
    )
    assert (await refunded.json())["state"] == "refunded"
    assert await gateway.available("acme", "goal_generation") == 20
    journal = await gateway.ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "refund" and journal[0]["reason"] == "the job failed"
    assert (
        await c.post("/v1/tokens/reservations/not-a-uuid/commit", headers=bearer())
    ).status == 404


@pytest.fixture
async def alerting(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str]
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], list[tuple[bytes, str]]]]:
    received: list[tuple[bytes, str]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append((await request.read(), request.headers["X-Gateway-Signature"]))
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    hook_server = TestServer(receiver, host="127.0.0.1")
    await hook_server.start_server()
    limits = (
        "limits:\n  default: {rate: [], min_interval: null}\n  blocks: null\n"
        f"alerts: {{thresholds: [0.8, 1.0], webhook_url: '{hook_server.make_url('/hook')}'}}\n"
    )
    rules = load_test_rules(upstream[1], limits=limits)
    await ledger.create_org("acme", "pro")
    app = build_app(
        rules, ledger, limiter, environ={**ENVIRON, "GATEWAY_ALERT_SECRET": "s"}, sweeper=False
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client, received
    await client.close()
    await hook_server.close()


async def test_thresholds_fire_once_each(
    alerting: tuple[TestClient[web.Request, web.Application], list[tuple[bytes, str]]],
    database_url: str,
    schema: str,
) -> None:
    client, received = alerting
    deduct = {"action": "deduct", "feature": "leads"}
    for _ in range(7):  # 35 of 50: under 80%
        await client.post("/v1/tokens/check-balance", json=deduct, headers=bearer())
    resp = await client.post("/v1/leads/generate", json={}, headers=bearer())  # 40: 80%
    assert resp.status == 200
    resp = await client.post("/v1/leads/generate", json={}, headers=bearer())  # 45
    assert (
        resp.headers["X-Tokens-Warning"] == "lead_generation: 90% of this period's allowance used"
    )
    await client.post("/v1/tokens/check-balance", json=deduct, headers=bearer())  # 50: 100%
    refused = await client.post("/v1/tokens/check-balance", json=deduct, headers=bearer())
    assert refused.status == 402
    for _ in range(50):
        if len(received) >= 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    events = [json.loads(body) for body, _ in received]
    assert [(e["token_type"], e["threshold"]) for e in events] == [
        ("lead_generation", 0.8),
        ("lead_generation", 1.0),
    ]
    assert all(verify("s", body, signature) for body, signature in received)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch("SELECT threshold FROM threshold_events ORDER BY threshold")
    finally:
        await conn.close()
    assert [float(r["threshold"]) for r in rows] == [0.8, 1.0]


async def test_undeliverable_threshold_webhook_is_dead_lettered(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    import aiohttp

    from gateway.alerts import Thresholds
    from gateway.rules import AlertsConfig
    from gateway.runtime import free_port

    await ledger.create_org("acme", "pro")
    config = AlertsConfig(
        thresholds=[0.5], webhook_url=f"http://127.0.0.1:{free_port()}/hook", retries=1
    )
    async with aiohttp.ClientSession() as session:
        thresholds = Thresholds(ledger, session, {})
        held = await ledger.reserve("acme", "general", 60, ttl_seconds=60)
        settlement = await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
        await thresholds.after_commit(config, settlement)
        await thresholds.after_commit(config, settlement)  # announced once only
        await thresholds.close()
    assert len(thresholds.events) == 1
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch("SELECT url, body, attempts, error FROM webhook_dead_letters")
    finally:
        await conn.close()
    assert len(rows) == 1 and rows[0]["attempts"] == 2
    assert json.loads(rows[0]["body"])["threshold"] == 0.5
