"""Leases: durable holds made ahead of a caller's requests, drawn in memory.

With ``ledger.leases`` set in rules.yaml, a request of a fixed-cost route without an
Idempotency-Key takes a hold that its process made earlier for the same organization, user
and route, instead of reserving on its own path, and its charge is committed just after
its answer (``Exchange``) instead of before the answer's last byte. What holds:

- **Every hold is an ordinary reservation**, gated and durable before any request it
  serves is forwarded: nothing is forwarded without a durable hold, and no replica can
  spend what another holds. Each is settled exactly once: committed by the request that
  drew it, or refunded (``lease: not drawn``) when no request drew it in time.
- **Only for callers that use them.** Holds are made (one ``Ledger.reserve_holds`` round
  trip, in the background) only while a caller's requests come at least twice per window,
  twice as many as it made in the last window (at least 4, at most ``max_holds``), and no
  more than half of what the account had left when the ledger last said: a small balance
  is not stranded. A request that finds none left while some are being made waits for
  those rather than reserving on its own.
- **Staleness is bounded.** A hold is drawn only within ``seconds`` of being made, so a
  change of plan, license, quota or balance reaches leased requests within that time;
  holds not drawn by then, and every undrawn hold at shutdown, are refunded.
- **The crash story.** A process that dies leaves its holds held, drawn or not; the sweeper
  refunds them at their expiry. The charge of an answer already delivered whose commit had
  not landed is lost with it: in the customer's favour, never against it.

The same caller's requests are admitted by the limits the same way, when blocks and rates
are all that judge them (``Limiter.leasable``; a minimum interval, a concurrency cap or a
token rate needs each request's own judgement): admissions made ahead in one Redis call
(``Limiter.lease``), as many as the holds and at most half of what each rate has left, are
drawn in memory within ``seconds``, so that such a request makes no round trip at all
before it is forwarded. Each rate counts the leased hits from the moment they are made
until its window has passed after the last moment they could be drawn, so no rate is ever
exceeded, whichever process admits; hits not drawn in time go back to the rate, and those
of a process that dies age out (its caller may be refused early, never admitted over the
rate). A block reaches leased requests within ``seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.auth import Principal
from gateway.errors import LedgerError, LedgerUnavailable
from gateway.gate import reserve_holds
from gateway.ledger import Ledger, ReserveOutcome
from gateway.limits.admission import Admission, Leased
from gateway.limits.config import Effective
from gateway.limits.limiter import Limiter
from gateway.metrics import Metrics
from gateway.rules import LeasesConfig, Route, Rules

# How long the commit of a leased answer, already delivered, may wait to share its
# transaction with others (gateway.ledger.batch): under 400 streams a second PostgreSQL's
# CPU fell by a third (from 13-16% to 9-11%).
COMMIT_LINGER = 0.02

log = logging.getLogger("gateway.leases")

# A caller's demand is the number of its requests in a window this long (the larger of
# the current and the last one); holds are made for twice that many.
WINDOW_SECONDS = 0.1
# Callers with a lease of their own in one process, at most; past it, new callers reserve
# on their own path until idle leases are dropped.
MAX_LEASES = 10_000

_Key = tuple[str, str, str, str]  # rules version, organization, user, route
T = TypeVar("T")


@dataclass
class _Lease:
    """One caller's holds (each with the monotonic time it was made) and its demand."""

    window: float
    holds: deque[tuple[float, ReserveOutcome]] = field(default_factory=deque)
    seen: int = 0
    seen_before: int = 0
    want: int = 0  # holds (and admissions) the caller's demand calls for (0: too few requests)
    making: asyncio.Task[None] | None = None  # holds being made
    admits: deque[tuple[float, Leased]] = field(default_factory=deque)
    admitting: asyncio.Task[None] | None = None  # admissions being made
    refused: float = -math.inf  # when the limits last made no admission for it

    @property
    def refilling(self) -> bool:
        return _running(self.making) or _running(self.admitting)

    def demand(self, now: float) -> int:
        if now - self.window >= WINDOW_SECONDS:
            self.seen_before = self.seen if now - self.window < 2 * WINDOW_SECONDS else 0
            self.seen, self.window = 0, now
        return max(self.seen, self.seen_before)

    def stale(self, oldest: float) -> list[ReserveOutcome]:
        """Take out the holds made before ``oldest``."""
        return _older(self.holds, oldest)

    def stale_admits(self, oldest: float) -> list[Leased]:
        """Take out the admissions made before ``oldest``."""
        return _older(self.admits, oldest)


def _running(task: asyncio.Task[None] | None) -> bool:
    return task is not None and not task.done()


def _older(made: deque[tuple[float, T]], oldest: float) -> list[T]:
    out: list[T] = []
    while made and made[0][0] < oldest:
        out.append(made.popleft()[1])
    return out


class Leases:
    """The leases of one gateway process. ``draw`` is the request path (no I/O of its own:
    at most it waits for holds being made); making and returning holds runs in tasks of
    their own, which ``close`` waits for."""

    def __init__(
        self,
        ledger: Ledger,
        limiter: Limiter,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._limiter = limiter
        self._metrics = metrics
        self._clock = clock
        self._leases: dict[_Key, _Lease] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    async def draw(
        self, config: LeasesConfig, rules: Rules, route: Route, principal: Principal
    ) -> ReserveOutcome | None:
        """A hold of the route's cost for this request, made for this caller under these
        rules within the last ``config.seconds``; None when there is none: reserve as
        usual, then tell ``reserved``. Asks for more holds in the background when the
        caller's requests come fast enough to use them. With none left but some being
        made, waits for those (they may hold what the account had left)."""
        lease = self._lease(rules, route, principal)
        if lease is None:
            return None
        now = self._clock()
        # Twice the caller's demand, so that holds are there before they run out.
        demand = lease.demand(now)
        lease.want = min(config.max_holds, max(4, 2 * demand)) if demand else 0
        lease.seen += 1
        if not lease.holds and lease.making is not None and not lease.making.done():
            await asyncio.wait({lease.making})  # cancelling this request leaves it running
            now = self._clock()
        stale = lease.stale(now - config.seconds)
        if stale:
            self._spawn(self._give_back(stale, config))
        if not lease.holds:
            return None
        drawn = lease.holds.popleft()[1]
        self._metrics.leased_holds.labels("drawn").inc()
        # What the ledger said was left after this hold counts the lease's later holds.
        outside = drawn.remaining - len(lease.holds) * route.cost
        self._refill(lease, outside, config, rules, route, principal)
        return drawn

    def admit(
        self,
        config: LeasesConfig,
        rules: Rules,
        route: Route,
        principal: Principal,
        limits: Effective,
    ) -> Admission | None:
        """An admission made for this caller within the last ``config.seconds``; None when
        there is none: admit as usual. Asks for more in the background while the caller's
        requests come fast enough to use them (the demand its holds are made for), when
        blocks and rates are all its limits (``Limiter.leasable``). No I/O of its own."""
        lease = self._lease(rules, route, principal, create=False)  # made by draw
        if lease is None:
            return None
        now = self._clock()
        stale = lease.stale_admits(now - config.seconds)
        # Made under other limits (the organization's plan changed): not drawn.
        while lease.admits and lease.admits[0][1].limits is not limits:
            stale.append(lease.admits.popleft()[1])
        if stale:
            self._spawn(self._give_back_admits(stale))
        drawn = lease.admits.popleft()[1] if lease.admits else None
        if drawn is not None:
            self._metrics.leased_admissions.labels("drawn").inc()
        held = len(lease.admits)
        # Refused a lease (blocked, or the rate nearly used up): not asked again for a while.
        if lease.want and held <= lease.want // 2 and not _running(lease.admitting):
            org, user, token_type = principal.org, principal.user, route.token_type
            if now - lease.refused >= config.seconds and self._limiter.leasable(
                org, user, token_type, limits
            ):
                count = lease.want - held
                lease.admitting = self._spawn(
                    self._make_admits(lease, count, config, principal, token_type, limits)
                )
        return drawn.admission if drawn is not None else None

    async def _make_admits(
        self,
        lease: _Lease,
        count: int,
        config: LeasesConfig,
        principal: Principal,
        token_type: str,
        limits: Effective,
    ) -> None:
        made = self._clock()
        admits = await self._limiter.lease(
            principal.org, principal.user, token_type, limits, count, config.seconds
        )
        if not admits:
            lease.refused = self._clock()
            return
        self._metrics.leased_admissions.labels("made").inc(len(admits))
        if self._closed:
            await self._give_back_admits(admits)
        else:
            lease.admits.extend((made, one) for one in admits)

    async def _give_back_admits(self, admits: list[Leased]) -> None:
        returned = await self._limiter.give_back(admits)
        self._metrics.leased_admissions.labels("returned").inc(returned)

    def reserved(
        self,
        config: LeasesConfig,
        rules: Rules,
        route: Route,
        principal: Principal,
        outcome: ReserveOutcome,
    ) -> None:
        """A request that ``draw`` found no hold for has reserved on its own: what the
        account has left after it tells how many holds may be made."""
        lease = self._lease(rules, route, principal)
        if lease is not None:
            self._refill(lease, outcome.remaining, config, rules, route, principal)

    def _lease(
        self, rules: Rules, route: Route, principal: Principal, *, create: bool = True
    ) -> _Lease | None:
        if self._closed:
            return None
        key = (rules.version, principal.org, principal.user, route.name)
        lease = self._leases.get(key)
        if lease is None and create:
            if len(self._leases) >= MAX_LEASES:
                return None
            lease = self._leases[key] = _Lease(window=self._clock())
        return lease

    def _refill(
        self,
        lease: _Lease,
        remaining: int,
        config: LeasesConfig,
        rules: Rules,
        route: Route,
        principal: Principal,
    ) -> None:
        """Make holds in the background when half of what the caller wants is drawn: up to
        what it wants, and so that its holds stay within what the account has left
        outside them (``remaining``, as the ledger last said)."""
        held = len(lease.holds)
        if not lease.want or _running(lease.making) or held > lease.want // 2:
            return
        count = min(lease.want - held, (remaining // route.cost - held) // 2)
        if count > 0:
            lease.making = self._spawn(self._make(lease, count, config, rules, route, principal))

    async def _make(
        self,
        lease: _Lease,
        count: int,
        config: LeasesConfig,
        rules: Rules,
        route: Route,
        principal: Principal,
    ) -> None:
        made = self._clock()
        try:
            holds = await reserve_holds(
                self._ledger,
                rules.document,
                route,
                principal,
                f"lease-{uuid.uuid4().hex[:16]}",
                count=count,
                lease_seconds=config.seconds,
            )
        except LedgerUnavailable as exc:
            log.warning("could not make holds for a lease (requests reserve on their own): %s", exc)
            return
        if not holds:
            return
        self._metrics.leased_holds.labels("made").inc(len(holds))
        self._metrics.tokens.labels(route.token_type, "reserved").inc(route.cost * len(holds))
        if self._closed:
            await self._give_back(holds, config)
        else:
            lease.holds.extend((made, hold) for hold in holds)

    async def _give_back(
        self, holds: Iterable[ReserveOutcome], config: LeasesConfig | None
    ) -> None:
        reason = f"not drawn within {config.seconds:g}s" if config is not None else "not drawn"
        holds = list(holds)
        ids = [hold.reservation_id for hold in holds if hold.reservation_id is not None]
        assert len(ids) == len(holds), "a hold without a reservation"
        results = await asyncio.gather(
            *(self._ledger.refund(rid, reason=f"lease: {reason}") for rid in ids),
            return_exceptions=True,
        )
        returned = 0
        for hold, result in zip(holds, results, strict=True):
            if isinstance(result, LedgerUnavailable | LedgerError):
                log.warning(
                    "could not give back leased hold %s (the sweeper refunds it at its expiry): %s",
                    hold.reservation_id,
                    result,
                )
            elif isinstance(result, BaseException):
                raise result
            else:
                returned += 1
                self._metrics.tokens.labels(result.token_type, "refunded").inc(
                    hold.from_allowance + hold.from_purchased
                )
        self._metrics.leased_holds.labels("returned").inc(returned)

    def sweep(self, config: LeasesConfig | None) -> None:
        """Give back the holds past their time (every hold, with ``config`` None: leases
        switched off by a reload) and forget idle callers."""
        now = self._clock()
        stale: list[ReserveOutcome] = []
        admits: list[Leased] = []
        for key, lease in list(self._leases.items()):
            oldest = now - config.seconds if config is not None else float("inf")
            stale += lease.stale(oldest)
            admits += lease.stale_admits(oldest)
            idle = not lease.holds and not lease.admits and not lease.refilling
            if idle and now - lease.window > 20 * WINDOW_SECONDS:
                del self._leases[key]
        if stale:
            self._spawn(self._give_back(stale, config))
        if admits:
            self._spawn(self._give_back_admits(admits))

    async def run(self, config: Callable[[], LeasesConfig | None]) -> None:
        """Sweep every half of ``seconds`` (``config`` is read each round: a reload may
        change it), until cancelled."""
        while True:
            current = config()
            await asyncio.sleep(current.seconds / 2 if current is not None else 1.0)
            self.sweep(config())

    @property
    def held(self) -> int:
        """Holds made and not drawn yet, in this process."""
        return sum(len(lease.holds) for lease in self._leases.values())

    @property
    def admitted_ahead(self) -> int:
        """Admissions made and not drawn yet, in this process."""
        return sum(len(lease.admits) for lease in self._leases.values())

    async def close(self) -> None:
        """Make no more holds, wait for those being made, and give back every undrawn
        one."""
        self._closed = True
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sweep(None)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._leases.clear()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name="lease")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("lease task failed", exc_info=task.exception())
