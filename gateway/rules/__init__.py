"""rules.yaml: the schema operators edit, its loading and diagnostics, and route matching.

schema        the pydantic models (RulesDocument and its sections)
paths         route path patterns (compile_path)
loading       YAML, ${VAR} interpolation, the schema and references, at once (load_rules)
diagnostics   each problem as ``path: what is wrong``, in the order of the file
references    names one section uses that another must define
routes        the compiled Rules and Route, and matching a request to a route
pricing       the margin check of priced plans
usage         routes priced by what the backend reports: holds and charges
"""

from gateway.rules.loading import load_rules, parse_rules
from gateway.rules.paths import compile_path
from gateway.rules.pricing import margin_problems
from gateway.rules.routes import Route, Rules
from gateway.rules.schema import (
    HTTP_METHODS,
    JWT_ALGORITHMS,
    NAME_RE,
    AlertsConfig,
    Algorithm,
    AuthConfig,
    BillingConfig,
    ClaimsConfig,
    DegradationStep,
    LeasesConfig,
    LedgerConfig,
    LicenseConfig,
    PackConfig,
    PlanConfig,
    RouteConfig,
    RulesDocument,
    TokenTypeConfig,
    UpstreamConfig,
    UsageConfig,
    UsageRates,
)
from gateway.rules.usage import Usage, charge, hold_for

__all__ = [
    "HTTP_METHODS",
    "JWT_ALGORITHMS",
    "NAME_RE",
    "AlertsConfig",
    "Algorithm",
    "AuthConfig",
    "BillingConfig",
    "ClaimsConfig",
    "DegradationStep",
    "LeasesConfig",
    "LedgerConfig",
    "LicenseConfig",
    "PackConfig",
    "PlanConfig",
    "Route",
    "RouteConfig",
    "Rules",
    "RulesDocument",
    "TokenTypeConfig",
    "UpstreamConfig",
    "Usage",
    "UsageConfig",
    "UsageRates",
    "charge",
    "compile_path",
    "hold_for",
    "load_rules",
    "margin_problems",
    "parse_rules",
]
