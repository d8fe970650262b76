"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): it shows a
seeded organization's true numbers, warns at 80%, invites starter organizations to
upgrade, starts a Stripe checkout, says what went wrong in words, keeps the token out of
every URL, and fits a phone. Screenshots go to test-artifacts/.

Chromium comes from ``scripts/install-browser.sh`` (``./dev test`` runs it). Without it the
tests skip, except under CI, where they fail."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import parse_rules
from tests.conftest import ENVIRON, Gateway, bearer, rules_yaml, token
from tests.upstream import Upstream

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPIRED = "Your session has expired or the token is invalid. Paste a new token."
DOWN = "Can't reach the gateway. Check your connection and try again."

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the dashboard tests: scripts/install-browser.sh")
    pytest.skip("Chromium is not installed (scripts/install-browser.sh)", allow_module_level=True)

from playwright.async_api import Browser, Page, Request, async_playwright  # noqa: E402


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        await browser.close()


@dataclass
class Tab:
    """A page and what it did: every request it sent and every error it logged."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def text(self, selector: str) -> str:
        return (await self.page.locator(selector).first.inner_text()).strip()

    async def shown(self) -> None:
        """Wait until the page settles on the dashboard, the sign-in box or an error."""
        await self.page.wait_for_selector(
            "#dashboard:not(.hidden), #signin:not(.hidden), #error:not(.hidden)"
        )

    async def screenshot(self, name: str, *, full_page: bool = True) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)


async def open_tab(
    browser: Browser,
    url: str,
    *,
    width: int = 1200,
    height: int = 900,
    phone: bool = False,
    unreachable: str | None = None,
) -> Tab:
    """A fresh browser tab on ``url``; requests matching the glob ``unreachable`` fail as a
    refused connection does."""
    context = await browser.new_context(
        viewport={"width": width, "height": height},
        is_mobile=phone,
        has_touch=phone,
        locale="en-US",
        timezone_id="UTC",
    )
    tab = Tab(await context.new_page())
    tab.page.on("request", lambda r: tab.requests.append(r))
    tab.page.on("pageerror", lambda exc: tab.problems.append(str(exc)))
    tab.page.on("console", lambda m: tab.problems.append(m.text) if m.type == "error" else None)
    if unreachable:
        await tab.page.route(unreachable, lambda route: route.abort("connectionrefused"))
    await tab.page.goto(url)
    await tab.shown()
    return tab


async def open_dashboard(browser: Browser, gateway: Gateway, jwt: str, **kwargs: Any) -> Tab:
    return await open_tab(browser, gateway.url("/dashboard") + f"#token={jwt}", **kwargs)


async def stats(gateway: Gateway, org: str = "acme", user: str = "alice") -> dict[str, Any]:
    resp = await gateway.client.get("/v1/tokens/stats", headers=bearer(org, user))
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


def day(iso: str) -> str:
    """A date as the page writes it (in UTC, the browser's time zone here)."""
    at = datetime.fromisoformat(iso)
    return f"{at:%b} {at.day}, {at.year}"


async def cells(page: Page, table: str, *columns: str) -> list[list[str]]:
    """A table's rows, each as the text of the cells of these classes."""
    return [
        [(await row.locator(f"td.{c}").inner_text()).strip() for c in columns]
        for row in await page.locator(f"{table} tbody tr").all()
    ]


async def run_some_requests(gateway: Gateway) -> None:
    """2 leads (5 each) and 3 chats (1 each) for alice, 1 chat for bob: all committed."""
    calls = [("alice", "/v1/leads/generate")] * 2 + [("alice", "/v1/chat/x")] * 3
    for user, path in [*calls, ("bob", "/v1/chat/x")]:
        resp = await gateway.client.post(path, json={}, headers=bearer("acme", user))
        assert resp.status == 200, await resp.text()
        await resp.read()
    await gateway.settled()


async def spend(gateway: Gateway, token_type: str, amount: int) -> None:
    held = await gateway.ledger.reserve("acme", token_type, amount, ttl_seconds=60, user="alice")
    assert held.reservation_id is not None
    await gateway.ledger.commit(held.reservation_id)


async def test_shows_the_organizations_numbers(browser: Browser, gateway: Gateway) -> None:
    await run_some_requests(gateway)
    jwt = token()
    tab = await open_dashboard(browser, gateway, jwt)
    page = tab.page
    api = await stats(gateway)

    # The page shows what the API says, for every token type...
    assert await page.locator("#balances [data-token-type]").count() == len(api["token_types"])
    for name, t in api["token_types"].items():
        card = f'#balances [data-token-type="{name}"]'
        for key in ("available", "used", "allocated"):
            assert await tab.text(f"{card} .{key}") == f"{t[key]:,}", (name, key)
        assert await tab.text(f"{card} .refresh") == f"Refreshes {day(t['refresh_at'])}"
    # ... and what we counted by hand.
    leads = '[data-token-type="lead_generation"]'
    general = '[data-token-type="general"]'
    assert [await tab.text(f"{leads} .{k}") for k in ("available", "used", "allocated")] == [
        "40",
        "10",
        "50",
    ]
    assert [await tab.text(f"{general} .{k}") for k in ("available", "used", "allocated")] == [
        "96",
        "4",
        "100",
    ]
    assert await tab.text(f"{leads} .pct") == "20%"
    assert await page.locator(f"{leads} [role=progressbar]").get_attribute("aria-valuenow") == "20"
    runs_out = api["token_types"]["lead_generation"]["forecast"]["runs_out_at"]
    assert api["token_types"]["lead_generation"]["forecast"]["before_refresh"] is True
    assert f"run out around {day(runs_out)}, before the refresh" in await tab.text(
        f"{leads} .forecast.soon"
    )
    assert await cells(page, "#features", "feature", "token-type", "tokens", "requests") == [
        ["leads", "lead generation", "10", "2"],
        ["chat", "general", "4", "4"],
    ]
    assert await cells(page, "#users", "user", "tokens", "requests") == [
        ["alice", "13", "5"],
        ["bob", "1", "1"],
    ]
    assert await tab.text("#total-used") == "14"
    assert await tab.text("#total-requests") == "6"
    today = api["generated_at"][:10]
    assert await page.locator(f'#daily [data-date="{today}"]').get_attribute("data-tokens") == "14"

    assert await tab.text("#who") == "acme"
    assert await page.locator("#plan").text_content() == "pro"
    assert await page.locator(".low-balance").count() == 0
    assert await page.locator("#upgrade").is_hidden()
    assert await page.locator("#buy").is_hidden()  # billing is not configured here

    # The token left the address bar, went out only in the Authorization header, and the
    # page fetched nothing from anywhere but the gateway.
    assert "token" not in page.url
    assert await page.evaluate("sessionStorage.getItem('gateway-token')") == jwt
    origin = gateway.url("/").rstrip("/")
    assert all(r.url.startswith(origin + "/") for r in tab.requests), [r.url for r in tab.requests]
    assert not [r.url for r in tab.requests if jwt in r.url]
    api_calls = [r for r in tab.requests if "/v1/" in r.url]
    assert [r.url for r in api_calls] == [gateway.url("/v1/tokens/stats")]
    assert await api_calls[0].header_value("authorization") == f"Bearer {jwt}"
    assert tab.problems == []  # no script errors, nothing blocked by the page's CSP
    await tab.screenshot("dashboard.png")


async def test_warns_when_use_crosses_80_percent(browser: Browser, gateway: Gateway) -> None:
    await spend(gateway, "general", 79)
    tab = await open_dashboard(browser, gateway, token())
    general = '#balances [data-token-type="general"]'
    assert await tab.text(f"{general} .used") == "79"
    assert await tab.page.locator(".low-balance").count() == 0
    assert await tab.text(f"{general} .pill") == "At risk"  # 79 a day, 21 left: gone tomorrow

    await spend(gateway, "general", 1)
    await tab.page.click("#refresh")
    warning = tab.page.locator('.low-balance[data-token-type="general"]')
    await warning.wait_for()
    refresh = (await stats(gateway))["token_types"]["general"]["refresh_at"]
    assert await warning.inner_text() == (
        "Running low. You have used 80% of your general tokens this period: "
        f"20 tokens left until the refresh on {day(refresh)}."
    )
    assert await tab.page.locator(".low-balance").count() == 1
    assert await tab.page.locator(f"{general}.low").count() == 1
    assert await tab.text(f"{general} .pill") == "Running low"
    assert await tab.text(f"{general} .used") == "80"

    await spend(gateway, "general", 20)
    await tab.page.click("#refresh")
    await tab.page.locator(f"{general}.out").wait_for()
    assert await warning.inner_text() == (
        "Out of tokens. You have used 100% of your general tokens this period. "
        f"Wait for the refresh on {day(refresh)}."
    )
    assert await tab.text(f"{general} .pill") == "Used up"
    await tab.screenshot("dashboard-warning.png")

    await gateway.ledger.grant("acme", "general", 50, kind="purchase")  # a pack arrives
    await tab.page.click("#refresh")
    await tab.page.locator(f"{general} .purchased").wait_for()
    assert await tab.text(f"{general} .purchased") == "50"
    assert await tab.text(f"{general} .available") == "50"
    assert await warning.inner_text() == (
        "Allowance used up. You have used 100% of your general tokens this period: "
        "50 purchased tokens left."
    )


async def test_starter_sees_the_upgrade_call(browser: Browser, gateway: Gateway) -> None:
    tab = await open_dashboard(browser, gateway, token("freeloader", "bob"))
    upgrade = tab.page.locator("#upgrade")
    assert await upgrade.is_visible()
    assert await tab.page.locator("#upgrade-plan").text_content() == "pro"
    assert "Upgrade to pro" in (await upgrade.inner_text()).replace("Pro", "pro")
    assert await tab.page.locator("#plan").text_content() == "starter"
    assert await tab.page.locator(".low-balance").count() == 0
    assert await tab.page.locator("#usage").is_hidden()  # no empty charts under the call
    assert await tab.page.locator("#upgrade-buy").is_hidden()  # billing is not configured
    assert tab.problems == []
    await tab.screenshot("dashboard-starter.png")

    pro = await open_dashboard(browser, gateway, token())
    assert await pro.page.locator("#upgrade").is_hidden()


async def test_errors_in_words(browser: Browser, gateway: Gateway) -> None:
    tab = await open_dashboard(browser, gateway, token(ttl_seconds=-60))
    assert await tab.text("#error") == EXPIRED
    assert await tab.page.locator("#signin").is_visible()
    assert await tab.page.evaluate("sessionStorage.getItem('gateway-token')") is None
    await tab.screenshot("dashboard-signin.png")

    # A token for an organization the ledger does not know: the problem's own words.
    tab = await open_dashboard(browser, gateway, token("nobody"))
    resp = await gateway.client.get("/v1/tokens/stats", headers=bearer("nobody"))
    assert resp.status in (403, 404)
    assert await tab.text("#error") == (await resp.json())["detail"]

    # The page loads but the API cannot be reached: the error, and a way to try again.
    dashboard = gateway.url("/dashboard") + f"#token={token()}"
    tab = await open_tab(browser, dashboard, unreachable="**/v1/tokens/stats")
    assert await tab.text("#error") == DOWN
    assert await tab.page.locator("#refresh").is_visible()
    assert await tab.page.locator("#signin").is_hidden()

    # The gateway goes down under an open page: the numbers stay, the error says why.
    tab = await open_tab(browser, dashboard)
    assert await tab.text('[data-token-type="general"] .available') == "100"
    await gateway.client.server.close()
    await tab.page.click("#refresh")
    await tab.page.wait_for_selector("#error:not(.hidden)")
    assert await tab.text("#error") == DOWN
    assert await tab.text('[data-token-type="general"] .available') == "100"


async def test_sign_in_box_and_sign_out(browser: Browser, gateway: Gateway) -> None:
    tab = await open_tab(browser, gateway.url("/dashboard"))
    page = tab.page
    assert await page.locator("#signin").is_visible()
    assert await page.locator("#dashboard").is_hidden()
    jwt = token()
    await page.fill("#token-input", f"Bearer {jwt}")  # a pasted header works too
    await page.click("#signin-button")
    await page.wait_for_selector("#dashboard:not(.hidden)")
    assert await tab.text("#who") == "acme"
    assert await page.input_value("#token-input") == ""
    assert not [r.url for r in tab.requests if jwt in r.url]

    await page.click("#signout")
    assert await page.locator("#signin").is_visible()
    assert await page.evaluate("sessionStorage.getItem('gateway-token')") is None
    assert await page.locator("#balances [data-token-type]").count() == 0
    await page.click("#signin-button")  # nothing pasted
    assert await tab.text("#error") == "Paste a token first."
    assert tab.problems == []


async def test_fits_a_phone(browser: Browser, gateway: Gateway) -> None:
    await run_some_requests(gateway)
    await spend(gateway, "general", 80)
    tab = await open_dashboard(browser, gateway, token(), width=390, height=844, phone=True)
    page = tab.page
    overflow = await page.evaluate(
        "document.scrollingElement.scrollWidth - document.scrollingElement.clientWidth"
    )
    assert overflow <= 0
    lefts = await page.locator("#balances .card").evaluate_all(
        "cards => cards.map(c => Math.round(c.getBoundingClientRect().left))"
    )
    assert len(set(lefts)) == 1  # one column
    for selector in ("#balances .card", ".low-balance", "#features", "#users", "header .bar"):
        right = await page.locator(selector).first.evaluate("e => e.getBoundingClientRect().right")
        assert right <= 390, selector
    assert await page.locator(".low-balance").is_visible()
    await tab.screenshot("dashboard-phone.png")
    await tab.screenshot("dashboard-phone-first-screen.png", full_page=False)


# -- buying tokens: a real checkout through the gateway, Stripe played by a local server --

PACKS = """
billing:
  packs:
    leads_100: {{price_id: price_leads_100, token_type: lead_generation, amount: 100}}
    chat_1000: {{price_id: price_chat_1000, token_type: general, amount: 1000}}
  api_base: '{api_base}'
"""


@dataclass
class FakeStripe:
    url: str
    sessions: list[dict[str, str]]


@pytest.fixture
async def stripe_api() -> AsyncIterator[FakeStripe]:
    sessions: list[dict[str, str]] = []
    base: list[str] = []

    async def create(request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        sessions.append(form)
        return web.json_response(
            {"id": "cs_test_7", "object": "checkout.session", "url": f"{base[0]}/c/pay/cs_test_7"}
        )

    async def pay(request: web.Request) -> web.Response:
        return web.Response(text="<h1>Stripe checkout (test)</h1>", content_type="text/html")

    fake = web.Application()
    fake.router.add_post("/v1/checkout/sessions", create)
    fake.router.add_get("/c/pay/{id}", pay)
    server = TestServer(fake, host="127.0.0.1")
    await server.start_server()
    base.append(str(server.make_url("")).rstrip("/"))
    yield FakeStripe(base[0], sessions)
    await server.close()


@pytest.fixture
async def billed(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str], stripe_api: FakeStripe
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A gateway that sells token packs (through the fake Stripe)."""
    rules = parse_rules((rules_yaml(upstream[1]) + PACKS.format(api_base=stripe_api.url)).encode())
    await ledger.create_org("acme", "pro")
    await ledger.create_org("freeloader", "starter")
    env = {**ENVIRON, "STRIPE_API_KEY": "sk_test_local"}
    client = TestClient(TestServer(build_app(rules, ledger, limiter, environ=env, sweeper=False)))
    await client.start_server()
    yield client
    await client.close()


async def test_buy_tokens_starts_the_stripe_checkout(
    browser: Browser,
    billed: TestClient[web.Request, web.Application],
    stripe_api: FakeStripe,
) -> None:
    url = str(billed.make_url("/dashboard")) + f"#token={token()}"
    tab = await open_tab(browser, url)
    page = tab.page
    assert await page.locator("#buy").is_visible()
    await page.click("#buy")
    assert await page.locator("#packs").is_visible()
    assert [
        " ".join((await p.inner_text()).split())
        for p in await page.locator("#packs-list .pack").all()
    ] == ["100 tokens Lead generation Buy", "1,000 tokens General Buy"]
    await tab.screenshot("dashboard-buy.png", full_page=False)
    await page.click('#packs-list button[data-pack="leads_100"]')
    await page.wait_for_url(f"{stripe_api.url}/c/pay/cs_test_7")
    [session] = stripe_api.sessions
    assert session["line_items[0][price]"] == "price_leads_100"
    assert session["metadata[organization]"] == "acme"
    assert session["metadata[pack]"] == "leads_100"

    # A starter organization may buy a pack too: the upgrade call offers one.
    url = str(billed.make_url("/dashboard")) + f"#token={token('freeloader', 'bob')}"
    starter = await open_tab(browser, url)
    assert await starter.page.locator("#upgrade").is_visible()
    await starter.page.click("#upgrade-buy")
    assert await starter.page.locator("#packs").is_visible()
    assert await starter.page.locator("#packs-list .pack").count() == 2
