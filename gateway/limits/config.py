"""The ``limits`` section of rules.yaml, and the per-route ``limits`` override.

Limits are set at three levels, the most specific winning kind by kind: a route's
``limits``, then ``limits.plans.<plan>``, then ``limits.default``. A kind set to ``null`` (or
``rate: []``, ``tokens: []``) at a level switches it off there. With no ``limits`` section
at all, the defaults below apply: 30 requests a minute per user and 3 seconds between two
requests of one user to one token type, and no cap on tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

Per = Literal["user", "organization"]
_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?\s*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_rate(text: str) -> tuple[int, int]:
    """'30/minute' -> (30, 60); '1000/day', '5/second', '100/hour', '10/5m' also work."""
    match = _RATE.match(text)
    if not match or match.group(3) not in _UNITS:
        raise ValueError(f"'{text}' is not a rate like 30/minute, 1000/day, 5/second or 100/hour")
    count, multiple = int(match.group(1)), int(match.group(2) or 1)
    if count <= 0 or multiple <= 0:
        raise ValueError(f"'{text}': the count and the period must be positive")
    return count, multiple * _UNITS[match.group(3)]


class _PerWindow(_Strict):
    """A count per window, per user or per organization, parsed once when the rules load."""

    limit: str
    per: Per = "user"

    @field_validator("limit")
    @classmethod
    def _valid(cls, value: str) -> str:
        parse_rate(value)
        return value

    # Read on every request: cached in the instance's own dict (a private attribute would
    # go through pydantic's __getattr__ each time).
    @cached_property
    def count(self) -> int:
        return parse_rate(self.limit)[0]

    @cached_property
    def window_seconds(self) -> int:
        return parse_rate(self.limit)[1]

    @cached_property
    def window_ms(self) -> int:
        return self.window_seconds * 1000


class RateLimit(_PerWindow):
    """At most ``count`` requests per window."""

    name: str | None = None  # shown in RateLimit-Policy; default "<per>-<limit>"

    @property
    def policy_name(self) -> str:
        return self.name or f"{self.per}-{self.count}-per-{self.window_seconds}s"


class TokenRate(_PerWindow):
    """At most ``count`` tokens charged per window: what requests hold until they settle,
    then what they were charged."""


class MinInterval(_Strict):
    """The shortest time between two requests to one token type."""

    seconds: Annotated[float, Field(gt=0)]
    per: Per = "user"

    @property
    def ms(self) -> int:
        return max(1, int(self.seconds * 1000))


class Concurrency(_Strict):
    max: Annotated[int, Field(gt=0, strict=True)]
    per: Per = "user"


class LimitSet(_Strict):
    rate: list[RateLimit] | None = None
    min_interval: MinInterval | None = None
    concurrency: Concurrency | None = None
    tokens: list[TokenRate] | None = None

    @field_validator("rate", "tokens", mode="before")
    @classmethod
    def _one_or_many(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"limit": v} if isinstance(v, str) else v for v in value]
        if value is not None and info.field_name == "tokens":  # rate keeps pydantic's message
            raise ValueError(
                "must be a limit like '100000/minute', a mapping with 'limit' and 'per', "
                f"or a list of these, got {json.dumps(value, default=str)}"
            )
        return value


class Blocks(_Strict):
    """After ``after`` refusals (401, 402, 403, 429) of one principal within
    ``within_seconds``, refuse everything from it for ``cooldown_seconds``."""

    after: Annotated[int, Field(gt=0, strict=True)] = 20
    within_seconds: Annotated[float, Field(gt=0)] = 300
    cooldown_seconds: Annotated[float, Field(gt=0)] = 900


class Spike(_Strict):
    """Spend in the last ``window_minutes`` above ``factor`` times the average spend of a
    window over the ``baseline_minutes`` before it (and at least ``min_tokens``) alerts."""

    window_minutes: Annotated[int, Field(gt=0, strict=True)] = 5
    baseline_minutes: Annotated[int, Field(gt=0, strict=True)] = 120
    factor: Annotated[float, Field(gt=1)] = 5.0
    min_tokens: Annotated[int, Field(ge=0, strict=True)] = 50
    cooldown_minutes: Annotated[int, Field(gt=0, strict=True)] = 60
    block: bool = False
    webhook_url: str | None = None
    webhook_secret_env: str = "GATEWAY_ALERT_SECRET"


DEFAULT_LIMITS = LimitSet(
    rate=[RateLimit(limit="30/minute", per="user")],
    min_interval=MinInterval(seconds=3, per="user"),
)


class LimitsConfig(_Strict):
    on_store_error: Literal["open", "closed"] = "open"
    default: LimitSet = DEFAULT_LIMITS
    plans: dict[str, LimitSet] = {}
    blocks: Blocks | None = Blocks()
    spike: Spike | None = None
    lease_grace_seconds: Annotated[float, Field(gt=0)] = 30


@dataclass(frozen=True)
class Effective:
    """The limits that apply to one request. Built once per plan and route for the rules
    in force (``GatewayState.limits_for``), so what is derived here is derived once."""

    rate: tuple[RateLimit, ...]
    min_interval: MinInterval | None
    concurrency: Concurrency | None
    tokens: tuple[TokenRate, ...] = ()

    @cached_property
    def rate_policy(self) -> str:
        """The ``RateLimit-Policy`` header of the rates (IETF draft), or ""."""
        return ", ".join(f'"{r.policy_name}";q={r.count};w={r.window_seconds}' for r in self.rate)


def effective(config: LimitsConfig, plan: str | None, route_limits: LimitSet | None) -> Effective:
    """Per kind: the route's if set there, else the plan's, else ``limits.default``'s, else
    the built-in default."""
    levels = [route_limits, config.plans.get(plan) if plan else None, config.default]

    def pick(kind: str) -> object:
        for level in levels:
            if level is not None and kind in level.model_fields_set:
                return getattr(level, kind)
        return getattr(DEFAULT_LIMITS, kind)

    rate = pick("rate")
    min_interval = pick("min_interval")
    concurrency = pick("concurrency")
    tokens = pick("tokens")
    assert isinstance(rate, list | None)
    assert isinstance(min_interval, MinInterval | None)
    assert isinstance(concurrency, Concurrency | None)
    assert isinstance(tokens, list | None)
    return Effective(tuple(rate or ()), min_interval, concurrency, tuple(tokens or ()))
