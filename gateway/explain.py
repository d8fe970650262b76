"""``gateway rules explain`` and ``GET /v1/admin/explain``: which route a request matches
and, given a token, each gate's verdict as it would apply now, consuming nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.auth import Authenticator
from gateway.errors import GatewayError
from gateway.ledger import Ledger
from gateway.limits.config import Effective
from gateway.limits.limiter import Limiter
from gateway.rules import Route, Rules

_RESERVE_VERDICTS = {
    "ok": (True, "the balance covers the cost"),
    "insufficient": (False, "402 insufficient_tokens"),
    "plan_forbidden": (False, "403 plan_forbidden"),
    "unknown_organization": (False, "403 unknown_organization"),
}


async def explain(
    rules: Rules,
    method: str,
    path: str,
    *,
    token: str | None = None,
    auth: Authenticator | None = None,
    ledger: Ledger | None = None,
    limiter: Limiter | None = None,
    limits_for: Callable[[str, Route], Awaitable[Effective]] | None = None,
) -> dict[str, Any]:
    """A report (JSON-ready) of how the gateway would treat ``method path`` now."""
    path = path.split("?", 1)[0]
    report: dict[str, Any] = {"request": f"{method} {path}", "rules_version": rules.version}
    route = rules.match(method, path)
    if route is None:
        report.update(route=None, gates=[], verdict="refused: 404 no_route")
        return report
    report["route"] = {
        "name": route.name,
        "index": route.index,
        "path": route.config.path,
        "upstream": route.config.upstream,
        "upstream_url": route.upstream.url,
        "token_type": route.token_type,
        "cost": route.cost,
        "plans": route.config.plans,
        "enforce": route.config.enforce,
    }
    gates: list[dict[str, Any]] = []
    report["gates"] = gates
    if token is None or auth is None or ledger is None:
        report["verdict"] = "matched (give a token to see each gate's verdict)"
        return report

    def gate(name: str, ok: bool, detail: str) -> None:
        gates.append({"gate": name, "ok": ok, "detail": detail})

    try:
        principal = await auth.authenticate(f"Bearer {token}")
    except GatewayError as exc:
        gate("token", False, f"{exc.status} {exc.code}: {exc.detail}")
        return _finish(report, route)
    roles = ", ".join(sorted(principal.roles)) or "none"
    gate("token", True, f"organization '{principal.org}', user '{principal.user}', roles {roles}")
    org = await ledger.organization(principal.org)
    if org is None:
        gate("organization", False, f"403 unknown_organization: '{principal.org}'")
        return _finish(report, route)
    gate("plan", True, f"plan '{org['plan']}'")
    if limiter is not None and limits_for is not None:
        limits = await limits_for(principal.org, route)
        try:
            verdicts = await limiter.peek(principal.org, principal.user, route.token_type, limits)
        except GatewayError as exc:
            gate(
                "limits",
                False,
                f"Redis unreachable ({exc.detail}); on_store_error: "
                f"{rules.document.limits.on_store_error}",
            )
        else:
            for name, ok, detail in verdicts:
                gate(f"limit {name}", ok, detail)
    verdict = await ledger.record_shadow(
        principal.org,
        route.token_type,
        route.cost,
        charged=0,
        plans=route.config.plans,
        route=route.name,
        user=principal.user,
        journal=False,
    )
    balance = next(
        (a for a in await ledger.balances(principal.org) if a.token_type == route.token_type),
        None,
    )
    available = balance.available if balance else 0
    ok, detail = _RESERVE_VERDICTS.get(verdict, (False, verdict))
    gate(
        "ledger",
        ok,
        f"{detail}: {available} {route.token_type} tokens available, cost {route.cost}",
    )
    return _finish(report, route)


def _finish(report: dict[str, Any], route: Route) -> dict[str, Any]:
    failed = [g for g in report["gates"] if not g["ok"]]
    if not failed:
        report["verdict"] = "allowed: would be forwarded and charged on a 2xx answer"
    elif not route.config.enforce:
        report["verdict"] = (
            f"shadow route: would be refused by {failed[0]['gate']}, but is forwarded anyway"
        )
    else:
        report["verdict"] = f"refused by {failed[0]['gate']}: {failed[0]['detail']}"
    return report


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lines = [f"{report['request']}  (rules version {report['rules_version']})"]
    route = report.get("route")
    if route is None:
        lines.append("  route: none matches")
    else:
        lines.append(
            f"  route: {route['name']} (routes[{route['index']}], {route['path']})"
            f"{'' if route['enforce'] else ' [shadow: enforce: false]'}"
        )
        lines.append(f"  upstream: {route['upstream']} ({route['upstream_url']})")
        lines.append(f"  token type: {route['token_type']}, cost {route['cost']}")
        if route["plans"]:
            lines.append(f"  plans: {', '.join(route['plans'])}")
    for g in report.get("gates", []):
        lines.append(f"  [{'ok' if g['ok'] else 'NO'}] {g['gate']}: {g['detail']}")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
