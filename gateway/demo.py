"""``gateway demo``: the whole product on one machine in one command.

Starts the sample upstream, the ledger (embedded PostgreSQL unless DATABASE_URL is set),
seeds an organization on the pro plan and one on starter, runs a short scripted tour that
shows a metered request, the balance falling and a refusal, then prints curl commands.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.auth import mint_token
from gateway.cli import (
    CommandError,
    demo_secret,
    free_port,
    open_ledger,
    open_limiter,
    wait_for_signal,
)
from gateway.errors import LedgerError
from gateway.ledger import Ledger
from gateway.rules import load_rules
from gateway.sample_upstream import make_app
from gateway.settings import Settings

PRO_ORG, STARTER_ORG = "acme", "freeloader"


async def _seed(ledger: Ledger) -> None:
    for org, plan in ((PRO_ORG, "pro"), (STARTER_ORG, "starter")):
        try:
            await ledger.create_org(org, plan)
        except LedgerError as exc:
            if exc.reason != "exists":
                raise


async def _available(ledger: Ledger, org: str, token_type: str) -> int:
    return next((a.available for a in await ledger.balances(org) if a.token_type == token_type), 0)


def _say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(
    settings: Settings, rules_path: Path, port: int, upstream_port: int, once: bool
) -> int:
    from gateway.app import build_app

    upstream_port = upstream_port or free_port()
    upstream = web.AppRunner(make_app(), access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
    os.environ["AI_BACKEND_URL"] = f"http://127.0.0.1:{upstream_port}"

    rules = load_rules(rules_path)
    auth = rules.document.auth
    if "HS256" not in auth.algorithms:
        raise CommandError("the demo mints HS256 tokens: list HS256 in auth.algorithms")
    if not os.environ.get(auth.secret_env):
        os.environ[auth.secret_env] = demo_secret(settings.data_dir)
    secret = os.environ[auth.secret_env]

    try:
        async with (
            open_ledger(settings, rules) as ledger,
            open_limiter(settings, rules) as limiter,
        ):
            await _seed(ledger)
            await limiter.unblock(STARTER_ORG, "bob")  # earlier demo runs count refusals
            app = build_app(rules, ledger, limiter)
            runner = web.AppRunner(app, access_log=None, handler_cancellation=False)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", port).start()
            except OSError as exc:
                await runner.cleanup()
                raise CommandError(
                    f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pick another with --port"
                ) from exc
            base = f"http://127.0.0.1:{port}"
            pro = mint_token(
                secret, org=PRO_ORG, user="alice", ttl_seconds=86400, claims=auth.claims
            )
            starter = mint_token(
                secret, org=STARTER_ORG, user="bob", ttl_seconds=86400, claims=auth.claims
            )
            ok = await _tour(ledger, base, pro, starter)
            _print_commands(base, pro, starter, rules_path)
            if not once:
                _say("The gateway is running. Press Ctrl-C to stop.")
                await wait_for_signal()
                _say("Stopping: finishing requests, then the embedded servers...")
            await runner.cleanup()
    finally:
        await upstream.cleanup()
    return 0 if ok else 1


async def _tour(ledger: Ledger, base: str, pro: str, starter: str) -> bool:
    """A scripted run that shows metering work; returns whether everything behaved."""
    chat = {"model": "sample-1", "messages": [{"role": "user", "content": "Hello"}]}
    checks: list[bool] = []
    _say(f"\n== Metering gateway demo at {base} ==\n")
    async with aiohttp.ClientSession() as http:
        before = await _available(ledger, PRO_ORG, "general")
        _say(f"1. Organization '{PRO_ORG}' (plan pro) has {before} 'general' tokens.")
        async with http.post(
            f"{base}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {pro}"}
        ) as resp:
            body = await resp.json()
            _say(
                f"   POST /v1/chat/completions -> {resp.status}, "
                f"X-Tokens-Charged: {resp.headers.get('X-Tokens-Charged')}, "
                f"X-Tokens-Remaining: {resp.headers.get('X-Tokens-Remaining')}"
            )
            _say(f"   answer: {body['choices'][0]['message']['content']!r}")
            checks.append(resp.status == 200)
        after = await _available(ledger, PRO_ORG, "general")
        _say(f"   balance now {after} (fell by {before - after}, the route's cost).")
        checks.append(before - after == 1)

        async with http.post(
            f"{base}/v1/forecasts?fail=503",
            json={"horizon": "Q3"},
            headers={"Authorization": f"Bearer {pro}"},
        ) as resp:
            await resp.read()  # the settlement is final once the answer has been read
            forecast_after = await _available(ledger, PRO_ORG, "forecast")
            _say(
                f"\n2. The backend fails (503): X-Tokens-Charged: "
                f"{resp.headers.get('X-Tokens-Charged')}; forecast balance still "
                f"{forecast_after}: the reservation was refunded."
            )
            checks.append(resp.status == 503 and resp.headers.get("X-Tokens-Charged") == "0")

        async with http.post(
            f"{base}/v1/leads/generate",
            json={"industry": "robotics"},
            headers={"Authorization": f"Bearer {starter}"},
        ) as resp:
            problem = await resp.json()
            _say(
                f"\n3. Organization '{STARTER_ORG}' (plan starter) asks for leads -> "
                f"{resp.status} {problem['code']}:\n   {problem['detail']}"
            )
            checks.append(resp.status == 403 and problem["code"] == "plan_forbidden")

        async with http.post(f"{base}/v1/leads/generate", json={}) as resp:
            problem = await resp.json()
            _say(f"\n4. No token -> {resp.status} {problem['code']}: {problem['detail']}")
            checks.append(resp.status == 401)

        async with http.post(
            f"{base}/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {pro}"}
        ) as resp:
            problem = await resp.json()
            _say(
                f"\n5. The same user asks for another chat at once -> {resp.status} "
                f"{problem['code']}: {problem['detail']}\n"
                f"   Retry-After: {resp.headers.get('Retry-After')}\n"
                f"   RateLimit-Policy: {resp.headers.get('RateLimit-Policy')}\n"
                f"   RateLimit: {resp.headers.get('RateLimit')}"
            )
            checks.append(resp.status == 429 and "Retry-After" in resp.headers)
    violations = await ledger.audit()
    _say(f"\n6. Ledger audit: {violations or 'every invariant holds'}")
    checks.append(not violations)
    if not all(checks):
        _say("\nThe tour did not go as expected: see above.")
    return all(checks)


def _print_commands(base: str, pro: str, starter: str, rules_path: Path) -> None:
    chat = json.dumps({"model": "sample-1", "messages": [{"role": "user", "content": "Hi"}]})
    stream = json.dumps(
        {"model": "sample-1", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    )
    auth = '-H "Authorization: Bearer $TOKEN"'
    json_h = "-H 'Content-Type: application/json'"
    _say(
        f"""
== Try it yourself (tokens valid for 24 hours) ==

export TOKEN={pro}
export STARTER_TOKEN={starter}

# a metered chat completion (1 'general' token); see X-Tokens-Charged / X-Tokens-Remaining
curl -i {base}/v1/chat/completions {auth} {json_h} -d {shlex.quote(chat)}

# the same, streamed as server-sent events
curl -N {base}/v1/chat/completions {auth} {json_h} -d {shlex.quote(stream)}

# lead generation (5 'lead_generation' tokens)
curl -i -X POST {base}/v1/leads/generate {auth} {json_h} -d '{{"industry": "robotics"}}'

# the backend fails: refunded, X-Tokens-Charged: 0
curl -i -X POST '{base}/v1/forecasts?fail=503' {auth} {json_h} -d '{{}}'

# a starter organization has no AI: 403 plan_forbidden
curl -i -X POST {base}/v1/leads/generate -H "Authorization: Bearer $STARTER_TOKEN" -d '{{}}'

# the dashboard: open this in a browser
{base}/dashboard#token={pro}

# balances and the ledger audit (in another terminal, same directory)
gateway --rules {rules_path} balance {PRO_ORG}
gateway --rules {rules_path} audit
"""
    )
