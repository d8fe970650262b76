"""What a run prints and writes: the results table, the ratios between targets, the CPU
table, the ledger check and a summary of the gateway's log. Each table is built as lines
(so that it can be tested) and printed by ``print_report``."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.ledger_check import LedgerCheck
from bench.load import Load
from bench.workload import TOKEN_TYPE

RATIO_PAIRS = (
    ("gateway / upstream", "gateway", "upstream"),
    ("gateway / passthrough", "gateway", "passthrough"),
    ("passthrough / upstream", "passthrough", "upstream"),
)
CPU_COLUMNS = (
    "upstream",
    "passthrough",
    "gateway",
    "postgres",
    "redis",
    "load gen",
    "other",
    "machine",
)


@dataclass
class Result:
    """One target's measurement: what the load generator saw, and CPU use meanwhile."""

    target: str
    url: str
    load: Load
    cpu: dict[str, float]


def ratio(a: float, b: float) -> float:
    """a / b; NaN when b is 0 (a target that answered nothing has no ratio)."""
    return a / b if b else math.nan


def ratios(loads: Mapping[str, Load]) -> dict[str, dict[str, float]]:
    """Throughput and p50/p99 latency ratios of each pair in RATIO_PAIRS that was measured."""
    out: dict[str, dict[str, float]] = {}
    for name, a, b in RATIO_PAIRS:
        if a in loads and b in loads:
            x, y = loads[a], loads[b]
            out[name] = {
                "throughput": ratio(x.rps, y.rps),
                "p50": ratio(x.p50_ms, y.p50_ms),
                "p99": ratio(x.p99_ms, y.p99_ms),
            }
    return out


def results_table(results: Sequence[Result]) -> list[str]:
    lines = [
        f"{'target':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'requests':>11}"
        f"{'non-2xx':>9}{'errors':>8}"
    ]
    for r in results:
        x = r.load
        lines.append(
            f"{r.target:<14}{x.rps:>10,.0f}{x.p50_ms:>10.2f}{x.p99_ms:>10.2f}{x.requests:>11}"
            f"{x.non_2xx:>9}{x.error_count:>8}"
        )
    return lines


def ratios_table(table: Mapping[str, Mapping[str, float]]) -> list[str]:
    if not table:
        return []
    lines = [f"{'ratio':<26}{'throughput':>12}{'p50':>10}{'p99':>10}"]
    for name, row in table.items():
        lines.append(f"{name:<26}{row['throughput']:>11.2f}x{row['p50']:>9.2f}x{row['p99']:>9.2f}x")
    return lines


def cpu_table(results: Sequence[Result]) -> list[str]:
    """Percent of one CPU per column during each run ('-': not measured), then a warning
    for each run that other processes disturbed."""
    lines = [
        "CPU during each run, % of one CPU (machine: % of all CPUs busy)",
        f"{'target':<14}" + "".join(f"{c:>12}" for c in CPU_COLUMNS),
    ]
    for r in results:
        cells = [f"{r.cpu[c]:.0f}" if c in r.cpu else "-" for c in CPU_COLUMNS]
        lines.append(f"{r.target:<14}" + "".join(f"{c:>12}" for c in cells))
    lines.append(
        "  postgres and redis count every such process on the machine; other is everything "
        "else busy\n  (this script included): a large share means something else ran "
        "meanwhile and disturbed the numbers"
    )
    for r in results:
        if r.cpu.get("other", 0) > 25 or (r.target != "gateway" and r.cpu.get("postgres", 0) > 10):
            lines.append(f"  WARNING: other processes were busy during the {r.target} run")
    return lines


def ledger_lines(check: LedgerCheck) -> list[str]:
    lines = [
        f"ledger check (gateway run): {check.verdict()}",
        f"  2xx answers received by the load generator: {check.ok_responses}",
        f"  '{TOKEN_TYPE}' balance fell by:              {check.balance_drop}",
        f"  journal: {check.commits} commit(s), {check.refunds} refund(s), "
        f"{check.expires} expiry(ies); {check.held_after} reservation(s) held after",
    ]
    for reason, n in check.refund_reasons.items():
        lines.append(f"    {n} refunded or expired: {reason or '(no reason recorded)'}")
    extra = check.balance_drop - check.ok_responses
    if check.exact:
        lines.append(
            "  the python generator waits for every request it sent: the fall must equal "
            "the 2xx count,\n  with no refund"
        )
    else:
        lines.append(
            f"  wrk counts only responses completed within the run and drops the "
            f"connections at its end:\n  {extra} more were charged and {check.refunds} "
            f"refunded, requests in flight when it stopped ({extra + check.refunds} of at most "
            f"{check.concurrency},\n  one per connection); the gateway still settled "
            "each of them"
        )
    if check.violations:
        lines.extend(f"  audit: violation: {v}" for v in check.violations)
    else:
        lines.append("  audit: every invariant holds")
    lines.extend(f"  PROBLEM: {problem}" for problem in check.problems)
    return lines


def header(info: Mapping[str, Any], config: Mapping[str, Any], ledger: str, limits: str) -> str:
    """The run's context: machine, load, ledger and limits (``config`` as in ``summary``)."""
    return (
        f"machine: {info['nproc']} CPU(s), {info['cpu_model']}; {info['kernel']}; "
        f"Python {info['python']}, aiohttp {info['aiohttp']}\n"
        f"load: {config['generator']}\n      {config['concurrency']} connections, "
        f"{config['threads']} thread(s), {config['duration_s']}s per target after "
        f"{config['warmup_s']}s warm-up; POST {config['path']} ({config['body_bytes']}-byte "
        "JSON body)\n"
        f"      all CPUs {info['busy_before_percent']:.0f}% busy in the second before the run\n"
        f"note: the load generator, the three servers and PostgreSQL share these "
        f"{info['nproc']} CPU(s);\n      absolute numbers are lower than on separate machines, "
        "read the ratios.\n"
        f"ledger: {ledger}\n"
        f"limits: --limits {config['limits']}: {limits}"
    )


def summary(
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    results: Sequence[Result],
    check: LedgerCheck | None,
    failures: Sequence[str],
) -> dict[str, Any]:
    """Everything the report shows, for ``--json``."""
    return {
        "machine": dict(info),
        "config": dict(config),
        "results": {
            r.target: {"url": r.url, **asdict(r.load), "cpu_percent": r.cpu} for r in results
        },
        "ratios": ratios({r.target: r.load for r in results}),
        "ledger_check": asdict(check) if check is not None else None,
        "failures": list(failures),
    }


def print_report(
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    results: Sequence[Result],
    check: LedgerCheck | None,
    *,
    ledger: str,
    limits: str,
) -> None:
    print("\n" + "=" * 78)
    print(header(info, config, ledger, limits) + "\n")
    print("\n".join(results_table(results)))
    table = ratios_table(ratios({r.target: r.load for r in results}))
    if table:
        print("\n" + "\n".join(table))
    if results:
        print("\n" + "\n".join(cpu_table(results)))
    if check is not None:
        print("\n" + "\n".join(ledger_lines(check)))


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T][\d:.,]+Z?\s*")


def summarize_log(lines: Sequence[str], limit: int = 12) -> list[str]:
    """Distinct log records with their counts, most frequent first. JSON records (the
    gateway's structured log) are shown as level, logger, message and the last line of
    their exception; other lines without their timestamp."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        key = _TIMESTAMP.sub("", line.strip())
        with contextlib.suppress(ValueError, AttributeError):
            record = json.loads(line)
            key = f"{record.get('level', '?').upper()} {record.get('logger', '?')}: "
            key += str(record.get("message", ""))
            exception = str(record.get("exception") or "").strip()
            if exception:
                key += f" [{exception.splitlines()[-1]}]"
        counts[key] += 1
        first.setdefault(key, index)
    ranked = sorted(counts, key=lambda k: (-counts[k], first[k]))
    shown = [f"{counts[k]:>6} x {k[:400]}" for k in ranked[:limit]]
    if len(ranked) > limit:
        shown.append(f"       ... and {len(ranked) - limit} other distinct line(s)")
    return shown
