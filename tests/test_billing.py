"""Stripe webhooks through the official SDK's verification: signed events credit packs,
move licenses and plans exactly once, whatever order or how often they arrive."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import parse_rules
from tests.conftest import ENVIRON, rules_yaml
from tests.upstream import Upstream

SECRET = "whsec_test_0123456789abcdef"
BILLING = """
license:
  grace_period_days: 14
  degradation_order:
    - {after_days: 0, token_types: [lead_generation]}
billing:
  packs:
    leads_100: {price_id: price_leads_100, token_type: lead_generation, amount: 100}
  plan_prices: {pro: price_pro_monthly, enterprise: price_ent_monthly}
"""


def signed(
    event: dict[str, Any], *, secret: str = SECRET, at: int | None = None
) -> tuple[bytes, str]:
    """The body and Stripe-Signature header Stripe would send."""
    body = json.dumps(event).encode()
    t = at if at is not None else int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return body, f"t={t},v1={mac}"


def event(
    event_id: str, kind: str, obj: dict[str, Any], created: int | None = None
) -> dict[str, Any]:
    return {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created": created or int(time.time()),
        "data": {"object": obj},
    }


@pytest.fixture
async def client(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str]
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    rules = parse_rules((rules_yaml(upstream[1]) + BILLING).encode())
    await ledger.create_org("acme", "pro")
    app = build_app(
        rules, ledger, limiter, environ={**ENVIRON, "STRIPE_WEBHOOK_SECRET": SECRET}, sweeper=False
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


async def post(
    client: TestClient[web.Request, web.Application], body: bytes, signature: str
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(
        "/v1/billing/stripe/webhook", data=body, headers={"Stripe-Signature": signature}
    )
    return resp.status, await resp.json()


async def purchased(ledger: Ledger, token_type: str) -> int:
    return next(a.purchased for a in await ledger.balances("acme") if a.token_type == token_type)


async def test_a_paid_checkout_credits_its_pack_once(
    client: TestClient[web.Request, web.Application], ledger: Ledger
) -> None:
    completed = event(
        "evt_checkout_1",
        "checkout.session.completed",
        {
            "object": "checkout.session",
            "id": "cs_1",
            "customer": "cus_acme",
            "payment_status": "paid",
            "metadata": {"organization": "acme", "pack": "leads_100"},
        },
    )
    status, body = await post(client, *signed(completed))
    assert (status, body["outcome"]) == (200, "ok")
    assert await purchased(ledger, "lead_generation") == 100
    for _ in range(3):  # Stripe retries
        status, body = await post(client, *signed(completed))
        assert (status, body["outcome"]) == (200, "duplicate")
    assert await purchased(ledger, "lead_generation") == 100
    journal = await ledger.journal("acme", limit=1)
    assert journal[0]["kind"] == "purchase" and journal[0]["actor"] == "stripe"
    org = await ledger.organization("acme")
    assert org is not None and org["stripe_customer"] == "cus_acme"


async def test_bad_or_stale_signatures_change_nothing(
    client: TestClient[web.Request, web.Application], ledger: Ledger
) -> None:
    completed = event(
        "evt_forged",
        "checkout.session.completed",
        {"payment_status": "paid", "metadata": {"organization": "acme", "pack": "leads_100"}},
    )
    body, _ = signed(completed)
    for signature in (
        signed(completed, secret="whsec_wrong")[1],
        signed(completed, at=int(time.time()) - 3600)[1],  # replayed an hour later
        "t=1,v1=deadbeef",
        "",
    ):
        status, problem = await post(client, body, signature)
        assert status == 400 and problem["code"] == "invalid_signature"
    assert await purchased(ledger, "lead_generation") == 0


async def test_payment_failure_grace_and_restore_in_any_order(
    client: TestClient[web.Request, web.Application], ledger: Ledger
) -> None:
    await ledger.create_org("other", "pro")
    link = event(
        "evt_link",
        "checkout.session.completed",
        {
            "customer": "cus_acme",
            "payment_status": "paid",
            "metadata": {"organization": "acme", "pack": "leads_100"},
        },
    )
    await post(client, *signed(link))
    now = int(time.time())
    invoice = {"object": "invoice", "customer": "cus_acme"}
    failed = event("evt_fail", "invoice.payment_failed", invoice, created=now - 60)
    status, body = await post(client, *signed(failed))
    assert (status, body["outcome"]) == (200, "ok")
    org = await ledger.organization("acme")
    assert org is not None and org["license_state"] == "past_due"
    paid = event("evt_paid", "invoice.paid", invoice, created=now)
    assert (await post(client, *signed(paid)))[1]["outcome"] == "ok"
    # An older failure delivered late does not undo the payment.
    late = event("evt_fail_old", "invoice.payment_failed", invoice, created=now - 120)
    assert (await post(client, *signed(late)))[1]["outcome"] == "stale"
    org = await ledger.organization("acme")
    assert org is not None and org["license_state"] == "active"
    other = await ledger.organization("other")
    assert other is not None and other["license_state"] == "active"


async def test_subscription_changes_and_cancellation(
    client: TestClient[web.Request, web.Application], ledger: Ledger
) -> None:
    now = int(time.time())
    sub = {
        "object": "subscription",
        "customer": "cus_acme",
        "metadata": {"organization": "acme"},
        "items": {"data": [{"price": {"id": "price_ent_monthly"}}]},
    }
    updated = event("evt_sub_up", "customer.subscription.updated", sub, created=now - 10)
    assert (await post(client, *signed(updated)))[1]["outcome"] == "ok"
    org = await ledger.organization("acme")
    assert org is not None and org["plan"] == "enterprise"
    deleted = event("evt_sub_del", "customer.subscription.deleted", sub, created=now)
    assert (await post(client, *signed(deleted)))[1]["outcome"] == "ok"
    org = await ledger.organization("acme")
    assert org is not None and (org["plan"], org["license_state"]) == ("starter", "canceled")
    ignored = event("evt_other", "customer.created", {"id": "cus_x"})
    status, body = await post(client, *signed(ignored))
    assert (status, body["handled"]) == (200, False)
    unknown_org = event("evt_nobody", "invoice.paid", {"customer": "cus_nobody"}, created=now + 5)
    assert (await post(client, *signed(unknown_org)))[1]["outcome"] == "unknown_organization"


async def test_checkout_through_the_official_sdk_then_the_webhook_credits_the_pack(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str]
) -> None:
    """The SDK talks to a local server playing Stripe's API; the webhook that Stripe would
    send when the customer pays then credits the pack named in the session's metadata."""
    seen: list[tuple[str, dict[str, str]]] = []

    async def sessions(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer sk_test_local"
        form = dict(await request.post())
        seen.append((request.path, {k: str(v) for k, v in form.items()}))
        return web.json_response(
            {
                "id": "cs_test_42",
                "object": "checkout.session",
                "url": "https://checkout.stripe.com/c/pay/cs_test_42",
                "metadata": {
                    "organization": form["metadata[organization]"],
                    "pack": form["metadata[pack]"],
                },
            }
        )

    fake = web.Application()
    fake.router.add_post("/v1/checkout/sessions", sessions)
    stripe_server = TestServer(fake, host="127.0.0.1")
    await stripe_server.start_server()
    api_base = str(stripe_server.make_url("")).rstrip("/")
    rules = parse_rules(
        (rules_yaml(upstream[1]) + BILLING + f"  api_base: '{api_base}'\n").encode()
    )
    await ledger.create_org("acme", "pro")
    env = {**ENVIRON, "STRIPE_WEBHOOK_SECRET": SECRET, "STRIPE_API_KEY": "sk_test_local"}
    app = build_app(rules, ledger, limiter, environ=env, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        from tests.conftest import bearer

        resp = await client.post(
            "/v1/billing/checkout", json={"pack": "leads_100"}, headers=bearer("acme", "alice")
        )
        assert resp.status == 201
        assert (await resp.json())["url"] == "https://checkout.stripe.com/c/pay/cs_test_42"
        _, form = seen[0]
        assert form["line_items[0][price]"] == "price_leads_100"
        assert form["metadata[organization]"] == "acme" and form["mode"] == "payment"
        stats = await (await client.get("/v1/tokens/stats", headers=bearer())).json()
        assert stats["billing"]["checkout"] is True
        unknown = await client.post("/v1/billing/checkout", json={"pack": "gold"}, headers=bearer())
        assert unknown.status == 400 and "unknown pack 'gold'" in (await unknown.json())["detail"]
        # The customer pays; Stripe tells the gateway.
        paid = event(
            "evt_cs_42",
            "checkout.session.completed",
            {
                "id": "cs_test_42",
                "customer": "cus_42",
                "payment_status": "paid",
                "metadata": {"organization": "acme", "pack": "leads_100"},
            },
        )
        status, body = await post(client, *signed(paid))
        assert (status, body["outcome"]) == (200, "ok")
        assert await purchased(ledger, "lead_generation") == 100
    finally:
        await client.close()
        await stripe_server.close()


async def test_checkout_without_billing_configured(
    client: TestClient[web.Request, web.Application],
) -> None:
    from tests.conftest import bearer

    resp = await client.post("/v1/billing/checkout", json={"pack": "leads_100"}, headers=bearer())
    assert resp.status == 404 and (await resp.json())["code"] == "billing_not_configured"
