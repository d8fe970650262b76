"""Stripe webhooks at their edges (issue 10): a pack bought for another organization than
its customer's, a pack for an organization not created yet, plan and license events
ordered separately, refunds and disputes of packs, and signed but malformed events."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import parse_rules
from tests.conftest import ENVIRON, rules_yaml
from tests.test_billing import BILLING, SECRET, event
from tests.upstream import Upstream

Client = TestClient[web.Request, web.Application]
LEADS = "lead_generation"


@pytest.fixture
async def client(
    ledger: Ledger, limiter: Limiter, upstream: tuple[Upstream, str]
) -> AsyncIterator[Client]:
    """Two organizations on a plan without allowance, so every token is a purchased one."""
    rules = parse_rules((rules_yaml(upstream[1]) + BILLING).encode())
    await ledger.create_org("acme", "starter")
    await ledger.create_org("beta", "starter")
    app = build_app(
        rules, ledger, limiter, environ={**ENVIRON, "STRIPE_WEBHOOK_SECRET": SECRET}, sweeper=False
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


@pytest.fixture
async def db(database_url: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to this test's schema, to look at what the ledger recorded."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    yield conn
    await conn.close()


async def deliver(client: Client, body: dict[str, Any] | bytes) -> tuple[int, str, dict[str, Any]]:
    """Sign ``body`` as Stripe would and post it: (status, content type, JSON answer)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    t = int(time.time())
    mac = hmac.new(SECRET.encode(), f"{t}.".encode() + raw, hashlib.sha256).hexdigest()
    resp = await client.post(
        "/v1/billing/stripe/webhook", data=raw, headers={"Stripe-Signature": f"t={t},v1={mac}"}
    )
    return resp.status, resp.content_type, await resp.json(content_type=None)


def checkout(
    event_id: str,
    org: str,
    customer: str,
    *,
    payment_intent: str | None = None,
    amount_total: int | None = None,
) -> dict[str, Any]:
    session: dict[str, Any] = {
        "object": "checkout.session",
        "id": f"cs_{event_id}",
        "customer": customer,
        "payment_status": "paid",
        "metadata": {"organization": org, "pack": "leads_100"},
    }
    if payment_intent is not None:
        session["payment_intent"] = payment_intent
    if amount_total is not None:
        session["amount_total"] = amount_total
    return event(event_id, "checkout.session.completed", session)


def refund(event_id: str, *, refunded: int, amount: int = 1000) -> dict[str, Any]:
    charge = {
        "object": "charge",
        "id": "ch_1",
        "payment_intent": "pi_1",
        "amount": amount,
        "amount_refunded": refunded,
        "refunded": refunded == amount,
    }
    return event(event_id, "charge.refunded", charge)


def dispute(
    event_id: str,
    *,
    amount: int = 1000,
    kind: str = "created",
    status: str = "needs_response",
    dispute_id: str = "dp_1",
) -> dict[str, Any]:
    obj = {"object": "dispute", "id": dispute_id, "charge": "ch_1", "payment_intent": "pi_1"}
    return event(event_id, f"charge.dispute.{kind}", {**obj, "amount": amount, "status": status})


async def purchased(ledger: Ledger, org: str) -> int:
    return next((a.purchased for a in await ledger.balances(org) if a.token_type == LEADS), 0)


async def spend(ledger: Ledger, org: str, amount: int) -> None:
    held = await ledger.reserve(org, LEADS, amount, ttl_seconds=60)
    assert held.status == "ok" and held.reservation_id is not None
    await ledger.commit(held.reservation_id)


# -- (a) the organization in a pack's metadata is the one credited ----------------------


async def test_a_pack_for_another_organization_credits_it_and_leaves_the_customer_bound(
    client: Client, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """The customer paid for acme first; the same customer then buys a pack that the
    gateway's checkout made out to beta. beta is credited once, acme keeps its customer."""
    status, _, answer = await deliver(client, checkout("evt_a1", "acme", "cus_acme"))
    assert (status, answer["outcome"]) == (200, "ok")
    with caplog.at_level(logging.WARNING, logger="gateway.billing"):
        status, _, answer = await deliver(client, checkout("evt_a2", "beta", "cus_acme"))
    assert (status, answer["outcome"]) == (200, "ok")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'beta'" in warning and "'acme'" in warning and "cus_acme" in warning
    for _ in range(2):
        status, _, answer = await deliver(client, checkout("evt_a2", "beta", "cus_acme"))
        assert (status, answer["outcome"]) == (200, "duplicate")
    assert (await purchased(ledger, "acme"), await purchased(ledger, "beta")) == (100, 100)
    acme, beta = await ledger.organization("acme"), await ledger.organization("beta")
    assert acme is not None and acme["stripe_customer"] == "cus_acme"
    assert beta is not None and beta["stripe_customer"] is None
    # Events naming only the customer still go to the organization it is bound to.
    failed = event("evt_a3", "invoice.payment_failed", {"customer": "cus_acme"})
    assert (await deliver(client, failed))[2]["outcome"] == "ok"
    acme, beta = await ledger.organization("acme"), await ledger.organization("beta")
    assert acme is not None and acme["license_state"] == "past_due"
    assert beta is not None and beta["license_state"] == "active"


# -- (b) a pack for an organization that does not exist yet ------------------------------


async def test_a_pack_for_an_organization_not_created_yet_is_refused_until_it_exists(
    client: Client, ledger: Ledger, db: asyncpg.Connection
) -> None:
    paid = checkout("evt_b1", "newco", "cus_newco", payment_intent="pi_b", amount_total=900)
    status, content_type, problem = await deliver(client, paid)
    assert (status, content_type, problem["code"]) == (
        403,
        "application/problem+json",
        "unknown_organization",
    )
    assert "organization 'newco' does not exist" in problem["detail"]
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 0
    assert await db.fetchval("SELECT count(*) FROM stripe_payments") == 0

    await ledger.create_org("newco", "starter")
    status, _, answer = await deliver(client, paid)  # Stripe's retry
    assert (status, answer["outcome"]) == (200, "ok")
    assert await purchased(ledger, "newco") == 100
    status, _, answer = await deliver(client, paid)
    assert (status, answer["outcome"]) == (200, "duplicate")
    assert await purchased(ledger, "newco") == 100
    assert [r["kind"] for r in await ledger.journal("newco", limit=10)] == ["purchase"]
    newco = await ledger.organization("newco")
    assert newco is not None and newco["stripe_customer"] == "cus_newco"


async def test_a_pack_without_organization_or_known_customer_is_refused(
    client: Client, ledger: Ledger, db: asyncpg.Connection
) -> None:
    session = {
        "customer": "cus_nobody",
        "payment_status": "paid",
        "metadata": {"pack": "leads_100"},
    }
    status, _, problem = await deliver(
        client, event("evt_b2", "checkout.session.completed", session)
    )
    assert (status, problem["code"]) == (403, "unknown_organization")
    assert "customer cus_nobody" in problem["detail"]
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 0


# -- (c) plan and license events are ordered separately ----------------------------------


async def test_a_subscription_change_is_not_stale_behind_a_later_invoice(
    client: Client, ledger: Ledger
) -> None:
    now = int(time.time())
    invoice = {"object": "invoice", "customer": "cus_acme", "metadata": {"organization": "acme"}}
    paid = event("evt_c_paid", "invoice.paid", invoice, created=now)
    assert (await deliver(client, paid))[2]["outcome"] == "ok"
    sub = {
        "object": "subscription",
        "customer": "cus_acme",
        "metadata": {"organization": "acme"},
        "items": {"data": [{"price": {"id": "price_ent_monthly"}}]},
    }
    # Created before the invoice was paid, delivered after it: a different kind of event.
    updated = event("evt_c_up", "customer.subscription.updated", sub, created=now - 30)
    assert (await deliver(client, updated))[2]["outcome"] == "ok"
    org = await ledger.organization("acme")
    assert org is not None and org["plan"] == "enterprise"
    # Each kind is still ordered among its own events.
    older = {**sub, "items": {"data": [{"price": {"id": "price_pro_monthly"}}]}}
    late_sub = event("evt_c_old_up", "customer.subscription.updated", older, created=now - 60)
    assert (await deliver(client, late_sub))[2]["outcome"] == "stale"
    late_fail = event("evt_c_old_fail", "invoice.payment_failed", invoice, created=now - 10)
    assert (await deliver(client, late_fail))[2]["outcome"] == "stale"
    org = await ledger.organization("acme")
    assert org is not None and (org["plan"], org["license_state"]) == ("enterprise", "active")


# -- (d) refunds and disputes of a pack -------------------------------------------------


async def test_a_refunded_pack_loses_what_is_left_of_its_tokens(
    client: Client, ledger: Ledger, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    paid = checkout("evt_d1", "acme", "cus_acme", payment_intent="pi_1", amount_total=1000)
    assert (await deliver(client, paid))[2]["outcome"] == "ok"
    await spend(ledger, "acme", 30)
    assert await purchased(ledger, "acme") == 70

    # A quarter refunded: a quarter of the pack goes back.
    status, _, answer = await deliver(client, refund("evt_d2", refunded=250))
    assert (status, answer["outcome"]) == (200, "ok")
    assert await purchased(ledger, "acme") == 45
    assert (await deliver(client, refund("evt_d2", refunded=250)))[2]["outcome"] == "duplicate"
    assert await purchased(ledger, "acme") == 45

    # The rest refunded: 75 more are due, 45 are left, 30 were spent.
    with caplog.at_level(logging.WARNING, logger="gateway.billing"):
        status, _, answer = await deliver(client, refund("evt_d3", refunded=1000))
    assert (status, answer["outcome"]) == (200, "shortfall")
    assert await purchased(ledger, "acme") == 0
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "'acme'" in warning and "30" in warning and "ch_1" in warning

    # A dispute of the same charge takes nothing more.
    assert (await deliver(client, dispute("evt_d4")))[2]["outcome"] == "unchanged"
    assert await purchased(ledger, "acme") == 0

    adjustments = [r for r in await ledger.journal("acme", limit=20) if r["kind"] == "adjust"]
    assert [r["purchased_delta"] for r in adjustments] == [-45, -25]
    assert all("ch_1" in r["reason"] and r["actor"] == "stripe" for r in adjustments)
    clawbacks = await db.fetch(
        "SELECT event_id, clawed_back, unbilled FROM stripe_clawbacks ORDER BY id"
    )
    assert [tuple(r) for r in clawbacks] == [("evt_d2", 25, 0), ("evt_d3", 45, 30)]
    payment = await db.fetchrow("SELECT * FROM stripe_payments WHERE payment_intent = 'pi_1'")
    assert payment is not None
    assert (payment["charge"], payment["clawed_back"], payment["unbilled"]) == ("ch_1", 70, 30)
    owed = await ledger.unbilled("acme")
    assert [(r["payment_intent"], r["unbilled"]) for r in owed["stripe"]] == [("pi_1", 30)]


async def test_a_dispute_then_a_refund_takes_the_pack_back_once(
    client: Client, ledger: Ledger
) -> None:
    paid = checkout("evt_d5", "acme", "cus_acme", payment_intent="pi_1", amount_total=1000)
    assert (await deliver(client, paid))[2]["outcome"] == "ok"
    assert (await deliver(client, dispute("evt_d6", amount=1)))[2]["outcome"] == "ok"
    assert await purchased(ledger, "acme") == 99  # a thousandth of the pack, rounded up
    assert (await deliver(client, dispute("evt_d7")))[2]["outcome"] == "ok"
    assert await purchased(ledger, "acme") == 0
    assert (await deliver(client, refund("evt_d8", refunded=1000)))[2]["outcome"] == "unchanged"
    assert await purchased(ledger, "acme") == 0


async def test_a_dispute_won_gives_the_pack_back_and_forgives_what_was_unbilled(
    client: Client, ledger: Ledger, db: asyncpg.Connection
) -> None:
    paid = checkout("evt_w1", "acme", "cus_acme", payment_intent="pi_1", amount_total=1000)
    assert (await deliver(client, paid))[2]["outcome"] == "ok"
    await spend(ledger, "acme", 30)
    assert (await deliver(client, dispute("evt_w2")))[2]["outcome"] == "shortfall"
    assert await purchased(ledger, "acme") == 0  # 70 taken back, 30 unbilled
    won = dispute("evt_w3", kind="closed", status="won")
    assert (await deliver(client, won))[2]["outcome"] == "restored"
    assert await purchased(ledger, "acme") == 70  # the 30 spent are forgiven, not re-credited
    assert (await deliver(client, won))[2]["outcome"] == "duplicate"
    reinstated = dispute("evt_w4", kind="funds_reinstated", status="won")
    assert (await deliver(client, reinstated))[2]["outcome"] == "unchanged"
    assert await purchased(ledger, "acme") == 70
    adjustments = [r for r in await ledger.journal("acme", limit=20) if r["kind"] == "adjust"]
    assert [r["purchased_delta"] for r in reversed(adjustments)] == [-70, 70]
    payment = await db.fetchrow("SELECT * FROM stripe_payments WHERE payment_intent = 'pi_1'")
    assert payment is not None
    assert (payment["disputed"], payment["clawed_back"], payment["unbilled"]) == (0, 0, 0)


async def test_a_dispute_won_before_it_is_seen_opened_takes_nothing(
    client: Client, ledger: Ledger
) -> None:
    paid = checkout("evt_w5", "acme", "cus_acme", payment_intent="pi_1", amount_total=1000)
    assert (await deliver(client, paid))[2]["outcome"] == "ok"
    won = dispute("evt_w6", kind="closed", status="won")
    assert (await deliver(client, won))[2]["outcome"] == "unchanged"
    assert (await deliver(client, dispute("evt_w7")))[2]["outcome"] == "unchanged"
    assert await purchased(ledger, "acme") == 100
    # A second dispute of the same charge, lost, takes its share.
    lost = dispute("evt_w8", amount=500, kind="closed", status="lost", dispute_id="dp_2")
    assert (await deliver(client, lost))[2]["outcome"] == "ok"
    assert await purchased(ledger, "acme") == 50


async def test_a_refund_seen_before_its_pack_takes_it_back_when_it_is_credited(
    client: Client, ledger: Ledger
) -> None:
    """The pack's event was refused (its organization did not exist yet) while the refund
    arrived: the pack is credited and taken back as soon as the retry applies it."""
    assert (await deliver(client, refund("evt_d9", refunded=500)))[2]["outcome"] == (
        "unknown_payment"
    )
    paid = checkout("evt_d10", "acme", "cus_acme", payment_intent="pi_1", amount_total=1000)
    assert (await deliver(client, paid))[2]["outcome"] == "ok"
    assert await purchased(ledger, "acme") == 50
    other = event(
        "evt_d11",
        "charge.refunded",
        {"id": "ch_sub", "payment_intent": "pi_sub", "amount": 2000, "amount_refunded": 2000},
    )
    assert (await deliver(client, other))[2]["outcome"] == "unknown_payment"
    assert await purchased(ledger, "acme") == 50


async def test_concurrent_deliveries_credit_once_and_a_racing_refund_still_counts(
    client: Client, ledger: Ledger
) -> None:
    paid = checkout("evt_d12", "acme", "cus_acme", payment_intent="pi_1", amount_total=1000)
    answers = await asyncio.gather(
        *(deliver(client, paid) for _ in range(5)), deliver(client, refund("evt_d13", refunded=500))
    )
    outcomes = sorted(answer["outcome"] for _, _, answer in answers[:5])
    assert outcomes == ["duplicate"] * 4 + ["ok"]
    assert answers[5][2]["outcome"] in ("ok", "unknown_payment")  # before or after the pack
    assert await purchased(ledger, "acme") == 50


# -- (e) signed but malformed events ------------------------------------------------------

NOW = int(time.time())
MALFORMED: list[tuple[str, Any, str]] = [
    (
        "not JSON",
        b"{not json",
        "Stripe event: the body is not JSON ("
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    ),
    ("not an object", b"[1, 2]", "Stripe event: the body must be an object, not an array"),
    (
        "no data.object",
        {"id": "evt_e", "type": "invoice.paid", "created": NOW, "data": {}},
        "Stripe event: data.object: must be an object, not null",
    ),
    (
        "created not an int",
        {**event("evt_e", "invoice.paid", {}), "created": "yesterday"},
        "Stripe event: created: must be a non-negative integer, not 'yesterday'",
    ),
    (
        "no type",
        {"id": "evt_e", "created": NOW, "data": {"object": {}}},
        "Stripe event: type: must be a non-empty string, not null",
    ),
    (
        "metadata not an object",
        checkout("evt_e", "acme", "cus_acme") | {"data": {"object": {"metadata": ["acme"]}}},
        "Stripe event evt_e (checkout.session.completed): "
        "data.object.metadata: must be an object, not an array",
    ),
    (
        "negative amount",
        event("evt_e", "charge.refunded", {"id": "ch_1", "amount": -5, "amount_refunded": 0}),
        "Stripe event evt_e (charge.refunded): "
        "data.object.amount: must be a non-negative integer, not -5",
    ),
    (
        "refunded over the amount",
        refund("evt_e", refunded=1500),
        "Stripe event evt_e (charge.refunded): "
        "data.object.amount_refunded: 1500 is over amount 1000",
    ),
    (
        "dispute amount a string",
        event("evt_e", "charge.dispute.created", {"charge": "ch_1", "amount": "10.00"}),
        "Stripe event evt_e (charge.dispute.created): "
        "data.object.amount: must be a non-negative integer, not '10.00'",
    ),
    (
        "subscription items not an array",
        event("evt_e", "customer.subscription.updated", {"items": {"data": {"price": "x"}}}),
        "Stripe event evt_e (customer.subscription.updated): "
        "data.object.items.data: must be an array, not an object",
    ),
    (
        "customer not a string",
        event("evt_e", "invoice.paid", {"customer": 42}),
        "Stripe event evt_e (invoice.paid): "
        "data.object.customer: must be a non-empty string, not 42",
    ),
]


@pytest.mark.parametrize(
    ("body", "detail"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
async def test_a_signed_but_malformed_event_is_refused_with_400(
    client: Client, ledger: Ledger, db: asyncpg.Connection, body: Any, detail: str
) -> None:
    status, content_type, problem = await deliver(client, body)
    assert (status, content_type, problem["code"]) == (
        400,
        "application/problem+json",
        "invalid_request",
    )
    assert problem["detail"] == detail
    assert await db.fetchval("SELECT count(*) FROM stripe_events") == 0
    assert await purchased(ledger, "acme") == 0
