"""Cross-references: names one section uses that another must define (a route's upstream,
token type and plans; a plan's allowance; packs, prices, limits per plan), and the rules
that tie several keys together (asymmetric algorithms need one key source)."""

from __future__ import annotations

from typing import Any

from gateway.rules.diagnostics import Loc
from gateway.rules.schema import JWT_ALGORITHMS, NAME_RE


def reference_errors(data: dict[str, Any]) -> list[tuple[Loc, str]]:
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
