"""Abuse limits on Redis: the one seam to redis-py.

Each limiter is one Lua script (``lua/*.lua``), registered once, so every check is atomic
across any number of gateway replicas. Keys of one organization share the hash tag
``{org}`` so that Redis Cluster keeps them on one node. Redis failures are translated here
into ``LimiterUnavailable``; what a request does then is ``limits.on_store_error``'s call,
made by ``Limiter.admit``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import Blocked, LimiterUnavailable
from gateway.limits import token_rates
from gateway.limits import verdicts as refuse
from gateway.limits.config import Blocks, Effective, LimitsConfig, RateLimit, Spike
from gateway.limits.token_rates import TokenCheck, TokenEntry
from gateway.limits.verdicts import LimitVerdict, retry_seconds

log = logging.getLogger("gateway.limits")

ClockMs = Callable[[], int]

# Every key the gateway writes to Redis, under one prefix (default "gw:"):
#   {org}:rate:<subject>:<window>:<count>  sorted set: admitted hits (sliding log)
#   {org}:tokens:<subject>:<window>:<cap>  sorted set: token entries by time (sliding log),
#     and ...:<cap>:amounts                hash: each entry's tokens, and their "total"
#   {org}:gap:<subject>:<token_type>       last admitted request to one feature
#   {org}:inflight:<subject>               sorted set: concurrency leases by expiry
#   {org}:refusals:<subject>               sorted set: recent refusals of a principal
#   {org}:block:<subject>                  a block; its value is when it ends
#   {org}:spend / {org}:spike-alerted      spend per minute bucket; alert cooldown
#   {ip:<address>}:refusals / :block       the same for callers with no valid token
# <subject> is "o" for the organization or "u:<user>" for one of its users.


def _clean(value: str) -> str:
    # Braces would end the hash tag early and colons would blur the key's fields.
    return value.replace("%", "%25").replace("{", "%7B").replace("}", "%7D").replace(":", "%3A")


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Admission:
    """What ``admit`` took: leases to release when the request ends, the RateLimit headers
    to send, and the entries in token-rate logs to settle with the actual charge."""

    leases: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    token_entries: list[TokenEntry] = field(default_factory=list)


@dataclass(frozen=True)
class SpikeAlert:
    org: str
    recent: int
    baseline: float
    window_minutes: int
    blocked: bool


class Limiter:
    def __init__(
        self,
        client: aioredis.Redis,
        config: LimitsConfig,
        *,
        prefix: str = "gw:",
        clock_ms: ClockMs = wall_clock_ms,
    ) -> None:
        self._redis = client
        self.config = config
        self._prefix = prefix
        self.clock_ms = clock_ms
        self.store_errors = 0  # counted for metrics
        self._outage = False
        scripts = resources.files("gateway.limits").joinpath("lua")
        self._scripts = {
            name: client.register_script(scripts.joinpath(f"{name}.lua").read_text())
            for name in (
                *("rate", "min_interval", "concurrency", "refusals", "blocked", "spike"),
                *("tokens", "settle_tokens"),
            )
        }

    @classmethod
    def from_url(
        cls,
        url: str,
        config: LimitsConfig,
        *,
        prefix: str = "gw:",
        clock_ms: ClockMs = wall_clock_ms,
    ) -> Limiter:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            health_check_interval=10,
            decode_responses=True,
        )
        return cls(client, config, prefix=prefix, clock_ms=clock_ms)

    async def close(self) -> None:
        await self._redis.aclose()

    # -- plumbing -------------------------------------------------------------------

    def _key(self, org: str, *parts: str) -> str:
        return f"{self._prefix}{{{_clean(org)}}}:" + ":".join(parts)

    def _ip_key(self, address: str, part: str) -> str:
        return f"{self._prefix}{{ip:{_clean(address)}}}:{part}"

    def _rate_key(self, org: str, user: str, rate: RateLimit) -> str:
        subject = self._subject(rate.per, user)
        return self._key(org, "rate", subject, str(rate.window_seconds), str(rate.count))

    async def _check_tokens(
        self, org: str, user: str, limits: Effective, tokens: int, now: int, entry: str
    ) -> list[TokenCheck]:
        logs = [
            self._key(org, "tokens", self._subject(r.per, user), f"{r.window_seconds}:{r.count}")
            for r in limits.tokens
        ]
        call = token_rates.check_call(logs, limits.tokens, tokens, now, entry)
        return token_rates.read_checks(logs, limits.tokens, await self._run("tokens", *call))

    @staticmethod
    def _subject(per: str, user: str) -> str:
        return "o" if per == "organization" else f"u:{_clean(user)}"

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> list[int]:
        try:
            result = await self._scripts[script](keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self.store_errors += 1
            if not self._outage:
                self._outage = True
                log.error(
                    "Redis unreachable (%s: %s); limits fail %s until it is back",
                    type(exc).__name__,
                    exc,
                    self.config.on_store_error,
                )
            raise LimiterUnavailable(f"the limits store is unreachable: {exc}") from exc
        if self._outage:
            self._outage = False
            log.warning("Redis reachable again; limits enforced")
        return [int(v) for v in result]

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"the limits store is unreachable: {exc}") from exc

    # -- the request path -------------------------------------------------------------

    async def check_address(self, address: str) -> None:
        """Raise ``Blocked`` if this client address is blocked (for repeated 401s)."""
        if self.config.blocks is None:
            return
        try:
            index, retry_ms = await self._run(
                "blocked", [self._ip_key(address, "block")], [self.clock_ms()]
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
        """Check blocks, rate limits, the minimum interval, the concurrency cap and the
        token rates, in that order, stopping at the first refusal. Raises ``Blocked``,
        ``RateLimited``, ``TooFrequent`` or ``TooManyInFlight`` with ``Retry-After``; with
        Redis down, admits (``open``) or raises ``LimiterUnavailable`` (``closed``).

        Token rates admit the request when the tokens in the window plus ``tokens`` (its
        hold) stay within each cap; a hold of 0 is admitted while the window is below the
        cap. Every token rate is checked before any records the hold, which then counts
        until ``settle_tokens`` replaces it with the charge."""
        if tokens < 0:
            raise ValueError(f"a request cannot hold {tokens} tokens")
        admission = Admission()
        try:
            await self._admit(admission, org, user, token_type, limits, lease_seconds, tokens)
        except LimiterUnavailable:
            await self.release(admission)
            if self.config.on_store_error == "closed":
                raise
            return Admission()
        except BaseException:
            await self.release(admission)
            raise
        return admission

    async def _admit(
        self,
        admission: Admission,
        org: str,
        user: str,
        token_type: str,
        limits: Effective,
        lease_seconds: float,
        tokens: int,
    ) -> None:
        now = self.clock_ms()
        spike_blocks = self.config.spike is not None and self.config.spike.block
        if self.config.blocks is not None or spike_blocks:
            keys = [
                self._key(org, "block", self._subject("user", user)),
                self._key(org, "block", "o"),
            ]
            index, retry_ms = await self._run("blocked", keys, [now])
            if index:
                raise refuse.blocked(org, user, index, retry_ms)
        policies: list[str] = []
        states: list[str] = []
        for rate in limits.rate:
            window_ms = rate.window_seconds * 1000
            key = self._rate_key(org, user, rate)
            admitted, remaining, retry_ms, reset_ms = await self._run(
                "rate", [key], [now, window_ms, rate.count, uuid.uuid4().hex]
            )
            name = rate.policy_name
            policies.append(f'"{name}";q={rate.count};w={rate.window_seconds}')
            states.append(f'"{name}";r={remaining};t={retry_seconds(reset_ms)}')
            if not admitted:
                raise refuse.rate_limited(
                    rate,
                    retry_ms,
                    {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)},
                )
        if policies:
            admission.headers = {
                "RateLimit-Policy": ", ".join(policies),
                "RateLimit": ", ".join(states),
            }
        gap = limits.min_interval
        if gap is not None:
            key = self._key(org, "gap", self._subject(gap.per, user), _clean(token_type))
            admitted, retry_ms = await self._run(
                "min_interval", [key], [now, max(1, int(gap.seconds * 1000))]
            )
            if not admitted:
                raise refuse.too_frequent(token_type, gap, retry_ms, admission.headers)
        cap = limits.concurrency
        if cap is not None:
            key = self._key(org, "inflight", self._subject(cap.per, user))
            lease = uuid.uuid4().hex
            lease_ms = int((lease_seconds + self.config.lease_grace_seconds) * 1000)
            admitted, _, retry_ms = await self._run(
                "concurrency", [key], [now, cap.max, lease, lease_ms]
            )
            if not admitted:
                raise refuse.too_many_in_flight(cap, admission.headers)
            admission.leases.append((key, lease))
        if limits.tokens:
            # Last, so that no later check can refuse a request whose hold is recorded.
            entry = uuid.uuid4().hex
            checks = await self._check_tokens(org, user, limits, tokens, now, entry)
            for check in checks:
                if not check.fits:
                    raise refuse.tokens_limited(
                        check.rate, tokens, check.retry_ms, admission.headers
                    )
            admission.token_entries = token_rates.entries(checks, entry, tokens)

    async def peek(
        self, org: str, user: str, token_type: str, limits: Effective, *, tokens: int = 0
    ) -> list[LimitVerdict]:
        """Each limit's verdict for a request (holding ``tokens``) now, consuming nothing,
        with the error ``admit`` would refuse it with. Raises ``LimiterUnavailable``."""
        now = self.clock_ms()
        verdicts: list[LimitVerdict] = []
        keys = [self._key(org, "block", self._subject("user", user)), self._key(org, "block", "o")]
        index, retry_ms = await self._run("blocked", keys, [now])
        verdicts.append(
            LimitVerdict(
                "blocks",
                f"blocked for {retry_seconds(retry_ms)}s" if index else "none",
                refuse.blocked(org, user, index, retry_ms) if index else None,
            )
        )
        for rate in limits.rate:
            key = self._rate_key(org, user, rate)
            admitted, remaining, retry_ms, _ = await self._run(
                "rate", [key], [now, rate.window_seconds * 1000, rate.count, "-", "dry"]
            )
            left = remaining + 1 if admitted else 0
            detail = f"{left} of {rate.count} left per {rate.window_seconds}s"
            if not admitted:
                detail += f"; retry in {retry_seconds(retry_ms)}s"
            verdicts.append(
                LimitVerdict(
                    f"rate {rate.limit} per {rate.per}",
                    detail,
                    None if admitted else refuse.rate_limited(rate, retry_ms, {}),
                )
            )
        gap = limits.min_interval
        if gap is not None:
            key = self._key(org, "gap", self._subject(gap.per, user), _clean(token_type))
            admitted, retry_ms = await self._run(
                "min_interval", [key], [now, max(1, int(gap.seconds * 1000)), "dry"]
            )
            verdicts.append(
                LimitVerdict(
                    f"min_interval {gap.seconds:g}s per {gap.per}",
                    "free" if admitted else f"retry in {retry_seconds(retry_ms)}s",
                    None if admitted else refuse.too_frequent(token_type, gap, retry_ms, {}),
                )
            )
        cap = limits.concurrency
        if cap is not None:
            key = self._key(org, "inflight", self._subject(cap.per, user))
            admitted, in_flight, _ = await self._run(
                "concurrency", [key], [now, cap.max, "-", 0, "dry"]
            )
            verdicts.append(
                LimitVerdict(
                    f"concurrency {cap.max} per {cap.per}",
                    f"{in_flight} in flight",
                    None if admitted else refuse.too_many_in_flight(cap, {}),
                )
            )
        if limits.tokens:
            checks = await self._check_tokens(org, user, limits, tokens, now, token_rates.DRY)
            verdicts += [token_rates.verdict(check, tokens) for check in checks]
        return verdicts

    async def settle_tokens(self, admission: Admission, charged: int) -> None:
        """Replace the hold of ``admission``'s token entries with ``charged``, the request's
        actual charge (0 for a refund), counted at the time the hold was admitted. Settling
        again with another charge replaces that one; an entry already out of its window is
        left alone. Never raises for Redis: an unsettled hold counts until its window ends."""
        if charged < 0:
            raise ValueError(f"a request cannot be charged {charged} tokens")
        if not admission.token_entries:
            return
        entries = admission.token_entries
        call = token_rates.settle_call(entries, self.clock_ms(), charged)
        try:
            await self._run("settle_tokens", *call)
        except LimiterUnavailable as exc:
            log.warning("could not settle a token-rate hold (it counts until it ages out): %s", exc)
            return
        admission.token_entries = [entry._replace(amount=charged) for entry in entries]

    async def release(self, admission: Admission) -> None:
        """Give back concurrency slots. Never raises: an unreleased lease expires."""
        for key, lease in admission.leases:
            try:
                await self._redis.zrem(key, lease)
            except (RedisError, OSError) as exc:
                log.warning("could not release a concurrency lease (it will expire): %s", exc)
        admission.leases.clear()

    async def record_refusal(self, org: str | None, user: str | None, address: str | None) -> bool:
        """Count a refusal against the principal (or, with no valid token, the address).
        Returns whether it is blocked now."""
        blocks: Blocks | None = self.config.blocks
        if blocks is None:
            return False
        if org is not None and user is not None:
            subject = self._subject("user", user)
            keys = [self._key(org, "refusals", subject), self._key(org, "block", subject)]
            who = f"user '{user}' of organization '{org}'"
        elif address:
            keys = [self._ip_key(address, "refusals"), self._ip_key(address, "block")]
            who = f"address {address}"
        else:
            return False
        try:
            blocked, count = await self._run(
                "refusals",
                keys,
                [
                    self.clock_ms(),
                    int(blocks.within_seconds * 1000),
                    blocks.after,
                    int(blocks.cooldown_seconds * 1000),
                    uuid.uuid4().hex,
                ],
            )
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

    async def record_spend(self, org: str, amount: int) -> SpikeAlert | None:
        """Add committed spend; return an alert when the organization's spend spikes."""
        spike: Spike | None = self.config.spike
        if spike is None or amount <= 0:
            return None
        bucket_ms = 60_000
        try:
            fired, recent, baseline_milli = await self._run(
                "spike",
                [self._key(org, "spend"), self._key(org, "spike-alerted")],
                [
                    self.clock_ms(),
                    bucket_ms,
                    spike.window_minutes,
                    spike.baseline_minutes,
                    spike.factor,
                    spike.min_tokens,
                    amount,
                    spike.cooldown_minutes * 60_000,
                ],
            )
        except LimiterUnavailable:
            return None
        if not fired:
            return None
        if spike.block:
            until = self.clock_ms() + spike.cooldown_minutes * 60_000
            try:
                await self._redis.set(
                    self._key(org, "block", "o"), until, px=spike.cooldown_minutes * 60_000
                )
            except (RedisError, OSError) as exc:
                log.error("could not block organization '%s' after a spike: %s", org, exc)
        return SpikeAlert(org, recent, baseline_milli / 1000, spike.window_minutes, spike.block)

    async def unblock(
        self, org: str | None = None, user: str | None = None, address: str | None = None
    ) -> int:
        """Lift blocks (and forget recent refusals). Returns how many blocks were lifted."""
        blocks: list[str] = []
        refusals: list[str] = []
        if address:
            blocks.append(self._ip_key(address, "block"))
            refusals.append(self._ip_key(address, "refusals"))
        if org is not None and user is not None:
            subject = self._subject("user", user)
            blocks.append(self._key(org, "block", subject))
            refusals.append(self._key(org, "refusals", subject))
        elif org is not None:
            blocks.append(self._key(org, "block", "o"))
        try:
            # One by one: the keys may live on different cluster nodes.
            lifted = [int(await self._redis.delete(key)) for key in blocks]
            for key in refusals:
                await self._redis.delete(key)
        except (RedisError, OSError) as exc:
            raise LimiterUnavailable(f"the limits store is unreachable: {exc}") from exc
        return sum(lifted)
