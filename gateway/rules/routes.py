"""The compiled rules: routes in the order of the file, and matching a request to one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.rules.paths import DOT_SEGMENT, compile_path
from gateway.rules.pricing import margin_problems
from gateway.rules.schema import RouteConfig, RulesDocument, UpstreamConfig
from gateway.rules.usage import nominal_hold


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
        """The fixed cost; for a route priced by usage, the hold of a request that names no
        model and no limits (the request's own hold is ``gateway.rules.usage.hold_for``)."""
        if self.config.usage is not None:
            return nominal_hold(self.config.usage)
        assert self.config.cost is not None  # the schema requires one of the two
        return self.config.cost

    def matches(self, method: str, path: str) -> bool:
        """Whether a request for ``method`` and the decoded ``path`` (no query string) is this
        route's. A path with a '.' or '..' segment matches no route."""
        return (
            (self.methods is None or method in self.methods)
            and bool(self.pattern.match(path))
            and not DOT_SEGMENT.search(path)
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

    def public(self) -> dict[str, Any]:
        """The document as JSON with every secret hidden: an upstream's ``headers`` carry
        the backends' credentials, so only their names are shown."""
        document = self.document.model_dump(mode="json")
        for upstream in document["upstreams"].values():
            upstream["headers"] = {name: "(secret)" for name in upstream["headers"]}
        return document

    def margin_problems(self) -> list[str]:
        """See ``gateway.rules.pricing.margin_problems``."""
        return margin_problems(self.document)

    def plan_allowances(self) -> dict[str, tuple[str, dict[str, int]]]:
        return {name: (p.period, dict(p.allowance)) for name, p in self.document.plans.items()}


def compile_routes(document: RulesDocument) -> tuple[Route, ...]:
    """The document's routes, in order, each with its pattern compiled and its upstream
    resolved. ``document`` must have passed the reference checks."""
    return tuple(
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


def _methods(method: str | list[str]) -> frozenset[str] | None:
    methods = [method] if isinstance(method, str) else method
    if "*" in methods:
        return None
    return frozenset(m.upper() for m in methods)
