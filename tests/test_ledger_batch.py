"""Group commit: concurrent reserves and settlements share transactions, yet each call gets
its own reservation, its own rows and its own answer, and one call's failure is never
another's."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from gateway.errors import LedgerError, LedgerUnavailable
from gateway.ledger import Ledger
from gateway.ledger.batch import Coalescer
from gateway.rules import Rules
from tests.relay import Relay


async def test_concurrent_reserves_on_one_account_are_batched_and_exact(ledger: Ledger) -> None:
    await ledger.create_org("hot", "pro")  # 100 general tokens
    before = ledger.batches.batches

    async def pair(n: int) -> int | None:
        outcome = await ledger.reserve(
            "hot", "general", 1 + n % 3, ttl_seconds=60, route="chat", user=f"u{n}"
        )
        if outcome.status != "ok":
            return None
        assert outcome.reservation_id is not None
        settled = await ledger.commit(outcome.reservation_id, n % 2, actor=f"u{n}")
        return settled.charged

    charged = await asyncio.gather(*(pair(n) for n in range(150)))
    assert ledger.batches.batches > before  # they did share transactions
    committed = [c for c in charged if c is not None]
    assert len(committed) > 30
    accounts = {a.token_type: a for a in await ledger.balances("hot")}
    assert accounts["general"].available == 100 - sum(committed)
    assert accounts["general"].reserved == 0
    commits = [r for r in await ledger.journal("hot", limit=1000) if r["kind"] == "commit"]
    assert len(commits) == len(committed)
    assert len({r["reservation_id"] for r in commits}) == len(commits)


async def test_concurrent_reserves_never_overspend(ledger: Ledger) -> None:
    await ledger.create_org("hot", "pro")  # 100 general tokens
    outcomes = await asyncio.gather(
        *(ledger.reserve("hot", "general", 7, ttl_seconds=60, user=f"u{n}") for n in range(60))
    )
    statuses = [o.status for o in outcomes]
    assert statuses.count("ok") == 100 // 7
    assert set(statuses) == {"ok", "insufficient"}
    accounts = {a.token_type: a for a in await ledger.balances("hot")}
    assert (accounts["general"].available, accounts["general"].reserved) == (100 % 7, 98)


async def test_one_failing_call_does_not_fail_its_batch(ledger: Ledger) -> None:
    await ledger.create_org("hot", "pro")
    held = await ledger.reserve("hot", "general", 5, ttl_seconds=60)
    assert held.reservation_id is not None
    calls = [ledger.reserve("hot", "general", 1, ttl_seconds=60, user=f"u{n}") for n in range(20)]
    # A charge above the hold without usage is a refusal (exceeds_amount) of that call only,
    # and an amount of 0 is an error the server raises inside the batch's transaction.
    bad_commit = ledger.commit(held.reservation_id, 6)
    bad_reserve = ledger.reserve("hot", "general", 0, ttl_seconds=60)
    results = await asyncio.gather(*calls, bad_commit, bad_reserve, return_exceptions=True)
    assert all(getattr(r, "status", None) == "ok" for r in results[:20])
    assert isinstance(results[20], LedgerError) and results[20].reason == "exceeds_amount"
    assert isinstance(results[21], LedgerUnavailable)
    assert isinstance(results[21].__cause__, asyncpg.PostgresError)
    accounts = {a.token_type: a for a in await ledger.balances("hot")}
    assert accounts["general"].reserved == 25
    await ledger.refund(held.reservation_id, reason="test")


async def test_settling_one_reservation_many_times_at_once_applies_once(ledger: Ledger) -> None:
    await ledger.create_org("hot", "pro")
    held = await ledger.reserve("hot", "general", 4, ttl_seconds=60)
    assert held.reservation_id is not None
    rid = held.reservation_id

    async def settle(n: int) -> str:
        try:
            if n % 2:
                await ledger.commit(rid, 3)
                return "committed"
            await ledger.refund(rid, reason="race")
            return "refunded"
        except LedgerError as exc:
            return exc.reason

    results = await asyncio.gather(*(settle(n) for n in range(30)))
    winners = [r for r in results if r in ("committed", "refunded")]
    assert len(winners) == 1
    accounts = {a.token_type: a for a in await ledger.balances("hot")}
    assert accounts["general"].available == 100 - (3 if winners == ["committed"] else 0)


async def test_a_lost_connection_fails_every_call_of_the_batch(
    database_url: str, schema: str
) -> None:
    relay = Relay(database_url)
    await relay.start()
    ledger = await Ledger.connect(relay.dsn, schema=schema, max_size=4, timeout=2)
    try:
        await ledger.migrate()
        await ledger.sync_plans({"pro": ("month", {"general": 100})})
        await ledger.create_org("hot", "pro")
        await relay.cut()
        results = await asyncio.gather(
            *(ledger.reserve("hot", "general", 1, ttl_seconds=60) for _ in range(30)),
            return_exceptions=True,
        )
        assert all(isinstance(r, LedgerUnavailable) for r in results), results
        assert len({id(r) for r in results}) == 30  # each caller its own exception
        await relay.start()
        again = await ledger.reserve("hot", "general", 1, ttl_seconds=60)  # recovered
        assert again.status == "ok"
        assert await ledger.audit() == []
        accounts = {a.token_type: a for a in await ledger.balances("hot")}
        assert accounts["general"].reserved == 1  # nothing of the failed batch was kept
    finally:
        await ledger.close()
        await relay.cut()


@pytest.mark.parametrize("concurrency", [1])
async def test_a_lone_call_is_not_delayed_into_a_batch(ledger: Ledger, concurrency: int) -> None:
    await ledger.create_org("hot", "pro")
    before = ledger.batches.batches
    for _ in range(5):
        outcome = await ledger.reserve("hot", "general", 1, ttl_seconds=60)
        assert outcome.reservation_id is not None
        await ledger.commit(outcome.reservation_id)
    assert ledger.batches.batches == before  # each went alone, at once
    assert ledger.batches.alone >= 10


async def test_calls_made_in_one_turn_go_as_one_batch(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    """The answers of a batch wake all of its callers in one turn of the event loop; their
    next calls go together. (The first of them used to go alone, the rest waiting behind
    it: the callers of a busy account moved as one convoy, and each kind's batches stood
    idle while the other kind's ran.)"""
    await ledger.create_org("hot", "pro")
    coalescer = ledger.batches
    woken = asyncio.Event()

    async def caller(n: int) -> uuid.UUID:
        await woken.wait()
        outcome = await ledger.reserve("hot", "general", 1, ttl_seconds=60, user=f"u{n}")
        assert outcome.status == "ok" and outcome.reservation_id is not None
        return outcome.reservation_id

    callers = [asyncio.create_task(caller(n)) for n in range(20)]
    await asyncio.sleep(0)
    before = (coalescer.batches, coalescer.alone, coalescer.calls)
    woken.set()
    held = await asyncio.gather(*callers)
    assert (coalescer.batches, coalescer.alone, coalescer.calls) == (
        before[0] + 1,
        before[1],
        before[2] + 20,
    )
    await asyncio.gather(*(ledger.commit(r) for r in held))  # settled together too
    assert (coalescer.batches, coalescer.alone) == (before[0] + 2, before[1])
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:  # one transaction made the 20 reservations, one settled them
        made = await conn.fetchval(
            "SELECT count(DISTINCT j.xmin::text) FROM journal j"
            " WHERE j.org_id = 'hot' AND j.kind = 'reserve'"
        )
        settled = await conn.fetchval(
            "SELECT count(DISTINCT r.xmin::text) FROM reservations r WHERE r.org_id = 'hot'"
        )
    finally:
        await conn.close()
    assert (made, settled) == (1, 1)
    (account,) = [a for a in await ledger.balances("hot") if a.token_type == "general"]
    assert (account.allowance, account.reserved) == (100 - 20, 0)


async def _held(ledger: Ledger, org: str, count: int) -> list[uuid.UUID]:
    await ledger.create_org(org, "pro")  # 100 'general' tokens
    ids = []
    for n in range(count):
        outcome = await ledger.reserve(org, "general", 1, ttl_seconds=60, user=f"u{n}")
        assert outcome.reservation_id is not None
        ids.append(outcome.reservation_id)
    return ids


async def _transactions(database_url: str, schema: str, org: str) -> int:
    """How many transactions settled ``org``'s reservations."""
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    try:
        count: int = await conn.fetchval(
            "SELECT count(DISTINCT xmin::text) FROM reservations WHERE org_id = $1", org
        )
    finally:
        await conn.close()
    return count


async def _paid(ledger: Ledger, org: str, count: int) -> None:
    """``count`` tokens charged to ``org`` and none still held."""
    (account,) = [a for a in await ledger.balances(org) if a.token_type == "general"]
    assert (account.allowance, account.reserved) == (100 - count, 0)
    commits = [r for r in await ledger.journal(org, limit=100) if r["kind"] == "commit"]
    assert len(commits) == count


async def test_commits_that_may_linger_share_one_transaction(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    """Commits nobody waits for, made 20 ms apart, go together when the first has waited
    its linger, not one by one as they come."""
    held = await _held(ledger, "calm", 6)
    started = time.monotonic()

    async def commit(n: int) -> float:
        await asyncio.sleep(0.02 * n)
        await ledger.commit(held[n], linger=0.5)
        return time.monotonic() - started

    done = await asyncio.wait_for(asyncio.gather(*(commit(n) for n in range(6))), 10)
    assert min(done) >= 0.45  # the first waited for the others...
    assert max(done) < 3  # ...and no longer than it had to
    assert await _transactions(database_url, schema, "calm") == 1
    await _paid(ledger, "calm", 6)


async def test_a_call_that_may_not_wait_takes_the_lingering_ones_along(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    """A commit someone waits for (a client's answer hangs on it) goes at once, and the
    commits lingering for an hour go with it."""
    held = await _held(ledger, "mixed", 5)
    lingering = [asyncio.create_task(ledger.commit(r, linger=3600)) for r in held[:4]]
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in lingering)
    await asyncio.wait_for(ledger.commit(held[4]), 5)
    await asyncio.wait_for(asyncio.gather(*lingering), 5)
    assert await _transactions(database_url, schema, "mixed") == 1
    await _paid(ledger, "mixed", 5)


async def test_enough_lingering_calls_go_at_once(ledger: Ledger) -> None:
    held = await _held(ledger, "full", 6)
    ledger._coalescer = Coalescer(ledger._fetch, lingering_batch=4)  # instead of 8
    first = []
    for r in held[:4]:  # one after the other, the first three lingering meanwhile
        first.append(asyncio.create_task(ledger.commit(r, linger=3600)))
        await asyncio.sleep(0.02)
    await asyncio.wait_for(asyncio.gather(*first), 5)  # four: enough, gone
    rest = [asyncio.create_task(ledger.commit(r, linger=3600)) for r in held[4:]]
    await asyncio.sleep(0.1)
    assert not any(t.done() for t in rest)  # two: still waiting for others
    await asyncio.wait_for(ledger.refund((await _held(ledger, "other", 1))[0], reason="x"), 5)
    await asyncio.wait_for(asyncio.gather(*rest), 5)
    await _paid(ledger, "full", 6)


async def test_lingering_calls_are_not_left_waiting_when_their_batch_is_cancelled(
    ledger: Ledger,
) -> None:
    """The loop closing cancels the batch that waits for them: they are cancelled too (the
    holds stay held and are refunded at their expiry), not left waiting forever."""
    held = await _held(ledger, "closing", 2)
    lingering = [asyncio.create_task(ledger.commit(r, linger=3600)) for r in held]
    await asyncio.sleep(0.05)
    ledger.batches._runners["settle"].cancel()  # what closing the loop does
    for task in lingering:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    assert len(await ledger.held_reservations("closing")) == 2
    assert (await ledger.commit(held[0])).charged == 1  # nothing left stuck


async def test_a_call_cancelled_in_its_turn_leaves_the_others_to_go(ledger: Ledger) -> None:
    await ledger.create_org("hot", "pro")
    first = asyncio.create_task(ledger.reserve("hot", "general", 1, ttl_seconds=60))
    others = [
        asyncio.create_task(ledger.reserve("hot", "general", 2, ttl_seconds=60)) for _ in range(3)
    ]
    await asyncio.sleep(0)  # the first waits its turn; the others joined it
    first.cancel()
    outcomes = await asyncio.wait_for(asyncio.gather(*others), 10)
    assert [o.status for o in outcomes] == ["ok"] * 3
    with pytest.raises(asyncio.CancelledError):
        await first
    (account,) = [a for a in await ledger.balances("hot") if a.token_type == "general"]
    assert account.reserved == 6  # the cancelled call reserved nothing
    lone = await ledger.reserve("hot", "general", 1, ttl_seconds=60)  # nothing left stuck
    assert lone.status == "ok"


async def test_a_refund_does_not_wait_for_its_flush_and_a_commit_does(
    ledger: Ledger, database_url: str, schema: str
) -> None:
    """A refund lost in a crash leaves its reservation held, refunded again at its expiry,
    so refunds commit asynchronously; a commit pays for a delivered answer, so it waits."""
    await ledger.create_org("hot", "pro")
    paid = await ledger.reserve("hot", "general", 3, ttl_seconds=60)
    failed = await ledger.reserve("hot", "general", 4, ttl_seconds=60)
    conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
    settle = "SELECT * FROM gw_settle($1, $2, NULL, now(), 'test', NULL, NULL, NULL)"
    try:
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        for reservation, outcome, flushed in (
            (paid.reservation_id, "commit", "on"),
            (failed.reservation_id, "refund", "off"),
        ):
            async with conn.transaction():
                row = await conn.fetchrow(settle, reservation, outcome)
                assert row is not None and row["status"] == "ok"
                assert await conn.fetchval("SHOW synchronous_commit") == flushed
            assert await conn.fetchval("SHOW synchronous_commit") == "on"  # that one only
    finally:
        await conn.close()
    accounts = {a.token_type: a for a in await ledger.balances("hot")}
    assert (accounts["general"].available, accounts["general"].reserved) == (97, 0)


async def test_a_query_answers_before_its_connection_is_back_and_the_pool_gets_it_back(
    database_url: str, schema: str, rules: Rules
) -> None:
    # asyncpg's own release runs in a task of its own and its caller waits for it: one
    # more turn of a busy event loop per query. The caller has its rows first now.
    ledger = await Ledger.connect(database_url, schema=schema, min_size=1, max_size=1)
    try:
        await ledger.migrate()
        await ledger.sync_plans(rules.plan_allowances())
        await ledger.create_org("solo", "pro")
        pool = ledger._pool
        for _ in range(10):  # the last call's connection, coming back
            await asyncio.sleep(0)
        assert pool.get_idle_size() == 1
        balances = await ledger.balances("solo")
        assert pool.get_idle_size() == 0  # answered; the connection goes back next turn
        assert {b.token_type: b.available for b in balances}["general"] == 100
        # The one connection comes back: concurrent calls queue for it and all answer.
        outcomes = await asyncio.gather(
            *(ledger.reserve("solo", "general", 1, ttl_seconds=60, user=f"u{n}") for n in range(30))
        )
        assert [o.status for o in outcomes] == ["ok"] * 30
        await ledger.balances("solo")
    finally:
        await ledger.close()  # waits for the last release: no connection left behind
    assert pool.get_size() == 0 and pool.get_idle_size() == 0
