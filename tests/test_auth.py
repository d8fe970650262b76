"""Bearer JWT verification: every refusal names its reason, keys come only from config."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.auth import JWKS_REFETCH_INTERVAL, Authenticator, Principal, mint_token
from gateway.errors import ConfigError, InvalidToken
from gateway.rules import AuthConfig, ClaimsConfig

SECRET = "hs-secret-" + "k" * 54  # 64 bytes: enough for HS512
OTHER_SECRET = "other-secret-" + "o" * 51
ENV = {"GATEWAY_JWT_SECRET": SECRET}


# --- helpers ------------------------------------------------------------------------------


def config(**fields: Any) -> AuthConfig:
    return AuthConfig.model_validate(fields)


def claims(org: str = "acme", user: str = "alice", ttl: int = 3600, **more: Any) -> dict[str, Any]:
    now = int(datetime.now(UTC).timestamp())
    return {"org_id": org, "sub": user, "iat": now, "exp": now + ttl, **more}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(payload: dict[str, Any], key: bytes, alg: str = "HS256") -> str:
    """Signed without PyJWT, which refuses to use a PEM as an HMAC secret."""
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    mac = hmac.new(key, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(mac)}"


def unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    header = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64(json.dumps(payload).encode())}."


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def refused(auth: Authenticator, authorization: str | None, detail: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await auth.authenticate(authorization)
    assert detail in info.value.detail
    return info.value


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def auth() -> Authenticator:
    return Authenticator(config(algorithms=["HS256"]), environ=ENV)


@pytest.fixture
async def make_auth() -> AsyncIterator[Callable[..., Authenticator]]:
    made: list[Authenticator] = []

    def make(cfg: AuthConfig, clock: Monotonic | None = None) -> Authenticator:
        made.append(Authenticator(cfg, environ=ENV, clock=clock or Monotonic()))
        return made[-1]

    yield make
    for a in made:
        await a.close()


class KeyServer:
    """A real HTTP JWKS endpoint whose keys and health the test controls."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.status = 200
        self.requests = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.status != 200:
            return web.Response(status=self.status)
        return web.json_response({"keys": self.keys})

    def publish(self, jwk: dict[str, Any], kid: str | None) -> None:
        self.keys.append({**jwk, **({"kid": kid} if kid else {})})


@pytest.fixture
async def key_server() -> AsyncIterator[KeyServer]:
    ks = KeyServer()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", ks.handle)
    server = TestServer(app)
    await server.start_server()
    ks.url = str(server.make_url("/.well-known/jwks.json"))
    yield ks
    await server.close()


@pytest.fixture
def es_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def es_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    return ECAlgorithm.to_jwk(key.public_key(), as_dict=True)


def es_token(key: ec.EllipticCurvePrivateKey, kid: str | None, **more: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**more), key, algorithm="ES256", headers=headers)


# --- shared secret ------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hs_tokens_give_the_principal(alg: str) -> None:
    auth = Authenticator(config(algorithms=[alg]), environ=ENV)
    token = mint_token(SECRET, org="acme", user="alice", algorithm=alg, roles=["admin"])
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal == Principal("acme", "alice", frozenset({"admin"}), {})
    assert principal.claims["org_id"] == "acme" and principal.claims["sub"] == "alice"
    assert principal.claims["exp"] - principal.claims["iat"] == 3600


async def test_scheme_is_case_insensitive_and_claims_are_read_only(auth: Authenticator) -> None:
    principal = await auth.authenticate("bearer " + mint_token(SECRET, org="acme", user="bob"))
    assert (principal.org, principal.user, principal.roles) == ("acme", "bob", frozenset())
    with pytest.raises(TypeError):
        principal.claims["org_id"] = "evil"  # type: ignore[index]


async def test_secret_is_read_from_the_process_environment_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_JWT_SECRET", OTHER_SECRET)
    auth = Authenticator(config(secret_env="MY_JWT_SECRET"))
    principal = await auth.authenticate("Bearer " + mint_token(OTHER_SECRET, org="o", user="u"))
    assert principal.org == "o"


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "missing Authorization header"),
        ("", "missing Authorization header"),
        ("   ", "missing Authorization header"),
        ("Basic dXNlcjpwdw==", "must be 'Bearer <token>'"),
        ("Bearer", "must be 'Bearer <token>'"),
        ("Bearer a b", "must be 'Bearer <token>'"),
        ("Token abc.def.ghi", "must be 'Bearer <token>'"),
        ("Bearer a.b", "malformed token"),
        ("Bearer garbage", "malformed token"),
        ("Bearer !!!.???.***", "malformed token"),
        ("Bearer e30.e30.", "algorithm None is not accepted"),  # {} header: no alg at all
    ],
)
async def test_malformed_authorization_is_refused(
    auth: Authenticator, authorization: str | None, detail: str
) -> None:
    err = await refused(auth, authorization, detail)
    assert err.status == 401 and err.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_alg_none_is_refused(auth: Authenticator, alg: str) -> None:
    await refused(
        auth,
        f"Bearer {unsigned(claims(), alg)}",
        f"algorithm '{alg}' is not accepted (accepted: HS256)",
    )


async def test_an_algorithm_outside_the_configured_list_is_refused(auth: Authenticator) -> None:
    token = mint_token(SECRET, org="acme", user="alice", algorithm="HS512")
    await refused(auth, f"Bearer {token}", "algorithm 'HS512' is not accepted")


async def test_bad_signature_is_refused(auth: Authenticator) -> None:
    await refused(
        auth,
        "Bearer " + mint_token(OTHER_SECRET, org="acme", user="alice"),
        "signature does not verify",
    )
    header, _, signature = mint_token(SECRET, org="acme", user="alice").split(".")
    tampered = b64(json.dumps(claims(org="bigco")).encode())
    await refused(auth, f"Bearer {header}.{tampered}.{signature}", "signature does not verify")


# --- time claims --------------------------------------------------------------------------


async def test_expired_token_is_refused(auth: Authenticator) -> None:
    past = datetime.now(UTC) - timedelta(seconds=100)
    token = mint_token(SECRET, org="acme", user="alice", ttl_seconds=60, now=past)  # exp -40s
    await refused(auth, f"Bearer {token}", "token has expired")


async def test_leeway_is_honoured() -> None:
    past = datetime.now(UTC) - timedelta(seconds=80)
    token = mint_token(SECRET, org="acme", user="alice", ttl_seconds=60, now=past)  # exp -20s
    lenient = Authenticator(config(leeway_seconds=30), environ=ENV)
    assert (await lenient.authenticate(f"Bearer {token}")).org == "acme"
    strict = Authenticator(config(leeway_seconds=0), environ=ENV)
    await refused(strict, f"Bearer {token}", "token has expired")


async def test_nbf_in_the_future_is_refused(auth: Authenticator) -> None:
    nbf = int(datetime.now(UTC).timestamp()) + 120
    token = mint_token(SECRET, org="acme", user="alice", extra={"nbf": nbf})
    await refused(auth, f"Bearer {token}", "not yet valid (nbf is in the future)")
    within_leeway = mint_token(SECRET, org="acme", user="alice", extra={"nbf": nbf - 100})
    assert (await auth.authenticate(f"Bearer {within_leeway}")).org == "acme"


async def test_iat_in_the_future_is_refused(auth: Authenticator) -> None:
    future = datetime.now(UTC) + timedelta(seconds=120)
    token = mint_token(SECRET, org="acme", user="alice", now=future)
    await refused(auth, f"Bearer {token}", "not yet valid (iat is in the future)")


async def test_required_claims_come_from_config(auth: Authenticator) -> None:
    no_exp = {k: v for k, v in claims().items() if k != "exp"}
    await refused(
        auth, "Bearer " + jwt.encode(no_exp, SECRET), "token lacks the required 'exp' claim"
    )
    relaxed = Authenticator(config(require=[]), environ=ENV)
    assert (await relaxed.authenticate("Bearer " + jwt.encode(no_exp, SECRET))).org == "acme"
    strict = Authenticator(config(require=["exp", "nbf"]), environ=ENV)
    await refused(
        strict,
        "Bearer " + mint_token(SECRET, org="acme", user="alice"),
        "token lacks the required 'nbf' claim",
    )


# --- issuer and audience ------------------------------------------------------------------


async def test_issuer_is_checked_when_configured() -> None:
    auth = Authenticator(config(issuer="https://idp.example/"), environ=ENV)

    def with_iss(iss: str) -> str:
        return "Bearer " + mint_token(SECRET, org="acme", user="alice", extra={"iss": iss})

    assert (await auth.authenticate(with_iss("https://idp.example/"))).org == "acme"
    await refused(auth, with_iss("https://evil.example/"), "token issuer is not accepted")
    await refused(
        auth,
        "Bearer " + mint_token(SECRET, org="acme", user="alice"),
        "token lacks the required 'iss' claim",
    )


async def test_audience_is_checked_when_configured() -> None:
    auth = Authenticator(config(audience="gateway"), environ=ENV)

    def with_aud(aud: str | list[str]) -> str:
        return "Bearer " + mint_token(SECRET, org="acme", user="alice", extra={"aud": aud})

    assert (await auth.authenticate(with_aud("gateway"))).org == "acme"
    assert (await auth.authenticate(with_aud(["billing", "gateway"]))).org == "acme"
    await refused(auth, with_aud("billing"), "token audience is not accepted")
    await refused(
        auth,
        "Bearer " + mint_token(SECRET, org="acme", user="alice"),
        "token lacks the required 'aud' claim",
    )


async def test_audience_is_ignored_when_not_configured(auth: Authenticator) -> None:
    token = mint_token(SECRET, org="acme", user="alice", extra={"aud": "someone-else"})
    assert (await auth.authenticate(f"Bearer {token}")).org == "acme"


# --- identity claims ----------------------------------------------------------------------


async def test_missing_or_invalid_organization_is_refused(auth: Authenticator) -> None:
    no_org = {k: v for k, v in claims().items() if k != "org_id"}
    await refused(
        auth, "Bearer " + jwt.encode(no_org, SECRET), "token lacks the organization claim 'org_id'"
    )
    for bad in (42, ["acme"], ""):
        await refused(
            auth,
            "Bearer " + jwt.encode(claims(org=bad), SECRET),  # type: ignore[arg-type]
            "organization claim 'org_id' must be a non-empty string",
        )


async def test_missing_user_is_refused(auth: Authenticator) -> None:
    no_sub = {k: v for k, v in claims().items() if k != "sub"}
    await refused(auth, "Bearer " + jwt.encode(no_sub, SECRET), "token lacks the user claim 'sub'")


async def test_nested_claim_paths() -> None:
    paths = ClaimsConfig(
        organization="app_metadata.org_id", user="email", roles="app_metadata.roles"
    )
    auth = Authenticator(config(claims=paths.model_dump()), environ=ENV)
    token = mint_token(SECRET, org="acme", user="a@acme.test", roles=["admin", "ops"], claims=paths)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["app_metadata"] == {"org_id": "acme", "roles": ["admin", "ops"]}
    assert payload["email"] == "a@acme.test" and "org_id" not in payload
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal == Principal("acme", "a@acme.test", frozenset({"admin", "ops"}), {})

    flat = mint_token(SECRET, org="acme", user="alice")  # org at org_id, not app_metadata
    await refused(
        auth, f"Bearer {flat}", "token lacks the organization claim 'app_metadata.org_id'"
    )


async def test_claim_names_containing_dots_are_matched_whole() -> None:
    paths = {"organization": "https://acme.example/claims.org", "user": "sub"}
    auth = Authenticator(config(claims=paths), environ=ENV)
    payload = {**claims(), "https://acme.example/claims": {"org": "acme"}}
    del payload["org_id"]
    principal = await auth.authenticate("Bearer " + jwt.encode(payload, SECRET))
    assert principal.org == "acme"


@pytest.mark.parametrize(
    ("roles", "expected"),
    [
        (["admin", "billing"], {"admin", "billing"}),
        ("admin  billing", {"admin", "billing"}),
        ("", set()),
        ([], set()),
    ],
)
async def test_roles_as_list_or_space_separated_string(
    auth: Authenticator, roles: str | list[str], expected: set[str]
) -> None:
    principal = await auth.authenticate("Bearer " + jwt.encode(claims(roles=roles), SECRET))
    assert principal.roles == frozenset(expected)


async def test_roles_of_another_shape_are_refused(auth: Authenticator) -> None:
    for bad in ({"admin": True}, ["admin", 1], 7):
        await refused(
            auth,
            "Bearer " + jwt.encode(claims(roles=bad), SECRET),
            "roles claim 'roles' must be a list of strings or a space-separated string",
        )


def test_mint_token_only_signs_with_a_shared_secret() -> None:
    with pytest.raises(ValueError, match="RS256 is not HS256/384/512"):
        mint_token(SECRET, org="acme", user="alice", algorithm="RS256")


# --- PEM public key -----------------------------------------------------------------------


async def test_rs256_and_ps256_with_an_inline_pem(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(
        config(algorithms=["RS256", "PS256"], public_key=public_pem(rsa_key)), environ={}
    )
    for alg in ("RS256", "PS256"):
        token = jwt.encode(claims(roles="read"), rsa_key, algorithm=alg)
        principal = await auth.authenticate(f"Bearer {token}")
        assert principal == Principal("acme", "alice", frozenset({"read"}), {})
    await refused(
        auth,
        "Bearer " + mint_token(SECRET, org="acme", user="alice"),
        "algorithm 'HS256' is not accepted (accepted: RS256, PS256)",
    )


async def test_rs256_with_a_pem_file(rsa_key: rsa.RSAPrivateKey, tmp_path: Path) -> None:
    path = tmp_path / "idp.pem"
    path.write_text(public_pem(rsa_key))
    auth = Authenticator(config(algorithms=["RS256"], public_key_file=str(path)), environ={})
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await auth.authenticate(f"Bearer {token}")).user == "alice"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(), other, algorithm="RS256")
    await refused(auth, f"Bearer {forged}", "signature does not verify")


async def test_hs_rs_confusion_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic attack: HMAC-sign with the (public) RSA key as the secret."""
    pem = public_pem(rsa_key)
    forged = "Bearer " + hs256_by_hand(claims(org="victim"), pem.encode())

    rs_only = Authenticator(config(algorithms=["RS256"], public_key=pem), environ={})
    await refused(rs_only, forged, "algorithm 'HS256' is not accepted (accepted: RS256)")

    # With HS256 allowed too, HS tokens verify against the env secret and nothing else.
    both = Authenticator(config(algorithms=["RS256", "HS256"], public_key=pem), environ=ENV)
    await refused(both, forged, "signature does not verify")
    assert (await both.authenticate("Bearer " + hs256_by_hand(claims(), SECRET.encode()))).org
    rs_token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (await both.authenticate(f"Bearer {rs_token}")).org == "acme"


# --- JWKS ---------------------------------------------------------------------------------


async def test_es256_via_jwks_fetched_once_and_cached(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.publish(es_jwk(es_key), "k1")
    clock = Monotonic()
    auth = make_auth(
        config(algorithms=["ES256"], jwks_url=key_server.url, jwks_cache_seconds=60), clock
    )
    for user in ("alice", "bob", "carol"):
        principal = await auth.authenticate("Bearer " + es_token(es_key, "k1", user=user))
        assert (principal.org, principal.user) == ("acme", user)
    assert key_server.requests == 1

    clock.advance(61)  # cache expired: refreshed on the next token
    await auth.authenticate("Bearer " + es_token(es_key, "k1"))
    assert key_server.requests == 2


async def test_eddsa_via_jwks(
    key_server: KeyServer, make_auth: Callable[..., Authenticator]
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    key_server.publish(OKPAlgorithm.to_jwk(key.public_key(), as_dict=True), "ed")
    auth = make_auth(config(algorithms=["EdDSA"], jwks_url=key_server.url))
    token = jwt.encode(claims(roles=["x"]), key, algorithm="EdDSA", headers={"kid": "ed"})
    principal = await auth.authenticate(f"Bearer {token}")
    assert principal == Principal("acme", "alice", frozenset({"x"}), {})


async def test_cold_start_shares_one_fetch(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.publish(es_jwk(es_key), "k1")
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url))
    token = "Bearer " + es_token(es_key, "k1")
    principals = await asyncio.gather(*(auth.authenticate(token) for _ in range(20)))
    assert {p.org for p in principals} == {"acme"}
    assert key_server.requests == 1


async def test_key_rotation_refetches_on_an_unknown_kid(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.publish(es_jwk(es_key), "k1")
    clock = Monotonic()
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url), clock)
    await auth.authenticate("Bearer " + es_token(es_key, "k1"))

    rotated = ec.generate_private_key(ec.SECP256R1())
    key_server.keys = []
    key_server.publish(es_jwk(rotated), "k2")
    clock.advance(JWKS_REFETCH_INTERVAL)
    principal = await auth.authenticate("Bearer " + es_token(rotated, "k2", user="bob"))
    assert principal.user == "bob"
    assert key_server.requests == 2
    # k1 was withdrawn: its tokens no longer verify (and the refetch budget is spent).
    await refused(auth, "Bearer " + es_token(es_key, "k1"), "no ES256 signing key with kid 'k1'")
    assert key_server.requests == 2


async def test_unknown_kids_refetch_at_most_once_per_interval(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.publish(es_jwk(es_key), "k1")
    clock = Monotonic()
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url), clock)
    await auth.authenticate("Bearer " + es_token(es_key, "k1"))
    assert key_server.requests == 1

    async def flood() -> None:
        tokens = [es_token(es_key, uuid.uuid4().hex) for _ in range(50)]
        results = await asyncio.gather(
            *(auth.authenticate(f"Bearer {t}") for t in tokens), return_exceptions=True
        )
        assert all(
            isinstance(r, InvalidToken) and "no ES256 signing key with kid" in r.detail
            for r in results
        )

    await flood()
    assert key_server.requests == 1  # the first fetch was moments ago
    clock.advance(JWKS_REFETCH_INTERVAL - 0.5)
    await flood()
    assert key_server.requests == 1
    clock.advance(0.5)
    await flood()
    assert key_server.requests == 2
    # Known keys are still served from the cache meanwhile.
    assert (await auth.authenticate("Bearer " + es_token(es_key, "k1"))).org == "acme"
    assert key_server.requests == 2


async def test_a_lone_key_serves_tokens_without_kid(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.publish(es_jwk(es_key), None)
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url))
    assert (await auth.authenticate("Bearer " + es_token(es_key, None))).org == "acme"


async def test_without_kid_several_keys_are_ambiguous(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.publish(es_jwk(es_key), "k1")
    key_server.publish(es_jwk(ec.generate_private_key(ec.SECP256R1())), "k2")
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url))
    await refused(
        auth, "Bearer " + es_token(es_key, None), "token has no kid header and the key set holds 2"
    )


async def test_symmetric_keys_in_a_jwks_are_never_used(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    published_secret = b"p" * 64
    key_server.publish(es_jwk(es_key), "k1")
    key_server.keys.append({"kty": "oct", "kid": "h", "k": b64(published_secret)})
    auth = make_auth(config(algorithms=["ES256", "HS256"], jwks_url=key_server.url))
    assert (await auth.authenticate("Bearer " + es_token(es_key, "k1"))).org == "acme"
    forged = jwt.encode(claims(), published_secret, algorithm="HS256", headers={"kid": "h"})
    await refused(auth, f"Bearer {forged}", "signature does not verify")


async def test_jwks_fetch_failure_is_a_401_and_a_warning(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_server.status = 503
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url))
    token = es_token(es_key, "k1")
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        await refused(
            auth, f"Bearer {token}", "cannot fetch signing keys: the key server answered HTTP 503"
        )
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "cannot fetch signing keys from " + key_server.url in caplog.text
    assert token not in caplog.text and token.split(".")[2] not in caplog.text


async def test_unreachable_jwks_is_a_401(
    es_key: ec.EllipticCurvePrivateKey, make_auth: Callable[..., Authenticator]
) -> None:
    auth = make_auth(config(algorithms=["ES256"], jwks_url="http://127.0.0.1:1/jwks.json"))
    await refused(
        auth,
        "Bearer " + es_token(es_key, "k1"),
        "cannot fetch signing keys: the key server is unreachable",
    )


async def test_cached_keys_outlive_a_failed_refresh(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key_server.publish(es_jwk(es_key), "k1")
    clock = Monotonic()
    auth = make_auth(
        config(algorithms=["ES256"], jwks_url=key_server.url, jwks_cache_seconds=30), clock
    )
    await auth.authenticate("Bearer " + es_token(es_key, "k1"))
    key_server.status = 500
    clock.advance(31)
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        assert (await auth.authenticate("Bearer " + es_token(es_key, "k1"))).org == "acme"
    assert key_server.requests == 2
    assert "keeping the cached keys" in caplog.text


async def test_jwks_without_usable_keys_is_refused(
    key_server: KeyServer,
    es_key: ec.EllipticCurvePrivateKey,
    make_auth: Callable[..., Authenticator],
) -> None:
    key_server.keys.append({"kty": "oct", "kid": "h", "k": b64(b"p" * 64)})
    key_server.publish(ECAlgorithm.to_jwk(es_key.public_key(), as_dict=True), "enc")
    key_server.keys[-1]["use"] = "enc"
    auth = make_auth(config(algorithms=["ES256"], jwks_url=key_server.url))
    await refused(auth, "Bearer " + es_token(es_key, "enc"), "the key set holds no key for ES256")


async def test_a_jwk_alg_restricts_the_key(
    key_server: KeyServer, rsa_key: rsa.RSAPrivateKey, make_auth: Callable[..., Authenticator]
) -> None:
    jwk = RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    key_server.publish({**jwk, "alg": "PS256"}, "r1")
    auth = make_auth(config(algorithms=["RS256", "PS256"], jwks_url=key_server.url))
    ps = jwt.encode(claims(), rsa_key, algorithm="PS256", headers={"kid": "r1"})
    assert (await auth.authenticate(f"Bearer {ps}")).org == "acme"
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    await refused(auth, f"Bearer {rs}", "no RS256 signing key with kid 'r1'")


# --- configuration errors -----------------------------------------------------------------


def config_errors(cfg: AuthConfig, environ: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Authenticator(cfg, environ=environ)
    assert info.value.source == "auth"
    return info.value.errors


def test_missing_secret_is_a_config_error() -> None:
    assert config_errors(config(), {}) == [
        "auth.secret_env: environment variable GATEWAY_JWT_SECRET is not set"
    ]
    assert config_errors(config(), {"GATEWAY_JWT_SECRET": ""}) == [
        "auth.secret_env: environment variable GATEWAY_JWT_SECRET is not set"
    ]


def test_short_secret_is_a_config_error() -> None:
    assert config_errors(config(), {"GATEWAY_JWT_SECRET": "x" * 31}) == [
        "auth.secret_env: the secret in GATEWAY_JWT_SECRET must be at least 32 bytes"
    ]
    Authenticator(config(), environ={"GATEWAY_JWT_SECRET": "x" * 32})  # exactly enough


def test_hs512_needs_a_64_byte_secret() -> None:
    cfg = config(algorithms=["HS256", "HS512"], secret_env="S")
    assert config_errors(cfg, {"S": "x" * 63}) == [
        "auth.secret_env: the secret in S must be at least 64 bytes for HS512"
    ]


def test_a_pem_secret_is_a_config_error(rsa_key: rsa.RSAPrivateKey) -> None:
    assert config_errors(config(), {"GATEWAY_JWT_SECRET": public_pem(rsa_key)}) == [
        "auth.secret_env: the secret in GATEWAY_JWT_SECRET is an asymmetric key; "
        "HMAC secrets must not be public keys"
    ]


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    cfg = config(algorithms=["RS256"], public_key_file=str(missing))
    assert config_errors(cfg, {}) == [
        f"auth.public_key_file: cannot read {missing}: No such file or directory"
    ]


def test_every_key_error_is_reported_at_once(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    cfg = config(algorithms=["HS256", "RS256"], public_key_file=str(missing))
    assert config_errors(cfg, {}) == [
        "auth.secret_env: environment variable GATEWAY_JWT_SECRET is not set",
        f"auth.public_key_file: cannot read {missing}: No such file or directory",
    ]


@pytest.fixture
def private_pem(es_key: ec.EllipticCurvePrivateKey) -> Iterator[str]:
    yield es_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_pem_that_is_not_a_public_key_is_a_config_error(private_pem: str) -> None:
    assert config_errors(config(algorithms=["ES256"], public_key=private_pem), {}) == [
        "auth.public_key: is a private key; give the public key"
    ]
    assert config_errors(config(algorithms=["ES256"], public_key="hello"), {}) == [
        "auth.public_key: is not a PEM public key"
    ]


def test_key_that_cannot_verify_a_configured_algorithm_is_a_config_error(
    es_key: ec.EllipticCurvePrivateKey,
) -> None:
    cfg = config(algorithms=["ES256", "RS256"], public_key=public_pem(es_key))
    assert config_errors(cfg, {}) == [
        "auth.public_key: an EC secp256r1 key cannot verify RS256; "
        "list only algorithms the key fits"
    ]


def test_short_rsa_key_is_a_config_error() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert config_errors(config(algorithms=["RS256"], public_key=public_pem(weak)), {}) == [
        "auth.public_key: the RSA key has 1024 bits; at least 2048 are required"
    ]


def test_asymmetric_key_sources() -> None:
    assert config_errors(config(algorithms=["RS256"]), {}) == [
        "auth: asymmetric algorithms need one of public_key, public_key_file or jwks_url"
    ]
    both = config(algorithms=["RS256"], public_key="x", jwks_url="https://idp.example/jwks")
    assert config_errors(both, {}) == ["auth: give only one of public_key, jwks_url"]
    ftp = config(algorithms=["RS256"], jwks_url="ftp://idp.example/jwks")
    assert config_errors(ftp, {}) == ["auth.jwks_url: must be an http:// or https:// URL"]
