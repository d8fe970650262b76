"""The one gate (gw_gate): for each situation, ``Ledger.gate`` (write-free),
``Ledger.record_shadow`` and ``Ledger.reserve`` answer the same status, and the gate writes
nothing. Against a real PostgreSQL; the ``ledger`` fixture audits the ledger after each
test."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from gateway.ledger import Ledger
from tests.conftest import Clock

TTL = 60.0


@dataclass(frozen=True)
class Ask:
    """One question put to the gate, the shadow and the reserve alike."""

    org: str
    token_type: str
    amount: int
    user: str = "alice"
    plans: list[str] | None = None
    grace_days: int = 14
    degrade_after_days: int | None = None


Setup = Callable[[Ledger, Clock], Awaitable[Ask]]


async def spend(ledger: Ledger, org: str, token_type: str, amount: int, user: str) -> None:
    held = await ledger.reserve(org, token_type, amount, ttl_seconds=TTL, user=user)
    assert held.status == "ok" and held.reservation_id is not None
    await ledger.commit(held.reservation_id)


async def unknown_org(ledger: Ledger, clock: Clock) -> Ask:
    return Ask("ghost", "general", 1)


async def token_type_not_in_plan(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("free", "starter")
    return Ask("free", "general", 1)


async def route_closed_to_plan(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    return Ask("acme", "general", 1, plans=["enterprise"])


async def license_suspended(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_license("acme", "suspended", actor="test")
    return Ask("acme", "general", 1)


async def license_canceled(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_license("acme", "canceled", actor="test")
    return Ask("acme", "general", 1)


async def past_due_past_grace(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_license("acme", "past_due", actor="test")
    clock.advance(days=15)
    return Ask("acme", "general", 1, grace_days=14)


async def feature_degraded(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_license("acme", "past_due", actor="test")
    clock.advance(days=3)
    return Ask("acme", "general", 1, degrade_after_days=2)


async def user_quota_spent(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_quota("acme", "user:alice", "general", 5, actor="test")
    await spend(ledger, "acme", "general", 5, "alice")
    return Ask("acme", "general", 1)


async def team_quota_spent(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_team("acme", "sales", ["alice", "bob"], actor="test")
    await ledger.set_quota("acme", "team:sales", "general", 5, actor="test")
    await spend(ledger, "acme", "general", 4, "bob")
    return Ask("acme", "general", 2)


async def insufficient(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")  # general allowance 100
    return Ask("acme", "general", 101)


async def ok(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    return Ask("acme", "general", 100)


async def ok_after_period_ended(ledger: Ledger, clock: Clock) -> Ask:
    # The period ended unrefreshed: the gate judges the balance and the quota as the
    # reserve's refresh will make them (100 new allowance, nothing spent yet).
    await ledger.create_org("acme", "pro")
    await ledger.set_quota("acme", "user:alice", "general", 60, actor="test")
    await spend(ledger, "acme", "general", 60, "alice")
    clock.advance(days=32)
    return Ask("acme", "general", 60)


async def quota_spent_before_period_ended(ledger: Ledger, clock: Clock) -> Ask:
    await ledger.create_org("acme", "pro")
    await ledger.set_quota("acme", "user:alice", "general", 60, actor="test")
    await spend(ledger, "acme", "general", 60, "alice")
    clock.advance(days=32)
    return Ask("acme", "general", 61)


SITUATIONS: dict[str, tuple[Setup, str]] = {
    "unknown organization": (unknown_org, "unknown_organization"),
    "plan without the token type": (token_type_not_in_plan, "plan_forbidden"),
    "route plans exclude the plan": (route_closed_to_plan, "plan_forbidden"),
    "license suspended": (license_suspended, "license_suspended"),
    "license canceled": (license_canceled, "license_suspended"),
    "past due past grace": (past_due_past_grace, "license_suspended"),
    "feature degraded": (feature_degraded, "feature_degraded"),
    "user quota spent": (user_quota_spent, "quota_exceeded"),
    "team quota spent": (team_quota_spent, "quota_exceeded"),
    "insufficient balance": (insufficient, "insufficient"),
    "ok": (ok, "ok"),
    "ok after the period ended": (ok_after_period_ended, "ok"),
    "quota of the new period": (quota_spent_before_period_ended, "quota_exceeded"),
}


@pytest.fixture
async def db(ledger: Ledger, database_url: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    yield conn
    await conn.close()


async def state(conn: asyncpg.Connection) -> tuple[object, ...]:
    """Everything a gate might write: journal, accounts, reservations."""
    return (
        await conn.fetchval("SELECT count(*) FROM journal"),
        await conn.fetch("SELECT * FROM accounts ORDER BY org_id, token_type"),
        await conn.fetchval("SELECT count(*) FROM reservations"),
    )


@pytest.mark.parametrize("situation", list(SITUATIONS))
async def test_gate_shadow_and_reserve_agree(
    ledger: Ledger, clock: Clock, db: asyncpg.Connection, situation: str
) -> None:
    setup, expected = SITUATIONS[situation]
    ask = await setup(ledger, clock)
    grace, degrade = ask.grace_days, ask.degrade_after_days

    before = await state(db)
    gate = await ledger.gate(
        ask.org,
        ask.token_type,
        ask.amount,
        plans=ask.plans,
        user=ask.user,
        grace_days=grace,
        degrade_after_days=degrade,
    )
    assert gate.status == expected
    assert gate.reservation_id is None
    assert await state(db) == before, "the gate wrote something"

    shadow = await ledger.record_shadow(
        ask.org,
        ask.token_type,
        ask.amount,
        charged=0,
        plans=ask.plans,
        user=ask.user,
        grace_days=grace,
        degrade_after_days=degrade,
    )
    assert shadow == expected
    if expected != "unknown_organization":
        row = (await ledger.journal(ask.org, limit=1))[0]
        assert (row["kind"], row["reason"]) == (
            "shadow",
            f"shadow: the reserve would answer {shadow}",
        )

    reserved = await ledger.reserve(
        ask.org,
        ask.token_type,
        ask.amount,
        ttl_seconds=TTL,
        plans=ask.plans,
        user=ask.user,
        grace_days=grace,
        degrade_after_days=degrade,
    )
    assert reserved.status == expected
    # The gate answered the same figures the reserve judged by.
    assert (gate.plan, gate.license_date, gate.detail) == (
        reserved.plan,
        reserved.license_date,
        reserved.detail,
    )
    if expected == "ok":
        assert reserved.remaining == gate.remaining - ask.amount
        assert reserved.reservation_id is not None
        await ledger.commit(reserved.reservation_id)
    else:
        assert reserved.reservation_id is None


async def test_gate_reports_the_quota_that_refuses(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    await ledger.set_quota("acme", "user:alice", "general", 5, actor="test")
    await spend(ledger, "acme", "general", 3, "alice")
    gate = await ledger.gate("acme", "general", 3, user="alice")
    assert gate.status == "quota_exceeded"
    assert gate.detail is not None
    assert json.loads(gate.detail) == {"subject": "user:alice", "quota": 5, "spent": 3}
    assert (gate.allowance, gate.allocated) == (97, 100)


async def test_gate_judges_an_account_not_created_yet_without_creating_it(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "daily")  # general 10 a day, nothing else
    # The plan gains a token type: the organization's account of it does not exist yet.
    await db.execute(
        "INSERT INTO plan_allowances (plan, token_type, amount) VALUES ('daily', 'forecast', 7)"
    )
    before = await state(db)
    fits = await ledger.gate("acme", "forecast", 7)
    assert (fits.status, fits.allowance, fits.allocated) == ("ok", 7, 7)
    assert (await ledger.gate("acme", "forecast", 8)).status == "insufficient"
    assert await state(db) == before
    assert (await ledger.reserve("acme", "forecast", 8, ttl_seconds=TTL)).status == "insufficient"
    held = await ledger.reserve("acme", "forecast", 7, ttl_seconds=TTL)
    assert held.status == "ok" and held.reservation_id is not None
    await ledger.refund(held.reservation_id, reason="test")
