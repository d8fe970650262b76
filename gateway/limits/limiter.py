"""Abuse limits on Redis (or Redis Cluster).

A request is judged by one script, ``lua/admit.lua``, in one round trip: blocks, rate
limits, the minimum interval, the concurrency cap and token rates are all checked before
any is recorded, and recorded only when all pass, so a refused request uses up nothing.
``peek`` runs the same script dry. Keys of one organization share the hash tag ``{org}``
(``keys.py``), so every script touches one cluster slot. Redis failures are translated
into ``LimiterUnavailable`` by the seam (``store.py``); what a request does then is
``limits.on_store_error``'s call, made by ``Limiter.admit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from gateway.errors import Blocked, LimiterUnavailable
from gateway.limits import admission as judge
from gateway.limits import token_rates
from gateway.limits.admission import Admission
from gateway.limits.config import Blocks, Effective, LimitsConfig
from gateway.limits.keys import Keys, subject
from gateway.limits.spend import Spend, SpikeAlert
from gateway.limits.store import Call, Client, Eval, Store, connect
from gateway.limits.verdicts import LimitVerdict, retry_seconds

__all__ = ["Admission", "Limiter", "SpikeAlert", "wall_clock_ms"]

log = logging.getLogger("gateway.limits")

ClockMs = Callable[[], int]


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


class Limiter:
    """The limits of every request, on one Redis or Redis Cluster shared by any number of
    gateway replicas. Raises ``ConfigError`` when ``prefix`` would spread one
    organization's keys over several cluster slots."""

    def __init__(
        self,
        client: Client,
        config: LimitsConfig,
        *,
        prefix: str = "gw:",
        clock_ms: ClockMs = wall_clock_ms,
    ) -> None:
        self._keys = Keys(prefix)
        self._keys.check_slots()
        self._store = Store(client)
        self.config = config
        self.clock_ms = clock_ms
        self._spend = Spend(self._store, self._keys)
        self._sinks: list[Callable[[SpikeAlert], None]] = []
        self._flusher: tuple[asyncio.Task[None], asyncio.Event] | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        config: LimitsConfig,
        *,
        prefix: str = "gw:",
        clock_ms: ClockMs = wall_clock_ms,
    ) -> Limiter:
        """``url`` names one Redis (``redis://``, ``rediss://``, ``unix://``) or a cluster
        (``redis+cluster://host:port[,host:port...]``, ``rediss+cluster://``). Raises
        ``ConfigError`` for a URL it cannot use."""
        Keys(prefix).check_slots()  # before connecting: a refused prefix leaves nothing open
        return cls(connect(url), config, prefix=prefix, clock_ms=clock_ms)

    @property
    def config(self) -> LimitsConfig:
        return self._config

    @config.setter
    def config(self, config: LimitsConfig) -> None:
        self._config = config
        self._store.policy = config.on_store_error

    @property
    def store_errors(self) -> int:
        """Failed calls to Redis so far (for metrics)."""
        return self._store.errors

    async def close(self) -> None:
        await self._store.close()

    async def ping(self) -> None:
        await self._store.ping()

    # -- the request path -------------------------------------------------------------

    async def check_address(self, address: str) -> None:
        """Raise ``Blocked`` if this client address is blocked (for repeated 401s)."""
        if self.config.blocks is None:
            return
        try:
            index, retry_ms = await self._store.run(
                "blocked", [self._keys.ip(address, "block")], [self.clock_ms()]
            )
        except LimiterUnavailable:
            if self.config.on_store_error == "closed":
                raise
            return
        if index:
            raise Blocked(
                f"too many refused requests from {address}; try again later",
                headers={"Retry-After": str(retry_seconds(retry_ms))},
            )

    def _request(
        self, org: str, user: str, token_type: str, limits: Effective, tokens: int
    ) -> judge.Request:
        spike = self.config.spike
        blocks = self.config.blocks is not None or (spike is not None and spike.block)
        return judge.Request(org, user, token_type, limits, tokens, blocks)

    async def admit(
        self,
        org: str,
        user: str,
        token_type: str,
        limits: Effective,
        lease_seconds: float,
        *,
        tokens: int = 0,
    ) -> Admission:
        """Judge a request holding ``tokens`` by blocks, rate limits, the minimum interval,
        the concurrency cap and the token rates, in one round trip, and record it in each
        only if all admit it. Raises the refusal of the first that does not (``Blocked``,
        ``RateLimited``, ``TooFrequent`` or ``TooManyInFlight``, with ``Retry-After``); a
        refused request uses up none of them. With Redis down, admits (``open``) or raises
        ``LimiterUnavailable`` (``closed``).

        A token rate admits the request when the tokens in the window plus ``tokens`` (its
        hold) stay within its cap; a hold of 0 is admitted while the window is below the
        cap. The hold then counts until ``settle_tokens`` (or ``finish``) replaces it with
        the charge. The concurrency lease lasts ``lease_seconds`` plus
        ``limits.lease_grace_seconds`` unless released."""
        if tokens < 0:
            raise ValueError(f"a request cannot hold {tokens} tokens")
        request = self._request(org, user, token_type, limits, tokens)
        member = uuid.uuid4().hex
        lease_ms = int((lease_seconds + self.config.lease_grace_seconds) * 1000)
        keys, args = judge.call(
            self._keys, request, now=self.clock_ms(), member=member, lease_ms=lease_ms, dry=False
        )
        if not keys:  # no limit applies: nothing to ask Redis
            return Admission()
        try:
            answer = await self._store.run("admit", keys, args)
        except LimiterUnavailable:
            if self.config.on_store_error == "closed":
                raise
            return Admission()
        outcome = judge.read(keys, request, answer)
        refusal = outcome.refusal()
        if refusal is not None:
            raise refusal
        cap = limits.concurrency
        return Admission(
            leases=[(self._keys.inflight(org, user, cap), member)] if cap else [],
            headers=outcome.headers,
            token_entries=token_rates.entries(outcome.token_checks, member, tokens),
        )

    def leasable(self, org: str, user: str, token_type: str, limits: Effective) -> bool:
        """Whether ``lease`` can make admissions ahead for this caller and these limits."""
        return judge.leasable(self._request(org, user, token_type, limits, 0))

    async def lease(
        self, org: str, user: str, token_type: str, limits: Effective, count: int, seconds: float
    ) -> list[judge.Leased]:
        """Up to ``count`` admissions of this caller's requests, made now, to be drawn
        within ``seconds`` (``lua/lease.lua``): the blocks are checked once, and each rate
        counts the leased hits from now until ``seconds`` plus its window have passed, so
        that no rate is exceeded whichever process admits. Fewer (at most half of what a
        rate has left), or none when blocked, when the limits are not ``leasable``, or when
        Redis does not answer (the requests are then admitted one by one)."""
        request = self._request(org, user, token_type, limits, 0)
        if count < 1 or not judge.leasable(request):
            return []
        now, prefix = self.clock_ms(), uuid.uuid4().hex
        keys, args = judge.lease_call(
            self._keys, request, now=now, prefix=prefix, take=count, until=now + int(seconds * 1000)
        )
        try:
            answer = await self._store.run("lease", keys, args)
        except LimiterUnavailable:
            # It may have run all the same (a timeout): its hits would count until their
            # window passed, refusing the caller early. Taken back if Redis answers now.
            await self.give_back(judge.unanswered(keys, request, prefix, count))
            return []
        return judge.leased(keys, request, prefix, answer)

    async def give_back(self, leased: Sequence[judge.Leased]) -> int:
        """Take the hits of admissions made ahead and not drawn out of their rates' logs,
        in one round trip; how many were given back. Never raises for Redis: hits not
        given back age out of their windows."""
        if not leased:
            return 0
        members: dict[str, list[str]] = {}
        for one in leased:
            for key in one.keys:
                members.setdefault(key, []).append(one.member)
        if not members:  # blocks alone: nothing was recorded
            return len(leased)
        try:
            results = await self._store.pipeline(
                [("ZREM", key, *names) for key, names in members.items()]
            )
        except LimiterUnavailable as exc:
            results = [exc]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            log.warning("could not give back admissions made ahead (they age out): %s", failed)
            return 0
        return len(leased)

    async def peek(
        self, org: str, user: str, token_type: str, limits: Effective, *, tokens: int = 0
    ) -> list[LimitVerdict]:
        """Each limit's verdict for a request (holding ``tokens``) now, consuming nothing,
        with the error ``admit`` would refuse it with. Raises ``LimiterUnavailable``."""
        request = self._request(org, user, token_type, limits, tokens)
        keys, args = judge.call(
            self._keys, request, now=self.clock_ms(), member="-", lease_ms=0, dry=True
        )
        answer = await self._store.run("admit", keys, args)
        return judge.read(keys, request, answer).verdicts

    async def finish(self, admission: Admission, charged: int) -> None:
        """``settle_tokens`` and ``release`` at once, in one round trip: the request is
        over and was charged ``charged`` tokens (0 for a refund). Never raises for Redis."""
        await self._finish(admission, charged, release=True)

    async def settle_tokens(self, admission: Admission, charged: int) -> None:
        """Replace the hold of ``admission``'s token entries with ``charged``, the request's
        actual charge (0 for a refund), counted at the time the hold was admitted. Settling
        again with another charge replaces that one; an entry already out of its window is
        left alone. Never raises for Redis: an unsettled hold counts until its window ends."""
        await self._finish(admission, charged, release=False)

    async def release(self, admission: Admission) -> None:
        """Give back concurrency slots. Never raises: an unreleased lease expires."""
        await self._finish(admission, None, release=True)

    async def _finish(self, admission: Admission, charged: int | None, *, release: bool) -> None:
        if charged is not None and charged < 0:
            raise ValueError(f"a request cannot be charged {charged} tokens")
        entries = admission.token_entries if charged is not None else []
        leases = admission.leases if release else []
        calls: list[Call] = []
        if entries:
            assert charged is not None
            keys, args = token_rates.settle_call(entries, self.clock_ms(), charged)
            calls.append(Eval("settle_tokens", keys, args))
        calls += [("ZREM", key, lease) for key, lease in leases]
        if not calls:
            return
        try:
            results = await self._store.pipeline(calls)
        except LimiterUnavailable as exc:
            results = [exc] * len(calls)
        if entries:
            settled, *results = results
            if isinstance(settled, BaseException):
                log.warning(
                    "could not settle a token-rate hold (it counts until it ages out): %s",
                    settled,
                )
            else:
                assert charged is not None
                admission.token_entries = [entry._replace(amount=charged) for entry in entries]
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            log.warning("could not release a concurrency lease (it will expire): %s", failed)
        if release:
            admission.leases.clear()

    # -- blocks -------------------------------------------------------------------------

    async def record_refusal(self, org: str | None, user: str | None, address: str | None) -> bool:
        """Count a refusal against the principal (or, with no valid token, the address).
        Returns whether it is blocked now."""
        blocks: Blocks | None = self.config.blocks
        if blocks is None:
            return False
        if org is not None and user is not None:
            who_key = subject("user", user)
            keys = [self._keys.org(org, "refusals", who_key), self._keys.org(org, "block", who_key)]
            who = f"user '{user}' of organization '{org}'"
        elif address:
            keys = [self._keys.ip(address, "refusals"), self._keys.ip(address, "block")]
            who = f"address {address}"
        else:
            return False
        args = [
            self.clock_ms(),
            int(blocks.within_seconds * 1000),
            blocks.after,
            int(blocks.cooldown_seconds * 1000),
            uuid.uuid4().hex,
        ]
        try:
            blocked, count = await self._store.run("refusals", keys, args)
        except LimiterUnavailable:
            return False
        if blocked:
            log.warning(
                "blocked %s for %gs after %d refusals within %gs",
                who,
                blocks.cooldown_seconds,
                count,
                blocks.within_seconds,
            )
        return bool(blocked)

    async def unblock(
        self, org: str | None = None, user: str | None = None, address: str | None = None
    ) -> int:
        """Lift blocks (and forget recent refusals). Returns how many blocks were lifted.
        Raises ``LimiterUnavailable``."""
        blocks: list[str] = []
        refusals: list[str] = []
        if address:
            blocks.append(self._keys.ip(address, "block"))
            refusals.append(self._keys.ip(address, "refusals"))
        if org is not None and user is not None:
            who = subject("user", user)
            blocks.append(self._keys.org(org, "block", who))
            refusals.append(self._keys.org(org, "refusals", who))
        elif org is not None:
            blocks.append(self._keys.org(org, "block", "o"))
        # One by one: the keys may live on different cluster nodes.
        lifted = [await self._store.delete(key) for key in blocks]
        for key in refusals:
            await self._store.delete(key)
        return sum(lifted)

    # -- spend spikes ---------------------------------------------------------------------

    async def record_spend(self, org: str, amount: int) -> SpikeAlert | None:
        """Add committed spend. Inside ``flushing_spend`` it is only counted in memory (no
        round trip) and a spike goes to that context's ``on_spike``, so this returns None;
        otherwise it is added to Redis now and the alert is returned if it makes a spike."""
        spike = self.config.spike
        if spike is None or amount <= 0:
            return None
        if self._sinks:
            self._spend.add(org, amount)
            return None
        return await self._spend.record(spike, org, amount, self.clock_ms())

    async def flush_spend(self) -> list[SpikeAlert]:
        """Add the spend counted in memory to Redis now, in one pipeline; the spikes it
        makes (not handed to any ``on_spike``)."""
        return await self._spend.flush(self.config.spike, self.clock_ms())

    @contextlib.asynccontextmanager
    async def flushing_spend(
        self, on_spike: Callable[[SpikeAlert], None], *, every_seconds: float = 1.0
    ) -> AsyncIterator[None]:
        """Take spend counting off the request path while in this context: ``record_spend``
        counts in memory, a background task adds it to Redis every ``every_seconds`` (and
        once more on the way out) and hands each spike to ``on_spike``, so an alert is up
        to one flush late. Nested contexts share the task; the innermost gets the alerts."""
        self._sinks.append(on_spike)
        if self._flusher is None:
            stop = asyncio.Event()
            self._flusher = (asyncio.create_task(self._flush_every(every_seconds, stop)), stop)
        try:
            yield
        finally:
            if len(self._sinks) == 1:  # the last one out: a last flush, then stop
                task, stop = self._flusher
                self._flusher = None
                stop.set()
                await task
            self._sinks.remove(on_spike)

    async def _flush_every(self, seconds: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            for alert in await self.flush_spend():
                try:
                    self._sinks[-1](alert)
                except Exception:  # an alerting bug must not stop the counting
                    log.exception("could not hand on the spike alert of '%s'", alert.org)
