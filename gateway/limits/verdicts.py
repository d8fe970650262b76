"""The refusals of the limits, one constructor each.

``Limiter.admit`` raises them and ``Limiter.peek`` reports them, so a refusal reads the same
whichever of the two decided it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from gateway.errors import Blocked, GatewayError, RateLimited, TooFrequent, TooManyInFlight
from gateway.limits.config import Concurrency, MinInterval, RateLimit, TokenRate


class LimitVerdict(NamedTuple):
    """One limit's verdict on a request: ``refusal`` is the error ``admit`` raises."""

    limit: str
    detail: str
    refusal: GatewayError | None

    @property
    def ok(self) -> bool:
        return self.refusal is None


def retry_seconds(ms: float) -> int:
    return max(1, math.ceil(ms / 1000))


def _whose(per: str) -> str:
    return "organization" if per == "organization" else "user"


def blocked(org: str, user: str, index: int, retry_ms: float) -> Blocked:
    whom = f"user '{user}'" if index == 1 else f"organization '{org}'"
    return Blocked(
        f"{whom} is blocked after repeated refusals or unusual spend; "
        "try again later or ask an operator to lift the block",
        headers={"Retry-After": str(retry_seconds(retry_ms))},
    )


def rate_limited(rate: RateLimit, retry_ms: float, headers: dict[str, str]) -> RateLimited:
    return RateLimited(
        f"more than {rate.count} requests per {rate.window_seconds}s ({_whose(rate.per)} limit)",
        headers={"Retry-After": str(retry_seconds(retry_ms)), **headers},
        limit=rate.limit,
    )


def tokens_limited(
    rate: TokenRate, tokens: int, retry_ms: float, headers: dict[str, str]
) -> RateLimited:
    if tokens > rate.count:
        # No window will ever have room: say so rather than invite a retry.
        detail = (
            f"this request holds {tokens} tokens, more than the {rate.count} tokens per "
            f"{rate.window_seconds}s that the {_whose(rate.per)} limit allows at all"
        )
    else:
        detail = (
            f"more than {rate.count} tokens per {rate.window_seconds}s ({_whose(rate.per)} limit)"
        )
    return RateLimited(
        detail, headers={"Retry-After": str(retry_seconds(retry_ms)), **headers}, limit=rate.limit
    )


def too_frequent(
    token_type: str, gap: MinInterval, retry_ms: float, headers: dict[str, str]
) -> TooFrequent:
    return TooFrequent(
        f"at most one {token_type} request every {gap.seconds:g}s",
        headers={"Retry-After": str(retry_seconds(retry_ms)), **headers},
    )


def too_many_in_flight(cap: Concurrency, headers: dict[str, str]) -> TooManyInFlight:
    return TooManyInFlight(
        f"at most {cap.max} requests in flight at once ({_whose(cap.per)} limit)",
        headers={"Retry-After": "1", **headers},
    )
