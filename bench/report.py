"""What a run prints and writes: the verdict (each part's figure against its bar), the
results table, the ratios between targets, the CPU table, the stream ladder, the ledger
checks and a summary of the gateway's log. Each table is built as lines (so that it can be
tested) and printed by ``print_report``."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.breakdown import Breakdown, breakdown_lines
from bench.hot_account import HotAccount
from bench.ledger_check import LedgerCheck, RunLedgerCheck
from bench.load import Load
from bench.sse import TTFB_LIMIT_MS, StreamStep, held
from bench.workload import STREAM_EVENTS, TOKEN_TYPE

# The bars each part is judged against (the targets).
THROUGHPUT_BAR = 0.3  # gateway / passthrough req/s at 32 connections, at least
ADDED_P50_BAR_MS = 1.0  # gateway minus passthrough at 1 connection, at most
ADDED_P99_BAR_MS = 2.5
HOT_ACCOUNT_BAR = 5000.0  # reserve+commit pairs/s on one account, at least
STREAMS_BAR = 0.85  # streams the gateway holds / the pass-through holds, at least
WORKERS_BAR = 1.6  # req/s with 2 gateway workers / with 1, at least

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


@dataclass
class Outcome:
    """Everything one run measured; a part that was not run is empty or None."""

    throughput: list[Result] = field(default_factory=list)  # 32 connections
    latency: list[Result] = field(default_factory=list)  # 1 connection
    streams: dict[str, list[StreamStep]] = field(default_factory=dict)  # ladder per target
    hot: HotAccount | None = None
    hot_leased: HotAccount | None = None  # the same, holds made as leases make them
    workers: list[Result] = field(default_factory=list)  # 1 worker, then 2
    ledger: LedgerCheck | None = None  # the gateway's 32-connection measurement
    run_ledger: RunLedgerCheck | None = None  # the whole run
    breakdowns: dict[str, Breakdown] = field(default_factory=dict)  # gateway's /metrics

    def results(self) -> list[Result]:
        return [*self.throughput, *self.latency, *self.workers]


@dataclass(frozen=True)
class Bar:
    """One line of the verdict: a figure against its bar."""

    part: str
    measure: str
    value: str  # the figure, formatted
    bar: str  # '' when it is an extra line, judged by nothing
    passed: bool | None  # None: not judged (extra line, or could not be measured)

    def mark(self) -> str:
        return {True: "PASS", False: "MISS", None: ""}[self.passed]


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
        f"{'target':<18}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'requests':>11}"
        f"{'non-2xx':>9}{'errors':>8}"
    ]
    for r in results:
        x = r.load
        lines.append(
            f"{r.target:<18}{x.rps:>10,.0f}{x.p50_ms:>10.2f}{x.p99_ms:>10.2f}{x.requests:>11}"
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


def cpu_table(results: Sequence[Result], title: str = "each run") -> list[str]:
    """Percent of one CPU per column during each run ('-': not measured), then a warning
    naming the runs that other processes disturbed."""
    lines = [
        f"CPU during {title}, % of one CPU (machine: % of all CPUs busy)",
        f"{'target':<18}" + "".join(f"{c:>12}" for c in CPU_COLUMNS),
    ]
    for r in results:
        cells = [f"{r.cpu[c]:.0f}" if c in r.cpu else "-" for c in CPU_COLUMNS]
        lines.append(f"{r.target:<18}" + "".join(f"{c:>12}" for c in cells))
    disturbed = [
        r.target
        for r in results
        if r.cpu.get("other", 0) > 25 or (r.target == "upstream" and r.cpu.get("postgres", 0) > 10)
    ]
    if disturbed:
        lines.append(f"  WARNING: other processes were busy during: {', '.join(disturbed)}")
    return lines


CPU_NOTE = (
    "  postgres and redis count every such process on the machine; other is everything "
    "else busy\n  (this script included): a large share means something else ran "
    "meanwhile and disturbed the numbers"
)


def ledger_lines(check: LedgerCheck) -> list[str]:
    lines = [
        f"ledger check (gateway, 32 connections): {check.verdict()}",
        f"  2xx answers received by the load generator: {check.ok_responses}",
        f"  '{TOKEN_TYPE}' balance fell by:              {check.balance_drop}",
        *(
            [f"  requests the upstream answered the gateway: {check.forwarded}"]
            if check.forwarded is not None
            else []
        ),
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


def run_ledger_lines(check: RunLedgerCheck) -> list[str]:
    lines = [
        f"ledger check (the whole run, every part): {check.verdict()}",
        "  requests the upstream answered the gateway, by path, at their price:",
    ]
    for path, n in check.forwarded.items():
        lines.append(f"    {path:<34}{n:>9} x {check.prices.get(path, '?')}")
    lines += [
        f"  '{TOKEN_TYPE}' balance fell by {check.balance_drop} (forwarded requests cost "
        f"{check.expected_drop})",
        f"  journal: {check.commits} commit(s) for {sum(check.forwarded.values())} forwarded, "
        f"{check.refunds} refund(s) (not forwarded: the client had gone), {check.expires} "
        f"expiry(ies); {check.held_after} held after",
    ]
    if check.violations:
        lines.extend(f"  audit: violation: {v}" for v in check.violations)
    else:
        lines.append("  audit: every invariant holds")
    lines.extend(f"  PROBLEM: {problem}" for problem in check.problems)
    return lines


def _by_target(results: Sequence[Result]) -> dict[str, Load]:
    return {r.target: r.load for r in results}


def _judged(value: float, ok: bool) -> bool | None:
    return None if math.isnan(value) else ok


def bars(outcome: Outcome) -> list[Bar]:
    """The verdict: each measured part's figure against its bar, then the extra lines."""
    out: list[Bar] = []
    loads = _by_target(outcome.throughput)
    if "gateway" in loads and "passthrough" in loads:
        x = ratio(loads["gateway"].rps, loads["passthrough"].rps)
        out.append(
            Bar(
                "throughput",
                "req/s at 32 connections, gateway / passthrough",
                f"{x:.2f}x",
                f">= {THROUGHPUT_BAR:.1f}x",
                _judged(x, x >= THROUGHPUT_BAR),
            )
        )
    if "gateway usage" in loads and "passthrough" in loads:
        x = ratio(loads["gateway usage"].rps, loads["passthrough"].rps)
        out.append(Bar("  extra", "the same, usage-priced route", f"{x:.2f}x", "", None))
    lat = _by_target(outcome.latency)
    if "gateway" in lat and "passthrough" in lat:
        for name, q, limit in (
            ("p50", "p50_ms", ADDED_P50_BAR_MS),
            ("p99", "p99_ms", ADDED_P99_BAR_MS),
        ):
            added = getattr(lat["gateway"], q) - getattr(lat["passthrough"], q)
            out.append(
                Bar(
                    "latency",
                    f"{name} added at 1 connection, gateway - passthrough",
                    f"{added:+.2f} ms",
                    f"<= {limit:.1f} ms",
                    _judged(added, added <= limit),
                )
            )
    if outcome.hot is not None:
        rate = outcome.hot.per_second
        out.append(
            Bar(
                "hot account",
                f"durable reserve+commit pairs/s, {outcome.hot.concurrency} callers",
                f"{rate:,.0f}/s",
                f">= {HOT_ACCOUNT_BAR:,.0f}/s",
                rate >= HOT_ACCOUNT_BAR and outcome.hot.violations == 0,
            )
        )
    if outcome.hot_leased is not None:
        rate = outcome.hot_leased.per_second
        out.append(
            Bar(
                "  extra",
                "the same, holds made 64 a round trip (leases)",
                f"{rate:,.0f}/s",
                "",
                None,
            )
        )
    streams = {name: held(steps) for name, steps in outcome.streams.items()}
    if "gateway" in streams and "passthrough" in streams:
        x = ratio(streams["gateway"], streams["passthrough"])
        out.append(
            Bar(
                "sse",
                f"{STREAM_EVENTS}-event streams held (TTFB p99 <= {TTFB_LIMIT_MS:.0f} ms), "
                f"{streams['gateway']} / {streams['passthrough']}",
                f"{x:.2f}x",
                f">= {STREAMS_BAR:.2f}x",
                _judged(x, x >= STREAMS_BAR),
            )
        )
    if "gateway usage" in streams:
        out.append(
            Bar(
                "  extra",
                f"streams held on the usage-priced route: {streams['gateway usage']}",
                f"{ratio(streams['gateway usage'], streams.get('passthrough', 0)):.2f}x",
                "",
                None,
            )
        )
    if len(outcome.workers) == 2:
        one, two = outcome.workers
        x = ratio(two.load.rps, one.load.rps)
        gen = max(one.cpu.get("load gen", math.nan), two.cpu.get("load gen", math.nan))
        machine = two.cpu.get("machine", math.nan)
        out.append(
            Bar(
                "workers",
                f"req/s 2 workers / 1; load gen {gen:.0f}% CPU, machine {machine:.0f}%",
                f"{x:.2f}x",
                f">= {WORKERS_BAR:.1f}x",
                _judged(x, x >= WORKERS_BAR),
            )
        )
        # Whether a second worker costs more per request (a shared lock, a hot row) or the
        # machine simply had no CPU to give it: the same cost per request means the latter.
        costs = " / ".join(f"{cpu_per_request(r)[0]:.2f}" for r in (one, two))
        out.append(Bar("  extra", "gateway CPU ms per request, 1 worker / 2", costs, "", None))
        # The most any number of workers could give, at the same CPU per request: the
        # machine's CPUs all busy (the load generator, the stores and the upstream share
        # them), against how busy they were with one worker.
        busy = one.cpu.get("machine", math.nan)
        out.append(
            Bar(
                "  extra",
                f"the machine's ceiling: all CPUs busy, against {busy:.0f}% with 1 worker",
                f"{ratio(100.0, busy):.2f}x",
                "",
                None,
            )
        )
    if outcome.run_ledger is not None:
        check = outcome.run_ledger
        out.append(
            Bar(
                "ledger",
                "audit clean, commits and balance == upstream's count",
                check.verdict(),
                "ok",
                not check.problems,
            )
        )
    return out


def verdict_table(lines_of: Sequence[Bar]) -> list[str]:
    lines = [f"{'part':<13}{'measure':<62}{'value':>11}  {'bar':<11}result"]
    for b in lines_of:
        lines.append(f"{b.part:<13}{b.measure:<62}{b.value:>11}  {b.bar:<11}{b.mark()}".rstrip())
    return lines


def cpu_per_request(result: Result) -> tuple[float, float]:
    """Milliseconds of CPU per request answered: the target's own process (the upstream's
    for the upstream, the proxy's alone for a proxy), and that plus PostgreSQL and Redis
    (what metering adds; on a shared machine they also serve others). NaN when unknown."""
    server = "gateway" if result.target.startswith("gateway") else result.target
    rps = result.load.rps
    if server not in result.cpu or not rps:
        return math.nan, math.nan
    own = 10 * result.cpu[server] / rps  # percent of a CPU / (req/s) * 1000 ms / 100
    stores = 10 * (result.cpu.get("postgres", 0.0) + result.cpu.get("redis", 0.0)) / rps
    return own, own + stores


def side_by_side(outcome: Outcome) -> list[str]:
    """The three targets side by side: req/s at 32 connections, p50/p99 at 1 connection,
    streams held."""
    columns = ("upstream", "passthrough", "gateway", "gateway usage")
    rows: list[tuple[str, dict[str, str]]] = []
    loads = _by_target(outcome.throughput)
    if loads:
        rows.append(("req/s, 32 connections", {t: f"{x.rps:,.0f}" for t, x in loads.items()}))
        rows.append(("  p99 ms, 32 connections", {t: f"{x.p99_ms:.2f}" for t, x in loads.items()}))
        costs = {r.target: cpu_per_request(r) for r in outcome.throughput}
        rows.append(("  CPU ms per request: server", {t: f"{c[0]:.2f}" for t, c in costs.items()}))
        rows.append(
            (
                "  ... with postgres and redis",
                {t: f"{c[1]:.2f}" for t, c in costs.items() if t.startswith("gateway")},
            )
        )
    lat = _by_target(outcome.latency)
    if lat:
        rows.append(("p50 ms, 1 connection", {t: f"{x.p50_ms:.2f}" for t, x in lat.items()}))
        rows.append(("p99 ms, 1 connection", {t: f"{x.p99_ms:.2f}" for t, x in lat.items()}))
    if outcome.streams:
        rows.append(
            (
                f"streams held (TTFB p99 <= {TTFB_LIMIT_MS:.0f} ms)",
                {t: str(held(steps)) for t, steps in outcome.streams.items()},
            )
        )
    if not rows:
        return []
    lines = [f"{'':<34}" + "".join(f"{c:>15}" for c in columns)]
    for label, cells in rows:
        lines.append(f"{label:<34}" + "".join(f"{cells.get(c, '-'):>15}" for c in columns))
    return lines


def streams_table(ladders: Mapping[str, Sequence[StreamStep]]) -> list[str]:
    """Every step of every ladder: TTFB p50/p99, what went wrong, CPU meanwhile."""
    if not ladders:
        return []
    lines = [
        f"streams: {STREAM_EVENTS} events each; TTFB = request sent to first byte of body",
        f"{'target':<15}{'streams':>8}{'measured':>9}{'TTFB p50':>10}{'TTFB p99':>10}"
        f"{'server %':>10}{'upstream %':>11}{'clients %':>10}{'machine %':>10}  verdict",
    ]
    for target, steps in ladders.items():
        server = "gateway" if target.startswith("gateway") else target
        for step in steps:
            cpu = step.cpu
            cells = [
                f"{cpu[k]:.0f}" if k in cpu else "-"
                for k in (server, "upstream", "load gen", "machine")
            ]
            verdict = "holds" if step.holds() else step.why_not()
            lines.append(
                f"{target:<15}{step.streams:>8}{step.measured:>9}{step.ttfb_p50_ms:>10.2f}"
                f"{step.ttfb_p99_ms:>10.2f}{cells[0]:>10}{cells[1]:>11}{cells[2]:>10}"
                f"{cells[3]:>10}  {verdict}"
            )
    return lines


def hot_lines(hot: HotAccount) -> list[str]:
    how = "holds made 64 a round trip, as leases make them" if hot.leased else "ledger seam"
    return [
        f"hot account ({how}, one account, its own schema): {hot.per_second:,.0f} durable "
        f"reserve+commit pairs/s",
        f"  {hot.pairs} pairs in {hot.seconds:.1f}s from {hot.concurrency} concurrent callers; "
        f"balance exact; audit violations: {hot.violations}",
    ]


def header(info: Mapping[str, Any], config: Mapping[str, Any], ledger: str, limits: str) -> str:
    """The run's context: machine, load, ledger and limits (``config`` as in ``summary``)."""
    return (
        f"machine: {info['nproc']} CPU(s), {info['cpu_model']}; {info['kernel']}; "
        f"Python {info['python']}, aiohttp {info['aiohttp']}\n"
        f"parts: {', '.join(config.get('parts', ()))}\n"
        f"load: {config['generator']}\n      {config['concurrency']} connections, "
        f"{config['threads']} thread(s), {config['duration_s']}s per target after "
        f"{config['warmup_s']}s warm-up (latency: 1 connection); POST {config['path']} "
        f"({config['body_bytes']}-byte JSON body)\n"
        f"      all CPUs {info['busy_before_percent']:.0f}% busy in the second before the run\n"
        f"note: the load generator, the three servers and PostgreSQL share these "
        f"{info['nproc']} CPU(s);\n      absolute numbers are lower than on separate machines, "
        "read the ratios.\n"
        f"ledger: {ledger}\n"
        f"limits: --limits {config['limits']}: {limits}"
        + (f"\nleases: --leases {config['leases']}" if "leases" in config else "")
    )


def summary(
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    outcome: Outcome,
    failures: Sequence[str],
) -> dict[str, Any]:
    """Everything the report shows, for ``--json``."""

    def results(of: Sequence[Result]) -> dict[str, Any]:
        return {r.target: {"url": r.url, **asdict(r.load), "cpu_percent": r.cpu} for r in of}

    return {
        "machine": dict(info),
        "config": dict(config),
        "verdict": [asdict(b) | {"result": b.mark()} for b in bars(outcome)],
        "results": results(outcome.throughput),
        "ratios": ratios(_by_target(outcome.throughput)),
        "latency_1_connection": results(outcome.latency),
        "streams": {
            t: {"held": held(steps), "steps": [asdict(s) for s in steps]}
            for t, steps in outcome.streams.items()
        },
        "hot_account": (
            asdict(outcome.hot) | {"per_second": outcome.hot.per_second}
            if outcome.hot is not None
            else None
        ),
        "hot_account_leased": (
            asdict(outcome.hot_leased) | {"per_second": outcome.hot_leased.per_second}
            if outcome.hot_leased is not None
            else None
        ),
        "workers": results(outcome.workers),
        "gateway_breakdown_ms": {
            k: asdict(b) | {"own_ms": b.own_ms} for k, b in outcome.breakdowns.items()
        },
        "ledger_check": asdict(outcome.ledger) if outcome.ledger is not None else None,
        "run_ledger_check": (
            asdict(outcome.run_ledger) if outcome.run_ledger is not None else None
        ),
        "failures": list(failures),
    }


def print_report(
    info: Mapping[str, Any],
    config: Mapping[str, Any],
    outcome: Outcome,
    *,
    ledger: str,
    limits: str,
) -> None:
    def section(lines: Sequence[str], title: str = "") -> None:
        if lines:
            print(("\n" + title if title else "") + "\n" + "\n".join(lines))

    print("\n" + "=" * 78)
    print(header(info, config, ledger, limits))
    section(side_by_side(outcome))
    section(verdict_table(bars(outcome)))
    if outcome.throughput:
        section(results_table(outcome.throughput), "-- throughput: 32 connections")
        section(ratios_table(ratios(_by_target(outcome.throughput))))
    if outcome.latency:
        section(results_table(outcome.latency), "-- latency: 1 connection")
    section(breakdown_lines(outcome.breakdowns), "-- the gateway's time per request")
    if outcome.workers:
        section(results_table(outcome.workers), "-- workers: 32 connections")
    for title, results in (
        ("throughput", outcome.throughput),
        ("latency", outcome.latency),
        ("workers", outcome.workers),
    ):
        if results:
            section(cpu_table(results, title), f"-- CPU, {title}")
    if outcome.results():
        print(CPU_NOTE)
    section(streams_table(outcome.streams), "-- sse")
    if outcome.hot is not None:
        section(hot_lines(outcome.hot), "-- hot account")
    if outcome.hot_leased is not None:
        section(hot_lines(outcome.hot_leased))
    if outcome.ledger is not None:
        section(ledger_lines(outcome.ledger), "-- ledger")
    if outcome.run_ledger is not None:
        section(run_ledger_lines(outcome.run_ledger), "" if outcome.ledger else "-- ledger")


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
