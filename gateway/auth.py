"""Bearer JWT verification: from an ``Authorization`` header to a ``Principal``.

The accepted algorithms are fixed by ``auth.algorithms``, never by the token. A token's
``alg`` header only chooses among them, and each family has its own key source:

    HS256/384/512       the shared secret named by ``auth.secret_env``, and nothing else
    RS*, PS256, ES*,    the PEM key (``auth.public_key`` / ``auth.public_key_file``) or the
    EdDSA               keys of ``auth.jwks_url``, and never the shared secret

so ``alg: none`` is refused and a public key can never serve as an HMAC secret.

JWKS keys are fetched with aiohttp and cached for ``auth.jwks_cache_seconds``. An unknown
``kid`` triggers a refetch (the provider may have rotated its keys), at most once every
``JWKS_REFETCH_INTERVAL`` seconds, so that tokens with random kids cannot turn the gateway
into a load generator against the identity provider.

Keys are parsed once (when the rules load, or the key set is fetched) and a token is
verified once: its principal is then served from a ``TokenCache`` (gateway.auth_cache)
until the token expires, at most ``MAX_AGE_SECONDS``, and no longer than the key set that
verified it is fresh. A refresh that withdraws or changes a key empties the cache. Each
rules version builds its own ``Authenticator``, so a reload starts with an empty cache.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.types import Options

from gateway.auth_cache import EXPIRED, TokenCache
from gateway.auth_keys import (
    HMAC_KEY_BYTES,
    PublicKey,
    SigningKey,
    describe,
    fits,
    load_public_key,
    load_secret,
    parse_jwks,
    shown,
)
from gateway.errors import ConfigError, InvalidToken
from gateway.rules import AuthConfig, ClaimsConfig

log = logging.getLogger("gateway.auth")

JWKS_REFETCH_INTERVAL = 10.0
JWKS_TIMEOUT_SECONDS = 5.0
JWKS_MAX_BYTES = 1 << 20


@dataclass(frozen=True)
class Principal:
    """The verified caller. ``claims`` is the whole verified payload, read-only."""

    org: str
    user: str
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


class _JwksUnavailable(Exception):
    """The key set could not be fetched or held no usable key; the message says why."""


class Authenticator:
    """Verifies bearer JWTs against one ``AuthConfig``. Holds a JWKS HTTP session once a
    key set has been fetched: call ``close`` when done."""

    def __init__(
        self,
        config: AuthConfig,
        *,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Load the keys ``config`` names. Raises ``ConfigError(source="auth")`` listing every
        key that cannot be loaded. ``clock`` (monotonic seconds) times the JWKS cache and how
        long a verification is trusted; ``wall_clock`` (seconds since the epoch) says when a
        cached token has expired, and must be the clock PyJWT reads, as the default is."""
        self._config = config
        self._clock = clock
        errors: list[str] = []
        env = os.environ if environ is None else environ
        self._secret = load_secret(config, env, errors) if config.symmetric else None
        self._public_key: PublicKey | None = None
        self._jwks_url: str | None = None
        if config.asymmetric:
            sources = [
                k for k in ("public_key", "public_key_file", "jwks_url") if getattr(config, k)
            ]
            if not sources:
                errors.append(
                    "auth: asymmetric algorithms need one of public_key, public_key_file "
                    "or jwks_url"
                )
            elif len(sources) > 1:
                errors.append(f"auth: give only one of {', '.join(sources)}")
            elif config.jwks_url:
                if config.jwks_url.startswith(("http://", "https://")):
                    self._jwks_url = config.jwks_url
                else:
                    errors.append("auth.jwks_url: must be an http:// or https:// URL")
            else:
                self._public_key = load_public_key(config, errors)
        if errors:
            raise ConfigError("auth", errors)

        self._options: Options = {
            "require": list(config.require),
            "verify_iss": config.issuer is not None,
            # Without a configured audience, a token's aud is none of our business.
            "verify_aud": config.audience is not None,
        }
        # The same checks, made while the token is parsed and before its signature: see
        # _verify. PyJWT turns every claim check off unless told otherwise.
        self._claims_first: Options = {
            "verify_signature": False,
            "verify_exp": True,
            "verify_nbf": True,
            "verify_iat": True,
            "verify_sub": True,
            "verify_jti": True,
            "verify_iss": config.issuer is not None,
            "verify_aud": config.audience is not None,
            "require": list(config.require),
        }
        self._jwt = jwt.PyJWT()
        algorithms = get_default_algorithms()
        self._verifiers: dict[str, Algorithm] = {a: algorithms[a] for a in config.algorithms}
        self._tokens: TokenCache[Principal] = TokenCache(
            leeway=config.leeway_seconds, wall_clock=wall_clock, clock=clock
        )
        self._jwks_keys: list[SigningKey] | None = None  # None until a fetch succeeds
        self._jwks_fetched_at = float("-inf")
        self._jwks_attempted_at = float("-inf")
        self._jwks_error = ""
        self._jwks_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a valid ``Authorization: Bearer <jwt>`` header value. Raises
        ``InvalidToken`` (its detail says why) for anything else, including a key set that
        cannot be fetched."""
        token = _bearer_token(authorization)
        principal = self._tokens.get(token)
        if principal is None:
            principal, trusted_until = await self._verify(token)
            self._tokens.put(token, principal, principal.claims, trusted_until=trusted_until)
            log.debug("verified a token of user %r of %r", principal.user, principal.org)
        return principal

    async def close(self) -> None:
        """Close the JWKS HTTP session, if one was opened."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of ``token``, and until when (monotonic) the key that verified it
        stays trusted. Raises ``InvalidToken`` as ``authenticate`` does."""
        # One parse that checks the claims as it goes, then the signature with a key
        # prepared at load. A token with anything wrong in it, or whose key must first be
        # fetched, goes through _verify_in_order instead: its refusal then names what that
        # order finds first, and no claim is read before a wait for keys.
        try:
            parsed = self._jwt.decode_complete(
                token,
                options=self._claims_first,
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
            )
        except jwt.PyJWTError:
            return await self._verify_in_order(token)
        header = parsed["header"]
        alg = self._accepted(header)
        key = self._key_at_hand(alg, header)
        if key is None:
            return await self._verify_in_order(token)
        signed = token.encode().rpartition(b".")[0]
        if not self._verifiers[alg].verify(signed, key, parsed["signature"]):
            raise InvalidToken(_explain(jwt.InvalidSignatureError()))
        return self._principal(parsed["payload"]), self._trusted_until(alg)

    async def _verify_in_order(self, token: str) -> tuple[Principal, float]:
        """``_verify``, checking the header, the algorithm, the key (fetched if need be),
        the signature and only then the claims."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"malformed token: {exc}") from exc
        alg = self._accepted(header)
        key: bytes | PublicKey
        if alg.startswith("HS"):
            assert self._secret is not None  # loaded whenever an HS algorithm is configured
            key = self._secret
        else:
            kid = header.get("kid")
            key = await self._public_key_for(alg, kid if isinstance(kid, str) else None)
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=self._options,
                audience=self._config.audience,
                issuer=self._config.issuer,
                leeway=self._config.leeway_seconds,
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(_explain(exc)) from exc
        return self._principal(payload), self._trusted_until(alg)

    def _accepted(self, header: dict[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.algorithms:
            raise InvalidToken(
                f"token algorithm {shown(alg)} is not accepted "
                f"(accepted: {', '.join(self._config.algorithms)})"
            )
        return alg

    def _key_at_hand(self, alg: str, header: dict[str, Any]) -> bytes | PublicKey | None:
        """The key for ``alg``, or None when the key set must be fetched first."""
        if alg.startswith("HS"):
            return self._secret
        if self._public_key is not None:
            return self._pem_key(alg)
        if self._jwks_keys is None or self._jwks_stale():
            return None
        kid = header.get("kid")
        return self._find_jwk(alg, kid if isinstance(kid, str) else None)

    def _trusted_until(self, alg: str) -> float:
        """Until when a verification with ``alg`` holds: the key set's next refresh for
        JWKS keys, since a refresh may withdraw the key."""
        if alg.startswith("HS") or self._jwks_url is None:
            return math.inf
        return self._jwks_fetched_at + self._config.jwks_cache_seconds

    def _jwks_stale(self) -> bool:
        return self._clock() - self._jwks_fetched_at >= self._config.jwks_cache_seconds

    def _principal(self, payload: dict[str, Any]) -> Principal:
        paths = self._config.claims
        org = _claim(payload, paths.organization)
        if org is None:
            raise InvalidToken(f"token lacks the organization claim '{paths.organization}'")
        if not isinstance(org, str) or not org:
            raise InvalidToken(
                f"token's organization claim '{paths.organization}' must be a non-empty string"
            )
        user = _claim(payload, paths.user)
        if user is None or user == "":
            raise InvalidToken(f"token lacks the user claim '{paths.user}'")
        # Some providers number their users; a bool is never an identifier.
        if isinstance(user, bool) or not isinstance(user, str | int):
            raise InvalidToken(f"token's user claim '{paths.user}' must be a string")
        return Principal(
            org=_identifier(org, "organization", paths.organization),
            user=_identifier(str(user), "user", paths.user),
            roles=_roles(_claim(payload, paths.roles), paths.roles),
            claims=MappingProxyType(payload),
        )

    def _pem_key(self, alg: str) -> PublicKey:
        assert self._public_key is not None
        if not fits(self._public_key, alg):
            raise InvalidToken(
                f"token algorithm {alg} does not match the configured "
                f"{describe(self._public_key)} key"
            )
        return self._public_key

    async def _public_key_for(self, alg: str, kid: str | None) -> PublicKey:
        if self._public_key is not None:
            return self._pem_key(alg)
        if self._jwks_keys is None or self._jwks_stale():
            await self._refresh_jwks()
        if self._jwks_keys is None:
            raise InvalidToken(f"cannot fetch signing keys: {self._jwks_error}")
        found = self._find_jwk(alg, kid)
        if found is None:
            # An unknown kid usually means the provider has rotated its keys.
            await self._refresh_jwks()
            found = self._find_jwk(alg, kid)
        if found is None:
            if kid is None:
                raise InvalidToken(
                    f"token has no kid header and the key set holds {len(self._jwks_keys)} "
                    f"{alg} keys"
                )
            raise InvalidToken(f"no {alg} signing key with kid {shown(kid)} in the key set")
        return found

    def _find_jwk(self, alg: str, kid: str | None) -> PublicKey | None:
        fitting = [k for k in self._jwks_keys or [] if k.alg in (None, alg) and fits(k.key, alg)]
        for candidate in fitting:
            if kid is not None and candidate.kid == kid:
                return candidate.key
        # A lone key is unambiguous when either side goes without a kid.
        if len(fitting) == 1 and (kid is None or fitting[0].kid is None):
            return fitting[0].key
        return None

    async def _refresh_jwks(self) -> None:
        """Refetch the key set unless a fetch began less than ``JWKS_REFETCH_INTERVAL``
        seconds ago. Concurrent callers share one fetch. A failed fetch keeps the keys
        already cached."""
        async with self._jwks_lock:
            if self._clock() - self._jwks_attempted_at < JWKS_REFETCH_INTERVAL:
                return
            self._jwks_attempted_at = self._clock()
            try:
                keys = await self._fetch_jwks()
            except _JwksUnavailable as exc:
                self._jwks_error = str(exc)
                log.warning(
                    "cannot fetch signing keys from %s: %s%s",
                    self._jwks_url,
                    exc,
                    "; keeping the cached keys" if self._jwks_keys is not None else "",
                )
                return
            if self._jwks_keys is not None and any(k not in keys for k in self._jwks_keys):
                # A withdrawn or replaced key stops verifying cached tokens too.
                self._tokens.clear()
            if self._jwks_keys is None or {k.kid for k in keys} != {k.kid for k in self._jwks_keys}:
                log.info(
                    "signing keys from %s: %s",
                    self._jwks_url,
                    ", ".join(str(k.kid) for k in keys),
                )
            self._jwks_keys = keys
            self._jwks_fetched_at = self._clock()

    async def _fetch_jwks(self) -> list[SigningKey]:
        assert self._jwks_url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=JWKS_TIMEOUT_SECONDS), trust_env=False
            )
        body = bytearray()
        try:
            async with self._session.get(
                self._jwks_url, headers={"Accept": "application/json"}
            ) as resp:
                if resp.status != 200:
                    raise _JwksUnavailable(f"the key server answered HTTP {resp.status}")
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise _JwksUnavailable("the key set is larger than 1 MiB")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise _JwksUnavailable(f"the key server is unreachable ({reason})") from exc
        try:
            return parse_jwks(body, self._jwks_url, self._config.asymmetric)
        except ValueError as exc:
            raise _JwksUnavailable(str(exc)) from exc


def mint_token(
    secret: str,
    *,
    org: str,
    user: str,
    ttl_seconds: int = 3600,
    roles: Sequence[str] = (),
    algorithm: str = "HS256",
    claims: ClaimsConfig | None = None,
    now: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """An HS-signed token with ``org``, ``user`` and ``roles`` at the claim paths of
    ``claims`` (dotted paths become nested objects), ``iat`` and ``exp``. ``extra`` claims
    (``iss``, ``aud``, ``nbf``...) are added first, so they may replace ``iat``/``exp`` but
    not the identity. Raises ``ValueError`` for a non-HS ``algorithm``."""
    if algorithm not in HMAC_KEY_BYTES:
        raise ValueError(f"mint_token signs with a shared secret; {algorithm} is not HS256/384/512")
    paths = claims or ClaimsConfig()
    issued = now or datetime.now(UTC)
    payload: dict[str, Any] = {
        "iat": int(issued.timestamp()),
        "exp": int((issued + timedelta(seconds=ttl_seconds)).timestamp()),
    }
    payload.update(copy.deepcopy(dict(extra or {})))
    _set_claim(payload, paths.organization, org)
    _set_claim(payload, paths.user, user)
    if roles:
        _set_claim(payload, paths.roles, list(roles))
    return jwt.encode(payload, secret, algorithm=algorithm)


def _bearer_token(authorization: str | None) -> str:
    if authorization is None or not authorization.strip():
        raise InvalidToken("missing Authorization header; send 'Authorization: Bearer <token>'")
    parts = authorization.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise InvalidToken("the Authorization header must be 'Bearer <token>'")
    if not parts[1].isascii():  # a JWT is ASCII; other bytes arrive as lone surrogates
        raise InvalidToken("malformed token: a JWT has only ASCII characters")
    return parts[1]


def _explain(exc: jwt.PyJWTError) -> str:
    """The client-facing reason a token was refused."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return EXPIRED
    if isinstance(exc, jwt.ImmatureSignatureError):
        claim = "iat" if "(iat)" in str(exc) else "nbf"
        return f"token is not yet valid ({claim} is in the future)"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "token issuer is not accepted"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "token audience is not accepted"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token lacks the required '{exc.claim}' claim"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "token signature does not verify"
    if isinstance(exc, jwt.DecodeError):
        return f"malformed token: {exc}"
    if isinstance(exc, jwt.InvalidKeyError):
        log.warning("token refused by its key: %s", exc)
        return "token cannot be verified with the configured key"
    return f"invalid token: {exc}"


def _identifier(value: str, what: str, path: str) -> str:
    """An organization or user id the ledger can store: no NUL, no lone surrogate, no
    control characters, at most 200 characters."""
    if len(value) > 200:
        raise InvalidToken(f"token's {what} claim '{path}' is longer than 200 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidToken(f"token's {what} claim '{path}' contains a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidToken(f"token's {what} claim '{path}' contains a lone surrogate") from None
    return value


def _claim(node: Any, path: str) -> Any:
    """The value at a dotted path, or None. A key that itself holds dots (Auth0's
    ``https://example.com/org``) is matched whole, longest first, before splitting."""
    if not isinstance(node, Mapping):
        return None
    if path in node:
        return node[path]
    cut = path.rfind(".")
    while cut > 0:
        if path[:cut] in node:
            found = _claim(node[path[:cut]], path[cut + 1 :])
            if found is not None:
                return found
        cut = path.rfind(".", 0, cut)
    return None


def _set_claim(payload: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = payload
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def _roles(value: Any, path: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(r, str) for r in value):
        return frozenset(value)
    raise InvalidToken(
        f"token's roles claim '{path}' must be a list of strings or a space-separated string"
    )
