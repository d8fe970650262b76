"""One request against every limit: what goes into ``lua/admit.lua`` and what comes out.

``Limiter.admit`` runs the script and ``Limiter.peek`` runs it dry; both read its answer
through ``read``, which gives one verdict per limit with the refusal ``admit`` raises, so a
refusal is decided in one place and reads the same whichever of the two reports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.errors import GatewayError
from gateway.limits import token_rates
from gateway.limits import verdicts as refuse
from gateway.limits.config import Effective
from gateway.limits.keys import Keys
from gateway.limits.token_rates import TokenCheck, TokenEntry, amounts_key
from gateway.limits.verdicts import LimitVerdict, retry_seconds


@dataclass
class Admission:
    """What ``admit`` took: leases to release when the request ends, the RateLimit headers
    to send, and the entries in token-rate logs to settle with the actual charge."""

    leases: list[tuple[str, str]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    token_entries: list[TokenEntry] = field(default_factory=list)


class Request(NamedTuple):
    """One request to judge: ``tokens`` is its hold; ``blocks`` whether blocks apply."""

    org: str
    user: str
    token_type: str
    limits: Effective
    tokens: int
    blocks: bool


class Outcome(NamedTuple):
    """The script's answer: each limit's verdict, in the order ``admit`` checks them, and
    the RateLimit headers (after this request if it was admitted)."""

    admitted: bool
    verdicts: list[LimitVerdict]
    headers: dict[str, str]
    token_checks: list[TokenCheck]

    def refusal(self) -> GatewayError | None:
        """The first limit's refusal, which ``admit`` raises."""
        return next((v.refusal for v in self.verdicts if v.refusal is not None), None)


def call(
    keys: Keys, request: Request, *, now: int, member: str, lease_ms: int, dry: bool
) -> tuple[list[str], list[int | str]]:
    """The keys and arguments of admit.lua; ``member`` is the request's unique id."""
    org, user, limits = request.org, request.user, request.limits
    gap, cap = limits.min_interval, limits.concurrency
    names = _blocks_then_rates(keys, request)
    if gap is not None:
        names.append(keys.gap(org, user, gap, request.token_type))
    if cap is not None:
        names.append(keys.inflight(org, user, cap))
    for token_rate in limits.tokens:
        log = keys.tokens(org, user, token_rate)
        names += [log, amounts_key(log)]
    args: list[int | str] = [
        now,
        "dry" if dry else "record",
        member,
        2 if request.blocks else 0,
        len(limits.rate),
        0 if gap is None else 1,
        0 if cap is None else 1,
        len(limits.tokens),
        request.tokens,
        lease_ms,
    ]
    for rate in limits.rate:
        args += [rate.window_ms, rate.count]
    if gap is not None:
        args.append(gap.ms)
    if cap is not None:
        args.append(cap.max)
    for token_rate in limits.tokens:
        args += [token_rate.window_ms, token_rate.count]
    return names, [" ".join(map(str, args))]


def rate_headers(limits: Effective, windows: list[tuple[int, int]], taken: int) -> dict[str, str]:
    """The RateLimit headers of a request that found ``windows`` (per rate: hits before it,
    reset in ms) and, with what it was admitted by, ``taken`` hits (0: refused)."""
    if not limits.rate:
        return {}
    states = [
        f'"{rate.policy_name}";r={max(0, rate.count - hits - taken)};t={retry_seconds(reset_ms)}'
        for rate, (hits, reset_ms) in zip(limits.rate, windows, strict=True)
    ]
    return {"RateLimit-Policy": limits.rate_policy, "RateLimit": ", ".join(states)}


def leasable(request: Request) -> bool:
    """Whether admissions of ``request``'s caller can be made ahead (``lua/lease.lua``):
    when blocks and rates are all it is judged by, and at least one applies."""
    limits = request.limits
    return (
        limits.min_interval is None
        and limits.concurrency is None
        and not limits.tokens
        and (request.blocks or bool(limits.rate))
    )


class Leased(NamedTuple):
    """One admission made ahead: its hit in each rate's log (``member`` in each of
    ``keys``), the limits that judged it, and what a request drawing it is admitted with."""

    keys: tuple[str, ...]
    member: str
    limits: Effective
    admission: Admission


def lease_call(
    keys: Keys, request: Request, *, now: int, prefix: str, take: int, until: int
) -> tuple[list[str], list[int | str]]:
    """The keys and arguments of lease.lua: up to ``take`` admissions, drawn until
    ``until``; their hits' members start with ``prefix``."""
    limits = request.limits
    names = _blocks_then_rates(keys, request)
    args: list[int | str] = [now, prefix, 2 if request.blocks else 0, len(limits.rate), take, until]
    for rate in limits.rate:
        args += [rate.window_ms, rate.count]
    return names, [" ".join(map(str, args))]


def leased(keys: list[str], request: Request, prefix: str, answer: list[int]) -> list[Leased]:
    """The admissions lease.lua's ``answer`` made, in the order they are to be drawn: the
    n-th is admitted with the headers of the n-th request admitted one by one."""
    limits = request.limits
    if answer[0] < 1:
        return []
    rate_keys = _rate_keys(keys, request)
    windows = [(answer[1 + 2 * i], answer[2 + 2 * i]) for i in range(len(limits.rate))]
    return [
        Leased(
            rate_keys, f"{prefix}:{n}", limits, Admission(headers=rate_headers(limits, windows, n))
        )
        for n in range(1, answer[0] + 1)
    ]


def unanswered(keys: list[str], request: Request, prefix: str, take: int) -> list[Leased]:
    """Every admission a lease call that went unanswered may have made (it may have run):
    to give back."""
    rate_keys = _rate_keys(keys, request)
    return [
        Leased(rate_keys, f"{prefix}:{n}", request.limits, Admission()) for n in range(1, take + 1)
    ]


def _blocks_then_rates(keys: Keys, request: Request) -> list[str]:
    """The first keys of admit.lua and lease.lua alike: the blocks (if checked), then
    each rate's log."""
    org, user = request.org, request.user
    names = keys.blocks(org, user) if request.blocks else []
    return names + [keys.rate(org, user, rate) for rate in request.limits.rate]


def _rate_keys(keys: list[str], request: Request) -> tuple[str, ...]:
    """The rates' logs among ``lease_call``'s keys (they come last)."""
    return tuple(keys[len(keys) - len(request.limits.rate) :])


def read(keys: list[str], request: Request, answer: list[int]) -> Outcome:
    """Each limit's verdict from admit.lua's ``answer`` to ``call``'s ``keys``."""
    org, user, limits = request.org, request.user, request.limits
    admitted, block, block_ms = bool(answer[0]), answer[1], answer[2]
    at = 3
    rates = []
    for rate in limits.rate:
        rates.append((rate, bool(answer[at]), answer[at + 1], answer[at + 2]))
        at += 3
    # A refused request took nothing: what is left is what was left before it.
    headers = rate_headers(
        limits, [(hits, reset_ms) for _, _, hits, reset_ms in rates], int(admitted)
    )

    verdicts = [
        LimitVerdict(
            "blocks",
            f"blocked for {retry_seconds(block_ms)}s" if block else "none",
            refuse.blocked(org, user, block, block_ms) if block else None,
        )
    ]
    for rate, fits, hits, reset_ms in rates:
        detail = f"{rate.count - hits if fits else 0} of {rate.count} left per "
        detail += f"{rate.window_seconds}s"
        if not fits:
            detail += f"; retry in {retry_seconds(reset_ms)}s"
        verdicts.append(
            LimitVerdict(
                f"rate {rate.limit} per {rate.per}",
                detail,
                None if fits else refuse.rate_limited(rate, reset_ms, headers),
            )
        )
    gap = limits.min_interval
    if gap is not None:
        fits, retry_ms = bool(answer[at]), answer[at + 1]
        at += 2
        verdicts.append(
            LimitVerdict(
                f"min_interval {gap.seconds:g}s per {gap.per}",
                "free" if fits else f"retry in {retry_seconds(retry_ms)}s",
                None if fits else refuse.too_frequent(request.token_type, gap, retry_ms, headers),
            )
        )
    cap = limits.concurrency
    if cap is not None:
        fits, in_flight = bool(answer[at]), answer[at + 1]
        at += 3
        verdicts.append(
            LimitVerdict(
                f"concurrency {cap.max} per {cap.per}",
                f"{in_flight} in flight",
                None if fits else refuse.too_many_in_flight(cap, headers),
            )
        )
    logs = keys[len(keys) - 2 * len(limits.tokens) :: 2]
    checks = []
    for token_rate, log in zip(limits.tokens, logs, strict=True):
        checks.append(TokenCheck(token_rate, log, bool(answer[at]), answer[at + 1], answer[at + 2]))
        at += 3
    verdicts += [token_rates.verdict(check, request.tokens, headers) for check in checks]
    return Outcome(admitted, verdicts, headers, checks)
