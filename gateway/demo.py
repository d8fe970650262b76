"""``gateway demo``: the whole product on one machine in one command.

Starts the sample upstream, the ledger (embedded PostgreSQL unless DATABASE_URL is set),
seeds an organization on the pro plan and one on starter, runs a short scripted tour that
shows a metered request, the balance falling and a refusal, then prints curl commands.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.app import build_app
from gateway.auth import mint_token
from gateway.errors import LedgerError
from gateway.ledger import Ledger
from gateway.limits.config import effective
from gateway.rules import Rules, load_rules
from gateway.runtime import (
    CommandError,
    check_serving,
    demo_secret,
    free_port,
    listening,
    open_ledger,
    open_limiter,
    wait_for_signal,
)
from gateway.sample_upstream import make_app
from gateway.settings import Settings

PRO_ORG, STARTER_ORG = "acme", "freeloader"
# The tour's callers, and the ones whose tokens it prints: the limits count per user, so
# the tour's requests never make yours wait.
TOUR_USERS, YOUR_USERS = ("alice", "bob"), ("carol", "dave")


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
    upstream_port = upstream_port or free_port()
    upstream = web.AppRunner(make_app(), access_log=None)
    await upstream.setup()
    await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()
    os.environ["AI_BACKEND_URL"] = f"http://127.0.0.1:{upstream_port}"

    rules = load_rules(rules_path)
    auth = rules.document.auth
    if "HS256" not in auth.algorithms:
        raise CommandError("the demo mints HS256 tokens: list HS256 in auth.algorithms")
    generated = not os.environ.get(auth.secret_env)
    if generated:
        os.environ[auth.secret_env] = demo_secret(settings.data_dir)
    secret = os.environ[auth.secret_env]

    def token(org: str, user: str) -> str:
        return mint_token(secret, org=org, user=user, ttl_seconds=86400, claims=auth.claims)

    try:
        await check_serving(rules, os.environ)  # a bad key is said before any store opens
        async with (
            open_ledger(settings, rules) as ledger,
            open_limiter(settings, rules) as limiter,
        ):
            await _seed(ledger)
            for user in (TOUR_USERS[1], YOUR_USERS[1]):  # earlier runs count their refusals
                await limiter.unblock(STARTER_ORG, user)
            app = build_app(rules, ledger, limiter)
            hint = "; pick another with --port"
            async with listening(app, "127.0.0.1", port, hint=hint, shutdown_timeout=10):
                base = f"http://127.0.0.1:{port}"
                pro, starter = token(PRO_ORG, TOUR_USERS[0]), token(STARTER_ORG, TOUR_USERS[1])
                ok = await _tour(ledger, base, pro, starter)
                commands = _Commands(rules, rules_path, secret if generated else None)
                if once:
                    _say(commands.after_exit())
                else:
                    yours = token(PRO_ORG, YOUR_USERS[0]), token(STARTER_ORG, YOUR_USERS[1])
                    _say(commands.while_running(base, *yours))
                    _say("The gateway is running. Press Ctrl-C to stop.")
                    await wait_for_signal()
                    _say("Stopping: finishing requests, then the embedded servers...")
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


class _Commands:
    """What to paste next, in the words of the shell the demo was started from."""

    def __init__(self, rules: Rules, rules_path: Path, secret: str | None) -> None:
        # ./dev sets up the virtualenv: in a checkout, it is how `gateway` is on hand.
        gateway = "./dev gateway" if Path("dev").is_file() else "gateway"
        if rules_path != Path("rules.yaml"):
            gateway += f" --rules {shlex.quote(str(rules_path))}"
        self.gateway = gateway
        self.rules = rules
        env = rules.document.auth.secret_env
        self.secret_line = (
            f"export {env}={shlex.quote(secret)}   # the demo's secret: gateway token uses it"
            if secret is not None
            else f"# {env} is already set in this shell: gateway token uses it"
        )

    def _wait(self, route_name: str) -> str:
        """``sleep N`` when a second request of one user to this route's token type must
        wait for ``min_interval``; nothing when no interval applies."""
        route = next(r for r in self.rules.routes if r.name == route_name)
        limits = effective(self.rules.document.limits, "pro", route.config.limits)
        if limits.min_interval is None:
            return ""
        seconds = math.ceil(limits.min_interval.seconds)
        return (
            f"\n# one user may call one token type once every {seconds}s (limits: min_interval)"
            f"\nsleep {seconds}"
        )

    def while_running(self, base: str, pro: str, starter: str) -> str:
        chat = json.dumps({"model": "sample-1", "messages": [{"role": "user", "content": "Hi"}]})
        stream = json.dumps(
            {"model": "sample-1", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
        )
        auth = '-H "Authorization: Bearer $TOKEN"'
        json_h = "-H 'Content-Type: application/json'"
        wait = self._wait("chat") if any(r.name == "chat" for r in self.rules.routes) else ""
        return f"""
== Try it yourself: paste these in order in another terminal (tokens valid for 24 hours) ==

export TOKEN={pro}
export STARTER_TOKEN={starter}
{self.secret_line}

# a metered chat completion (1 'general' token); see X-Tokens-Charged / X-Tokens-Remaining
curl -i {base}/v1/chat/completions {auth} {json_h} -d {shlex.quote(chat)}

# lead generation (5 'lead_generation' tokens)
curl -i -X POST {base}/v1/leads/generate {auth} {json_h} -d '{{"industry": "robotics"}}'

# the backend fails: refunded, X-Tokens-Charged: 0
curl -i -X POST '{base}/v1/forecasts?fail=503' {auth} {json_h} -d '{{}}'

# a starter organization has no AI: 403 plan_forbidden
curl -i -X POST {base}/v1/leads/generate -H "Authorization: Bearer $STARTER_TOKEN" -d '{{}}'
{wait}
# a chat again, streamed as server-sent events
curl -N {base}/v1/chat/completions {auth} {json_h} -d {shlex.quote(stream)}

# the dashboard, in a browser: {base}/dashboard#token={pro}

# balances, the ledger audit, and how a request would be treated now
{self.gateway} balance {PRO_ORG}
{self.gateway} audit
{self.gateway} rules explain POST /v1/chat/completions --token "$TOKEN"
"""

    def after_exit(self) -> str:
        return f"""
== The tour is over and the gateway has stopped (--once) ==

Run the demo without --once to keep it running and get curl commands to try. Meanwhile,
the ledger is still there (paste these in order):

{self.secret_line}
export TOKEN=$({self.gateway} token --org {PRO_ORG} --user {YOUR_USERS[0]})
{self.gateway} balance {PRO_ORG}
{self.gateway} rules explain POST /v1/chat/completions --token "$TOKEN"
"""
