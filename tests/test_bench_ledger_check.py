"""The bench's ledger probe against the real ledger: it seeds, waits for settlement, reads
the run's journal and audits, all through ``gateway.ledger.Ledger``."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from bench import ledger_check
from bench.errors import BenchError
from bench.ledger_check import JournalSummary, LedgerProbe, Snapshot, judge
from bench.load import Load
from bench.workload import ORG, TOKEN_TYPE
from gateway.ledger import Ledger

T = TypeVar("T")


class InThread:
    """Runs the (synchronous) probe in one thread of its own, as the bench does, while the
    test's event loop drives the gateway side of the ledger."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1)

    async def __call__(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)


@pytest.fixture
async def bench(
    ledger: Ledger, database_url: str, schema: str
) -> AsyncIterator[tuple[LedgerProbe, InThread]]:
    """The probe on this test's schema (migrated by ``ledger``), and how to call it."""
    run = InThread()
    probe = await run(LedgerProbe, database_url, schema)
    yield probe, run
    await run(probe.close)
    run.pool.shutdown()


async def reserve_one(ledger: Ledger) -> uuid.UUID:
    outcome = await ledger.reserve(ORG, TOKEN_TYPE, 1, ttl_seconds=60)
    assert outcome.status == "ok"
    assert outcome.reservation_id is not None
    return outcome.reservation_id


async def test_probe_follows_a_run_through_the_ledger(
    ledger: Ledger, bench: tuple[LedgerProbe, InThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    probe, run = bench
    await run(probe.seed, "enterprise", 100)
    before = await run(probe.settled)
    # The enterprise plan's 1000 'general' tokens of allowance, plus the grant.
    assert before.available == 1100
    assert (before.reserved, before.held) == (0, 0)
    assert before.last_entry > 0

    committed, refunded, held = [await reserve_one(ledger) for _ in range(3)]
    await ledger.commit(committed)
    await ledger.refund(refunded, reason="Can not write request body")
    with pytest.raises(BenchError) as refused:
        await run(lambda: probe.settled(timeout=1.0, interval=0.2))
    assert str(refused.value) == "the ledger did not settle within 1s: 1 token(s) still reserved"

    await ledger.commit(held)
    after = await run(probe.settled)
    assert (after.available, after.reserved, after.held) == (1098, 0, 0)

    monkeypatch.setattr(ledger_check, "JOURNAL_PAGE", 2)  # read it over several pages
    summary = await run(probe.journal_since, before)
    assert summary == JournalSummary(
        kinds={"commit": 2, "refund": 1, "reserve": 3},
        refund_reasons={"Can not write request body": 1},
    )
    assert await run(probe.audit) == []

    wrk = Load("wrk", 1.0, 1, 1, 0, {}, 1.0, 1.0, 1.0)
    check = judge(before, after, summary, wrk, concurrency=2, violations=[])
    assert check.problems == []
    assert (check.balance_drop, check.commits, check.refunds) == (2, 2, 1)


async def test_journal_since_the_newest_entry_is_empty(
    bench: tuple[LedgerProbe, InThread],
) -> None:
    probe, run = bench
    await run(probe.seed, "enterprise", 5)
    now = await run(probe.settled)
    assert await run(probe.journal_since, now) == JournalSummary(kinds={}, refund_reasons={})
    empty = Snapshot(available=0, reserved=0, held=0, last_entry=0)
    everything = await run(probe.journal_since, empty)
    assert everything.kinds["grant"] == 1


@pytest.mark.parametrize("leased", [False, True], ids=["seam", "leased"])
async def test_the_hot_account_counts_durable_pairs_exactly(
    database_url: str, leased: bool
) -> None:
    """The hot account's own checks (the balance fell by exactly the pairs counted, the
    audit is clean), run briefly, with holds made one by one or as leases make them."""
    from bench.hot_account import hot_account

    hot = await hot_account(database_url, seconds=0.5, concurrency=8, leased=leased)
    assert hot.pairs > 0 and hot.violations == 0 and hot.leased == leased
