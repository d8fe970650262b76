"""The ledger checks: the ledger (read through ``gateway.ledger.Ledger``, the gateway's own
seam) must account for exactly what reached the backend. ``judge`` checks one measurement
against the load generator's count and the bench upstream's; ``judge_run`` checks the whole
run (every part, warm-ups included) against the bench upstream's count of the requests the
gateway forwarded, path by path, at each path's price.

The bench runs synchronously; ``LedgerProbe`` keeps one event loop and one small
connection pool open for the whole run, so each read is one round trip, not a connect."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from bench.errors import BenchError
from bench.load import Load
from bench.workload import ORG, TOKEN_TYPE
from gateway.ledger import Ledger

T = TypeVar("T")
JOURNAL_PAGE = 5000  # entries per round trip when reading the run's journal


@dataclass(frozen=True)
class Snapshot:
    """The bench account at one moment."""

    available: int
    reserved: int
    held: int  # reservations still held
    last_entry: int  # id of the newest journal entry of the organization (0: none)


@dataclass(frozen=True)
class JournalSummary:
    """Journal entries of one account by kind, and why tokens came back (refund, expire)."""

    kinds: dict[str, int]
    refund_reasons: dict[str, int]  # most frequent first; '' when none was recorded

    @property
    def lease_returns(self) -> int:
        """Refunds of holds made ahead and never drawn (ledger.leases): no request's."""
        return sum(n for reason, n in self.refund_reasons.items() if reason.startswith("lease: "))

    @property
    def refunds(self) -> int:
        """Refunds of requests: the rest."""
        return self.kinds.get("refund", 0) - self.lease_returns


def summarize_journal(entries: Iterable[Mapping[str, Any]], token_type: str) -> JournalSummary:
    """Count ``entries`` (journal rows as ``Ledger.journal`` returns them) of ``token_type``."""
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for entry in entries:
        if entry["token_type"] != token_type:
            continue
        kinds[str(entry["kind"])] += 1
        if entry["kind"] in ("refund", "expire"):
            reasons[str(entry["reason"] or "")] += 1
    ranked = sorted(reasons.items(), key=lambda item: (-item[1], item[0]))
    return JournalSummary(dict(sorted(kinds.items())), dict(ranked))


class LedgerProbe:
    """Reads and seeds the bench organization through a ``Ledger`` on the gateway's
    database. Close it with ``close``."""

    def __init__(self, dsn: str, schema: str | None) -> None:
        # Its own loop, never made the thread's current one, so that it cannot replace a
        # loop the caller already has.
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        try:
            self._ledger = self._run(Ledger.connect(dsn, schema=schema, min_size=1, max_size=2))
        except BaseException:
            self._runner.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coro)

    def close(self) -> None:
        try:
            self._run(asyncio.wait_for(self._ledger.close(), 10))
        finally:
            self._runner.close()

    def seed(self, plan: str, tokens: int) -> None:
        """Create the bench organization on ``plan`` and grant it ``tokens``."""
        self._run(self._ledger.create_org(ORG, plan))
        self._run(self._ledger.grant(ORG, TOKEN_TYPE, tokens, actor="bench", reason="bench"))

    async def _snapshot(self) -> Snapshot:
        account = next(a for a in await self._ledger.balances(ORG) if a.token_type == TOKEN_TYPE)
        # One more than any run can hold (a reservation per connection) would do; the
        # count only has to tell none from some.
        held = await self._ledger.held_reservations(ORG, limit=10_000)
        newest = await self._ledger.journal(ORG, limit=1)
        return Snapshot(
            available=account.available,
            reserved=account.reserved,
            held=len(held),
            last_entry=int(newest[0]["id"]) if newest else 0,
        )

    def settled(self, timeout: float = 60.0, interval: float = 0.3) -> Snapshot:
        """A snapshot once nothing is reserved and the balance has stopped moving: requests
        a load generator abandoned at its end are still settled by the gateway. Raises
        ``BenchError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        previous: Snapshot | None = None
        while True:
            current = self._run(self._snapshot())
            if current.reserved == 0 and current == previous:
                return current
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the ledger did not settle within {timeout:.0f}s: {current.reserved} "
                    "token(s) still reserved"
                )
            previous = current
            time.sleep(interval)

    async def _entries_after(self, after: int) -> list[dict[str, Any]]:
        # Ledger.journal pages newest first; stop at the first entry at or before ``after``.
        entries: list[dict[str, Any]] = []
        before: int | None = None
        while True:
            page = await self._ledger.journal(ORG, limit=JOURNAL_PAGE, before=before)
            newer = [e for e in page if e["id"] > after]
            entries.extend(newer)
            if len(newer) < len(page) or len(page) < JOURNAL_PAGE:
                return entries
            before = int(page[-1]["id"])

    def journal_since(self, snapshot: Snapshot) -> JournalSummary:
        """The bench account's journal entries written after ``snapshot``."""
        return summarize_journal(self._run(self._entries_after(snapshot.last_entry)), TOKEN_TYPE)

    def audit(self) -> list[str]:
        """Every violated invariant of the ledger; empty when it adds up."""
        return [str(v) for v in self._run(self._ledger.audit())]


@dataclass
class LedgerCheck:
    ok_responses: int  # 2xx the load generator received
    balance_drop: int
    commits: int
    refunds: int
    expires: int
    held_after: int
    exact: bool  # the generator waited for every request it sent
    concurrency: int
    refund_reasons: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    forwarded: int | None = None  # requests the gateway forwarded, by the upstream's count

    def verdict(self) -> str:
        return "FAILED" if self.problems else "ok"


def judge(
    before: Snapshot,
    after: Snapshot,
    journal: JournalSummary,
    load: Load,
    *,
    concurrency: int,
    violations: list[str],
    forwarded: int | None = None,
) -> LedgerCheck:
    """Compare the ledger's movement between two settled snapshots with the load
    generator's count; ``problems`` lists every disagreement (empty: the check passed).

    The python generator waits for every request it sent: the fall must equal its 2xx
    count, with no refund. wrk drops its connections at the end with up to one request in
    flight on each, which the gateway still settles (commit or refund): charged-extra plus
    refunded is at most ``concurrency``. With ``forwarded`` (the bench upstream's count of
    the requests the gateway sent it meanwhile), commits must equal it."""
    drop = before.available - after.available
    check = LedgerCheck(
        ok_responses=load.ok,
        balance_drop=drop,
        commits=journal.kinds.get("commit", 0),
        refunds=journal.refunds,
        expires=journal.kinds.get("expire", 0),
        held_after=after.held,
        exact=load.generator == "python",
        concurrency=concurrency,
        refund_reasons=journal.refund_reasons,
        violations=violations,
        forwarded=forwarded,
    )
    problems = check.problems
    if forwarded is not None and check.commits != forwarded:
        problems.append(f"{check.commits} commits but the upstream answered {forwarded}")
    if check.commits != drop:
        problems.append(f"{check.commits} commits but the balance fell by {drop}")
    if check.refunds and check.exact:
        problems.append(f"{check.refunds} refund(s) during the run")
    elif check.refunds and drop + check.refunds > load.ok + concurrency:
        problems.append(
            f"{check.refunds} refund(s) and {drop - load.ok} charge(s) beyond the 2xx "
            f"answers: more than the {concurrency} requests that can have been "
            "in flight when wrk stopped"
        )
    if check.expires:
        problems.append(f"{check.expires} expired reservation(s) during the run")
    if check.held_after:
        problems.append(f"{check.held_after} reservation(s) still held")
    if check.exact:
        if drop != load.ok:
            problems.append(f"the balance fell by {drop} for {load.ok} 2xx answers")
    elif not load.ok <= drop <= load.ok + concurrency:
        problems.append(
            f"the balance fell by {drop} for {load.ok} 2xx answers completed within the "
            f"run; expected between {load.ok} and {load.ok + concurrency} "
            "(up to one request per connection in flight when wrk stopped)"
        )
    if violations:
        problems.append(f"ledger audit: {len(violations)} violation(s)")
    return check


@dataclass
class RunLedgerCheck:
    """The whole run against the upstream's count of what the gateway forwarded."""

    forwarded: dict[str, int]  # path -> requests the gateway forwarded (upstream's count)
    prices: dict[str, int]  # path -> tokens one such request costs
    balance_drop: int
    commits: int
    refunds: int
    expires: int
    held_after: int
    violations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def expected_drop(self) -> int:
        return sum(n * self.prices.get(path, 0) for path, n in self.forwarded.items())

    def verdict(self) -> str:
        return "FAILED" if self.problems else "ok"


def judge_run(
    before: Snapshot,
    after: Snapshot,
    journal: JournalSummary,
    *,
    forwarded: Mapping[str, int],
    prices: Mapping[str, int],
    violations: list[str],
) -> RunLedgerCheck:
    """The ledger between two settled snapshots that bracket every request the gateway got,
    against ``forwarded`` (path -> requests that reached the upstream from the gateway
    meanwhile): one commit per forwarded request, the balance fallen by each path's count
    at its price, nothing held or expired, no audit violation. Refunds are requests the
    gateway could not forward (a load generator hung up first): they move nothing."""
    check = RunLedgerCheck(
        forwarded=dict(sorted(forwarded.items())),
        prices=dict(prices),
        balance_drop=before.available - after.available,
        commits=journal.kinds.get("commit", 0),
        refunds=journal.refunds,
        expires=journal.kinds.get("expire", 0),
        held_after=after.held,
        violations=violations,
    )
    problems = check.problems
    unpriced = sorted(path for path, n in forwarded.items() if n and path not in prices)
    if unpriced:
        problems.append(f"the upstream answered the gateway on unexpected path(s): {unpriced}")
    total = sum(forwarded.values())
    if check.commits != total:
        problems.append(f"{check.commits} commits for {total} requests forwarded")
    if check.balance_drop != check.expected_drop:
        problems.append(
            f"the balance fell by {check.balance_drop}, the forwarded requests cost "
            f"{check.expected_drop}"
        )
    if check.expires:
        problems.append(f"{check.expires} expired reservation(s)")
    if check.held_after:
        problems.append(f"{check.held_after} reservation(s) still held")
    if violations:
        problems.append(f"ledger audit: {len(violations)} violation(s)")
    return check
