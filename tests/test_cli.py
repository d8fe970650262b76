"""The ``gateway`` command, run as a real process against the tests' PostgreSQL schema."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import redis.asyncio

from gateway.auth import Authenticator
from gateway.ledger import Ledger
from gateway.rules import Rules
from gateway.runtime import free_port
from tests.conftest import SECRET, Clock, bearer, process_env, rules_yaml, start_serve
from tests.upstream import Upstream

REPO = Path(__file__).parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli_env(
    database_url: str, redis_url: str, schema: str, upstream: tuple[Upstream, str], tmp_path: Path
) -> dict[str, str]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_yaml(upstream[1]))
    return process_env(
        database_url, redis_url, schema, rules_file, GATEWAY_DATA_DIR=str(tmp_path / "data")
    )


async def gateway(env: dict[str, str], *args: str) -> Result:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def test_rules_check(tmp_path: Path, cli_env: dict[str, str]) -> None:
    ok = await gateway(cli_env, "rules", "check", str(REPO / "rules.yaml"))
    assert ok.code == 0, ok.err
    assert "ok" in ok.out and "6 route(s)" in ok.out and "5 token type(s)" in ok.out
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        (REPO / "rules.yaml")
        .read_text()
        .replace("cost: 5", "cost: -5")
        .replace(
            "upstream: ai_backend\n    token_type: forecast",
            "upstream: ai\n    token_type: forecast",
        )
    )
    bad = await gateway(cli_env, "rules", "check", str(broken))
    assert bad.code == 1
    assert f"{broken}: routes[0].cost: must be a positive integer" in bad.err
    assert f"{broken}: routes[3].upstream: unknown upstream 'ai'" in bad.err
    assert "2 error(s)" in bad.err


async def test_org_grant_balance_and_token(cli_env: dict[str, str], rules: Rules) -> None:
    created = await gateway(cli_env, "org", "create", "acme", "--plan", "pro")
    assert created.code == 0, created.err
    again = await gateway(cli_env, "org", "create", "acme", "--plan", "pro")
    assert again.code == 1 and "organization 'acme' already exists" in again.err
    unknown = await gateway(cli_env, "org", "create", "x", "--plan", "platinum")
    assert unknown.code == 1 and "plan 'platinum' is not in rules.yaml" in unknown.err

    granted = await gateway(cli_env, "grant", "acme", "general", "5", "--reason", "gift")
    assert granted.code == 0 and "available now 105" in granted.out
    nobody = await gateway(cli_env, "grant", "ghost", "general", "5")
    assert nobody.code == 1 and "organization 'ghost' does not exist" in nobody.err
    zero = await gateway(cli_env, "grant", "acme", "general", "0")
    assert zero.code == 2 and "must be positive" in zero.err

    moved = await gateway(cli_env, "org", "set-plan", "acme", "enterprise")
    assert moved.code == 0 and "moved to plan 'enterprise'" in moved.out
    balance = await gateway(cli_env, "balance", "acme", "--json")
    assert balance.code == 0, balance.err
    data = json.loads(balance.out)
    assert data["plan"] == "enterprise"
    assert data["accounts"]["general"]["available"] == 1005
    assert data["accounts"]["general"]["purchased"] == 5
    table = await gateway(cli_env, "balance", "acme")
    assert "lead_generation" in table.out and "500" in table.out

    minted = await gateway(cli_env, "token", "--org", "acme", "--user", "ops", "--ttl", "15m")
    assert minted.code == 0
    auth = Authenticator(rules.document.auth, environ={"GATEWAY_JWT_SECRET": SECRET})
    principal = await auth.authenticate(f"Bearer {minted.out.strip()}")
    await auth.close()
    assert (principal.org, principal.user) == ("acme", "ops")
    assert int(principal.claims["exp"]) - int(principal.claims["iat"]) == 900


async def test_audit_passes_then_names_a_corruption(
    cli_env: dict[str, str], database_url: str, schema: str
) -> None:
    await gateway(cli_env, "org", "create", "acme", "--plan", "pro")
    clean = await gateway(cli_env, "audit")
    assert clean.code == 0 and "every invariant holds" in clean.out
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        await conn.execute(
            "INSERT INTO journal (at, org_id, token_type, kind, purchased_delta)"
            " VALUES (now(), 'acme', 'general', 'commit', 40)"
        )
    finally:
        await conn.close()
    corrupt = await gateway(cli_env, "audit")
    assert corrupt.code == 1
    assert "violation: journal_balance_mismatch: account acme/general" in corrupt.err
    assert "violation: tokens_moved_by_commit" in corrupt.err


async def test_a_killed_gateways_reservation_expires_and_is_refunded(
    cli_env: dict[str, str], ledger: Ledger, clock: Clock, upstream: tuple[Upstream, str]
) -> None:
    await ledger.create_org("acme", "pro")
    port = free_port()
    proc = await start_serve(cli_env, port, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    headers = bearer()
    try:
        async with aiohttp.ClientSession() as http:
            request = asyncio.create_task(
                http.post(f"{base}/v1/chat/stream?behave=hang", json={}, headers=headers)
            )
            await asyncio.wait_for(upstream[0].arrived.wait(), timeout=10)
            proc.send_signal(signal.SIGKILL)  # the gateway dies mid-request
            await proc.wait()
            with pytest.raises(aiohttp.ClientError):
                await request
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert (general.allowance, general.reserved) == (99, 1)
    assert await ledger.expire_overdue() == 0  # not before its expiry
    clock.advance(seconds=20 + 30 + 1)  # the patient upstream's timeout plus the grace
    assert await ledger.expire_overdue() == 1
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert (general.allowance, general.reserved) == (100, 0)
    journal = await ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "expire" and journal[0]["actor"] == "sweeper"


def logged_errors(err: str) -> list[str]:
    """The messages of a JSON log's error lines; every line must be JSON."""
    lines = [json.loads(line) for line in err.splitlines()]
    return [line["message"] for line in lines if line["level"] == "error"]


async def test_serve_refuses_to_start_without_its_secret(cli_env: dict[str, str]) -> None:
    no_secret = {k: v for k, v in cli_env.items() if k != "GATEWAY_JWT_SECRET"}
    for workers in ("1", "2"):
        result = await gateway(no_secret, "serve", "--port", str(free_port()), "--workers", workers)
        assert result.code == 1
        assert logged_errors(result.err) == [
            f"{cli_env['GATEWAY_RULES']}: auth.secret_env: "
            "environment variable GATEWAY_JWT_SECRET is not set"
        ]


async def test_serve_says_which_database_it_cannot_reach(cli_env: dict[str, str]) -> None:
    port = free_port()
    no_db = {**cli_env, "DATABASE_URL": f"postgresql://postgres:s3cret@127.0.0.1:{port}/x"}
    result = await gateway(no_db, "serve", "--port", str(free_port()), "--workers", "1")
    assert result.code == 1
    assert logged_errors(result.err) == [
        f"cannot reach PostgreSQL at 127.0.0.1:{port}: connection refused"
    ]
    assert "s3cret" not in result.err
    balance = await gateway(no_db, "balance", "acme")
    assert balance.code == 1
    assert (
        balance.err == f"gateway: cannot reach PostgreSQL at 127.0.0.1:{port}: connection refused\n"
    )


async def test_serve_says_the_schema_is_missing(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "GATEWAY_DB_SCHEMA": "no_such_schema"}
    result = await gateway(env, "serve", "--port", str(free_port()), "--workers", "1")
    assert result.code == 1
    assert logged_errors(result.err) == [
        "GATEWAY_DB_SCHEMA 'no_such_schema': no such schema in database 'test' at "
        "127.0.0.1:5432; create it (CREATE SCHEMA no_such_schema) or unset the variable"
    ]


COMMANDS = [
    ["serve"],
    ["demo", "--once"],
    ["migrate"],
    ["org", "create", "acme", "--plan", "pro"],
    ["balance", "acme"],
    ["token", "--org", "acme", "--user", "ops"],
    ["rules", "explain", "POST", "/v1/chat/completions"],
    ["unblock", "--ip", "10.0.0.1"],
    ["audit"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
async def test_rules_option_before_or_after_the_command(
    cli_env: dict[str, str], command: list[str]
) -> None:
    missing = "/nonexistent/rules.yaml"
    before = await gateway(cli_env, "--rules", missing, *command)
    after = await gateway(cli_env, *command, "--rules", missing)
    for result in (before, after):
        assert result.code == 1
        assert f"{missing}: cannot read: No such file or directory" in result.err


async def test_rules_check_checks_the_rules_option_what_serve_builds(
    cli_env: dict[str, str],
) -> None:
    path = REPO / "tests" / "config" / "public_key_file_missing.yaml"
    expected = (
        f"{path}: auth.public_key_file: cannot read /nonexistent/gateway-key.pem: "
        f"No such file or directory\n{path}: 1 error(s)\n"
    )
    for args in (
        ["--rules", str(path), "rules", "check"],
        ["rules", "check", "--rules", str(path)],
        ["rules", "check", str(path)],
    ):
        result = await gateway(cli_env, *args)
        assert (result.code, result.err) == (1, expected)
    secretless = {k: v for k, v in cli_env.items() if k != "GATEWAY_JWT_SECRET"}
    result = await gateway(secretless, "rules", "check")
    assert result.code == 1
    assert result.err.startswith(
        f"{cli_env['GATEWAY_RULES']}: auth.secret_env: "
        "environment variable GATEWAY_JWT_SECRET is not set\n"
    )


async def test_demo_shows_metering_and_a_refusal(cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k not in ("GATEWAY_RULES", "GATEWAY_JWT_SECRET")}
    result = await gateway(env, "demo", "--once", "--port", str(free_port()))
    assert result.code == 0, result.out + result.err
    # The chat is priced by usage: the sample upstream reports 2 input tokens and
    # max_tokens (10, then 20 streamed) output, at 100 and 200 per 1,000.
    assert "X-Tokens-Charged: 3, X-Tokens-Remaining: 97" in result.out
    assert (
        "held 20, charged 3\n"
        "   for the usage reported: (2 input x 100 + 10 output x 200) / 1,000 = 2.2, rounded up\n"
        "   balance now 97 (fell by 3, exactly the charge)."
    ) in result.out
    assert "X-Tokens-Held: 20" in result.out and "     : tokens-charged=5\n" in result.out
    assert "balance now 92 (fell by exactly 5); its reservation: held 20, charged 5" in result.out
    assert "429 too_frequent" in result.out
    assert "forecast balance still 30" in result.out
    assert "403 plan_forbidden" in result.out
    assert "every invariant holds" in result.out
    # The server has gone: nothing to curl, but the ledger is there to ask.
    assert "curl -" not in result.out and "Try it yourself" not in result.out
    assert "export GATEWAY_JWT_SECRET=" in result.out
    assert "gateway token --org acme --user carol)" in result.out


async def test_unblock(cli_env: dict[str, str], redis_url: str, schema: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    prefix = cli_env["GATEWAY_REDIS_PREFIX"]
    until = int(time.time() * 1000) + 600_000
    try:
        await client.set(f"{prefix}{{acme}}:block:u:bob", until, px=600_000)
        await client.set(f"{prefix}{{ip:10.0.0.9}}:block", until, px=600_000)
        lifted = await gateway(cli_env, "unblock", "--org", "acme", "--user", "bob")
        assert lifted.code == 0 and "lifted 1 block(s) for org acme user bob" in lifted.out
        assert await client.exists(f"{prefix}{{acme}}:block:u:bob") == 0
        again = await gateway(cli_env, "unblock", "--org", "acme", "--user", "bob")
        assert "no block was in force" in again.out
        by_ip = await gateway(cli_env, "unblock", "--ip", "10.0.0.9")
        assert by_ip.code == 0 and "lifted 1 block(s)" in by_ip.out
        nothing = await gateway(cli_env, "unblock")
        assert nothing.code == 1 and "say what to unblock" in nothing.err
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_rules_check_fails_the_pricing_check(tmp_path: Path, cli_env: dict[str, str]) -> None:
    priced = tmp_path / "priced.yaml"
    priced.write_text(
        (REPO / "rules.yaml")
        .read_text()
        .replace(
            'general: {description: "General assistant and chat"}',
            'general: {description: "General assistant and chat", backend_cost: 0.5}',
        )
        .replace(
            "  starter:                       # no allowance: no AI", "  starter:\n    price: 0"
        )
        .replace("  pro:\n    period: month", "  pro:\n    price: 20\n    period: month")
    )
    # Only pro is priced, and one of its token types has no backend_cost.
    result = await gateway(cli_env, "rules", "check", str(priced))
    assert result.code == 1
    assert "plans.pro: cannot check its margin: no backend_cost for forecast" in result.err


async def test_quota_and_team_commands(cli_env: dict[str, str], ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    team = await gateway(cli_env, "team", "set", "acme", "research", "bob", "carol")
    assert team.code == 0 and "team 'research' of 'acme': bob, carol" in team.out
    quota = await gateway(cli_env, "quota", "set", "acme", "--team", "research", "forecast", "8")
    assert quota.code == 0 and "may spend 8 forecast tokens per period" in quota.out
    held = await ledger.reserve("acme", "forecast", 8, ttl_seconds=60, user="carol")
    refused = await ledger.reserve("acme", "forecast", 4, ttl_seconds=60, user="bob")
    assert refused.status == "quota_exceeded"
    await ledger.refund(held.reservation_id, reason="test")  # type: ignore[arg-type]
    cleared = await gateway(cli_env, "quota", "clear", "acme", "--team", "research", "forecast")
    assert cleared.code == 0 and "has no forecast quota now" in cleared.out
    bad = await gateway(cli_env, "quota", "set", "acme", "--user", "bob", "nonsense", "1")
    assert bad.code == 1 and "unknown token type 'nonsense'" in bad.err
