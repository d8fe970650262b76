"""Operations: live reloads under load, shadow mode, explain, metrics, readiness, and a
graceful SIGTERM, against real PostgreSQL, Redis and local upstreams."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import app as app_module
from gateway.app import build_app, reload_rules
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules
from gateway.runtime import free_port
from gateway.state import STATE
from tests.conftest import (
    ENVIRON,
    Clock,
    bearer,
    process_env,
    rules_yaml,
    start_serve,
    token,
)
from tests.relay import Relay
from tests.upstream import Upstream

REPO = Path(__file__).parent.parent
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
ADMIN = {"Authorization": "Bearer admin-secret-token"}


def rules_text(upstream_url: str, extra_routes: str = "", broken: bool = False) -> str:
    text = rules_yaml(upstream_url, extra_routes=extra_routes)
    if broken:
        text = text.replace("cost: 5", "cost: -5").replace(
            "upstream: backend", "upstream: ghost", 1
        )
    return text


@pytest.fixture
async def watched(
    tmp_path: Path,
    ledger: Ledger,
    limiter: Limiter,
    upstream: tuple[Upstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Path]]:
    monkeypatch.setattr(app_module, "WATCH_INTERVAL_SECONDS", 0.2)
    path = tmp_path / "rules.yaml"
    path.write_text(rules_text(upstream[1]))
    from gateway.rules import load_rules

    app = build_app(
        load_rules(path),
        ledger,
        limiter,
        environ={**ENVIRON, "GATEWAY_ADMIN_TOKEN": "admin-secret-token"},
        sweeper=False,
        watch=path,
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    await ledger.create_org("acme", "enterprise")
    yield client, path
    await client.close()


async def test_reload_under_load_good_bad_good(
    watched: tuple[TestClient[web.Request, web.Application], Path],
    ledger: Ledger,
    upstream: tuple[Upstream, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, path = watched
    statuses: list[int] = []
    stop = asyncio.Event()

    async def background() -> None:
        while not stop.is_set():
            resp = await client.post("/v1/chat/x?slow=0.05", json=CHAT, headers=bearer())
            statuses.append(resp.status)
            await resp.read()

    load = [asyncio.create_task(background()) for _ in range(8)]
    try:
        resp = await client.post("/v1/onboarded", json={}, headers=bearer())
        assert resp.status == 404
        first = (await (await client.get("/v1/admin/rules", headers=ADMIN)).json())["version"]

        # Good: a new route, in force within 2 seconds, without a restart.
        new_route = (
            "  - {name: onboarded, method: POST, path: /v1/onboarded, upstream: backend,"
            " token_type: forecast, cost: 4}\n"
        )
        path.write_text(rules_text(upstream[1], new_route))
        for _ in range(20):
            await asyncio.sleep(0.1)
            resp = await client.post("/v1/onboarded", json={}, headers=bearer())
            if resp.status == 200:
                break
        assert resp.status == 200 and resp.headers["X-Tokens-Charged"] == "4"
        admin = await (await client.get("/v1/admin/rules", headers=ADMIN)).json()
        second = admin["version"]
        assert second != first and admin["last_reload"]["outcome"] == "ok"
        assert any(r["name"] == "onboarded" for r in admin["rules"]["routes"])

        # Bad: refused whole, every error in the log, the good rules keep serving.
        path.write_text(rules_text(upstream[1], new_route, broken=True))
        for _ in range(20):
            await asyncio.sleep(0.1)
            admin = await (await client.get("/v1/admin/rules", headers=ADMIN)).json()
            if admin["last_reload"]["outcome"] == "refused":
                break
        assert admin["version"] == second
        errors = admin["last_reload"]["errors"]
        assert "routes[1].cost: must be a positive integer" in errors
        assert any("unknown upstream 'ghost'" in e for e in errors)
        assert any("rules reload refused" in r.getMessage() for r in caplog.records)
        resp = await client.post("/v1/onboarded", json={}, headers=bearer())
        assert resp.status == 200

        # Good again.
        path.write_text(rules_text(upstream[1]))
        for _ in range(20):
            await asyncio.sleep(0.1)
            resp = await client.post("/v1/onboarded", json={}, headers=bearer())
            if resp.status == 404:
                break
        assert resp.status == 404
    finally:
        stop.set()
        await asyncio.gather(*load)
    # No request was dropped, none charged twice, and every charge is accounted for.
    assert statuses and set(statuses) == {200}
    await asyncio.sleep(0.1)
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert general.available == 1000 - len(statuses) and general.reserved == 0
    commits = [r for r in await ledger.journal("acme", limit=10000) if r["kind"] == "commit"]
    assert len([c for c in commits if c["token_type"] == "general"]) == len(statuses)


async def test_sighup_style_reload_refuses_a_broken_file(
    watched: tuple[TestClient[web.Request, web.Application], Path],
    upstream: tuple[Upstream, str],
) -> None:
    client, path = watched
    app = client.server.app
    path.write_text("routes: [")
    outcome = await reload_rules(app, path)
    assert outcome["outcome"] == "refused"
    assert outcome["errors"][0].startswith("line 1, column")
    assert app[STATE].last_reload["outcome"] == "refused"


async def test_admin_endpoints_need_an_admin(
    watched: tuple[TestClient[web.Request, web.Application], Path],
) -> None:
    client, _ = watched
    resp = await client.get("/v1/admin/rules", headers=bearer())
    assert resp.status == 403 and (await resp.json())["code"] == "admin_only"
    resp = await client.get("/v1/admin/rules")
    assert resp.status == 401
    resp = await client.get("/v1/admin/rules", headers=bearer(roles=["gateway-admin"]))
    assert resp.status == 200


async def test_explain_endpoint(
    watched: tuple[TestClient[web.Request, web.Application], Path],
) -> None:
    client, _ = watched
    resp = await client.get(
        "/v1/admin/explain",
        params={"method": "POST", "path": "/v1/leads/generate", "token": token()},
        headers=ADMIN,
    )
    report = await resp.json()
    assert report["route"]["name"] == "leads" and report["route"]["cost"] == 5
    gates = {g["gate"]: g for g in report["gates"]}
    assert (
        gates["ledger"]["ok"]
        and "500 lead_generation tokens available" in gates["ledger"]["detail"]
    )
    assert report["verdict"].startswith("allowed")


async def test_shadow_route_is_forwarded_journaled_and_counted(
    gateway_with_shadow: tuple[TestClient[web.Request, web.Application], Ledger, Upstream],
) -> None:
    client, ledger, backend = gateway_with_shadow
    before = {a.token_type: a.available for a in await ledger.balances("acme")}
    resp = await client.post("/v1/shadowed", json={}, headers=bearer())
    await resp.read()  # settled (journaled) once the answer has been read
    assert resp.status == 200 and resp.headers["X-Tokens-Charged"] == "0"
    # Would be refused (starter has no forecast), forwarded anyway.
    resp = await client.post("/v1/shadowed", json={}, headers=bearer("freeloader", "bob"))
    await resp.read()
    assert resp.status == 200
    # No token at all: would be a 401, forwarded anyway.
    resp = await client.post("/v1/shadowed", json={})
    await resp.read()
    assert resp.status == 200
    assert len(backend.seen) == 3
    after = {a.token_type: a.available for a in await ledger.balances("acme")}
    assert after == before
    shadow = [r for r in await ledger.journal("acme") if r["kind"] == "shadow"]
    assert len(shadow) == 1 and shadow[0]["shadow_amount"] == 4
    assert shadow[0]["reason"] == "shadow: the reserve would answer ok"
    assert shadow[0]["allowance_delta"] == shadow[0]["purchased_delta"] == 0
    starter = [r for r in await ledger.journal("freeloader") if r["kind"] == "shadow"]
    assert starter[0]["reason"] == "shadow: the reserve would answer plan_forbidden"
    metrics = parse_metrics(await (await client.get("/metrics")).text())
    assert (
        metrics[
            ("gateway_shadow_refusals_total", (("code", "plan_forbidden"), ("route", "shadowed")))
        ]
        == 1
    )
    assert (
        metrics[
            ("gateway_shadow_refusals_total", (("code", "invalid_token"), ("route", "shadowed")))
        ]
        == 1
    )
    assert (
        metrics[("gateway_tokens_total", (("movement", "shadow"), ("token_type", "forecast")))] == 4
    )


@pytest.fixture
async def gateway_with_shadow(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str]
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], Ledger, Upstream]]:
    from gateway.rules import parse_rules

    route = (
        "  - {name: shadowed, method: POST, path: /v1/shadowed, upstream: backend,"
        " token_type: forecast, cost: 4, enforce: false}\n"
    )
    rules = parse_rules(rules_text(upstream[1], route).encode())
    await ledger.create_org("acme", "pro")
    await ledger.create_org("freeloader", "starter")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client, ledger, upstream[0]
    await client.close()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        pairs = []
        for item in labels.rstrip("}").split('",') if labels else []:
            if item:
                key, _, val = item.partition("=")
                pairs.append((key, val.strip('"')))
        out[(name, tuple(sorted(pairs)))] = float(value)
    return out


async def test_metrics_after_a_scripted_run(gateway: object) -> None:
    from tests.conftest import Gateway

    assert isinstance(gateway, Gateway)
    client = gateway.client
    for _ in range(3):
        assert (await client.post("/v1/leads/generate", json={}, headers=bearer())).status == 200
    assert (await client.post("/v1/forecasts?status=500", json={}, headers=bearer())).status == 500
    assert (await client.post("/v1/chat/x", json={}, headers=bearer("freeloader"))).status == 403
    assert (await client.post("/v1/chat/x", json={})).status == 401
    await gateway.settled()  # requests are counted as their exchange ends
    resp = await client.get("/metrics")
    assert resp.headers["Content-Type"].startswith("text/plain")
    m = parse_metrics(await resp.text())
    key = "gateway_requests_total"
    assert m[(key, (("outcome", "committed"), ("route", "leads"), ("status", "200")))] == 3
    assert m[(key, (("outcome", "refunded"), ("route", "forecast"), ("status", "500")))] == 1
    assert m[(key, (("outcome", "refused"), ("route", "chat"), ("status", "403")))] == 1
    assert m[(key, (("outcome", "refused"), ("route", "chat"), ("status", "401")))] == 1
    tokens = "gateway_tokens_total"
    assert m[(tokens, (("movement", "reserved"), ("token_type", "lead_generation")))] == 15
    assert m[(tokens, (("movement", "committed"), ("token_type", "lead_generation")))] == 15
    assert m[(tokens, (("movement", "refunded"), ("token_type", "forecast")))] == 4
    assert m[("gateway_refusals_total", (("code", "plan_forbidden"),))] == 1
    assert m[("gateway_refusals_total", (("code", "invalid_token"),))] == 1
    assert m[("gateway_request_duration_seconds_count", (("route", "leads"),))] == 3
    assert m[("gateway_ledger_duration_seconds_count", (("operation", "reserve"),))] == 5
    assert m[("gateway_upstream_duration_seconds_count", (("upstream", "backend"),))] == 4
    assert m[("gateway_redis_duration_seconds_count", ())] == 5
    # The collector's pauses stop every request: each one is observed while serving.
    pauses = ("gateway_gc_pause_seconds_count", (("generation", "2"),))
    before = m.get(pauses, 0)
    gc.collect()
    m = parse_metrics(await (await client.get("/metrics")).text())
    assert m[pauses] == before + 1


async def test_readiness_follows_the_stores(
    database_url: str,
    redis_url: str,
    schema: str,
    rules: Rules,
    clock: Clock,
) -> None:
    pg, rd = Relay(database_url), Relay(redis_url)
    await pg.start()
    await rd.start()
    ledger = await Ledger.connect(pg.dsn, schema=schema, timeout=1)
    await ledger.migrate()
    closed = rules.document.limits.model_copy(update={"on_store_error": "closed"})
    limiter = Limiter.from_url(f"redis://127.0.0.1:{rd.port}/0", closed, prefix="ready:")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:

        async def ready() -> tuple[int, dict[str, str]]:
            resp = await client.get("/readyz")
            return resp.status, (await resp.json())["checks"]

        assert (await ready())[0] == 200
        await pg.cut()
        status, checks = await ready()
        assert status == 503 and checks["postgres"].startswith("unreachable")
        assert (await client.get("/healthz")).status == 200  # the process is still up
        await pg.start()
        assert (await ready())[0] == 200
        await rd.cut()
        status, checks = await ready()
        assert status == 503 and checks["redis"].startswith("unreachable")
        await rd.start()
        await asyncio.sleep(0.1)
        assert (await ready())[0] == 200
    finally:
        await client.close()
        await ledger.close()
        await limiter.close()
        await pg.cut()
        await rd.cut()


async def test_cli_explain(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    schema: str,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_text(upstream[1]))
    env = process_env(database_url, redis_url, schema, rules_file)
    await ledger.create_org("acme", "pro")
    await ledger.create_org("freeloader", "starter")

    async def explain(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "rules",
            "explain",
            *args,
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    offline = await explain("POST", "/v1/goals/7/generate")
    assert "route: goals (routes[1], /v1/goals/{id}/generate)" in offline
    assert "token type: goal_generation, cost 3" in offline
    assert "verdict: matched" in offline
    allowed = await explain("POST", "/v1/leads/generate", "--token", token())
    assert "[ok] token: organization 'acme', user 'alice'" in allowed
    assert (
        "[ok] ledger: the balance covers the cost: 50 lead_generation tokens available" in allowed
    )
    assert "verdict: allowed" in allowed
    refused = json.loads(
        await explain("POST", "/v1/leads/generate", "--token", token("freeloader"), "--json")
    )
    assert refused["verdict"].startswith("refused by ledger: 403 plan_forbidden")
    nothing = await explain("GET", "/nowhere")
    assert "route: none matches" in nothing and "404 no_route" in nothing
    # Explaining consumed nothing and journaled nothing.
    assert [r["kind"] for r in await ledger.journal("acme")] == ["refresh"] * 5


async def test_sigterm_finishes_in_flight_requests_and_leaves_nothing_held(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    schema: str,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
    http: aiohttp.ClientSession,
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_text(upstream[1]))
    env = process_env(database_url, redis_url, schema, rules_file, GATEWAY_LOG_LEVEL="INFO")
    await ledger.create_org("acme", "pro")
    port = free_port()
    proc = await start_serve(env, port, stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:

        async def slow() -> tuple[int, str]:
            async with http.post(
                f"{base}/v1/chat/x?slow=1",
                json=CHAT,
                headers={**bearer(), "X-Request-Id": "term-1"},
            ) as resp:
                return resp.status, await resp.text()

        requests = [asyncio.create_task(slow()) for _ in range(5)]
        for _ in range(250):  # until all five reached the upstream
            if len(upstream[0].seen) == 5:
                break
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*requests)
        assert [status for status, _ in results] == [200] * 5
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
        stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert (general.available, general.reserved) == (95, 0)
    # Structured logs: one JSON object a line, carrying the request id sent upstream.
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    served = [e for e in lines if e.get("request_id") == "term-1" and e.get("status") == 200]
    assert len(served) == 5 and all(e["route"] == "chat" for e in served)
    assert upstream[0].seen[0].headers["X-Request-Id"] == "term-1"
    assert Counter(e["level"] for e in lines)["error"] == 0


async def test_a_worker_whose_supervisor_died_while_it_started_does_not_serve(
    tmp_path: Path, database_url: str, redis_url: str, schema: str, upstream: tuple[Upstream, str]
) -> None:
    # A supervisor that dies before its worker has asked to be stopped with it: the worker
    # has been reparented, and must not take its new parent for its supervisor.
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_text(upstream[1]))
    env = process_env(
        database_url, redis_url, schema, rules_file, GATEWAY_SUPERVISOR_PID=str(gone.pid)
    )
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--workers",
        "1",
        "--reuse-port",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        env=env,
        cwd=REPO,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(worker.communicate(), timeout=30)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert worker.returncode == 1
    assert f"the supervisor (pid {gone.pid}) is gone; not starting" in err.decode()


async def test_workers_share_the_port_and_metrics_and_die_with_their_supervisor(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    schema: str,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
) -> None:
    import psutil

    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_text(upstream[1]))
    env = process_env(
        database_url, redis_url, schema, rules_file, GATEWAY_DATA_DIR=str(tmp_path / "data")
    )
    await ledger.create_org("acme", "pro")
    port = free_port()
    supervisor = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                workers = psutil.Process(supervisor.pid).children()
                try:
                    async with http.get(f"{base}/readyz") as r:
                        if r.status == 200 and len(workers) == 2:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            assert len(workers) == 2
            for _ in range(20):  # new connections spread over both workers
                async with http.post(
                    f"{base}/v1/chat/x", json=CHAT, headers={**bearer(), "Connection": "close"}
                ) as r:
                    assert r.status == 200
            # Whichever worker answers, /metrics counts the requests of both (a request is
            # counted just after its last byte is sent, hence the wait).
            key = (
                "gateway_requests_total",
                (("outcome", "committed"), ("route", "chat"), ("status", "200")),
            )
            for _ in range(50):
                async with http.get(f"{base}/metrics", headers={"Connection": "close"}) as r:
                    metrics = parse_metrics(await r.text())
                if metrics.get(key) == 20:
                    break
                await asyncio.sleep(0.05)
        assert metrics[key] == 20
        supervisor.kill()  # the supervisor dies without a word
        await supervisor.wait()

        def exited(worker: psutil.Process) -> bool:
            # An orphan that has exited may stay a zombie until its new parent reaps it.
            try:
                return worker.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        for _ in range(150):
            if all(exited(w) for w in workers):
                break
            await asyncio.sleep(0.1)
        assert [w.pid for w in workers if not exited(w)] == []
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        for w in psutil.Process().children(recursive=True):
            if "gateway.cli" in " ".join(w.cmdline()):
                w.kill()
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert (general.available, general.reserved) == (80, 0)
