"""Spend spikes: committed spend counted per organization, added to Redis by
``lua/spike.lua``, and the alerts that come back.

While a gateway flushes spend in the background (``Limiter.flushing_spend``), committed
spend is only added up in memory on the request path, and one pipeline a second carries
every organization's sum to Redis: a spike is noticed at the first flush after the spend
that makes it, so its alert (and its block, with ``spike.block``) is up to one flush late.
Spend that could not be flushed (Redis unreachable) is dropped, never counted twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.errors import LimiterUnavailable
from gateway.limits.config import Spike
from gateway.limits.keys import Keys
from gateway.limits.store import Eval, Store

log = logging.getLogger("gateway.limits")

BUCKET_MS = 60_000  # spend is kept in one-minute buckets


@dataclass(frozen=True)
class SpikeAlert:
    org: str
    recent: int
    baseline: float
    window_minutes: int
    blocked: bool


class Spend:
    """Spend not yet in Redis, per organization."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._pending: dict[str, int] = {}

    def add(self, org: str, amount: int) -> None:
        self._pending[org] = self._pending.get(org, 0) + amount

    def _call(self, spike: Spike, org: str, amount: int, now: int) -> Eval:
        cooldown_ms = spike.cooldown_minutes * 60_000
        keys = [
            self._keys.org(org, "spend"),
            self._keys.org(org, "spike-alerted"),
            self._keys.org(org, "block", "o"),
        ]
        args = [
            now,
            BUCKET_MS,
            spike.window_minutes,
            spike.baseline_minutes,
            spike.factor,
            spike.min_tokens,
            amount,
            cooldown_ms,
            "block" if spike.block else "-",
        ]
        return Eval("spike", keys, args)

    @staticmethod
    def _alert(spike: Spike, org: str, answer: list[int]) -> SpikeAlert | None:
        fired, recent, baseline_milli = (int(v) for v in answer)
        if not fired:
            return None
        return SpikeAlert(org, recent, baseline_milli / 1000, spike.window_minutes, spike.block)

    async def record(self, spike: Spike, org: str, amount: int, now: int) -> SpikeAlert | None:
        """Add ``amount`` to Redis now (one round trip); the alert if it makes a spike."""
        call = self._call(spike, org, amount, now)
        try:
            answer = await self._store.run(call.script, call.keys, call.args)
        except LimiterUnavailable:
            return None
        return self._alert(spike, org, answer)

    async def flush(self, spike: Spike | None, now: int) -> list[SpikeAlert]:
        """Add the pending spend to Redis in one pipeline; the spikes it makes."""
        pending, self._pending = self._pending, {}
        if spike is None or not pending:
            return []
        orgs = list(pending)
        calls = [self._call(spike, org, pending[org], now) for org in orgs]
        try:
            answers = await self._store.pipeline(calls)
        except LimiterUnavailable as exc:
            log.warning("could not count the spend of %d organization(s): %s", len(orgs), exc)
            return []
        alerts = []
        for org, answer in zip(orgs, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("could not count the spend of organization '%s': %s", org, answer)
            elif (alert := self._alert(spike, org, answer)) is not None:
                alerts.append(alert)
        return alerts
