"""The dashboard in a real headless Chromium (Debian's, driven by Playwright): it shows a
seeded organization's true numbers, warns at 80%, invites starter organizations to
upgrade, says what went wrong in words, and fits a phone. Screenshots go to
test-artifacts/."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, token

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

if not CHROMIUM.exists():
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Chromium for the dashboard tests: scripts/install-browser.sh")
    pytest.skip("Chromium is not installed (scripts/install-browser.sh)", allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright  # noqa: E402


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        await browser.close()


async def open_dashboard(browser: Browser, gateway: Gateway, jwt: str, **context: object) -> Page:
    page = await (await browser.new_context(**context)).new_page()  # type: ignore[arg-type]
    await page.goto(gateway.url("/dashboard") + f"#token={jwt}")
    await page.wait_for_selector("#dashboard:not(.hidden), #error:not(.hidden)")
    return page


async def text(page: Page, selector: str) -> str:
    return (await page.locator(selector).first.inner_text()).strip()


async def test_shows_the_organizations_numbers(browser: Browser, gateway: Gateway) -> None:
    for path in ("/v1/leads/generate", "/v1/leads/generate", "/v1/chat/x"):
        resp = await gateway.client.post(
            path, json={}, headers={"Authorization": f"Bearer {token()}"}
        )
        assert resp.status == 200
    page = await open_dashboard(browser, gateway, token(), viewport={"width": 1200, "height": 900})
    assert "#token" not in page.url  # the token left the address bar
    leads = '[data-token-type="lead_generation"]'
    assert await text(page, f"{leads} .available") == "40"
    assert await text(page, f"{leads} .used") == "10"
    assert await text(page, f"{leads} .allocated") == "50"
    assert await text(page, '[data-token-type="general"] .available') == "99"
    assert "Refreshes" in await text(page, f"{leads} .refresh")
    first = page.locator("#features tbody tr").first
    assert (await first.locator("td").all_inner_texts()) == ["leads", "10", "2"]
    assert await text(page, "#who") == "acme"
    assert await page.locator(".low-balance").count() == 0
    assert await page.locator("#upgrade").is_hidden()
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


async def test_warns_at_80_percent(browser: Browser, gateway: Gateway) -> None:
    for _ in range(8):
        held = await gateway.ledger.reserve("acme", "general", 10, ttl_seconds=60, user="alice")
        await gateway.ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    page = await open_dashboard(browser, gateway, token())
    warning = page.locator('.low-balance[data-token-type="general"]')
    assert await warning.is_visible()
    assert "80% of your general tokens" in await warning.inner_text()
    assert await page.locator('[data-token-type="general"].low').count() == 1
    await page.screenshot(path=str(ARTIFACTS / "dashboard-warning.png"), full_page=True)


async def test_starter_sees_the_upgrade_call(browser: Browser, gateway: Gateway) -> None:
    page = await open_dashboard(browser, gateway, token("freeloader", "bob"))
    upgrade = page.locator("#upgrade")
    assert await upgrade.is_visible()
    assert "Upgrade to pro" in await upgrade.inner_text()


async def test_errors_in_words(browser: Browser, gateway: Gateway) -> None:
    page = await open_dashboard(browser, gateway, token(ttl_seconds=-60))
    assert "session has expired or the token is invalid" in await text(page, "#error")
    assert await page.locator("#signin").is_visible()
    page = await open_dashboard(browser, gateway, token())
    await gateway.client.server.close()  # the gateway goes down
    await page.click("#refresh")
    await page.wait_for_selector("#error:not(.hidden)")
    assert "Can't reach the gateway" in await text(page, "#error")


async def test_fits_a_phone(browser: Browser, gateway: Gateway) -> None:
    page = await open_dashboard(
        browser, gateway, token(), viewport={"width": 390, "height": 844}, is_mobile=True
    )
    overflow = await page.evaluate(
        "document.scrollingElement.scrollWidth - document.scrollingElement.clientWidth"
    )
    assert overflow <= 0
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
