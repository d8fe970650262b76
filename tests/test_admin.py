"""The operators' API: every action works, is recorded with the admin's identity, and no
organization's users can reach another organization's data through any endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules
from tests.conftest import ENVIRON, bearer
from tests.upstream import Upstream

ADMIN = {"Authorization": "Bearer the-admin-token-0123456789"}


@pytest.fixture
async def client(
    ledger: Ledger, limiter: Limiter, rules: Rules, upstream: tuple[Upstream, str]
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = build_app(
        rules,
        ledger,
        limiter,
        environ={**ENVIRON, "GATEWAY_ADMIN_TOKEN": "the-admin-token-0123456789"},
        sweeper=False,
    )
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


async def call(
    client: TestClient[web.Request, web.Application],
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    resp = await client.request(method, path, json=body, headers=headers or ADMIN)
    return resp.status, await resp.json()


async def test_admin_manages_an_organization(
    client: TestClient[web.Request, web.Application],
    ledger: Ledger,
    database_url: str,
    schema: str,
) -> None:
    status, org = await call(
        client, "POST", "/v1/admin/organizations", {"id": "acme", "plan": "pro"}
    )
    assert status == 201 and org["token_types"]["general"]["available"] == 100
    assert (await call(client, "POST", "/v1/admin/organizations", {"id": "acme", "plan": "pro"}))[
        0
    ] == 409
    status, problem = await call(
        client, "POST", "/v1/admin/organizations", {"id": "x", "plan": "gold"}
    )
    assert status == 400 and "plan 'gold' is not in rules.yaml" in problem["detail"]

    status, gift = await call(
        client,
        "POST",
        "/v1/admin/organizations/acme/grants",
        {"token_type": "forecast", "amount": 25, "reason": "apology for the outage"},
    )
    assert status == 201 and (gift["available"], gift["purchased"]) == (55, 25)
    status, _ = await call(
        client, "PUT", "/v1/admin/organizations/acme/plan", {"plan": "enterprise"}
    )
    assert status == 200
    status, lic = await call(
        client, "PUT", "/v1/admin/organizations/acme/license", {"state": "past_due"}
    )
    assert status == 200 and lic["changed"] is True
    await call(client, "PUT", "/v1/admin/organizations/acme/license", {"state": "active"})
    status, _ = await call(
        client, "PUT", "/v1/admin/organizations/acme/teams/research", {"users": ["bob"]}
    )
    assert status == 200
    status, quota = await call(
        client,
        "PUT",
        "/v1/admin/organizations/acme/quotas",
        {"team": "research", "token_type": "general", "amount": 2},
    )
    assert status == 200 and quota["subject"] == "team:research"

    # A charge made through the proxy, given back once.
    resp = await client.post("/v1/leads/generate", json={}, headers=bearer("acme", "bob"))
    await resp.read()  # settled once the answer has been read
    rid = resp.headers["X-Reservation-Id"]
    assert resp.status == 200
    status, refunded = await call(
        client, "POST", f"/v1/admin/reservations/{rid}/refund-charge", {"reason": "bad answer"}
    )
    assert status == 200 and refunded["refunded"] == 5
    status, again = await call(
        client, "POST", f"/v1/admin/reservations/{rid}/refund-charge", {"reason": "twice"}
    )
    assert status == 409 and again["reason"] == "already_refunded"
    reversals = [r for r in await ledger.journal("acme", limit=100) if r["kind"] == "reversal"]
    assert [(str(r["reservation_id"]), r["purchased_delta"]) for r in reversals] == [(rid, 5)]
    status, stats = await call(client, "GET", "/v1/admin/organizations/acme")
    leads = stats["token_types"]["lead_generation"]
    assert (leads["allowance"], leads["purchased"]) == (495, 5)

    held = await ledger.reserve("acme", "general", 1, ttl_seconds=60, user="bob")
    status, listing = await call(client, "GET", "/v1/admin/organizations/acme/reservations")
    assert [r["id"] for r in listing["reservations"]] == [str(held.reservation_id)]
    await ledger.refund(held.reservation_id, reason="test")  # type: ignore[arg-type]

    status, page = await call(client, "GET", "/v1/admin/organizations/acme/journal?limit=3")
    assert status == 200 and len(page["entries"]) == 3
    status, rest = await call(
        client,
        "GET",
        f"/v1/admin/organizations/acme/journal?limit=1000&before={page['next_before']}",
    )
    ids = [e["id"] for e in page["entries"] + rest["entries"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == len(set(ids))
    reversal = next(e for e in page["entries"] + rest["entries"] if e["kind"] == "reversal")
    assert reversal["actor"] == "admin:admin-token" and reversal["reason"] == "bad answer"
    grant_row = next(e for e in rest["entries"] if e["kind"] == "grant")
    assert grant_row["actor"] == "admin:admin-token"

    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        actions = [
            (r["actor"], r["action"])
            for r in await conn.fetch("SELECT actor, action FROM admin_actions ORDER BY id")
        ]
    finally:
        await conn.close()
    assert ("admin:admin-token", "create_organization") in actions
    assert ("admin:admin-token", "set_license") in actions
    assert ("admin:admin-token", "set_quota") in actions
    assert ("admin:admin-token", "refund_charge") in actions


async def test_an_organizations_users_cannot_reach_another_organizations_data(
    client: TestClient[web.Request, web.Application], ledger: Ledger
) -> None:
    await ledger.create_org("victim", "pro")
    await ledger.create_org("mallory-co", "pro")
    held = await ledger.reserve("victim", "general", 3, ttl_seconds=60, user="v")
    rid = str(held.reservation_id)
    mallory = bearer("mallory-co", "mallory")
    attempts = [
        ("POST", "/v1/admin/organizations", {"id": "evil", "plan": "pro"}),
        ("GET", "/v1/admin/organizations/victim", None),
        ("PUT", "/v1/admin/organizations/victim/plan", {"plan": "starter"}),
        ("PUT", "/v1/admin/organizations/victim/license", {"state": "suspended"}),
        (
            "POST",
            "/v1/admin/organizations/victim/grants",
            {"token_type": "general", "amount": -50, "reason": "x"},
        ),
        (
            "PUT",
            "/v1/admin/organizations/victim/quotas",
            {"user": "v", "token_type": "general", "amount": 0},
        ),
        ("PUT", "/v1/admin/organizations/victim/teams/t", {"users": ["v"]}),
        ("GET", "/v1/admin/organizations/victim/reservations", None),
        ("GET", "/v1/admin/organizations/victim/journal", None),
        ("POST", f"/v1/admin/reservations/{rid}/refund-charge", {"reason": "x"}),
        ("GET", "/v1/admin/rules", None),
        ("GET", "/v1/admin/explain?path=/v1/chat/x", None),
        ("GET", "/v1/tokens/stats?org=victim", None),
    ]
    for method, path, body in attempts:
        status, problem = await call(client, method, path, body, headers=mallory)
        assert status == 403, (method, path, status)
        assert problem["code"] == "admin_only"
    for action in ("commit", "refund"):
        status, problem = await call(
            client, "POST", f"/v1/tokens/reservations/{rid}/{action}", {}, headers=mallory
        )
        assert status == 404 and problem["code"] == "no_reservation"
    # Nothing of the victim's moved.
    reservation = await ledger.reservation(held.reservation_id)  # type: ignore[arg-type]
    assert reservation is not None and reservation.state == "held"
    org = await ledger.organization("victim")
    assert org is not None and (org["plan"], org["license_state"]) == ("pro", "active")
    stats = await (await client.get("/v1/tokens/stats", headers=mallory)).json()
    assert stats["organization"] == "mallory-co"
    await ledger.refund(held.reservation_id, reason="test")  # type: ignore[arg-type]
