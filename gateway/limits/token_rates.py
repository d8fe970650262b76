"""Token-rate limits: what goes into ``lua/tokens.lua`` and ``lua/settle_tokens.lua`` and
what comes out. ``Limiter`` runs the scripts (it is the seam to Redis); ``admit`` and
``peek`` read their answer through here, so they cannot read it differently.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.limits import verdicts as refuse
from gateway.limits.config import TokenRate
from gateway.limits.verdicts import LimitVerdict, retry_seconds

DRY = "-"  # the entry of a check that records nothing


class TokenEntry(NamedTuple):
    """An admitted request's entry in one token-rate log: ``amount`` tokens at its time."""

    key: str
    member: str
    amount: int
    window_ms: int


class TokenCheck(NamedTuple):
    """One token rate's answer: whether the request fits, the tokens already in the window,
    and in how many milliseconds it would fit."""

    rate: TokenRate
    log: str
    fits: bool
    used: int
    retry_ms: int


def amounts_key(log: str) -> str:
    return f"{log}:amounts"


def check_call(
    logs: list[str], rates: tuple[TokenRate, ...], tokens: int, now: int, entry: str
) -> tuple[list[str], list[Any]]:
    """The keys and arguments of tokens.lua: every rate at once; ``entry`` is recorded in
    each log when all fit, unless it is ``DRY``."""
    keys = [key for log in logs for key in (log, amounts_key(log))]
    args: list[Any] = [now, entry, tokens, "dry" if entry == DRY else "record"]
    for rate in rates:
        args += [rate.window_seconds * 1000, rate.count]
    return keys, args


def read_checks(
    logs: list[str], rates: tuple[TokenRate, ...], answer: list[int]
) -> list[TokenCheck]:
    _, *per_rate = answer
    return [
        TokenCheck(rate, log, bool(per_rate[3 * i]), per_rate[3 * i + 1], per_rate[3 * i + 2])
        for i, (rate, log) in enumerate(zip(rates, logs, strict=True))
    ]


def entries(checks: list[TokenCheck], member: str, tokens: int) -> list[TokenEntry]:
    return [TokenEntry(c.log, member, tokens, c.rate.window_seconds * 1000) for c in checks]


def verdict(check: TokenCheck, tokens: int) -> LimitVerdict:
    rate = check.rate
    detail = f"{max(0, rate.count - check.used)} of {rate.count} tokens left per "
    detail += f"{rate.window_seconds}s"
    if not check.fits:
        detail += f"; retry in {retry_seconds(check.retry_ms)}s"
    return LimitVerdict(
        f"tokens {rate.limit} per {rate.per}",
        detail,
        None if check.fits else refuse.tokens_limited(rate, tokens, check.retry_ms, {}),
    )


def settle_call(entries: list[TokenEntry], now: int, charged: int) -> tuple[list[str], list[Any]]:
    """The keys and arguments of settle_tokens.lua for one request's entries."""
    keys = [key for entry in entries for key in (entry.key, amounts_key(entry.key))]
    return keys, [now, entries[0].member, charged, *(entry.window_ms for entry in entries)]
