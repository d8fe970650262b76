"""Token-rate limits: their entries, their verdicts, and what goes into
``lua/settle_tokens.lua``. ``admit.lua`` checks and records them with the other limits
(see ``admission``); ``Limiter`` runs the scripts (it is the seam to Redis).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gateway.limits import verdicts as refuse
from gateway.limits.config import TokenRate
from gateway.limits.verdicts import LimitVerdict, retry_seconds


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


def entries(checks: list[TokenCheck], member: str, tokens: int) -> list[TokenEntry]:
    return [TokenEntry(c.log, member, tokens, c.rate.window_ms) for c in checks]


def verdict(check: TokenCheck, tokens: int, headers: dict[str, str]) -> LimitVerdict:
    rate = check.rate
    detail = f"{max(0, rate.count - check.used)} of {rate.count} tokens left per "
    detail += f"{rate.window_seconds}s"
    if not check.fits:
        detail += f"; retry in {retry_seconds(check.retry_ms)}s"
    return LimitVerdict(
        f"tokens {rate.limit} per {rate.per}",
        detail,
        None if check.fits else refuse.tokens_limited(rate, tokens, check.retry_ms, headers),
    )


def settle_call(entries: list[TokenEntry], now: int, charged: int) -> tuple[list[str], list[Any]]:
    """The keys and arguments of settle_tokens.lua for one request's entries."""
    keys = [key for entry in entries for key in (entry.key, amounts_key(entry.key))]
    return keys, [now, entries[0].member, charged, *(entry.window_ms for entry in entries)]
