"""rules.yaml: the schema operators edit, its validation, and route matching.

``load_rules`` either returns a complete, cross-checked ``Rules`` or raises ``ConfigError``
listing every problem at once, each as ``path: what is wrong`` (``routes[3].cost: must be a
positive integer``). Unknown keys, keys given twice and values of the wrong type are refused
(``cost: "5"`` is not a number), so that a typo never silently changes behaviour.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import ConfigError
from gateway.limits.config import LimitsConfig, LimitSet

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
PositiveNumber = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeNumber = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    # strict: YAML already has types, so "5" is not a number and 1 is not true.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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
    admin_role: str = "gateway-admin"  # a role claim that opens /v1/admin/

    @field_validator("audience", mode="before")
    @classmethod
    def _audience(cls, value: Any) -> Any:
        # Checked before the union so that one bad value gives one message, not one per member.
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if isinstance(value, list):
            bad = next(v for v in value if not isinstance(v, str))
            raise ValueError(
                f"must be a string or a list of strings, got {_describe(bad)} in the list"
            )
        raise ValueError(f"must be a string or a list of strings, got {_describe(value)}")

    @property
    def symmetric(self) -> list[str]:
        return [a for a in self.algorithms if a.startswith("HS")]

    @property
    def asymmetric(self) -> list[str]:
        return [a for a in self.algorithms if not a.startswith("HS")]


class UpstreamConfig(_Strict):
    url: str
    timeout_seconds: PositiveNumber = 60.0
    connect_timeout_seconds: PositiveNumber = 5.0

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or re.search(r"\s", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        if parts.query or parts.fragment or "?" in value or "#" in value:
            # The request's path and query are appended to this URL as they are.
            raise ValueError(f"must not have a query string or fragment, got {value!r}")
        return value.rstrip("/")


class TokenTypeConfig(_Strict):
    description: str = ""
    backend_cost: NonNegativeNumber | None = None  # what one token costs you upstream


class PlanConfig(_Strict):
    period: Literal["month", "week", "day"] = "month"
    allowance: dict[str, NonNegativeInt] = {}
    upgrade_to: str | None = None
    price: NonNegativeNumber | None = None  # per period, in the currency of backend_cost


class RouteConfig(_Strict):
    name: str | None = None
    method: str | list[str] = "*"
    path: str
    upstream: str
    token_type: str
    cost: PositiveInt
    plans: list[str] | None = Field(default=None, min_length=1)
    enforce: bool = True
    forward_authorization: bool = False
    limits: LimitSet | None = None  # overrides limits.plans.<plan> and limits.default

    @field_validator("method", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        # Checked before the union so that one bad value gives one message, not one per member.
        if not isinstance(value, str | list):
            raise ValueError(f"must be an HTTP method or a list of them, got {_describe(value)}")
        if value == []:
            raise ValueError("must not be an empty list (use '*' for any method)")
        methods = [value] if isinstance(value, str) else value
        bad = [
            m
            for m in methods
            if not isinstance(m, str) or (m != "*" and m.upper() not in HTTP_METHODS)
        ]
        if bad:
            named = ", ".join(repr(m) if isinstance(m, str) else _describe(m) for m in bad)
            verb = "is not an HTTP method" if len(bad) == 1 else "are not HTTP methods"
            raise ValueError(f"{named} {verb} ({', '.join(HTTP_METHODS)} or *)")
        return value

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compile_path(value)  # raises ValueError with the reason
        return value


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
    plan_prices: dict[str, str] = {}  # plan -> Stripe price id of its subscription
    cancel_plan: str = "starter"  # where a canceled subscription leaves the organization
    api_key_env: str = "STRIPE_API_KEY"
    webhook_secret_env: str = "STRIPE_WEBHOOK_SECRET"
    api_base: str | None = None  # another Stripe API address (stripe-mock, tests)
    success_url: str = "https://example.com/billing/success?session={CHECKOUT_SESSION_ID}"
    cancel_url: str = "https://example.com/billing/canceled"
    minimum_margin: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0


class AlertsConfig(_Strict):
    """Usage thresholds: one event per threshold per token type per period, to the log and,
    with ``webhook_url``, to an HMAC-signed webhook (retried, then dead-lettered)."""

    thresholds: list[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] = [0.8, 1.0]
    webhook_url: str | None = None
    webhook_secret_env: str = "GATEWAY_ALERT_SECRET"
    retries: NonNegativeInt = 3


class LedgerConfig(_Strict):
    """How long a reservation may stay held beyond its upstream's timeout before the
    sweeper refunds it, and how often each gateway runs the sweeper."""

    reservation_grace_seconds: PositiveInt = 60
    sweep_interval_seconds: PositiveNumber = 10.0


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
    alerts: AlertsConfig = AlertsConfig()

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if type(value) is not int or value != 1:  # Literal[1] alone would take true and 1.0
            raise ValueError(f"must be 1, got {_describe(value)}")
        return value


def compile_path(pattern: str) -> re.Pattern[str]:
    """Compile a route path pattern. ``{name}`` and ``*`` match one segment; a final ``**``
    matches the rest of the path, including nothing (``/v1/chat/**`` matches ``/v1/chat``).
    A trailing slash is optional. Raises ``ValueError`` saying what is wrong with ``pattern``."""
    if not pattern.startswith("/"):
        raise ValueError(f"must start with '/', got {pattern!r}")
    if "?" in pattern or "#" in pattern:
        raise ValueError("must not contain '?' or '#': the query string is not part of the path")
    body = pattern[1:]
    body = body[:-1] if body.endswith("/") else body
    segments = body.split("/") if body else []
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
        elif seg in (".", ".."):
            raise ValueError(f"segment '{seg}' is not allowed")
        else:
            parts.append("/" + re.escape(seg))
    return re.compile("^" + "".join(parts) + "/?$")


# A '.' or '..' segment: an upstream that resolves it would serve another route's endpoint
# (/v1/chat/../leads/generate) at this route's price.
_DOT_SEGMENT = re.compile(r"(?:^|/)\.\.?(?:/|$)")


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
        """Whether a request for ``method`` and the decoded ``path`` (no query string) is this
        route's. A path with a '.' or '..' segment matches no route."""
        return (
            (self.methods is None or method in self.methods)
            and bool(self.pattern.match(path))
            and not _DOT_SEGMENT.search(path)
        )


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

    def margin_problems(self) -> list[str]:
        """Plans whose full allowance would cost more in backend fees than their price less
        ``billing.minimum_margin``. Checked only for plans with a ``price`` whose token types
        all have a ``backend_cost``."""
        doc = self.document
        margin = doc.billing.minimum_margin
        problems = []
        for name, plan in doc.plans.items():
            if plan.price is None or not plan.allowance:
                continue
            costs = {tt: doc.token_types[tt].backend_cost for tt in plan.allowance}
            missing = sorted(tt for tt, cost in costs.items() if cost is None)
            if missing:
                problems.append(
                    f"plans.{name}: cannot check its margin: no backend_cost for "
                    + ", ".join(missing)
                )
                continue
            full = sum(plan.allowance[tt] * (cost or 0) for tt, cost in costs.items())
            ceiling = plan.price * (1 - margin)
            if full > ceiling:
                problems.append(
                    f"plans.{name}: its full allowance costs {full:.2f} in backend fees, more "
                    f"than its price {plan.price:.2f} less the {margin:.0%} minimum margin "
                    f"({ceiling:.2f})"
                )
        return problems

    def plan_allowances(self) -> dict[str, tuple[str, dict[str, int]]]:
        return {name: (p.period, dict(p.allowance)) for name, p in self.document.plans.items()}


def load_rules(path: str | Path) -> Rules:
    """Read, validate and compile a rules file. Raises ``ConfigError`` listing every error,
    each prefixed by ``path``."""
    source = str(path)
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from exc
    return parse_rules(raw_bytes, source)


Loc = tuple[int | str, ...]


def parse_rules(raw_bytes: bytes, source: str = "rules.yaml") -> Rules:
    """Validate and compile the rules in ``raw_bytes`` after replacing ``${VAR}`` and
    ``${VAR:-default}`` from the environment. Raises ``ConfigError`` (with ``source``)
    listing every error at once, in the order of the file, each as ``path: what is wrong``."""
    data, lines, errors = _load_yaml(raw_bytes, source)
    if data is None:
        raise ConfigError(source, ["(document): the file is empty"])
    if not isinstance(data, dict):
        raise ConfigError(
            source,
            [
                *_format(errors, data, lines),
                "(document): must be a mapping of sections (upstreams, token_types, plans, "
                f"routes, ...), got {_describe(data)}",
            ],
        )

    env_errors: list[tuple[Loc, str]] = []
    values = _interpolate(data, (), env_errors)
    errors += env_errors
    document: RulesDocument | None = None
    try:
        document = RulesDocument.model_validate(values)
    except ValidationError as exc:
        for error in exc.errors():
            loc, message = _schema_error(error)
            # A value whose variable is missing has already been reported once.
            if not any(loc[: len(bad)] == bad for bad, _ in env_errors):
                errors.append((loc, message))
    errors += _reference_errors(values)
    if errors or document is None:
        raise ConfigError(source, _format(errors, data, lines))

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


Lines = dict[tuple[str, ...], int]  # where each key or item starts, by its path


def _load_yaml(raw_bytes: bytes, source: str) -> tuple[Any, Lines, list[tuple[Loc, str]]]:
    """The document, the line of each of its values, and the keys it gives twice (which
    plain YAML loading would silently resolve to the last one). Raises ``ConfigError`` when
    it is not YAML."""
    loader = yaml.SafeLoader(raw_bytes)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        lines: Lines = {}
        duplicates = _walk(node, (), lines, set())
        return loader.construct_document(node), lines, duplicates
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_error(exc)]) from exc
    finally:
        loader.dispose()


def _yaml_error(exc: yaml.YAMLError) -> str:
    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    message = f"{at(mark)}: invalid YAML: {problem}" if mark else f"invalid YAML: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark and mark and context_mark.line != mark.line:
        # The problem is often noticed a line after the mistake: say where it began.
        message += f" ({context} started at {at(context_mark)})"
    return message


def _walk(node: yaml.Node, loc: Loc, lines: Lines, seen: set[int]) -> list[tuple[Loc, str]]:
    if id(node) in seen:  # an alias: already walked where its anchor is
        return []
    seen.add(id(node))
    lines.setdefault(tuple(map(str, loc)), node.start_mark.line + 1)
    errors: list[tuple[Loc, str]] = []
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _walk(item, (*loc, i), lines, seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            lines.setdefault(tuple(map(str, (*loc, key.value))), line)
            if (key.tag, key.value) in first_line:
                first = first_line[(key.tag, key.value)]
                errors.append(((*loc, key.value), f"key given twice (lines {first} and {line})"))
            else:
                first_line[(key.tag, key.value)] = line
            errors += _walk(value, (*loc, key.value), lines, seen)
    return errors


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, loc: Loc, errors: list[tuple[Loc, str]]) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in string values from the environment. As in
    the shell, the default also applies when the variable is set but empty."""
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), errors) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if "${" in _ENV_REF.sub("", value):
        errors.append((loc, "malformed variable reference: write ${NAME} or ${NAME:-default}"))
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            errors.append((loc, f"environment variable {name} is not set"))
            return ""
        return found

    return _ENV_REF.sub(sub, value)


def _methods(method: str | list[str]) -> frozenset[str] | None:
    methods = [method] if isinstance(method, str) else method
    if "*" in methods:
        return None
    return frozenset(m.upper() for m in methods)


def _format(errors: list[tuple[Loc, str]], data: Any, lines: Lines) -> list[str]:
    """``path: message`` for each error once, in the order of the file."""

    def line(loc: Loc) -> int:
        parts = tuple(map(str, loc))
        for end in range(len(parts), 0, -1):
            if parts[:end] in lines:
                return lines[parts[:end]]
        return 0

    ordered = sorted(errors, key=lambda error: line(error[0]))  # stable: same line, found order
    return list(dict.fromkeys(f"{_path(loc, data)}: {message}" for loc, message in ordered))


def _path(loc: Loc, data: Any) -> str:
    """``routes[3].cost``: the document is walked alongside so that an integer mapping key
    (``2024:``) is not mistaken for a list index."""
    out = ""
    for part in loc:
        if isinstance(part, int) and not (isinstance(data, dict) and part in data):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _key(part)
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            data = None
    return out or "(document)"


def _key(key: object) -> str:
    if key is None or isinstance(key, bool):
        return _describe(key)
    return str(key)


def _describe(value: Any) -> str:
    """A value as an operator wrote it in YAML, for ``got ...``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # e.g. a date: YAML reads 2024-01-01 as one


_EXPECTED = {
    "int_type": "must be an integer",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "list_type": "must be a list",
    "float_type": "must be a number",
}


def _schema_error(error: Any) -> tuple[Loc, str]:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    loc: Loc = tuple(error["loc"])
    if loc and loc[-1] == "[key]":
        return loc[:-1], f"key must be a string, got {_describe(error['input'])}"
    if kind in _EXPECTED:
        return loc, f"{_EXPECTED[kind]}, got {_describe(error['input'])}"
    if kind == "missing":
        message = "is required"
    elif kind == "extra_forbidden":
        message = "unknown key" + _known_keys(loc)
    elif kind == "greater_than" and ctx.get("gt") == 0:
        message = "must be a positive " + ("integer" if isinstance(ctx["gt"], int) else "number")
    elif kind == "greater_than":
        message = f"must be greater than {ctx.get('gt')}"
    elif kind == "greater_than_equal" and ctx.get("ge") == 0:
        message = "must not be negative"
    elif kind == "finite_number":
        message = "must be a finite number"
    elif kind == "literal_error":
        given = error["input"]
        message = f"must be one of {ctx.get('expected')}, got " + (
            repr(given) if isinstance(given, str) else _describe(given)
        )
    elif kind == "too_short":
        message = "must not be empty"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = str(error["msg"])
    return loc, message


def _known_keys(loc: Loc) -> str:
    """`` (did you mean 'cost'?)`` or the keys allowed where ``loc`` names an unknown one."""
    annotation: Any = RulesDocument
    for part in loc[:-1]:
        annotation = _unoptional(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return ""
            annotation = field.annotation
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            return ""
    annotation = _unoptional(annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return ""
    known = list(annotation.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of {', '.join(known)})"


def _unoptional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _reference_errors(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Cross-references the schema alone cannot check, run on the raw document so they are
    reported together with schema errors. Values of the wrong shape are skipped here: the
    schema reports them."""

    def mapping(value: Any) -> dict[Any, Any]:
        return value if isinstance(value, dict) else {}

    def strings(value: Any) -> list[tuple[int, str]]:
        items = value if isinstance(value, list) else []
        return [(i, v) for i, v in enumerate(items) if isinstance(v, str)]

    upstreams = set(mapping(data.get("upstreams")))
    token_types = set(mapping(data.get("token_types")))
    plans = set(mapping(data.get("plans")))
    errors: list[tuple[Loc, str]] = []
    for name in mapping(data.get("token_types")):
        if isinstance(name, str) and not NAME_RE.match(name):
            errors.append(
                (("token_types", name), "names must be lower_snake_case, e.g. lead_generation")
            )
    for pname, plan in mapping(data.get("plans")).items():
        for tt in mapping(mapping(plan).get("allowance")):
            if token_types and tt not in token_types:
                errors.append((("plans", pname, "allowance", tt), f"unknown token type '{tt}'"))
        upgrade = mapping(plan).get("upgrade_to")
        if isinstance(upgrade, str) and plans and upgrade not in plans:
            errors.append((("plans", pname, "upgrade_to"), f"unknown plan '{upgrade}'"))
    routes = data.get("routes")
    route_names: set[str] = set()
    for i, route in enumerate(routes if isinstance(routes, list) else []):
        route = mapping(route)
        name = route.get("name")
        if isinstance(name, str):
            if name in route_names:
                errors.append((("routes", i, "name"), f"duplicate route name '{name}'"))
            route_names.add(name)
        up = route.get("upstream")
        if isinstance(up, str) and upstreams and up not in upstreams:
            errors.append((("routes", i, "upstream"), f"unknown upstream '{up}'"))
        tt = route.get("token_type")
        if isinstance(tt, str) and token_types and tt not in token_types:
            errors.append((("routes", i, "token_type"), f"unknown token type '{tt}'"))
        for j, plan in strings(route.get("plans")):
            if plans and plan not in plans:
                errors.append((("routes", i, "plans", j), f"unknown plan '{plan}'"))
    auth = mapping(data.get("auth"))
    algorithms = auth.get("algorithms", ["HS256"])
    asymmetric = [a for _, a in strings(algorithms) if a in JWT_ALGORITHMS and a[:2] != "HS"]
    if asymmetric:
        sources = [k for k in ("public_key", "public_key_file", "jwks_url") if auth.get(k)]
        if not sources:
            errors.append(
                (
                    ("auth", "algorithms"),
                    f"{', '.join(asymmetric)} need{'s' if len(asymmetric) == 1 else ''} a public "
                    "key: set one of public_key, public_key_file or jwks_url",
                )
            )
        elif len(sources) > 1:
            errors.append((("auth",), f"give only one of {' and '.join(sources)}"))
    steps = mapping(data.get("license")).get("degradation_order")
    for i, step in enumerate(steps if isinstance(steps, list) else []):
        for j, tt in strings(mapping(step).get("token_types")):
            if token_types and tt not in token_types:
                loc: Loc = ("license", "degradation_order", i, "token_types", j)
                errors.append((loc, f"unknown token type '{tt}'"))
    for plan in mapping(mapping(data.get("limits")).get("plans")):
        if plans and plan not in plans:
            errors.append((("limits", "plans", plan), f"unknown plan '{plan}'"))
    billing = mapping(data.get("billing"))
    for pack_name, pack in mapping(billing.get("packs")).items():
        tt = mapping(pack).get("token_type")
        if isinstance(tt, str) and token_types and tt not in token_types:
            errors.append(
                (("billing", "packs", pack_name, "token_type"), f"unknown token type '{tt}'")
            )
    for plan in mapping(billing.get("plan_prices")):
        if plans and plan not in plans:
            errors.append((("billing", "plan_prices", plan), f"unknown plan '{plan}'"))
    return errors
