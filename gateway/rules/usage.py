"""Usage pricing: what a route with ``usage`` holds before forwarding and charges after.

The backend reports counters (input, cached input, output); the route's rates say how many
gateway tokens 1,000 of each cost. The charge is computed exactly (decimal rates, no
floating point) and rounded up once, over the sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.rules.schema import UsageConfig, UsageRates

MAX_HOLD = 2**63 - 1  # the ledger's bigint


@dataclass(frozen=True)
class Usage:
    """What the backend reported for one request. ``input`` excludes ``cached_input``."""

    input: int = 0
    cached_input: int = 0
    output: int = 0
    model: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "cached_input": self.cached_input,
            "output": self.output,
            "model": self.model,
        }


def rates_for(config: UsageConfig, model: str | None) -> UsageRates:
    """The rates of ``model`` when the route lists it, else the route's."""
    if model is not None and model in config.models:
        return config.models[model]
    return config.rates


def _per_thousand(count: int, rate: float) -> Decimal:
    # str() keeps the rate as written (0.1 stays 0.1, not 0.1000000000000000055...).
    return Decimal(count) * Decimal(str(rate))


def charge(config: UsageConfig, usage: Usage) -> int:
    """Tokens to charge for ``usage``: the sum over the counters at their rates, per 1,000,
    rounded up."""
    rates = rates_for(config, usage.model)
    cached_rate = rates.cached_input if rates.cached_input is not None else rates.input
    total = (
        _per_thousand(usage.input, rates.input)
        + _per_thousand(usage.cached_input, cached_rate)
        + _per_thousand(usage.output, rates.output)
    )
    return math.ceil(total / 1000)


def max_output_tokens(body: dict[str, Any], config: UsageConfig) -> int:
    """The most output the request allows: ``max_completion_tokens`` or ``max_tokens``
    when it names one, else the route's ``default_max_tokens``."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return config.default_max_tokens


def hold_for(config: UsageConfig, body: dict[str, Any], body_bytes: int) -> int:
    """The tokens held before forwarding: the route's ``hold``, else an estimate of the
    most the request can cost: its prompt (one counter per 4 bytes of body, a generous
    bound for text) plus its output limit, at the model's rates."""
    if config.hold is not None:
        return config.hold
    model = body.get("model")
    estimate = Usage(
        input=math.ceil(body_bytes / 4),
        output=max_output_tokens(body, config),
        model=model if isinstance(model, str) else None,
    )
    # A client may name any max_tokens: past what the ledger can count, the hold is simply
    # more than any balance (402), never an amount the ledger cannot store.
    return min(max(1, charge(config, estimate)), MAX_HOLD)


def nominal_hold(config: UsageConfig) -> int:
    """The hold of a request that names no model and no limits, for the places that judge a
    route without a request (explain, the usage API)."""
    if config.hold is not None:
        return config.hold
    return hold_for(config, {}, 0)
