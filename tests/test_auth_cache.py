"""gateway.auth_cache: a token is verified once, and a cached token is never accepted when
verifying it again would refuse it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth import JWKS_REFETCH_INTERVAL, Authenticator, Principal, mint_token
from gateway.auth_cache import MAX_AGE_SECONDS, TokenCache
from gateway.errors import InvalidToken
from gateway.rules import AuthConfig, parse_rules
from gateway.runtime import build_active
from tests.test_auth import (
    ENV,
    OTHER_SECRET,
    SECRET,
    KeyServer,
    Monotonic,
    claims,
    config,
    es_jwk,
    es_token,
)


class Wall:
    """A wall clock (seconds since the epoch) that the test sets."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now


def cache(leeway: int = 30, capacity: int = 10_000) -> tuple[TokenCache[str], Wall, Monotonic]:
    wall, mono = Wall(1_000_000.0), Monotonic()
    return TokenCache(leeway=leeway, capacity=capacity, wall_clock=wall, clock=mono), wall, mono


def verifications(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("verified a token") for r in caplog.records)


@pytest.fixture
async def key_server() -> AsyncIterator[KeyServer]:
    ks = KeyServer()
    app = web.Application()
    app.router.add_get("/jwks.json", ks.handle)
    server = TestServer(app)
    await server.start_server()
    ks.url = str(server.make_url("/jwks.json"))
    yield ks
    await server.close()


@pytest.fixture
async def make_auth() -> AsyncIterator[Callable[..., Authenticator]]:
    made: list[Authenticator] = []

    def make(cfg: AuthConfig, **clocks: Any) -> Authenticator:
        made.append(Authenticator(cfg, environ=ENV, **clocks))
        return made[-1]

    yield make
    for auth in made:
        await auth.close()


# --- the cache on its own -----------------------------------------------------------------


@pytest.mark.parametrize("leeway", [0, 30])
def test_a_token_is_served_until_exp_plus_leeway_exactly(leeway: int) -> None:
    tokens, wall, _ = cache(leeway)
    exp = 1_000_100
    tokens.put("t", "alice", {"exp": exp})
    wall.now = exp + leeway - 0.001
    assert tokens.get("t") == "alice"
    # PyJWT refuses once exp <= now - leeway: the very same instant.
    wall.now = exp + leeway
    with pytest.raises(InvalidToken) as info:
        tokens.get("t")
    assert info.value.detail == "token has expired" and info.value.status == 401
    assert len(tokens) == 0  # forgotten, so the next request verifies (and refuses) it


def test_claims_are_read_as_the_verifier_reads_them() -> None:
    tokens, wall, _ = cache(leeway=0)
    tokens.put("fraction", "a", {"exp": 1_000_100.9})  # PyJWT truncates: int(exp)
    tokens.put("text", "b", {"exp": "1000100"})  # PyJWT accepts what int() accepts
    wall.now = 1_000_100
    for token in ("fraction", "text"):
        with pytest.raises(InvalidToken, match="token has expired"):
            tokens.get(token)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_a_clock_gone_back_before_nbf_or_iat_means_verifying_again(claim: str) -> None:
    tokens, wall, _ = cache(leeway=30)
    tokens.put("t", "alice", {claim: 1_000_000, "exp": 1_000_500})
    wall.now = 1_000_000 - 30
    assert tokens.get("t") == "alice"
    wall.now = 1_000_000 - 30.001  # PyJWT refuses nbf > now + leeway
    assert tokens.get("t") is None
    wall.now = 1_000_000
    assert tokens.get("t") is None  # dropped: only a new verification puts it back


def test_no_verification_is_trusted_longer_than_max_age() -> None:
    tokens, _, mono = cache()
    tokens.put("no exp", "a", {})  # accepted only when auth.require leaves exp out
    tokens.put("long-lived", "b", {"exp": 2_000_000_000})
    mono.advance(MAX_AGE_SECONDS - 0.001)
    assert (tokens.get("no exp"), tokens.get("long-lived")) == ("a", "b")
    mono.advance(0.001)
    assert (tokens.get("no exp"), tokens.get("long-lived")) == (None, None)


def test_trusted_until_bounds_an_entry() -> None:
    tokens, _, mono = cache()
    tokens.put("jwks", "a", {"exp": 2_000_000_000}, trusted_until=mono.now + 10)
    tokens.put("kept keys", "b", {"exp": 2_000_000_000}, trusted_until=mono.now)
    assert len(tokens) == 1 and tokens.get("kept keys") is None
    mono.advance(9.999)
    assert tokens.get("jwks") == "a"
    mono.advance(0.001)
    assert tokens.get("jwks") is None


def test_the_cache_holds_at_most_capacity_tokens_least_recently_used_out() -> None:
    tokens, _, _ = cache(capacity=3)
    for i in range(10):
        tokens.put(f"t{i}", f"user{i}", {"exp": 2_000_000_000})
        assert len(tokens) == min(i + 1, 3)
    assert [tokens.get(f"t{i}") for i in range(10)] == [None] * 7 + ["user7", "user8", "user9"]
    assert tokens.get("t7") == "user7"  # now the most recently used: t8 goes first
    tokens.put("t10", "user10", {"exp": 2_000_000_000})
    assert [tokens.get(t) for t in ("t7", "t8", "t9", "t10")] == ["user7", None, "user9", "user10"]
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        TokenCache[str](leeway=0, capacity=0)


def test_tokens_are_kept_by_their_whole_text() -> None:
    tokens, _, _ = cache()
    tokens.put("header.payload.signature", "alice", {"exp": 2_000_000_000})
    for other in ("header.payload.signaturf", "header.payload.", "header.payload", "header"):
        assert tokens.get(other) is None


# --- through the Authenticator ------------------------------------------------------------


async def test_a_cached_token_is_not_verified_again(caplog: pytest.LogCaptureFixture) -> None:
    auth = Authenticator(config(), environ=ENV)
    token = "Bearer " + mint_token(SECRET, org="acme", user="alice", roles=["ops"])
    with caplog.at_level(logging.DEBUG, logger="gateway.auth"):
        first = await auth.authenticate(token)
        again = [await auth.authenticate(token) for _ in range(3)]
        assert verifications(caplog) == 1
        assert all(p is first for p in again)
        assert first == Principal("acme", "alice", frozenset({"ops"}), {})
        await auth.authenticate("Bearer " + mint_token(SECRET, org="acme", user="bob"))
        assert verifications(caplog) == 2
    assert token.split()[1] not in caplog.text


async def test_an_expired_token_is_refused_even_when_cached() -> None:
    wall = Wall()
    auth = Authenticator(config(leeway_seconds=30), environ=ENV, wall_clock=wall)
    exp = int(wall.now) + 60
    token = "Bearer " + jwt.encode(claims(exp=exp), SECRET)
    assert (await auth.authenticate(token)).user == "alice"
    wall.now = exp + 30 - 0.001
    assert (await auth.authenticate(token)).user == "alice"
    wall.now = exp + 30
    with pytest.raises(InvalidToken) as info:
        await auth.authenticate(token)
    assert (info.value.status, info.value.detail) == (401, "token has expired")


async def test_a_token_refused_once_is_verified_again(
    key_server: KeyServer, make_auth: Callable[..., Authenticator]
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_server.publish(es_jwk(key), "k1")
    key_server.status = 503
    mono = Monotonic()
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url), clock=mono)
    token = "Bearer " + es_token(key, "k1")
    for _ in range(2):
        with pytest.raises(InvalidToken, match="cannot fetch signing keys"):
            await auth.authenticate(token)
    key_server.status = 200
    mono.advance(JWKS_REFETCH_INTERVAL)
    assert (await auth.authenticate(token)).org == "acme"


async def test_a_refusal_for_the_claims_is_repeated_word_for_word() -> None:
    auth = Authenticator(config(), environ=ENV)
    no_org = "Bearer " + jwt.encode({k: v for k, v in claims().items() if k != "org_id"}, SECRET)
    forged = "Bearer " + mint_token(OTHER_SECRET, org="acme", user="alice")
    for token, detail in [
        (no_org, "token lacks the organization claim 'org_id'"),
        (forged, "token signature does not verify"),
    ]:
        for _ in range(2):
            with pytest.raises(InvalidToken) as info:
                await auth.authenticate(token)
            assert info.value.detail == detail


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        (jwt.encode(claims(ttl=-100), OTHER_SECRET), "token signature does not verify"),
        (jwt.encode(claims(ttl=-100), SECRET, "HS512"), "token algorithm 'HS512' is not accepted"),
        (jwt.encode(claims(ttl=-100, iss="https://evil/"), SECRET), "token has expired"),
        (jwt.encode({"sub": "alice", "exp": 1}, SECRET), "token has expired"),
        (jwt.encode({**claims(), "roles": 7}, OTHER_SECRET), "token signature does not verify"),
    ],
)
async def test_a_token_wrong_in_several_ways_is_refused_for_the_first(
    token: str, detail: str
) -> None:
    """Algorithm, then key and signature, then the claims in PyJWT's order."""
    auth = Authenticator(config(issuer="https://idp.example/", leeway_seconds=0), environ=ENV)
    with pytest.raises(InvalidToken) as info:
        await auth.authenticate(f"Bearer {token}")
    assert info.value.detail.startswith(detail)


async def test_each_rules_version_starts_with_an_empty_cache() -> None:
    """A reload builds a new Authenticator (build_active): a rotated secret or a new issuer
    applies to tokens that the previous rules had already verified."""
    base = b"""
upstreams: {ai: {url: "http://127.0.0.1:9100"}}
token_types: {general: {}}
plans: {pro: {allowance: {general: 1}}}
"""
    with_issuer = base + b'auth: {issuer: "https://idp.example/"}\n'
    token = "Bearer " + mint_token(SECRET, org="acme", user="alice")
    async with aiohttp.ClientSession() as session:
        first = build_active(parse_rules(base), ENV, session)
        rotated = build_active(parse_rules(base), {"GATEWAY_JWT_SECRET": OTHER_SECRET}, session)
        issuer = build_active(parse_rules(with_issuer), ENV, session)
        try:
            assert (await first.auth.authenticate(token)).org == "acme"
            with pytest.raises(InvalidToken, match="token signature does not verify"):
                await rotated.auth.authenticate(token)
            with pytest.raises(InvalidToken, match="token lacks the required 'iss' claim"):
                await issuer.auth.authenticate(token)
            assert (await first.auth.authenticate(token)).org == "acme"
        finally:
            for active in (first, rotated, issuer):
                await active.auth.close()
                await active.alerter.close()


# --- JWKS: a cached token is trusted no longer than its key -------------------------------


async def test_a_withdrawn_key_empties_the_cache(
    key_server: KeyServer, make_auth: Callable[..., Authenticator]
) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_server.publish(es_jwk(old), "k1")
    mono = Monotonic()
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url), clock=mono)
    cached = "Bearer " + es_token(old, "k1")
    assert (await auth.authenticate(cached)).org == "acme"

    key_server.keys = []
    key_server.publish(es_jwk(new), "k2")
    mono.advance(JWKS_REFETCH_INTERVAL)
    assert (await auth.authenticate("Bearer " + es_token(new, "k2"))).org == "acme"
    assert key_server.requests == 2
    with pytest.raises(InvalidToken, match="no ES256 signing key with kid 'k1'"):
        await auth.authenticate(cached)


async def test_a_key_added_to_the_set_keeps_the_cache(
    key_server: KeyServer,
    make_auth: Callable[..., Authenticator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_server.publish(es_jwk(first), "k1")
    mono = Monotonic()
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url), clock=mono)
    cached = "Bearer " + es_token(first, "k1")
    with caplog.at_level(logging.DEBUG, logger="gateway.auth"):
        await auth.authenticate(cached)
        key_server.publish(es_jwk(second), "k2")
        mono.advance(JWKS_REFETCH_INTERVAL)
        await auth.authenticate("Bearer " + es_token(second, "k2"))
        assert key_server.requests == 2
        assert (await auth.authenticate(cached)).org == "acme"
        assert verifications(caplog) == 2  # k1's token came from the cache


async def test_cached_tokens_do_not_hold_off_a_key_set_refresh(
    key_server: KeyServer, make_auth: Callable[..., Authenticator]
) -> None:
    key, successor = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    key_server.publish(es_jwk(key), "k1")
    mono = Monotonic()
    cfg = config(algorithms=["ES256"], jwks_url=key_server.url, jwks_cache_seconds=60)
    auth = make_auth(cfg, clock=mono)
    cached = "Bearer " + es_token(key, "k1")
    await auth.authenticate(cached)
    mono.advance(59.9)
    await auth.authenticate(cached)
    assert key_server.requests == 1

    key_server.keys = []  # the provider revokes k1; no token has asked for k2 yet
    key_server.publish(es_jwk(successor), "k2")
    mono.advance(0.1)
    with pytest.raises(InvalidToken, match="no ES256 signing key with kid 'k1'"):
        await auth.authenticate(cached)
    assert key_server.requests == 2


async def test_keys_kept_through_a_failed_refresh_verify_every_time(
    key_server: KeyServer,
    make_auth: Callable[..., Authenticator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_server.publish(es_jwk(key), "k1")
    mono = Monotonic()
    cfg = config(algorithms=["ES256"], jwks_url=key_server.url, jwks_cache_seconds=60)
    auth = make_auth(cfg, clock=mono)
    token = "Bearer " + es_token(key, "k1")
    await auth.authenticate(token)
    key_server.status = 500
    mono.advance(60)
    with caplog.at_level(logging.DEBUG, logger="gateway.auth"):
        for _ in range(3):
            assert (await auth.authenticate(token)).org == "acme"
        assert verifications(caplog) == 3
    assert key_server.requests == 2  # one refresh attempt per JWKS_REFETCH_INTERVAL
