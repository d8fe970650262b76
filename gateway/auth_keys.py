"""Key material for JWT verification: the HS* secret from the environment, PEM public
keys, the keys of a JWKS document, and which key fits which algorithm. Each is parsed
once, when the rules load or the key set is fetched, never per token. Loading failures are
collected as errors with their path, for ``ConfigError``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm

from gateway.rules import AuthConfig

log = logging.getLogger("gateway.auth")

MIN_SECRET_BYTES = 32
# RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
HMAC_KEY_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# NIST SP 800-131A; PyJWT warns on every verification with a shorter RSA key.
MIN_RSA_BITS = 2048

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)
EC_CURVES: dict[str, type[ec.EllipticCurve]] = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1}


@dataclass(frozen=True)
class SigningKey:
    """One usable key of a JWKS document."""

    kid: str | None
    alg: str | None  # the JWK's own ``alg``, which then is the only one it may verify
    key: PublicKey


def fits(key: PublicKey, alg: str) -> bool:
    """Whether ``key`` can verify ``alg``; PyJWT would raise TypeError, not refuse, on a
    mismatch such as an EC key for RS256."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg in EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, EC_CURVES[alg])
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    return False


def describe(key: PublicKey) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"


def shown(value: object) -> str:
    """A client-supplied value, quoted and cut short, for error details and logs."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load_secret(config: AuthConfig, environ: Mapping[str, str], errors: list[str]) -> bytes:
    name = config.secret_env
    value = environ.get(name, "")
    if not value:
        errors.append(f"auth.secret_env: environment variable {name} is not set")
        return b""
    secret = value.encode()
    strongest = max(config.symmetric, key=HMAC_KEY_BYTES.__getitem__)
    need = max(MIN_SECRET_BYTES, HMAC_KEY_BYTES[strongest])
    if len(secret) < need:
        errors.append(
            f"auth.secret_env: the secret in {name} must be at least {need} bytes"
            + (f" for {strongest}" if need > MIN_SECRET_BYTES else "")
        )
    try:
        HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)
    except jwt.InvalidKeyError:
        errors.append(
            f"auth.secret_env: the secret in {name} is an asymmetric key; "
            "HMAC secrets must not be public keys"
        )
    return secret


def load_public_key(config: AuthConfig, errors: list[str]) -> PublicKey | None:
    if config.public_key is not None:
        where, pem = "auth.public_key", config.public_key.encode()
    else:
        assert config.public_key_file is not None
        where = "auth.public_key_file"
        try:
            pem = Path(config.public_key_file).read_bytes()
        except OSError as exc:
            errors.append(f"{where}: cannot read {config.public_key_file}: {exc.strerror}")
            return None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        if b"PRIVATE KEY-----" in pem:
            errors.append(f"{where}: is a private key; give the public key")
        else:
            errors.append(f"{where}: is not a PEM public key")
        return None
    if not isinstance(key, PUBLIC_KEY_TYPES):
        errors.append(f"{where}: a {type(key).__name__} cannot verify JWTs")
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        errors.append(
            f"{where}: the RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} are required"
        )
        return None
    unfit = [a for a in config.asymmetric if not fits(key, a)]
    if unfit:
        errors.append(
            f"{where}: an {describe(key)} key cannot verify {', '.join(unfit)}; "
            "list only algorithms the key fits"
        )
        return None
    return key


def parse_jwks(body: bytes | bytearray, source: str, algorithms: Sequence[str]) -> list[SigningKey]:
    """The keys of the JWKS document ``body`` (fetched from ``source``) that may verify
    ``algorithms``; keys that may not are skipped and logged. Raises ``ValueError`` saying
    why no key is usable."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ValueError("the key set is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the key set has no 'keys' list")
    keys = [
        k for i, jwk in enumerate(document["keys"]) if (k := _parse_jwk(i, jwk, source, algorithms))
    ]
    if not keys:
        raise ValueError(f"the key set holds no key for {', '.join(algorithms)}")
    return keys


def _parse_jwk(index: int, jwk: Any, source: str, algorithms: Sequence[str]) -> SigningKey | None:
    """The signing key of the ``index``-th JWK of the key set at ``source``, or None
    (logged) for a key this gateway must not use to verify ``algorithms``."""
    if not isinstance(jwk, dict):
        return None
    kid = jwk.get("kid")
    name = f"key {shown(kid)}" if isinstance(kid, str) else f"keys[{index}]"
    if jwk.get("use") not in (None, "sig") or jwk.get("kty") == "oct":
        # Encryption keys are not for verifying; a symmetric key published in a key set
        # would reopen HS/RS confusion.
        log.debug("skipping %s of %s: not an asymmetric signing key", name, source)
        return None
    try:
        parsed = jwt.PyJWK(jwk)
    except jwt.PyJWTError as exc:
        log.warning("skipping %s of %s: %s", name, source, exc)
        return None
    key = parsed.key
    if not isinstance(key, PUBLIC_KEY_TYPES):
        log.warning("skipping %s of %s: not a public key", name, source)
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        log.warning(
            "skipping %s of %s: RSA key of %d bits, below %d",
            name,
            source,
            key.key_size,
            MIN_RSA_BITS,
        )
        return None
    alg = jwk.get("alg")
    if not any(alg in (None, a) and fits(key, a) for a in algorithms):
        log.debug("skipping %s of %s: fits no configured algorithm", name, source)
        return None
    return SigningKey(kid=parsed.key_id, alg=alg if isinstance(alg, str) else None, key=key)
