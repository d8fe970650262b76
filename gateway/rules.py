"""rules.yaml: the schema operators edit, its validation, and route matching.

``load_rules`` either returns a complete, cross-checked ``Rules`` or raises ``ConfigError``
listing every problem by path (``routes[3].cost: must be a positive integer``). Unknown keys
are refused so that a typo never silently changes behaviour.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import ConfigError

JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "ES256",
    "ES384",
    "EdDSA",
)
Algorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"
]
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClaimsConfig(_Strict):
    """Dotted paths into the JWT payload, e.g. ``app_metadata.org_id``."""

    organization: str = "org_id"
    user: str = "sub"
    roles: str = "roles"


class AuthConfig(_Strict):
    algorithms: list[Algorithm] = Field(default=["HS256"], min_length=1)
    secret_env: str = "GATEWAY_JWT_SECRET"
    public_key: str | None = None
    public_key_file: str | None = None
    jwks_url: str | None = None
    jwks_cache_seconds: PositiveInt = 300
    issuer: str | None = None
    audience: str | list[str] | None = None
    leeway_seconds: NonNegativeInt = 30
    require: list[Literal["exp", "iat", "nbf", "iss", "aud", "sub"]] = ["exp"]
    claims: ClaimsConfig = ClaimsConfig()

    @property
    def symmetric(self) -> list[str]:
        return [a for a in self.algorithms if a.startswith("HS")]

    @property
    def asymmetric(self) -> list[str]:
        return [a for a in self.algorithms if not a.startswith("HS")]


class UpstreamConfig(_Strict):
    url: str
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0
    connect_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")


class TokenTypeConfig(_Strict):
    description: str = ""


class PlanConfig(_Strict):
    period: Literal["month", "week", "day"] = "month"
    allowance: dict[str, NonNegativeInt] = {}
    upgrade_to: str | None = None


class RouteConfig(_Strict):
    name: str | None = None
    method: str | list[str] = "*"
    path: str
    upstream: str
    token_type: str
    cost: PositiveInt
    plans: list[str] | None = None
    enforce: bool = True
    forward_authorization: bool = False

    @field_validator("method")
    @classmethod
    def _methods(cls, value: str | list[str]) -> str | list[str]:
        for m in [value] if isinstance(value, str) else value:
            if m != "*" and m.upper() not in HTTP_METHODS:
                raise ValueError(f"'{m}' is not an HTTP method ({', '.join(HTTP_METHODS)} or *)")
        return value

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compile_path(value)  # raises ValueError with the reason
        return value


class LimitsConfig(_Strict):
    on_store_error: Literal["open", "closed"] = "open"


class DegradationStep(_Strict):
    after_days: NonNegativeInt
    token_types: list[str]


class LicenseConfig(_Strict):
    grace_period_days: NonNegativeInt = 14
    degradation_order: list[DegradationStep] = []


class PackConfig(_Strict):
    price_id: str
    token_type: str
    amount: PositiveInt


class BillingConfig(_Strict):
    packs: dict[str, PackConfig] = {}
    plan_prices: dict[str, str] = {}


class LedgerConfig(_Strict):
    """How long a reservation may stay held beyond its upstream's timeout before the
    sweeper refunds it, and how often each gateway runs the sweeper."""

    reservation_grace_seconds: PositiveInt = 60
    sweep_interval_seconds: Annotated[float, Field(gt=0)] = 10.0


class RulesDocument(_Strict):
    version: Literal[1] = 1
    auth: AuthConfig = AuthConfig()
    upstreams: dict[str, UpstreamConfig] = Field(min_length=1)
    token_types: dict[str, TokenTypeConfig] = Field(min_length=1)
    plans: dict[str, PlanConfig] = Field(min_length=1)
    routes: list[RouteConfig] = []
    limits: LimitsConfig = LimitsConfig()
    license: LicenseConfig = LicenseConfig()
    billing: BillingConfig = BillingConfig()
    ledger: LedgerConfig = LedgerConfig()


def compile_path(pattern: str) -> re.Pattern[str]:
    """Compile a route path pattern. ``{name}`` and ``*`` match one segment; a final ``**``
    matches the rest of the path, including nothing (``/v1/chat/**`` matches ``/v1/chat``)."""
    if not pattern.startswith("/"):
        raise ValueError("must start with '/'")
    segments = pattern.strip("/").split("/") if pattern != "/" else []
    parts: list[str] = []
    for i, seg in enumerate(segments):
        if seg == "**":
            if i != len(segments) - 1:
                raise ValueError("'**' may only be the last segment")
            return re.compile("^" + "".join(parts) + "(?:/.*)?$")
        if seg == "*" or re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", seg):
            parts.append("/[^/]+")
        elif "{" in seg or "}" in seg or "*" in seg:
            raise ValueError(f"segment '{seg}' is not a literal, '*', '**' or '{{name}}'")
        elif seg == "":
            raise ValueError("has an empty segment ('//')")
        else:
            parts.append("/" + re.escape(seg))
    return re.compile("^" + "".join(parts) + "/?$")


@dataclass(frozen=True)
class Route:
    index: int
    name: str
    methods: frozenset[str] | None  # None: any method
    pattern: re.Pattern[str]
    config: RouteConfig
    upstream: UpstreamConfig

    @property
    def token_type(self) -> str:
        return self.config.token_type

    @property
    def cost(self) -> int:
        return self.config.cost

    def matches(self, method: str, path: str) -> bool:
        return (self.methods is None or method in self.methods) and bool(self.pattern.match(path))


@dataclass(frozen=True)
class Rules:
    document: RulesDocument
    routes: tuple[Route, ...]
    source: str
    version: str  # sha256 of the file's bytes, first 12 hex digits

    def match(self, method: str, path: str) -> Route | None:
        """First matching route wins; ``path`` carries no query string."""
        for route in self.routes:
            if route.matches(method, path):
                return route
        return None

    def plan_allowances(self) -> dict[str, tuple[str, dict[str, int]]]:
        return {name: (p.period, dict(p.allowance)) for name, p in self.document.plans.items()}


def load_rules(path: str | Path) -> Rules:
    """Read, validate and compile a rules file. Raises ``ConfigError`` listing every error."""
    source = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from exc
    return parse_rules(raw_bytes, source)


def parse_rules(raw_bytes: bytes, source: str = "rules.yaml") -> Rules:
    try:
        data = yaml.safe_load(raw_bytes)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}invalid YAML: {problem}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError(source, ["the document must be a mapping with upstreams, routes, ..."])

    errors: list[str] = []
    data = _interpolate(data, (), errors)
    document: RulesDocument | None = None
    try:
        document = RulesDocument.model_validate(data)
    except ValidationError as exc:
        errors.extend(_format_error(e) for e in exc.errors())
    errors.extend(_reference_errors(data))
    if errors or document is None:
        raise ConfigError(source, _dedupe(errors))

    routes = tuple(
        Route(
            index=i,
            name=r.name
            or f"{r.method if isinstance(r.method, str) else ','.join(r.method)} {r.path}",
            methods=_methods(r.method),
            pattern=compile_path(r.path),
            config=r,
            upstream=document.upstreams[r.upstream],
        )
        for i, r in enumerate(document.routes)
    )
    version = hashlib.sha256(raw_bytes).hexdigest()[:12]
    return Rules(document=document, routes=routes, source=source, version=version)


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, loc: tuple[int | str, ...], errors: list[str]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values from the environment."""
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, str(k)), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if found is None:
            if default is None:
                errors.append(f"{_loc(loc)}: environment variable {name} is not set")
                return ""
            return default
        return found

    return _ENV_REF.sub(sub, value)


def _methods(method: str | list[str]) -> frozenset[str] | None:
    methods = [method] if isinstance(method, str) else method
    if "*" in methods:
        return None
    return frozenset(m.upper() for m in methods)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(document)"


def _format_error(error: Any) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    messages = {
        "missing": "is required",
        "extra_forbidden": "unknown key",
        "int_type": "must be an integer",
        "int_parsing": "must be an integer",
        "bool_type": "must be true or false",
        "bool_parsing": "must be true or false",
        "string_type": "must be a string",
        "dict_type": "must be a mapping",
        "list_type": "must be a list",
        "float_type": "must be a number",
        "float_parsing": "must be a number",
    }
    if kind in messages:
        message = messages[kind]
    elif kind == "greater_than" and ctx.get("gt") == 0:
        message = "must be a positive " + ("integer" if isinstance(ctx["gt"], int) else "number")
    elif kind == "greater_than":
        message = f"must be greater than {ctx.get('gt')}"
    elif kind == "greater_than_equal" and ctx.get("ge") == 0:
        message = "must not be negative"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected')}"
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = error["msg"]
    # Union types report one error per member; keep the path readable.
    loc = tuple(p for p in loc if p not in ("str", "list[str]", "list[...]"))
    return f"{_loc(loc)}: {message}"


def _reference_errors(data: dict[str, Any]) -> list[str]:
    """Cross-references the schema alone cannot check, run on the raw document so they are
    reported together with schema errors."""

    def names(section: str) -> set[str]:
        value = data.get(section)
        return set(value) if isinstance(value, dict) else set()

    upstreams, token_types, plans = names("upstreams"), names("token_types"), names("plans")
    errors: list[str] = []
    for name in token_types:
        if not NAME_RE.match(str(name)):
            errors.append(f"token_types.{name}: names must be lower_snake_case")
    for pname, plan in (data.get("plans") or {}).items():
        if not isinstance(plan, dict):
            continue
        for tt in plan.get("allowance") or {}:
            if token_types and tt not in token_types:
                errors.append(f"plans.{pname}.allowance.{tt}: unknown token type")
        upgrade = plan.get("upgrade_to")
        if isinstance(upgrade, str) and plans and upgrade not in plans:
            errors.append(f"plans.{pname}.upgrade_to: unknown plan '{upgrade}'")
    routes = data.get("routes")
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            errors.append(f"routes[{i}]: must be a mapping")
            continue
        up = route.get("upstream")
        if isinstance(up, str) and upstreams and up not in upstreams:
            errors.append(f"routes[{i}].upstream: unknown upstream '{up}'")
        tt = route.get("token_type")
        if isinstance(tt, str) and token_types and tt not in token_types:
            errors.append(f"routes[{i}].token_type: unknown token type '{tt}'")
        for plan in route.get("plans") or []:
            if isinstance(plan, str) and plans and plan not in plans:
                errors.append(f"routes[{i}].plans: unknown plan '{plan}'")
    auth = data.get("auth") if isinstance(data.get("auth"), dict) else {}
    assert isinstance(auth, dict)
    algs = auth.get("algorithms") or ["HS256"]
    if isinstance(algs, list) and any(isinstance(a, str) and not a.startswith("HS") for a in algs):
        sources = [k for k in ("public_key", "public_key_file", "jwks_url") if auth.get(k)]
        if not sources:
            errors.append(
                "auth: asymmetric algorithms need one of public_key, public_key_file or jwks_url"
            )
        elif len(sources) > 1:
            errors.append(f"auth: give only one of {', '.join(sources)}")
    license_ = data.get("license") if isinstance(data.get("license"), dict) else {}
    assert isinstance(license_, dict)
    for i, step in enumerate(license_.get("degradation_order") or []):
        for tt in step.get("token_types") or [] if isinstance(step, dict) else []:
            if token_types and tt not in token_types:
                errors.append(
                    f"license.degradation_order[{i}].token_types: unknown token type '{tt}'"
                )
    billing = data.get("billing") if isinstance(data.get("billing"), dict) else {}
    assert isinstance(billing, dict)
    for pack_name, pack in (billing.get("packs") or {}).items():
        tt = pack.get("token_type") if isinstance(pack, dict) else None
        if isinstance(tt, str) and token_types and tt not in token_types:
            errors.append(f"billing.packs.{pack_name}.token_type: unknown token type '{tt}'")
    for plan in billing.get("plan_prices") or {}:
        if plans and plan not in plans:
            errors.append(f"billing.plan_prices.{plan}: unknown plan")
    return errors


def _dedupe(errors: list[str]) -> list[str]:
    seen: set[str] = set()
    return [e for e in errors if not (e in seen or seen.add(e))]  # type: ignore[func-returns-value]
