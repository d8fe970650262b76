"""Token-rate limits against a real Redis: exact boundaries of holds and charges, settling
down, up and to nothing, the sliding window under an injected clock, 200 simultaneous
admissions through four limiters, Redis outages, and the rules that configure them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from gateway.errors import ConfigError, LimiterUnavailable, RateLimited
from gateway.limits.config import (
    Effective,
    LimitsConfig,
    LimitSet,
    RateLimit,
    TokenRate,
    effective,
)
from gateway.limits.limiter import Admission, Limiter
from gateway.rules.loading import parse_rules
from gateway.runtime import free_port
from tests.conftest import Clock, load_test_rules, rules_yaml
from tests.relay import Relay

ORG, USER = "acme", "alice"


def tokens(*rates: TokenRate, rate: tuple[RateLimit, ...] = ()) -> Effective:
    return Effective(rate=rate, min_interval=None, concurrency=None, tokens=rates)


PER_USER = tokens(TokenRate(limit="100/minute"))


async def admit(
    limiter: Limiter, limits: Effective, hold: int, org: str = ORG, user: str = USER
) -> Admission:
    return await limiter.admit(org, user, "general", limits, 10, tokens=hold)


async def left(limiter: Limiter, limits: Effective, org: str = ORG, user: str = USER) -> list[str]:
    verdicts = await limiter.peek(org, user, "general", limits)
    return [v.detail for v in verdicts if v.limit.startswith("tokens ")]


# --- the boundary ------------------------------------------------------------------------


async def test_ten_holds_of_ten_fill_a_cap_of_100_and_a_settle_frees_the_rest(
    limiter: Limiter,
) -> None:
    admissions = [await admit(limiter, PER_USER, 10) for _ in range(10)]
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, PER_USER, 10)
    assert refused.value.detail == "more than 100 tokens per 60s (user limit)"
    assert refused.value.code == "rate_limited" and refused.value.status == 429
    assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
    assert await left(limiter, PER_USER) == ["0 of 100 tokens left per 60s; retry in 60s"]

    await limiter.settle_tokens(admissions[0], 3)  # 7 of its 10 were not needed
    assert await left(limiter, PER_USER) == ["7 of 100 tokens left per 60s"]
    with pytest.raises(RateLimited):
        await admit(limiter, PER_USER, 8)
    await admit(limiter, PER_USER, 7)
    with pytest.raises(RateLimited):
        await admit(limiter, PER_USER, 1)
    with pytest.raises(RateLimited):  # a hold of 0 needs the window below its cap
        await admit(limiter, PER_USER, 0)


async def test_a_hold_of_0_is_admitted_until_the_window_is_full(limiter: Limiter) -> None:
    first = await admit(limiter, PER_USER, 0)
    await admit(limiter, PER_USER, 99)
    second = await admit(limiter, PER_USER, 0)  # 99 of 100: room for a charge still to come
    await limiter.settle_tokens(first, 1)
    with pytest.raises(RateLimited):
        await admit(limiter, PER_USER, 0)
    await limiter.settle_tokens(second, 0)
    await limiter.settle_tokens(first, 0)
    await admit(limiter, PER_USER, 0)


async def test_a_hold_over_the_cap_never_fits(limiter: Limiter) -> None:
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, PER_USER, 101)
    assert refused.value.detail == (
        "this request holds 101 tokens, more than the 100 tokens per 60s "
        "that the user limit allows at all"
    )
    assert refused.value.headers["Retry-After"] == "60"
    await admit(limiter, PER_USER, 100)  # the refused hold left nothing behind


# --- per user, per organization ----------------------------------------------------------


async def test_a_user_limit_is_each_users_own(limiter: Limiter) -> None:
    await admit(limiter, PER_USER, 100)
    with pytest.raises(RateLimited):
        await admit(limiter, PER_USER, 1)
    await admit(limiter, PER_USER, 100, user="bob")
    await admit(limiter, PER_USER, 100, org="other")


async def test_an_organization_limit_is_shared_by_its_users(limiter: Limiter) -> None:
    limits = tokens(TokenRate(limit="100/hour", per="organization"))
    await admit(limiter, limits, 60, user="alice")
    await admit(limiter, limits, 40, user="bob")
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, limits, 1, user="carol")
    assert refused.value.detail == "more than 100 tokens per 3600s (organization limit)"
    await admit(limiter, limits, 100, org="other", user="alice")


async def test_every_limit_is_checked_before_any_records(limiter: Limiter) -> None:
    limits = tokens(TokenRate(limit="1000/minute"), TokenRate(limit="50/hour", per="organization"))
    for _ in range(5):
        await admit(limiter, limits, 10)
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, limits, 10)
    assert refused.value.detail == "more than 50 tokens per 3600s (organization limit)"
    # The refused hold was not recorded under the per-user limit, which it fitted.
    assert await left(limiter, limits) == [
        "950 of 1000 tokens left per 60s",
        "0 of 50 tokens left per 3600s; retry in 3600s",
    ]


async def test_a_limit_listed_twice_counts_each_hold_once(limiter: Limiter) -> None:
    limits = tokens(TokenRate(limit="100/minute"), TokenRate(limit="100/minute"))
    admission = await admit(limiter, limits, 30)
    assert await left(limiter, limits) == ["70 of 100 tokens left per 60s"] * 2
    await limiter.settle_tokens(admission, 50)
    assert await left(limiter, limits) == ["50 of 100 tokens left per 60s"] * 2


# --- settling ----------------------------------------------------------------------------


async def test_a_charge_above_the_hold_counts_in_full(limiter: Limiter) -> None:
    admission = await admit(limiter, PER_USER, 10)
    await limiter.settle_tokens(admission, 40)
    assert [e.amount for e in admission.token_entries] == [40]
    for _ in range(6):
        await admit(limiter, PER_USER, 10)
    with pytest.raises(RateLimited):
        await admit(limiter, PER_USER, 1)
    # A charge may take the window over its cap: nothing fits until it falls back below.
    await limiter.settle_tokens(admission, 150)
    assert await left(limiter, PER_USER) == ["0 of 100 tokens left per 60s; retry in 60s"]
    with pytest.raises(RateLimited):
        await admit(limiter, PER_USER, 0)
    await limiter.settle_tokens(admission, 39)
    await admit(limiter, PER_USER, 1)


async def test_a_refund_gives_the_hold_back_and_settling_again_is_harmless(
    limiter: Limiter,
) -> None:
    admission = await admit(limiter, PER_USER, 100)
    for _ in range(2):
        await limiter.settle_tokens(admission, 0)
    assert await left(limiter, PER_USER) == ["100 of 100 tokens left per 60s"]
    assert [e.amount for e in admission.token_entries] == [0]
    for _ in range(2):
        await limiter.settle_tokens(admission, 25)
    assert await left(limiter, PER_USER) == ["75 of 100 tokens left per 60s"]
    await limiter.settle_tokens(Admission(), 10)  # nothing held: nothing to settle
    with pytest.raises(ValueError, match="cannot be charged -1 tokens"):
        await limiter.settle_tokens(admission, -1)
    with pytest.raises(ValueError, match="cannot hold -1 tokens"):
        await admit(limiter, PER_USER, -1)


# --- the sliding window ------------------------------------------------------------------


async def test_holds_leave_the_window_one_by_one(limiter: Limiter, clock: Clock) -> None:
    early = await admit(limiter, PER_USER, 60)
    clock.advance(seconds=40)
    late = await admit(limiter, PER_USER, 40)
    clock.advance(seconds=10)
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, PER_USER, 1)
    assert refused.value.headers["Retry-After"] == "10"  # when the 60 leave the window
    with pytest.raises(RateLimited) as refused:  # 61 need the 40 to leave as well
        await admit(limiter, PER_USER, 61)
    assert refused.value.headers["Retry-After"] == "50"
    clock.advance(seconds=10, milliseconds=1)
    await admit(limiter, PER_USER, 60)
    # A hold that has left its window is not counted again by a late settle.
    await limiter.settle_tokens(early, 100)
    # The 40 of t=40s leave at t=100s: the first room for even a hold of 0.
    assert await left(limiter, PER_USER) == ["0 of 100 tokens left per 60s; retry in 40s"]
    clock.advance(seconds=60)
    await limiter.settle_tokens(late, 100)  # out of its window, though not yet trimmed
    assert await left(limiter, PER_USER) == ["100 of 100 tokens left per 60s"]
    await admit(limiter, PER_USER, 100)


# --- concurrency -------------------------------------------------------------------------


@pytest.fixture
async def replicas(redis_url: str, clock: Clock) -> AsyncIterator[list[Limiter]]:
    """Four limiters sharing one key prefix, as four gateway replicas share one Redis."""
    prefix = f"t{os.urandom(6).hex()}:"
    limiters = [
        Limiter.from_url(redis_url, LimitsConfig(), prefix=prefix, clock_ms=clock.ms)
        for _ in range(4)
    ]
    yield limiters
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
        for limiter in limiters:
            await limiter.close()


async def test_200_simultaneous_holds_of_10_against_1000_admit_exactly_100(
    replicas: list[Limiter],
) -> None:
    limits = tokens(TokenRate(limit="1000/minute", per="organization"))

    async def one(i: int) -> str:
        try:
            await admit(replicas[i % 4], limits, 10, user=f"u{i}")
        except RateLimited:
            return "refused"
        return "admitted"

    # Open the connections first: 200 connects at once on a loaded machine can pass the
    # 0.5 s connect timeout, and `on_store_error: open` would then admit (as it should).
    await asyncio.gather(*(replica.ping() for replica in replicas for _ in range(50)))
    outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    assert Counter(outcomes) == {"admitted": 100, "refused": 100}
    assert await left(replicas[0], limits) == ["0 of 1000 tokens left per 60s; retry in 60s"]


# --- peek --------------------------------------------------------------------------------


async def test_peek_refuses_as_admit_does_and_consumes_nothing(limiter: Limiter) -> None:
    await admit(limiter, PER_USER, 95)
    verdicts = await limiter.peek(ORG, USER, "general", PER_USER, tokens=5)
    assert [(v.limit, v.detail, v.ok) for v in verdicts] == [
        ("blocks", "none", True),
        ("tokens 100/minute per user", "5 of 100 tokens left per 60s", True),
    ]
    verdicts = await limiter.peek(ORG, USER, "general", PER_USER, tokens=6)
    refusal = verdicts[-1].refusal
    assert isinstance(refusal, RateLimited)
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, PER_USER, 6)
    assert (refusal.detail, refusal.headers, refusal.extra) == (
        refused.value.detail,
        refused.value.headers,
        refused.value.extra,
    )
    await admit(limiter, PER_USER, 5)


async def test_token_refusals_carry_the_request_rate_headers(limiter: Limiter) -> None:
    limits = tokens(TokenRate(limit="10/minute"), rate=(RateLimit(limit="30/minute"),))
    await admit(limiter, limits, 10)
    with pytest.raises(RateLimited) as refused:
        await admit(limiter, limits, 1)
    assert refused.value.detail == "more than 10 tokens per 60s (user limit)"
    assert refused.value.headers["RateLimit-Policy"] == '"user-30-per-60s";q=30;w=60'


# --- Redis down --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_outage_follows_on_store_error_and_settling_never_raises(
    redis_url: str, clock: Clock, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    relay = Relay(redis_url)
    await relay.start()
    limiter = Limiter.from_url(
        f"redis://127.0.0.1:{relay.port}/0",
        LimitsConfig(on_store_error=mode),  # type: ignore[arg-type]
        prefix=f"t{os.urandom(6).hex()}:",
        clock_ms=clock.ms,
    )
    try:
        held = await admit(limiter, PER_USER, 100)
        await relay.cut()
        with caplog.at_level(logging.WARNING, logger="gateway.limits"):
            await limiter.settle_tokens(held, 0)
        assert any("could not settle a token-rate hold" in r.getMessage() for r in caplog.records)
        assert [e.amount for e in held.token_entries] == [100]
        if mode == "open":
            unmetered = await admit(limiter, PER_USER, 100)
            assert unmetered.token_entries == []
            await limiter.settle_tokens(unmetered, 50)
        else:
            with pytest.raises(LimiterUnavailable):
                await admit(limiter, PER_USER, 100)
        await relay.start()
        await asyncio.sleep(0.1)
        with pytest.raises(RateLimited):  # the hold that could not be settled still counts
            await admit(limiter, PER_USER, 1)
        await limiter.settle_tokens(held, 0)
        await admit(limiter, PER_USER, 100)
    finally:
        await relay.cut()
        await limiter.close()


async def test_an_unreachable_redis_in_closed_mode_refuses() -> None:
    limiter = Limiter.from_url(
        f"redis://127.0.0.1:{free_port()}/0", LimitsConfig(on_store_error="closed")
    )
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.peek(ORG, USER, "general", PER_USER, tokens=1)
        with pytest.raises(LimiterUnavailable):
            await admit(limiter, PER_USER, 1)
    finally:
        await limiter.close()


# --- configuration -----------------------------------------------------------------------


def test_a_string_a_mapping_or_a_list() -> None:
    config = LimitsConfig.model_validate(
        {
            "default": {"tokens": "100000/minute"},
            "plans": {
                "pro": {"tokens": {"limit": "500000/hour", "per": "organization"}},
                "enterprise": {
                    "tokens": ["10000/minute", {"limit": "1000000/day", "per": "organization"}]
                },
            },
        },
        strict=True,
    )
    assert config.default.tokens == [TokenRate(limit="100000/minute", per="user")]
    assert effective(config, "pro", None).tokens == (
        TokenRate(limit="500000/hour", per="organization"),
    )
    (minute, day) = effective(config, "enterprise", None).tokens
    assert (minute.count, minute.window_seconds, minute.per) == (10000, 60, "user")
    assert (day.count, day.window_seconds, day.per) == (1000000, 86400, "organization")
    assert effective(config, "starter", None).tokens == (TokenRate(limit="100000/minute"),)


def test_no_token_limits_unless_configured() -> None:
    assert effective(LimitsConfig(), None, None).tokens == ()
    assert effective(LimitsConfig(), "pro", LimitSet(rate=[])).tokens == ()


def test_the_most_specific_level_wins_and_null_switches_tokens_off() -> None:
    yaml = rules_yaml(
        "http://127.0.0.1:9",
        limits="limits:\n"
        "  default: {rate: [], min_interval: null, tokens: 100000/minute}\n"
        "  plans:\n"
        "    enterprise: {tokens: {limit: 1000000/minute, per: organization}}\n",
        extra_routes="  - {name: free, method: POST, path: /v1/free, upstream: backend,"
        " token_type: general, cost: 1, limits: {tokens: null}}\n"
        "  - {name: tight, method: POST, path: /v1/tight, upstream: backend,"
        " token_type: general, cost: 1, limits: {tokens: [1000/minute]}}\n"
        "  - {name: plain, method: POST, path: /v1/plain, upstream: backend,"
        " token_type: general, cost: 1, limits: {concurrency: {max: 2}}}\n",
    )
    rules = parse_rules(yaml.encode(), "rules.yaml")
    config = rules.document.limits

    def caps(plan: str, path: str) -> list[tuple[str, str]]:
        route = rules.match("POST", path)
        assert route is not None
        return [(r.limit, r.per) for r in effective(config, plan, route.config.limits).tokens]

    assert caps("pro", "/v1/plain") == [("100000/minute", "user")]
    assert caps("enterprise", "/v1/plain") == [("1000000/minute", "organization")]
    assert caps("enterprise", "/v1/free") == []
    assert caps("pro", "/v1/tight") == [("1000/minute", "user")]


@pytest.mark.parametrize(
    ("tokens_yaml", "errors"),
    [
        (
            "100000",
            [
                "limits.default.tokens: must be a limit like '100000/minute', a mapping with "
                "'limit' and 'per', or a list of these, got 100000"
            ],
        ),
        ("{limit: 100000}", ["limits.default.tokens[0].limit: must be a string, got 100000"]),
        (
            "[100000/fortnight]",
            [
                "limits.default.tokens[0].limit: '100000/fortnight' is not a rate like "
                "30/minute, 1000/day, 5/second or 100/hour"
            ],
        ),
        (
            "[0/minute]",
            [
                "limits.default.tokens[0].limit: '0/minute': "
                "the count and the period must be positive"
            ],
        ),
        (
            "{limit: 10/minute, per: team}",
            ["limits.default.tokens[0].per: must be one of 'user' or 'organization', got 'team'"],
        ),
        (
            "{limit: 10/minute, name: x}",
            ["limits.default.tokens[0].name: unknown key (expected one of limit, per)"],
        ),
    ],
)
def test_bad_token_limits_are_refused_by_path(tokens_yaml: str, errors: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        load_test_rules(
            "http://127.0.0.1:9", limits=f"limits:\n  default: {{tokens: {tokens_yaml}}}\n"
        )
    assert refused.value.errors == errors
