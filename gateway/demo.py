"""``gateway demo``: the whole product on one machine in one command.

Starts the sample upstream, the ledger (embedded PostgreSQL unless DATABASE_URL is set),
seeds an organization on the pro plan and one on starter, runs a short scripted tour that
shows a chat priced by usage (its exact charge, and the usage behind it), the same chat
streamed, a refund and refusals, then prints curl commands.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import build_app
from gateway.auth import mint_token
from gateway.errors import LedgerError
from gateway.ledger import Ledger
from gateway.limits.config import effective
from gateway.rules import Route, Rules, Usage, UsageConfig, charge, load_rules
from gateway.rules.usage import rates_for
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
CHAT = "/v1/chat/completions"  # the tour's usage-priced route, OpenAI-compatible
# The tour's callers (two on pro, one on starter), and the ones whose tokens it prints:
# the limits count per user, so the tour's requests never make yours wait, and its stream
# comes from a second pro user, since one user may call a token type only every few
# seconds (limits: min_interval).
TOUR_USERS, YOUR_USERS = ("alice", "bob", "erin"), ("carol", "dave")
# The tour's chats ask for different output limits (the sample upstream uses them whole),
# so their charges differ by what was used.
CHAT_MAX_TOKENS, STREAM_MAX_TOKENS = 10, 20


async def _seed(ledger: Ledger) -> None:
    for org, plan in ((PRO_ORG, "pro"), (STARTER_ORG, "starter")):
        try:
            await ledger.create_org(org, plan)
        except LedgerError as exc:
            if exc.reason != "exists":
                raise


async def _available(ledger: Ledger, org: str, token_type: str) -> int:
    return next((a.available for a in await ledger.balances(org) if a.token_type == token_type), 0)


async def _top_up(ledger: Ledger, rules: Rules, route: Route) -> int:
    """Grants the pro organization 'general' tokens when fewer are left than the tour's two
    chats may hold (the demo's store outlives it: earlier runs spend the allowance);
    returns how many, 0 when none were needed."""
    need = 2 * route.cost
    available = await _available(ledger, PRO_ORG, route.token_type)
    if available >= need:
        return 0
    allowance = rules.plan_allowances()["pro"][1].get(route.token_type, 0)
    amount = max(need, allowance) - available
    await ledger.grant(
        PRO_ORG, route.token_type, amount, actor="demo", reason="the demo's tour needs tokens"
    )
    return amount


def _arithmetic(config: UsageConfig, usage: Usage | None) -> str:
    """How ``usage`` comes to its charge at the route's rates, e.g. '(2 input x 100 +
    10 output x 200) / 1,000 = 2.2, rounded up'."""
    if usage is None:
        return "none reported: charged the hold (on_missing_usage)"
    rates = rates_for(config, usage.model)
    terms = [(usage.input, "input", rates.input)]
    if usage.cached_input:
        cached = rates.cached_input if rates.cached_input is not None else rates.input
        terms.append((usage.cached_input, "cached input", cached))
    terms.append((usage.output, "output", rates.output))
    exact = sum((Decimal(n) * Decimal(str(rate)) for n, _, rate in terms), Decimal(0)) / 1000
    sums = " + ".join(f"{n} {name} x {rate:g}" for n, name, rate in terms)
    rounded = "" if exact == exact.to_integral_value() else ", rounded up"
    return f"({sums}) / 1,000 = {exact}{rounded}"


async def _reservation(
    http: aiohttp.ClientSession, base: str, token: str, reservation_id: str
) -> tuple[int, int, Usage | None]:
    """A proxied request's reservation, as its organization reads it: (hold, charged,
    usage)."""
    async with http.get(
        f"{base}/v1/tokens/reservations/{reservation_id}",
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        found = await resp.json()
    usage = found["usage"]
    return found["amount"], found["charged"], Usage(**usage) if usage else None


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
    chat = rules.match("POST", CHAT)
    if chat is None or chat.config.usage is None or chat.config.usage.format != "openai":
        raise CommandError(
            f"the demo's tour calls POST {CHAT} priced by usage: give it a route with "
            "usage: {format: openai, ...} (see the example rules.yaml)"
        )
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
                callers = _Callers(
                    pro=token(PRO_ORG, TOUR_USERS[0]),
                    starter=token(STARTER_ORG, TOUR_USERS[1]),
                    streamer=token(PRO_ORG, TOUR_USERS[2]),
                )
                ok = await _tour(ledger, rules, chat, base, callers)
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


@dataclass(frozen=True)
class _Callers:
    """The tour's tokens: a pro user, a starter user, and a second pro user who streams."""

    pro: str
    starter: str
    streamer: str


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _chat(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    """A chat request; the sample upstream reports ``max_tokens`` as the output it used."""
    body: dict[str, Any] = {
        "model": "sample-1",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    if stream:
        body["stream"] = True
    return body


async def _priced_chat(
    http: aiohttp.ClientSession, ledger: Ledger, base: str, token: str, config: UsageConfig
) -> bool:
    """A JSON chat: its exact charge in X-Tokens-Charged, explained by its reservation."""
    before = await _available(ledger, PRO_ORG, "general")
    async with http.post(
        f"{base}{CHAT}", json=_chat(CHAT_MAX_TOKENS), headers=_bearer(token)
    ) as resp:
        body = await resp.json()
        headers = resp.headers
    if resp.status != 200:
        _say(f"   POST {CHAT} -> {resp.status}: {body.get('detail', body)}")
        return False
    _say(
        f"   POST {CHAT} (max_tokens: {CHAT_MAX_TOKENS}) -> 200, "
        f"X-Tokens-Charged: {headers.get('X-Tokens-Charged')}, "
        f"X-Tokens-Remaining: {headers.get('X-Tokens-Remaining')}"
    )
    _say(f"   answer: {body['choices'][0]['message']['content']!r}")
    hold, charged, usage = await _reservation(http, base, token, headers["X-Reservation-Id"])
    after = await _available(ledger, PRO_ORG, "general")
    _say(
        f"   its reservation, GET /v1/tokens/reservations/<X-Reservation-Id>: held {hold}, "
        f"charged {charged}\n   for the usage reported: {_arithmetic(config, usage)}\n"
        f"   balance now {after} (fell by {before - after}, exactly the charge)."
    )
    return (
        headers.get("X-Tokens-Charged") == str(charged)
        and usage is not None
        and charged == charge(config, usage)
        and before - after == charged
    )


async def _streamed_chat(
    http: aiohttp.ClientSession, ledger: Ledger, base: str, token: str, config: UsageConfig
) -> bool:
    """A streamed chat: its charge in the stream's last line, the balance falling by it."""
    before = await _available(ledger, PRO_ORG, "general")
    body = _chat(STREAM_MAX_TOKENS, stream=True)
    async with http.post(f"{base}{CHAT}", json=body, headers=_bearer(token)) as resp:
        text = await resp.text()  # read to the end: the charge is settled by then
        headers = resp.headers
    if resp.status != 200:
        _say(f"   POST {CHAT} -> {resp.status}: {text}")
        return False
    lines = [line for line in text.split("\n") if line]
    events = sum(line.startswith("data:") for line in lines)
    last = lines[-1] if lines else ""
    prefix = ": tokens-charged="
    stated = int(last[len(prefix) :]) if last.startswith(prefix) else None
    _say(
        f"   POST {CHAT} -> 200, X-Tokens-Held: {headers.get('X-Tokens-Held')} "
        "(a stream's charge is known at its end)\n"
        f"   {events} events relayed as they came; the stream's last lines:\n"
        + "\n".join(f"     {line}" for line in lines[-2:])
    )
    hold, charged, usage = await _reservation(http, base, token, headers["X-Reservation-Id"])
    after = await _available(ledger, PRO_ORG, "general")
    _say(
        f"   balance now {after} (fell by exactly {before - after}); its reservation: "
        f"held {hold}, charged {charged}\n   for the usage reported: {_arithmetic(config, usage)}"
    )
    return (
        stated is not None
        and stated == charged == before - after
        and usage is not None
        and charged == charge(config, usage)
        and headers.get("X-Tokens-Held") == str(hold)
    )


async def _tour(ledger: Ledger, rules: Rules, route: Route, base: str, callers: _Callers) -> bool:
    """A scripted run that shows metering work; returns whether everything behaved."""
    assert route.config.usage is not None  # run_demo refuses rules without it
    config = route.config.usage
    checks: list[bool] = []
    _say(f"\n== Metering gateway demo at {base} ==\n")
    granted = await _top_up(ledger, rules, route)
    async with aiohttp.ClientSession() as http:
        balance = await _available(ledger, PRO_ORG, "general")
        spent = f" (earlier runs had spent them: the demo granted {granted})" if granted else ""
        _say(f"1. Organization '{PRO_ORG}' (plan pro) has {balance} 'general' tokens{spent}.")
        checks.append(await _priced_chat(http, ledger, base, callers.pro, config))

        _say(
            f'\n2. A chat streamed ("stream": true, max_tokens: {STREAM_MAX_TOKENS}) by another '
            f"user of '{PRO_ORG}':"
        )
        checks.append(await _streamed_chat(http, ledger, base, callers.streamer, config))

        async with http.post(
            f"{base}/v1/forecasts?fail=503", json={"horizon": "Q3"}, headers=_bearer(callers.pro)
        ) as resp:
            await resp.read()  # the settlement is final once the answer has been read
            forecast_after = await _available(ledger, PRO_ORG, "forecast")
            _say(
                f"\n3. The backend fails (503): X-Tokens-Charged: "
                f"{resp.headers.get('X-Tokens-Charged')}; forecast balance still "
                f"{forecast_after}: the reservation was refunded."
            )
            checks.append(resp.status == 503 and resp.headers.get("X-Tokens-Charged") == "0")

        async with http.post(
            f"{base}/v1/leads/generate",
            json={"industry": "robotics"},
            headers=_bearer(callers.starter),
        ) as resp:
            problem = await resp.json()
            _say(
                f"\n4. Organization '{STARTER_ORG}' (plan starter) asks for leads -> "
                f"{resp.status} {problem['code']}:\n   {problem['detail']}"
            )
            checks.append(resp.status == 403 and problem["code"] == "plan_forbidden")

        async with http.post(f"{base}/v1/leads/generate", json={}) as resp:
            problem = await resp.json()
            _say(f"\n5. No token -> {resp.status} {problem['code']}: {problem['detail']}")
            checks.append(resp.status == 401)

        async with http.post(
            f"{base}{CHAT}", json=_chat(CHAT_MAX_TOKENS), headers=_bearer(callers.pro)
        ) as resp:
            problem = await resp.json()
            _say(
                f"\n6. The user of step 1 asks for another chat at once -> {resp.status} "
                f"{problem['code']}: {problem['detail']}\n"
                f"   Retry-After: {resp.headers.get('Retry-After')}\n"
                f"   RateLimit-Policy: {resp.headers.get('RateLimit-Policy')}\n"
                f"   RateLimit: {resp.headers.get('RateLimit')}"
            )
            checks.append(resp.status == 429 and "Retry-After" in resp.headers)
    violations = await ledger.audit()
    _say(f"\n7. Ledger audit: {violations or 'every invariant holds'}")
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

    def _wait(self, route: Route) -> str:
        """``sleep N`` when a second request of one user to this route's token type must
        wait for ``min_interval``; nothing when no interval applies."""
        limits = effective(self.rules.document.limits, "pro", route.config.limits)
        if limits.min_interval is None:
            return ""
        seconds = math.ceil(limits.min_interval.seconds)
        return (
            f"\n# one user may call one token type once every {seconds}s (limits: min_interval)"
            f"\nsleep {seconds}"
        )

    def while_running(self, base: str, pro: str, starter: str) -> str:
        chat = json.dumps(_chat(CHAT_MAX_TOKENS))
        stream = json.dumps(_chat(STREAM_MAX_TOKENS, stream=True))
        auth = '-H "Authorization: Bearer $TOKEN"'
        json_h = "-H 'Content-Type: application/json'"
        route = self.rules.match("POST", CHAT)
        wait = self._wait(route) if route is not None else ""
        headers = '"${TMPDIR:-/tmp}/gateway-stream.headers"'
        return f"""
== Try it yourself: paste these in order in another terminal (tokens valid for 24 hours) ==

export TOKEN={pro}
export STARTER_TOKEN={starter}
{self.secret_line}

# a chat completion priced by usage: X-Tokens-Charged is what the backend reported it used
# at the route's rates (rules.yaml), X-Tokens-Remaining what is left
curl -i {base}{CHAT} {auth} {json_h} -d {shlex.quote(chat)}

# lead generation (5 'lead_generation' tokens)
curl -i -X POST {base}/v1/leads/generate {auth} {json_h} -d '{{"industry": "robotics"}}'

# the backend fails: refunded, X-Tokens-Charged: 0
curl -i -X POST '{base}/v1/forecasts?fail=503' {auth} {json_h} -d '{{}}'

# a starter organization has no AI: 403 plan_forbidden
curl -i -X POST {base}/v1/leads/generate -H "Authorization: Bearer $STARTER_TOKEN" -d '{{}}'
{wait}
# a chat again, streamed as server-sent events: the headers (kept in a file) say only
# X-Tokens-Held; the exact charge is the stream's last line, ': tokens-charged=N'
curl -N -D {headers} {base}{CHAT} {auth} {json_h} -d {shlex.quote(stream)}

# the stream's exact charge and the usage behind it, later: its reservation, by the
# X-Reservation-Id header of its answer (any request's works the same)
RESERVATION=$(awk 'tolower($1) == "x-reservation-id:" {{print $2}}' {headers} | tr -d '\\r')
curl -s -w '\\n' {base}/v1/tokens/reservations/$RESERVATION {auth}

# the dashboard, in a browser: {base}/dashboard#token={pro}

# balances, the ledger audit, and how a request would be treated now
{self.gateway} balance {PRO_ORG}
{self.gateway} audit
{self.gateway} rules explain POST {CHAT} --token "$TOKEN"
"""

    def after_exit(self) -> str:
        return f"""
== The tour is over and the gateway has stopped (--once) ==

Run the demo without --once to keep it running and get curl commands to try. Meanwhile,
the ledger is still there (paste these in order):

{self.secret_line}
export TOKEN=$({self.gateway} token --org {PRO_ORG} --user {YOUR_USERS[0]})
{self.gateway} balance {PRO_ORG}
{self.gateway} rules explain POST {CHAT} --token "$TOKEN"
"""
