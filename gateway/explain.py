"""``gateway rules explain`` and ``GET /v1/admin/explain``: which route a request matches
and, given a token, each gate's verdict as it would apply now, consuming nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from gateway.auth import Authenticator
from gateway.errors import GatewayError
from gateway.gate import judge
from gateway.ledger import Ledger
from gateway.limits.config import Effective
from gateway.limits.limiter import Limiter
from gateway.rules import Route, Rules


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
        # Priced by usage: "cost" is the hold of a request naming no model and no limits.
        "usage": route.config.usage.format if route.config.usage is not None else None,
        "plans": route.config.plans,
        "enforce": route.config.enforce,
        # With leases, a busy caller's requests here may draw holds made up to this many
        # seconds before: what the gates below say now reaches them within that time.
        "lease_seconds": (
            leases.seconds
            if (leases := rules.document.ledger.leases) is not None
            and route.config.usage is None
            and route.config.enforce
            else None
        ),
    }
    gates: list[dict[str, Any]] = []
    report["gates"] = gates
    if token is None or auth is None or ledger is None:
        report["verdict"] = "matched (give a token to see each gate's verdict)"
        return report

    def gate(name: str, ok: bool, detail: str, refused: GatewayError | None = None) -> None:
        entry: dict[str, Any] = {"gate": name, "ok": ok, "detail": detail}
        if refused is not None:
            entry.update(status=refused.status, code=refused.code)
        gates.append(entry)

    try:
        principal = await auth.authenticate(f"Bearer {token}")
    except GatewayError as exc:
        gate("token", False, _refusal(exc), exc)
        return _finish(report, route)
    roles = ", ".join(sorted(principal.roles)) or "none"
    gate("token", True, f"organization '{principal.org}', user '{principal.user}', roles {roles}")
    outcome, refused = await judge(ledger, rules.document, route, principal)
    if outcome.status == "unknown_organization":
        gate("organization", False, _refusal(refused), refused)
        return _finish(report, route)
    gate("plan", True, f"plan '{outcome.plan}'")
    if limiter is not None and limits_for is not None:
        limits = await limits_for(principal.org, route)
        try:
            verdicts = await limiter.peek(
                principal.org, principal.user, route.token_type, limits, tokens=route.cost
            )
        except GatewayError as exc:
            closed = rules.document.limits.on_store_error == "closed"
            gate(
                "limits",
                not closed,
                f"{exc.status} {exc.code}: Redis unreachable ({exc.detail}); "
                f"on_store_error: {rules.document.limits.on_store_error}",
                exc if closed else None,
            )
        else:
            for verdict in verdicts:
                if verdict.refusal is None:
                    gate(f"limit {verdict.limit}", True, verdict.detail)
                else:
                    gate(
                        f"limit {verdict.limit}", False, _refusal(verdict.refusal), verdict.refusal
                    )
    balance = f"{outcome.remaining} {route.token_type} tokens available, cost {route.cost}"
    if refused is None:
        gate("ledger", True, f"the balance covers the cost: {balance}")
    else:
        gate("ledger", False, f"{_refusal(refused)} ({balance})", refused)
    return _finish(report, route)


def _refusal(exc: GatewayError | None) -> str:
    return f"{exc.status} {exc.code}: {exc.detail}" if exc is not None else "ok"


def _finish(report: dict[str, Any], route: Route) -> dict[str, Any]:
    failed = [g for g in report["gates"] if not g["ok"]]
    report["code"] = failed[0].get("code") if failed else None
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
        price = (
            f"cost {route['cost']}"
            if route["usage"] is None
            else f"priced by usage ({route['usage']} format), hold {route['cost']}"
        )
        lines.append(f"  token type: {route['token_type']}, {price}")
        if route["plans"]:
            lines.append(f"  plans: {', '.join(route['plans'])}")
    for g in report.get("gates", []):
        lines.append(f"  [{'ok' if g['ok'] else 'NO'}] {g['gate']}: {g['detail']}")
    lines.append(f"verdict: {report['verdict']}")
    return "\n".join(lines)
