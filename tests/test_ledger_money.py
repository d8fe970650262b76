"""Where money could leak: who may settle a reservation, plan changes while allowance is
held, and idempotency keys reused for another request. Against a real PostgreSQL; the
``ledger`` fixture audits the ledger after each test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from gateway.errors import LedgerError
from gateway.ledger import Ledger
from tests.conftest import Clock

TTL = 60.0


@pytest.fixture
async def db(ledger: Ledger, database_url: str, schema: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    yield conn
    await conn.close()


async def account(ledger: Ledger, org: str, token_type: str) -> tuple[int, int, int]:
    a = next(a for a in await ledger.balances(org) if a.token_type == token_type)
    return a.allowance, a.purchased, a.reserved


async def journal_sums(db: asyncpg.Connection, org: str, token_type: str) -> tuple[int, ...]:
    row = await db.fetchrow(
        "SELECT sum(allowance_delta), sum(purchased_delta), sum(reserved_delta),"
        " coalesce(sum(allowance_delta) FILTER (WHERE kind = 'lapse'), 0)"
        " FROM journal WHERE org_id = $1 AND token_type = $2",
        org,
        token_type,
    )
    assert row is not None
    return tuple(int(v) for v in row)


async def hold(ledger: Ledger, org: str, token_type: str, amount: int, n: int) -> list[uuid.UUID]:
    ids = []
    for _ in range(n):
        held = await ledger.reserve(org, token_type, amount, ttl_seconds=TTL)
        assert held.status == "ok" and held.reservation_id is not None
        ids.append(held.reservation_id)
    return ids


async def used(ledger: Ledger, org: str, token_type: str, amount: int) -> None:
    (rid,) = await hold(ledger, org, token_type, amount, 1)
    await ledger.commit(rid)


# -- who may settle -------------------------------------------------------------------


async def test_only_the_source_and_organization_that_reserved_may_settle(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    await ledger.create_org("other", "pro")
    proxy = await ledger.reserve("acme", "general", 3, ttl_seconds=TTL)
    assert proxy.reservation_id is not None
    rid = proxy.reservation_id
    ghost = uuid.uuid4()
    with pytest.raises(LedgerError) as unknown:
        await ledger.commit(ghost, org="acme", source="api")
    attempts = [
        ledger.commit(rid, source="api"),
        ledger.commit(rid, org="acme", source="api"),
        ledger.commit(rid, org="other"),
        ledger.refund(rid, reason="x", source="api"),
        ledger.refund(rid, reason="x", org="other", source="proxy"),
    ]
    for attempt in attempts:
        with pytest.raises(LedgerError) as exc:
            await attempt
        # Exactly the answer for an id that does not exist: nothing to tell them apart.
        assert exc.value.reason == unknown.value.reason == "not_found"
        assert str(exc.value) == str(unknown.value).replace(str(ghost), str(rid))
    assert await account(ledger, "acme", "general") == (97, 0, 3)
    reservation = await ledger.reservation(rid)
    assert reservation is not None and (reservation.state, reservation.source) == ("held", "proxy")
    settled = await ledger.commit(rid, org="acme", source="proxy")
    assert settled.charged == 3

    api = await ledger.reserve("acme", "general", 2, ttl_seconds=TTL, source="api")
    assert api.reservation_id is not None
    with pytest.raises(LedgerError) as exc:
        await ledger.refund(api.reservation_id, reason="x", org="acme", source="proxy")
    assert exc.value.reason == "not_found"
    with pytest.raises(LedgerError) as exc:
        await ledger.refund(api.reservation_id, reason="x", org="other", source="api")
    assert exc.value.reason == "not_found"
    await ledger.refund(api.reservation_id, reason="client gave up", org="acme", source="api")
    assert await account(ledger, "acme", "general") == (97, 0, 0)


# -- plan changes while allowance is held ---------------------------------------------------


async def test_downgrade_with_holds_lapses_what_the_refunds_release(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "enterprise")  # lead_generation 500
    await used(ledger, "acme", "lead_generation", 5)
    ids = await hold(ledger, "acme", "lead_generation", 50, 9)  # 450 held
    assert await account(ledger, "acme", "lead_generation") == (45, 0, 450)
    assert await ledger.set_plan("acme", "pro", actor="test")  # 50
    assert await account(ledger, "acme", "lead_generation") == (0, 0, 450)
    for rid in ids:
        await ledger.refund(rid, reason="upstream failed")
    # Pro allows 50 this period and 5 were used: 45, not 450.
    assert await account(ledger, "acme", "lead_generation") == (45, 0, 0)
    allowance, purchased, reserved, lapsed = await journal_sums(db, "acme", "lead_generation")
    assert (allowance, purchased, reserved) == (45, 0, 0)
    assert lapsed == -405
    assert await ledger.audit() == []


async def test_downgrade_with_holds_then_expiry(
    ledger: Ledger, clock: Clock, db: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "enterprise")
    for _ in range(9):
        await ledger.reserve("acme", "lead_generation", 50, ttl_seconds=10)
    await ledger.set_plan("acme", "pro")
    clock.advance(seconds=11)
    assert await ledger.expire_overdue() == 9
    assert await account(ledger, "acme", "lead_generation") == (50, 0, 0)
    assert (await journal_sums(db, "acme", "lead_generation"))[:3] == (50, 0, 0)


async def test_partial_commit_after_downgrade(ledger: Ledger, db: asyncpg.Connection) -> None:
    await ledger.create_org("acme", "enterprise")
    ids = await hold(ledger, "acme", "lead_generation", 50, 9)
    await ledger.set_plan("acme", "pro")
    settled = await ledger.commit(ids[0], charged=20)  # releases 30: it lapses
    assert settled.charged == 20
    assert await account(ledger, "acme", "lead_generation") == (0, 0, 400)
    for rid in ids[1:]:
        await ledger.refund(rid, reason="upstream failed")
    assert await account(ledger, "acme", "lead_generation") == (30, 0, 0)  # 50 - 20
    assert (await journal_sums(db, "acme", "lead_generation"))[:3] == (30, 0, 0)
    # Nothing more comes back: a full new allowance only at the next period.
    assert (await ledger.reserve("acme", "lead_generation", 31, ttl_seconds=TTL)).status == (
        "insufficient"
    )


async def test_upgrade_with_holds_gives_the_new_plan_minus_used(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")  # lead_generation 50
    await used(ledger, "acme", "lead_generation", 5)
    ids = await hold(ledger, "acme", "lead_generation", 20, 2)  # 40 held, 5 left
    await ledger.set_plan("acme", "enterprise")  # 500
    assert await account(ledger, "acme", "lead_generation") == (455, 0, 40)
    for rid in ids:
        await ledger.refund(rid, reason="upstream failed")
    assert await account(ledger, "acme", "lead_generation") == (495, 0, 0)


async def test_downgrade_then_upgrade_with_holds_still_out(ledger: Ledger) -> None:
    await ledger.create_org("acme", "enterprise")
    ids = await hold(ledger, "acme", "lead_generation", 50, 9)
    await ledger.set_plan("acme", "pro")
    await ledger.set_plan("acme", "enterprise")
    assert await account(ledger, "acme", "lead_generation") == (50, 0, 450)
    for rid in ids:
        await ledger.refund(rid, reason="upstream failed")
    assert await account(ledger, "acme", "lead_generation") == (500, 0, 0)


async def test_the_next_period_forgets_the_overdraft(ledger: Ledger, clock: Clock) -> None:
    await ledger.create_org("acme", "enterprise")
    (rid,) = await hold(ledger, "acme", "lead_generation", 450, 1)
    await ledger.set_plan("acme", "pro")
    clock.advance(days=32)
    await ledger.refund(rid, reason="late")  # last period's allowance: lapses in full
    accounts = {a.token_type: a for a in await ledger.balances("acme")}
    lead = accounts["lead_generation"]
    assert (lead.allowance, lead.allocated, lead.overdrawn, lead.reserved) == (50, 50, 0, 0)


# -- idempotency keys bound to their request --------------------------------------------------


async def test_a_key_reused_for_another_request_is_refused(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "pro")
    alice = await ledger.reserve(
        "acme",
        "lead_generation",
        5,
        ttl_seconds=TTL,
        user="alice",
        idempotency_key="k1",
        idempotency_fingerprint="alice:leads:5:abc",
    )
    assert alice.status == "ok" and alice.reservation_id is not None
    again = await ledger.reserve(
        "acme",
        "lead_generation",
        5,
        ttl_seconds=TTL,
        user="alice",
        idempotency_key="k1",
        idempotency_fingerprint="alice:leads:5:abc",
    )
    assert (again.status, again.reservation_id) == ("duplicate", alice.reservation_id)
    rows = await db.fetchval("SELECT count(*) FROM journal")
    bob = await ledger.reserve(
        "acme",
        "general",
        1,
        ttl_seconds=TTL,
        user="bob",
        idempotency_key="k1",
        idempotency_fingerprint="bob:chat:1:def",
    )
    assert (bob.status, bob.reservation_id) == ("idempotency_key_reused", None)
    assert await db.fetchval("SELECT count(*) FROM journal") == rows
    # A key without a fingerprint is bound to "no fingerprint".
    assert (
        await ledger.reserve("acme", "general", 1, ttl_seconds=TTL, idempotency_key="k1")
    ).status == "idempotency_key_reused"
    # Keys belong to an organization.
    await ledger.create_org("other", "pro")
    elsewhere = await ledger.reserve(
        "other", "general", 1, ttl_seconds=TTL, idempotency_key="k1", idempotency_fingerprint="x"
    )
    assert elsewhere.status == "ok" and elsewhere.reservation_id is not None
    await ledger.commit(alice.reservation_id)
    await ledger.commit(elsewhere.reservation_id)


async def test_concurrent_first_uses_of_a_key_make_one_reservation(
    ledger: Ledger, db: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "pro")

    async def attempt() -> tuple[str, uuid.UUID | None]:
        outcome = await ledger.reserve(
            "acme",
            "general",
            2,
            ttl_seconds=TTL,
            user="alice",
            idempotency_key="same",
            idempotency_fingerprint="alice:chat:2",
        )
        return outcome.status, outcome.reservation_id

    results = await asyncio.gather(*(attempt() for _ in range(20)))
    statuses = sorted(status for status, _ in results)
    assert statuses == ["duplicate"] * 19 + ["ok"]
    assert len({rid for _, rid in results}) == 1
    assert await db.fetchval("SELECT count(*) FROM reservations") == 1
    assert await db.fetchval("SELECT count(*) FROM journal WHERE kind = 'reserve'") == 1
    assert await account(ledger, "acme", "general") == (98, 0, 2)
