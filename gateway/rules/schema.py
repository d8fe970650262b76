"""The schema of rules.yaml: what operators may write, as pydantic models.

Every model refuses unknown keys and values of the wrong type (``cost: "5"`` is not a
number); the document is validated strictly as a whole, nested sections included (see
``loading``), so a limit's ``seconds: "3"`` is refused too.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.limits.config import LimitsConfig, LimitSet
from gateway.rules.paths import compile_path

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
                f"must be a string or a list of strings, got {describe(bad)} in the list"
            )
        raise ValueError(f"must be a string or a list of strings, got {describe(value)}")

    @property
    def symmetric(self) -> list[str]:
        return [a for a in self.algorithms if a.startswith("HS")]

    @property
    def asymmetric(self) -> list[str]:
        return [a for a in self.algorithms if not a.startswith("HS")]


# Header names an upstream's ``headers`` may not set: the transport's own, and the ones the
# gateway sets for the upstream (see gateway.proxy).
RESERVED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "transfer-encoding",
        "host",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "x-request-id",
        "x-gateway-organization",
        "x-gateway-user",
        "x-gateway-roles",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
    }
)
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class UpstreamConfig(_Strict):
    url: str
    timeout_seconds: PositiveNumber = 60.0
    connect_timeout_seconds: PositiveNumber = 5.0
    # Sent on every forwarded request, overriding the client's: the backend's credentials,
    # e.g. {Authorization: "Bearer ${OPENAI_API_KEY}"}. Values are secrets: never shown.
    headers: dict[str, str] = {}

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not HEADER_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"{name!r} is set by the gateway itself and cannot be overridden")
            if any(c in text for c in "\r\n\0"):
                # The value is a secret: name the header, never echo the value.
                raise ValueError(f"the value of {name!r} contains a line break or NUL")
            if not text.strip():
                raise ValueError(f"the value of {name!r} is empty")
        return value

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


class UsageRates(_Strict):
    """Tokens charged per 1,000 of each counter the backend reports."""

    input: NonNegativeNumber
    output: NonNegativeNumber
    cached_input: NonNegativeNumber | None = None  # absent: charged as input


class UsageConfig(_Strict):
    """A route charged by what the backend reports it used, rather than a fixed cost."""

    format: Literal["openai", "anthropic"]
    rates: UsageRates
    models: dict[str, UsageRates] = {}  # by the request body's "model"
    hold: PositiveInt | None = None  # absent: estimated from the request
    on_missing_usage: Literal["hold", "refund"] = "hold"
    # Estimating the hold: the output a request without max_tokens may produce.
    default_max_tokens: PositiveInt = 4096
    max_request_bytes: PositiveInt = 4 * 1024 * 1024  # read to find model, max_tokens, stream
    max_response_bytes: PositiveInt = 16 * 1024 * 1024  # a JSON answer, read for its usage


class RouteConfig(_Strict):
    name: str | None = None
    method: str | list[str] = "*"
    path: str
    upstream: str
    token_type: str
    cost: PositiveInt | None = None
    usage: UsageConfig | None = None
    plans: list[str] | None = Field(default=None, min_length=1)
    enforce: bool = True
    forward_authorization: bool = False
    limits: LimitSet | None = None  # overrides limits.plans.<plan> and limits.default

    @field_validator("method", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        # Checked before the union so that one bad value gives one message, not one per member.
        if not isinstance(value, str | list):
            raise ValueError(f"must be an HTTP method or a list of them, got {describe(value)}")
        if value == []:
            raise ValueError("must not be an empty list (use '*' for any method)")
        methods = [value] if isinstance(value, str) else value
        bad = [
            m
            for m in methods
            if not isinstance(m, str) or (m != "*" and m.upper() not in HTTP_METHODS)
        ]
        if bad:
            named = ", ".join(repr(m) if isinstance(m, str) else describe(m) for m in bad)
            verb = "is not an HTTP method" if len(bad) == 1 else "are not HTTP methods"
            raise ValueError(f"{named} {verb} ({', '.join(HTTP_METHODS)} or *)")
        return value

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        compile_path(value)  # raises ValueError with the reason
        return value

    @model_validator(mode="after")
    def _priced_once(self) -> RouteConfig:
        if (self.cost is None) == (self.usage is None):
            raise ValueError(
                "needs exactly one of cost (a fixed price) or usage (priced by what the "
                "backend reports)"
            )
        return self


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


class LeasesConfig(_Strict):
    """Holds made ahead of demand and charges settled after the answer (see
    ``gateway.leases``): each process keeps up to ``max_holds`` durable holds (and as many
    admissions of the limits) per organization, user and route, drawn within ``seconds`` of
    being made or given back."""

    seconds: Annotated[float, Field(gt=0, le=60, allow_inf_nan=False)] = 1.0
    max_holds: Annotated[int, Field(ge=1, le=1024, strict=True)] = 64


class LedgerConfig(_Strict):
    """How long a reservation may stay held beyond its upstream's timeout before the
    sweeper refunds it, how often each gateway runs the sweeper, and leases (off unless
    set)."""

    reservation_grace_seconds: PositiveInt = 60
    sweep_interval_seconds: PositiveNumber = 10.0
    leases: LeasesConfig | None = None


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
            raise ValueError(f"must be 1, got {describe(value)}")
        return value


def describe(value: Any) -> str:
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
