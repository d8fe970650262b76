"""One gate: every place that judges a request gives the same verdict and the same code.

Each refusal of the contract is set up for real (ledger state, Redis state), then judged
five ways, in an order that consumes nothing before the last: check-balance ``check``,
``GET /v1/admin/explain``, ``gateway rules explain --json`` (a real process), a shadow
route (its ``gateway_shadow_refusals_total`` counter), and finally the proxy itself.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.errors import contract
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import parse_rules
from tests.conftest import ENVIRON, HERE, bearer, process_env, rules_yaml, token
from tests.test_operations import parse_metrics
from tests.upstream import Upstream

pytestmark = pytest.mark.slow

ADMIN = "admin-" + "y" * 30
SHADOW_ROUTES = (
    "  - {name: shadow-leads, method: POST, path: /v1/shadow/leads, upstream: backend,"
    " token_type: lead_generation, cost: 5, enforce: false}\n"
    "  - {name: shadow-enterprise, method: POST, path: /v1/shadow/enterprise, upstream: backend,"
    " token_type: general, cost: 1, plans: [enterprise], enforce: false}\n"
    "  - {name: held, method: POST, path: /v1/held, upstream: patient,"
    " token_type: lead_generation, cost: 5}\n"
)
LIMITS = """limits:
  default:
    rate: {limit: 2/minute, per: user}
    min_interval: null
    concurrency: {max: 1, per: user}
  blocks: {after: 2, within_seconds: 60, cooldown_seconds: 60}
license:
  grace_period_days: 14
  degradation_order:
    - {after_days: 0, token_types: [lead_generation]}
"""


@dataclass
class Judges:
    client: TestClient[web.Request, web.Application]
    ledger: Ledger
    limiter: Limiter
    backend: Upstream
    env: dict[str, str]

    async def check(self, org: str, user: str, feature: str) -> str | None:
        resp = await self.client.post(
            "/v1/tokens/check-balance",
            json={"action": "check", "feature": feature},
            headers=bearer(org, user),
        )
        if resp.status != 200:  # the check itself refused: its own code
            return str((await resp.json())["code"])
        body = await resp.json()
        return body["refusals"][0]["code"] if body["refusals"] else None

    async def admin_explain(self, org: str, user: str, path: str) -> str | None:
        resp = await self.client.get(
            "/v1/admin/explain",
            params={"method": "POST", "path": path, "token": token(org, user)},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert resp.status == 200, await resp.text()
        code = (await resp.json())["code"]
        return str(code) if code else None

    async def cli_explain(self, org: str, user: str, path: str) -> str | None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "rules",
            "explain",
            "POST",
            path,
            "--token",
            token(org, user),
            "--json",
            env=self.env,
            cwd=HERE.parent,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        code = json.loads(out)["code"]
        return str(code) if code else None

    async def shadow(self, org: str, user: str, path: str) -> str | None:
        route = "shadow-enterprise" if "enterprise" in path else "shadow-leads"
        before = await self._shadow_counts(route)
        resp = await self.client.post(path, json={}, headers=bearer(org, user))
        await resp.read()
        assert resp.status == 200  # shadow routes are forwarded whatever the gates say
        after = await self._shadow_counts(route)
        codes = [code for code, n in after.items() if n > before.get(code, 0)]
        assert len(codes) <= 1, codes
        return codes[0] if codes else None

    async def _shadow_counts(self, route: str) -> dict[str, float]:
        metrics = parse_metrics(await (await self.client.get("/metrics")).text())
        return {
            dict(labels)["code"]: value
            for (name, labels), value in metrics.items()
            if name == "gateway_shadow_refusals_total" and dict(labels)["route"] == route
        }

    async def proxy(self, org: str, user: str, path: str) -> str | None:
        resp = await self.client.post(path, json={}, headers=bearer(org, user))
        body = await resp.read()
        if resp.status == 200:
            return None
        return str(json.loads(body)["code"])


LIMITS_GAP = LIMITS.replace("min_interval: null", "min_interval: {seconds: 60, per: user}")


@pytest.fixture
async def judges(
    request: pytest.FixtureRequest,
    database_url: str,
    redis_url: str,
    schema: str,
    ledger: Ledger,
    upstream: tuple[Upstream, str],
    tmp_path: Path,
) -> AsyncIterator[Judges]:
    limits = getattr(request, "param", LIMITS)
    raw = rules_yaml(upstream[1], limits=limits, extra_routes=SHADOW_ROUTES)
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(raw)
    rules = parse_rules(raw.encode(), str(rules_file))
    await ledger.sync_plans(rules.plan_allowances())
    prefix = f"{schema}:"
    limiter = Limiter.from_url(redis_url, rules.document.limits, prefix=prefix)
    for org, plan in (("acme", "pro"), ("bigco", "enterprise"), ("freeloader", "starter")):
        await ledger.create_org(org, plan)
    app = build_app(
        rules, ledger, limiter, environ={**ENVIRON, "GATEWAY_ADMIN_TOKEN": ADMIN}, sweeper=False
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    env = process_env(database_url, redis_url, schema, rules_file, GATEWAY_LOG_LEVEL="ERROR")
    yield Judges(client, ledger, limiter, upstream[0], env)
    upstream[0].sse_gate.set()
    await client.close()
    keys = redis.asyncio.Redis.from_url(redis_url)
    try:
        found = [k async for k in keys.scan_iter(match=f"{prefix}*", count=1000)]
        if found:
            await keys.delete(*found)
    finally:
        await keys.aclose()
        await limiter.close()


Setup = Callable[[Judges], Awaitable[Any]]


async def _nothing(j: Judges) -> None:
    return None


async def _suspended(j: Judges) -> None:
    await j.ledger.set_license("acme", "suspended", actor="test")


async def _past_due(j: Judges) -> None:
    await j.ledger.set_license("acme", "past_due", actor="test")


async def _user_quota(j: Judges) -> None:
    await j.ledger.set_quota("acme", "user:alice", "lead_generation", 4, actor="test")


async def _team_quota(j: Judges) -> None:
    await j.ledger.set_team("acme", "research", ["alice"], actor="test")
    await j.ledger.set_quota("acme", "team:research", "lead_generation", 4, actor="test")


async def _poor(j: Judges) -> None:
    await j.ledger.grant(
        "acme", "lead_generation", -48, bucket="allowance", kind="adjust", actor="test"
    )


async def _rate_used(j: Judges) -> None:
    for _ in range(2):
        resp = await j.client.post("/v1/chat/x", json={}, headers=bearer("acme", "alice"))
        assert resp.status == 200, await resp.text()
        await resp.read()


async def _in_flight(j: Judges) -> asyncio.Task[Any]:
    async def hold() -> None:
        resp = await j.client.post("/v1/held?behave=sse", json={}, headers=bearer("acme", "alice"))
        await resp.read()

    task = asyncio.create_task(hold())
    await asyncio.wait_for(j.backend.arrived.wait(), timeout=5)
    return task


async def _blocked(j: Judges) -> None:
    for _ in range(2):
        await j.limiter.record_refusal("acme", "alice", None)


CASES: list[tuple[str, str, str, str, Setup, str | None]] = [
    # (case, org, user, path, setup, expected code)
    ("allowed", "acme", "alice", "/v1/leads/generate", _nothing, None),
    ("unknown organization", "ghost", "alice", "/v1/leads/generate", _nothing,
     "unknown_organization"),
    ("plan", "freeloader", "bob", "/v1/leads/generate", _nothing, "plan_forbidden"),
    ("route plans", "acme", "alice", "/v1/enterprise/x", _nothing, "plan_forbidden"),
    ("license suspended", "acme", "alice", "/v1/leads/generate", _suspended,
     "license_suspended"),
    ("feature degraded", "acme", "alice", "/v1/leads/generate", _past_due, "feature_degraded"),
    ("user quota", "acme", "alice", "/v1/leads/generate", _user_quota, "quota_exceeded"),
    ("team quota", "acme", "alice", "/v1/leads/generate", _team_quota, "quota_exceeded"),
    ("insufficient balance", "acme", "alice", "/v1/leads/generate", _poor,
     "insufficient_tokens"),
    ("rate limit", "acme", "alice", "/v1/leads/generate", _rate_used, "rate_limited"),
    ("concurrency", "acme", "alice", "/v1/leads/generate", _in_flight, "too_many_in_flight"),
    ("blocked", "acme", "alice", "/v1/leads/generate", _blocked, "blocked"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("org", "user", "path", "setup", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
async def test_every_judge_gives_the_same_verdict(
    judges: Judges, org: str, user: str, path: str, setup: Setup, expected: str | None
) -> None:
    held = await setup(judges)
    feature = "enterprise-only" if "enterprise" in path else "leads"
    shadow_path = "/v1/shadow/enterprise" if "enterprise" in path else "/v1/shadow/leads"
    verdicts = {
        "check": await judges.check(org, user, feature),
        "admin explain": await judges.admin_explain(org, user, path),
        "rules explain": await judges.cli_explain(org, user, path),
        "shadow": await judges.shadow(org, user, shadow_path),
        "proxy": await judges.proxy(org, user, path),
    }
    assert verdicts == dict.fromkeys(verdicts, expected)
    if isinstance(held, asyncio.Task):
        judges.backend.sse_gate.set()
        await held
    # Who paid: only an allowed request (and the setups' own chats) ever charged anyone.
    charged = (
        [r for r in await judges.ledger.journal(org, limit=1000) if r["kind"] == "commit"]
        if org != "ghost"
        else []
    )
    leads_commits = [r for r in charged if r["token_type"] == "lead_generation"]
    assert len(leads_commits) == (1 if expected is None else 0) + (
        1 if isinstance(held, asyncio.Task) else 0
    )


@pytest.mark.parametrize("judges", [LIMITS_GAP], indirect=True, ids=["min_interval"])
async def test_the_minimum_interval_is_judged_the_same(judges: Judges) -> None:
    first = await judges.proxy("acme", "alice", "/v1/leads/generate")
    assert first is None
    verdicts = {
        "check": await judges.check("acme", "alice", "leads"),
        "admin explain": await judges.admin_explain("acme", "alice", "/v1/leads/generate"),
        "rules explain": await judges.cli_explain("acme", "alice", "/v1/leads/generate"),
        "shadow": await judges.shadow("acme", "alice", "/v1/shadow/leads"),
        "proxy": await judges.proxy("acme", "alice", "/v1/leads/generate"),
    }
    assert verdicts == dict.fromkeys(verdicts, "too_frequent")
    commits = [r for r in await judges.ledger.journal("acme") if r["kind"] == "commit"]
    assert len(commits) == 1  # only the first request was charged


def test_codes_are_unique_and_each_has_one_status() -> None:
    from gateway.errors import GatewayError, contract

    codes = contract()
    assert len(codes) >= 25
    for code, cls in codes.items():
        assert issubclass(cls, GatewayError) and cls.code == code
        assert 400 <= cls.status <= 599
    assert codes["unknown_organization"].status == 403


def test_every_gateway_error_lives_in_errors_py() -> None:
    import ast

    root = HERE.parent / "gateway"
    for path in root.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"GatewayError"} and not any(
                    b.endswith(("Error", "Refused")) and b in _gateway_error_names() for b in bases
                ), f"{path}: class {node.name} is a GatewayError outside errors.py"


def _gateway_error_names() -> set[str]:
    from gateway.errors import contract

    return {cls.__name__ for cls in contract().values()} | {"GatewayError"}


def test_no_import_cycles() -> None:
    """No module imports one that imports it back, even through a function-local import."""
    import ast

    root = HERE.parent / "gateway"
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imports: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("gateway"):
                    imports.add(node.module)
                    imports.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imports.update(a.name for a in node.names if a.name.startswith("gateway"))
        graph[module] = imports
    known = set(graph)
    edges = {m: {i for i in imps if i in known and i != m} for m, imps in graph.items()}
    # Importing gateway.x.y runs gateway.x/__init__: a package imports its submodules.
    for module in known:
        parent = module.rsplit(".", 1)[0]
        if parent in known and parent != module:
            edges[module] = edges[module] - {parent}

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(m for m in known if m in reach(m) and not m.endswith("__init__"))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_no_python_file_over_500_lines() -> None:
    long = {
        str(p.relative_to(HERE.parent)): n
        for p in (HERE.parent / "gateway").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_every_error_code_is_in_the_readme() -> None:
    """The README's error table is the contract clients read: every code in it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = sorted(code for code in contract() if f"`{code}`" not in readme)
    assert missing == []
