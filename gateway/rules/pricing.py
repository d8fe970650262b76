"""The pricing check: would a plan's full allowance cost more in backend fees than it earns?"""

from __future__ import annotations

from gateway.rules.schema import RulesDocument


def margin_problems(document: RulesDocument) -> list[str]:
    """Plans whose full allowance would cost more in backend fees than their price less
    ``billing.minimum_margin``, each as ``plans.<name>: ...``. Checked only for plans with a
    ``price`` whose token types all have a ``backend_cost``; the others are named as
    unchecked."""
    margin = document.billing.minimum_margin
    problems = []
    for name, plan in document.plans.items():
        if plan.price is None or not plan.allowance:
            continue
        costs = {tt: document.token_types[tt].backend_cost for tt in plan.allowance}
        missing = sorted(tt for tt, cost in costs.items() if cost is None)
        if missing:
            problems.append(
                f"plans.{name}: cannot check its margin: no backend_cost for " + ", ".join(missing)
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
