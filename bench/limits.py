"""The rules the gateway runs with during a benchmark: the given rules with the bench's two
routes put first (a fixed-cost and a usage-priced chat completion, so that the run does not
depend on how rules.yaml prices /v1/chat/completions today), their ``limits`` adjusted by
``--limits`` so that one user's load is (or is not) refused, and ``ledger.leases`` set by
``--leases``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.workload import (
    FIXED_COST,
    PATH,
    PLAN,
    TOKEN_TYPE,
    USAGE_HOLD,
    USAGE_PATH,
    USAGE_RATES,
)

# --limits bench: what rate limits and concurrency caps become, so that one user's load is
# never refused while every check still runs.
UNBOUND_RATE = "1000000/second"
UNBOUND_CONCURRENCY = 1_000_000
# What the gateway applies when rules.yaml says nothing (gateway/limits/config.py).
BUILTIN_LIMITS: dict[str, Any] = {
    "rate": [{"limit": "30/minute", "per": "user"}],
    "min_interval": {"seconds": 3, "per": "user"},
    "concurrency": None,
}
LIMITS_MODES = {
    "bench": "rules.yaml's limits with rate limits and concurrency caps raised out of reach "
    "and min_interval off, so that one user can load the gateway; blocks, rate checks and "
    "spike accounting still run on Redis",
    "off": "every limit off (no Redis round trip): the cost of metering alone",
    "rules": "rules.yaml as it is: its per-user limits refuse a load test within seconds",
}


# --leases on: what ledger.leases becomes (rules.yaml's own, where it sets them).
BENCH_LEASES: dict[str, Any] = {"seconds": 1, "max_holds": 64}
LEASES_MODES = {
    "on": "ledger.leases on (rules.yaml's, else seconds 1 and max_holds 64): a busy caller "
    "draws holds made ahead, and its charge commits just after its answer",
    "off": "ledger.leases off: every request reserves on its own path and commits before "
    "its answer's last byte",
    "rules": "ledger.leases as rules.yaml says",
}


def adjust_leases(doc: dict[str, Any], mode: str) -> dict[str, Any]:
    """``doc`` (changed in place and returned) with ``ledger.leases`` set by ``mode``, one
    of LEASES_MODES."""
    if mode == "rules":
        return doc
    ledger = dict(doc.get("ledger") or {})
    if mode == "on":
        ledger["leases"] = ledger.get("leases") or dict(BENCH_LEASES)
    else:
        ledger.pop("leases", None)
    doc["ledger"] = ledger
    return doc


def _rates(value: object) -> list[dict[str, Any]]:
    if value is None:
        return []
    items: list[Any] = value if isinstance(value, list) else [value]
    return [{"limit": r} if isinstance(r, str) else dict(r) for r in items]


def loosened(level: dict[str, Any]) -> dict[str, Any]:
    """The same kinds of limit, none of which can refuse the bench's load."""
    out = dict(level)
    if "rate" in out:
        out["rate"] = [{**r, "limit": UNBOUND_RATE} for r in _rates(out["rate"])]
    if "min_interval" in out:
        out["min_interval"] = None  # no interval is short enough for concurrent requests
    if isinstance(out.get("concurrency"), dict):
        out["concurrency"] = {**out["concurrency"], "max": UNBOUND_CONCURRENCY}
    return out


def adjust_limits(doc: dict[str, Any], mode: str) -> dict[str, Any]:
    """``doc`` (a parsed rules file, changed in place and returned) with its ``limits``
    adjusted by ``mode``, one of LIMITS_MODES other than ``rules``."""
    limits = dict(doc.get("limits") or {})
    routes = doc.get("routes") or []
    if mode == "off":
        limits["default"] = {"rate": [], "min_interval": None, "concurrency": None}
        limits["plans"] = {}
        limits["blocks"] = None
        limits["spike"] = None
        for route in routes:
            route.pop("limits", None)
    else:
        default = limits.get("default") or {}
        plans = dict(limits.get("plans") or {})
        plan = plans.get(PLAN) or {}
        # Kind by kind, what the plan gets today (its own, else the default, else built in).
        effective = {
            kind: plan.get(kind, default.get(kind, builtin))
            for kind, builtin in BUILTIN_LIMITS.items()
        }
        plans[PLAN] = loosened(effective)
        limits["plans"] = plans
        for route in routes:
            if isinstance(route.get("limits"), dict):
                route["limits"] = loosened(route["limits"])
    doc["limits"] = limits
    return doc


def add_bench_routes(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (changed in place and returned) with the bench's routes first, so that they
    win over the file's own: ``bench_fixed`` (POST PATH, FIXED_COST) and ``bench_usage``
    (POST USAGE_PATH, priced by the usage the backend reports), both on the upstream
    ``ai_backend`` (else the file's first upstream)."""
    upstreams = list(doc.get("upstreams") or {})
    upstream = "ai_backend" if "ai_backend" in upstreams or not upstreams else upstreams[0]
    common = {"method": "POST", "upstream": upstream, "token_type": TOKEN_TYPE}
    routes = [
        {"name": "bench_fixed", **common, "path": PATH, "cost": FIXED_COST},
        {
            "name": "bench_usage",
            **common,
            "path": USAGE_PATH,
            "usage": {
                "format": "openai",
                "rates": dict(USAGE_RATES),
                "hold": USAGE_HOLD,
                "on_missing_usage": "hold",
            },
        },
    ]
    doc["routes"] = routes + list(doc.get("routes") or [])
    return doc


def bench_rules(source: Path, mode: str, dest: Path, leases: str = "rules") -> Path:
    """The rules file the gateway runs with, written at ``dest``: ``source`` with the
    bench's routes (``add_bench_routes``), its limits adjusted unless ``mode`` is ``rules``,
    its leases set by ``leases`` (``adjust_leases``), and a relative ``public_key_file``
    made absolute, since the copy lives elsewhere."""
    import yaml

    doc = yaml.safe_load(source.read_text())
    auth = doc.get("auth") or {}
    key_file = auth.get("public_key_file")
    if isinstance(key_file, str) and not Path(key_file).is_absolute():
        auth["public_key_file"] = str(source.parent / key_file)
    add_bench_routes(doc)
    if mode != "rules":
        adjust_limits(doc, mode)
    adjust_leases(doc, leases)
    dest.write_text(
        f"# {source} for bench/run.py --limits {mode} --leases {leases}: "
        f"{LIMITS_MODES[mode]}; {LEASES_MODES[leases]}\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    return dest
