"""The ledger against a real PostgreSQL: two-phase reservations, periods, the journal and
the audit. The ``ledger`` fixture audits every invariant after each test."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from importlib import resources

import asyncpg
import pytest

from gateway.errors import LedgerError, LedgerUnavailable
from gateway.ledger import FUNCTION_FILES, Ledger
from tests.conftest import Clock

TTL = 60.0


async def account(ledger: Ledger, org: str, token_type: str) -> tuple[int, int, int]:
    a = next(a for a in await ledger.balances(org) if a.token_type == token_type)
    return a.allowance, a.purchased, a.reserved


async def test_reserve_takes_allowance_first_then_purchased(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")  # lead_generation allowance 50
    await ledger.grant("acme", "lead_generation", 10, reason="pack")
    first = await ledger.reserve("acme", "lead_generation", 48, ttl_seconds=TTL)
    assert (first.from_allowance, first.from_purchased) == (48, 0)
    second = await ledger.reserve("acme", "lead_generation", 5, ttl_seconds=TTL)
    assert (second.from_allowance, second.from_purchased) == (2, 3)
    assert await account(ledger, "acme", "lead_generation") == (0, 7, 53)
    assert second.remaining == 7
    await ledger.commit(first.reservation_id)  # type: ignore[arg-type]
    await ledger.refund(second.reservation_id, reason="upstream failed")  # type: ignore[arg-type]
    assert await account(ledger, "acme", "lead_generation") == (2, 10, 0)


async def test_commit_for_less_releases_the_rest_allowance_charged_first(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")  # forecast allowance 30
    await ledger.grant("acme", "forecast", 10)
    held = await ledger.reserve("acme", "forecast", 35, ttl_seconds=TTL)  # 30 + 5
    assert held.reservation_id is not None
    settled = await ledger.commit(held.reservation_id, charged=32)
    # Charged 30 from allowance and 2 from purchased; 3 purchased released.
    assert settled.charged == 32
    assert await account(ledger, "acme", "forecast") == (0, 8, 0)
    reservation = await ledger.reservation(held.reservation_id)
    assert reservation is not None and reservation.state == "committed"
    assert reservation.charged == 32


async def test_each_reservation_resolves_exactly_once(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    held = await ledger.reserve("acme", "general", 3, ttl_seconds=TTL)
    rid = held.reservation_id
    assert rid is not None
    with pytest.raises(LedgerError) as exc:
        await ledger.commit(rid, charged=4)
    assert exc.value.reason == "exceeds_amount"
    with pytest.raises(LedgerError) as exc:
        await ledger.commit(rid, charged=-1)
    assert exc.value.reason == "exceeds_amount"
    await ledger.commit(rid, charged=3)
    with pytest.raises(LedgerError) as exc:
        await ledger.commit(rid)
    assert exc.value.reason == "already_committed"
    with pytest.raises(LedgerError) as exc:
        await ledger.refund(rid, reason="late")
    assert exc.value.reason == "already_committed"
    with pytest.raises(LedgerError) as exc:
        await ledger.refund(uuid.uuid4(), reason="unknown")
    assert exc.value.reason == "not_found"
    assert await account(ledger, "acme", "general") == (97, 0, 0)


async def test_concurrent_settlements_of_one_reservation_apply_once(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    held = await ledger.reserve("acme", "general", 10, ttl_seconds=TTL)
    rid = held.reservation_id
    assert rid is not None

    async def attempt(i: int) -> str:
        try:
            if i % 2:
                await ledger.commit(rid)
            else:
                await ledger.refund(rid, reason="race")
            return "ok"
        except LedgerError as exc:
            return exc.reason

    results = await asyncio.gather(*(attempt(i) for i in range(40)))
    assert results.count("ok") == 1
    allowance, _, reserved = await account(ledger, "acme", "general")
    assert reserved == 0 and allowance in (90, 100)


async def test_idempotency_key_returns_the_same_reservation(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    a = await ledger.reserve("acme", "general", 2, ttl_seconds=TTL, idempotency_key="k1")
    b = await ledger.reserve("acme", "general", 2, ttl_seconds=TTL, idempotency_key="k1")
    assert a.status == "ok" and b.status == "duplicate"
    assert a.reservation_id == b.reservation_id
    assert await account(ledger, "acme", "general") == (98, 0, 2)
    await ledger.commit(a.reservation_id)  # type: ignore[arg-type]


async def test_refusals_write_nothing(ledger: Ledger) -> None:
    await ledger.create_org("free", "starter")
    refused = await ledger.reserve("free", "general", 1, ttl_seconds=TTL)
    assert refused.status == "plan_forbidden" and refused.plan == "starter"
    unknown = await ledger.reserve("ghost", "general", 1, ttl_seconds=TTL)
    assert unknown.status == "unknown_organization"
    await ledger.create_org("acme", "pro")
    before = await ledger.journal("acme")
    short = await ledger.reserve("acme", "general", 101, ttl_seconds=TTL)
    assert short.status == "insufficient" and short.remaining == 100
    assert await ledger.journal("acme") == before
    assert await ledger.journal("free") == []


async def test_monthly_refresh_lapses_allowance_and_keeps_purchased(
    ledger: Ledger, clock: Clock
) -> None:
    await ledger.create_org("acme", "pro")
    await ledger.grant("acme", "general", 7)
    held = await ledger.reserve("acme", "general", 40, ttl_seconds=TTL)
    await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    assert await account(ledger, "acme", "general") == (60, 7, 0)
    clock.advance(days=32)
    after = await ledger.reserve("acme", "general", 1, ttl_seconds=TTL)
    assert after.status == "ok" and after.remaining == 100 - 1 + 7
    kinds = [r["kind"] for r in reversed(await ledger.journal("acme"))]
    assert kinds[-3:] == ["lapse", "refresh", "reserve"]
    lapse = next(r for r in await ledger.journal("acme") if r["kind"] == "lapse")
    assert lapse["allowance_delta"] == -60
    await ledger.commit(after.reservation_id)  # type: ignore[arg-type]


async def test_refund_across_a_period_boundary_lapses_the_old_allowance(
    ledger: Ledger, clock: Clock
) -> None:
    await ledger.create_org("acme", "pro")
    held = await ledger.reserve("acme", "general", 30, ttl_seconds=TTL)
    clock.advance(days=32)
    await ledger.refresh_overdue()
    assert await account(ledger, "acme", "general") == (100, 0, 30)
    await ledger.refund(held.reservation_id, reason="late failure")  # type: ignore[arg-type]
    # The 30 came from last period's allowance, which has ended: they lapse, not return.
    assert await account(ledger, "acme", "general") == (100, 0, 0)
    kinds = [r["kind"] for r in reversed(await ledger.journal("acme"))]
    assert kinds[-2:] == ["refund", "lapse"]


async def test_sweeper_refreshes_idle_accounts(ledger: Ledger, clock: Clock) -> None:
    await ledger.create_org("idle", "daily")
    held = await ledger.reserve("idle", "general", 4, ttl_seconds=TTL)
    await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    clock.advance(days=1, seconds=1)
    assert await ledger.refresh_overdue() == 1
    assert await ledger.refresh_overdue() == 0
    assert await account(ledger, "idle", "general") == (10, 0, 0)


@pytest.mark.parametrize(
    ("anchor", "now", "start", "end"),
    [
        ("2026-01-31", "2026-02-27", "2026-01-31", "2026-02-28"),
        ("2026-01-31", "2026-02-28", "2026-02-28", "2026-03-31"),
        ("2026-01-31", "2026-03-31", "2026-03-31", "2026-04-30"),
        ("2026-03-15", "2026-11-21", "2026-11-15", "2026-12-15"),
        ("2025-12-01", "2026-12-01", "2026-12-01", "2027-01-01"),
        ("2026-05-10", "2026-05-09", "2026-05-10", "2026-06-10"),
    ],
)
async def test_monthly_periods_are_anchored_on_the_billing_date(
    ledger: Ledger, database_url: str, schema: str, anchor: str, now: str, start: str, end: str
) -> None:
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        row = await conn.fetchrow(
            "SELECT * FROM gw_period_bounds($1, 'month', $2)",
            datetime.fromisoformat(anchor).replace(tzinfo=UTC),
            datetime.fromisoformat(now).replace(tzinfo=UTC),
        )
    finally:
        await conn.close()
    assert row is not None
    assert row["period_start"].date().isoformat() == start
    assert row["period_end"].date().isoformat() == end


async def test_set_plan_rebases_allowance_in_full(ledger: Ledger) -> None:
    await ledger.create_org("acme", "pro")
    await ledger.grant("acme", "general", 5)
    held = await ledger.reserve("acme", "general", 30, ttl_seconds=TTL)
    await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    assert await ledger.set_plan("acme", "enterprise", actor="test") is True
    # Enterprise grants 1000 this period; 30 of allowance were already used.
    assert await account(ledger, "acme", "general") == (970, 5, 0)
    assert await ledger.set_plan("acme", "enterprise") is False
    await ledger.set_plan("acme", "starter")
    assert await account(ledger, "acme", "general") == (0, 5, 0)
    with pytest.raises(LedgerError) as exc:
        await ledger.set_plan("acme", "platinum")
    assert exc.value.reason == "unknown_plan"


async def test_expired_reservations_are_refunded_once_by_concurrent_sweepers(
    ledger: Ledger, clock: Clock
) -> None:
    await ledger.create_org("acme", "pro")
    for _ in range(30):
        await ledger.reserve("acme", "general", 1, ttl_seconds=10)
    live = await ledger.reserve("acme", "general", 1, ttl_seconds=3600)
    clock.advance(seconds=11)
    counts = await asyncio.gather(*(ledger.expire_overdue(limit=7) for _ in range(10)))
    assert sum(counts) == 30
    assert await ledger.expire_overdue() == 0
    assert await account(ledger, "acme", "general") == (99, 0, 1)
    await ledger.commit(live.reservation_id)  # type: ignore[arg-type]


async def test_journal_refuses_update_delete_and_truncate(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    await ledger.create_org("acme", "pro")
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        for statement in (
            "UPDATE journal SET allowance_delta = 1000",
            "DELETE FROM journal",
            "TRUNCATE journal",
        ):
            with pytest.raises(asyncpg.RestrictViolationError, match="append-only"):
                await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.corrupts_ledger
async def test_audit_names_each_violation(ledger: Ledger, database_url: str, schema: str) -> None:
    await ledger.create_org("acme", "pro")
    held = await ledger.reserve("acme", "general", 3, ttl_seconds=TTL)
    await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    assert await ledger.audit() == []
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        # Tokens from nowhere: a reserve row that no reservation made.
        await conn.execute(
            "INSERT INTO journal (at, org_id, token_type, kind, allowance_delta)"
            " VALUES (now(), 'acme', 'general', 'refund', 50)"
        )
        # A balance changed behind the journal's back.
        await conn.execute(
            "UPDATE accounts SET purchased = purchased + 9"
            " WHERE org_id = 'acme' AND token_type = 'forecast'"
        )
    finally:
        await conn.close()
    found = {(v.invariant, v.detail.split(":")[0]) for v in await ledger.audit()}
    assert ("journal_balance_mismatch", "account acme/general") in found
    assert ("journal_balance_mismatch", "account acme/forecast") in found
    assert any(inv == "tokens_moved_by_refund" for inv, _ in found)


async def test_an_audit_may_take_longer_than_a_request(
    ledger: Ledger, database_url: str, schema: str, clock: Clock
) -> None:
    """The audit reads the whole journal: on a large ledger or a busy server it takes
    longer than the request path's timeout, and must still finish (it failed as 'ledger
    unavailable' after 5 s at the end of a bench run on a slow machine)."""
    await ledger.create_org("acme", "pro")
    held = await ledger.reserve("acme", "general", 3, ttl_seconds=TTL)
    await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    quick = await Ledger.connect(database_url, schema=schema, clock=clock, timeout=0.5)
    blocker = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        # The audit waits 1.5 s for a lock: three times the requests' timeout, which a
        # request's statement waiting for the same lock does not outlast.
        locked = blocker.transaction()
        await locked.start()
        await blocker.execute("LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE")
        audit = asyncio.ensure_future(quick.audit())
        with pytest.raises(LedgerUnavailable):
            await quick.balances("acme")
        await asyncio.sleep(1.0)
        assert not audit.done()
        await locked.rollback()
        assert await asyncio.wait_for(audit, 30) == []
    finally:
        await blocker.close()
        await quick.close()


async def test_outside_the_plan_never_bought_is_403_spent_out_is_402(ledger: Ledger) -> None:
    await ledger.create_org("free", "starter")
    assert (await ledger.reserve("free", "forecast", 1, ttl_seconds=TTL)).status == (
        "plan_forbidden"
    )
    await ledger.grant("free", "forecast", 2, kind="purchase", reason="pack")
    held = await ledger.reserve("free", "forecast", 2, ttl_seconds=TTL)
    # All purchased tokens are held: short of tokens, whether or not they come back.
    assert (await ledger.reserve("free", "forecast", 1, ttl_seconds=TTL)).status == ("insufficient")
    await ledger.commit(held.reservation_id)  # type: ignore[arg-type]
    assert (await ledger.reserve("free", "forecast", 1, ttl_seconds=TTL)).status == ("insufficient")
    assert (await ledger.reserve("free", "general", 1, ttl_seconds=TTL)).status == (
        "plan_forbidden"
    )


def test_migrate_applies_every_function_file() -> None:
    sql = resources.files("gateway.ledger").joinpath("sql")
    files = {f.name for f in sql.iterdir() if f.name.endswith(".sql")}
    # audit.sql is a query run by Ledger.audit, not a definition.
    assert set(FUNCTION_FILES) == files - {"audit.sql"}
    assert len(FUNCTION_FILES) == len(set(FUNCTION_FILES))


@pytest.mark.corrupts_ledger
async def test_audit_checks_usage_overruns_and_reversals(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    await ledger.create_org("acme", "pro")  # 100 general
    held = await ledger.reserve("acme", "general", 10, ttl_seconds=TTL)
    assert held.reservation_id is not None
    settled = await ledger.commit(held.reservation_id, 130, usage={"input": 130})
    assert (settled.charged, settled.unbilled) == (100, 30)  # never below zero
    other = await ledger.reserve("acme", "forecast", 4, ttl_seconds=TTL)
    assert other.reservation_id is not None
    await ledger.commit(other.reservation_id)
    await ledger.refund_charge(other.reservation_id, actor="ops", reason="bad")
    assert await ledger.audit() == []
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        # An unbilled amount the commit row does not record, and a second reversal.
        await conn.execute(
            "UPDATE reservations SET unbilled = 5 WHERE id = $1", held.reservation_id
        )
        await conn.execute(
            "INSERT INTO journal (at, org_id, token_type, kind, purchased_delta, reservation_id)"
            " VALUES (now(), 'acme', 'forecast', 'reversal', 4, $1)",
            other.reservation_id,
        )
        await conn.execute(
            "UPDATE accounts SET purchased = purchased + 4"
            " WHERE org_id = 'acme' AND token_type = 'forecast'"
        )
    finally:
        await conn.close()
    found = {v.invariant for v in await ledger.audit()}
    assert found == {"charge_mismatch", "reversal_mismatch"}
