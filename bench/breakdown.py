"""Where a gateway request's time goes, from the gateway's own histograms (``/metrics``):
read before and after a measurement, the difference of each histogram's ``_sum`` and
``_count`` gives the mean time per request of each phase. What the phases do not cover
is the gateway's own work on the request path (parsing, auth, rules, building requests
and answers) and its waits for the CPU."""

from __future__ import annotations

import math
import re
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from bench.errors import BenchError

# (phase, histogram, label filter) in the order a request meets them.
PHASES = (
    ("limits (Redis)", "gateway_redis_duration_seconds", ""),
    ("ledger reserve", "gateway_ledger_duration_seconds", 'operation="reserve"'),
    ("upstream exchange", "gateway_upstream_duration_seconds", ""),
    ("ledger commit", "gateway_ledger_duration_seconds", 'operation="commit"'),
)
WHOLE = "gateway_request_duration_seconds"
GC = "gateway_gc_pause_seconds"
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")

Totals = dict[tuple[str, str], float]  # (metric name, labels) -> value


def parse_metrics(text: str) -> Totals:
    """Every ``_sum`` and ``_count`` sample of Prometheus' text format."""
    totals: Totals = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match and match["name"].endswith(("_sum", "_count")):
            totals[match["name"], match["labels"] or ""] = float(match["value"])
    return totals


def read_metrics(base_url: str) -> Totals:
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as resp:
            return parse_metrics(resp.read().decode())
    except (urllib.error.URLError, OSError) as exc:
        raise BenchError(f"the gateway's /metrics did not answer: {exc}") from exc


def _delta(before: Totals, after: Totals, name: str, labels: str) -> tuple[float, float]:
    """(seconds, observations) added to histogram ``name`` over the samples whose labels
    contain ``labels``."""
    seconds = count = 0.0
    for (metric, have), value in after.items():
        if labels not in have:
            continue
        if metric == f"{name}_sum":
            seconds += value - before.get((metric, have), 0.0)
        elif metric == f"{name}_count":
            count += value - before.get((metric, have), 0.0)
    return seconds, count


@dataclass(frozen=True)
class Breakdown:
    """Mean milliseconds per metered request, by phase."""

    requests: int
    whole_ms: float
    phases: dict[str, float]
    gc_pauses: int = 0  # the collector's pauses meanwhile: each one stops every request
    gc_ms: float = 0.0  # their length, in all

    @property
    def own_ms(self) -> float:
        """The request's time outside every phase: the gateway's own work and waits."""
        return self.whole_ms - sum(self.phases.values())


def breakdown(before: Totals, after: Totals) -> Breakdown:
    seconds, count = _delta(before, after, WHOLE, "")
    if not count:
        return Breakdown(0, math.nan, {})
    phases = {}
    for phase, name, labels in PHASES:
        spent, _ = _delta(before, after, name, labels)
        phases[phase] = 1e3 * spent / count
    gc_seconds, gc_pauses = _delta(before, after, GC, "")
    return Breakdown(int(count), 1e3 * seconds / count, phases, int(gc_pauses), 1e3 * gc_seconds)


def breakdown_lines(breakdowns: Mapping[str, Breakdown]) -> list[str]:
    """One column per measurement, one line per phase, in ms per request."""
    if not breakdowns:
        return []
    names = list(breakdowns)
    lines = [
        "where a gateway request's time goes: mean ms per request, from its /metrics",
        f"{'phase':<34}" + "".join(f"{n:>16}" for n in names),
    ]
    for phase, _, _ in PHASES:
        cells = [breakdowns[n].phases.get(phase, math.nan) for n in names]
        lines.append(f"{phase:<34}" + "".join(f"{c:>16.2f}" for c in cells))
    lines.append(
        f"{'own work and waits for a CPU':<34}"
        + "".join(f"{breakdowns[n].own_ms:>16.2f}" for n in names)
    )
    lines.append(
        f"{'whole request, until settled':<34}"
        + "".join(f"{breakdowns[n].whole_ms:>16.2f}" for n in names)
    )
    lines.append(
        f"{'requests observed':<34}" + "".join(f"{breakdowns[n].requests:>16}" for n in names)
    )
    lines.append(
        f"{'collector pauses (all requests)':<34}"
        + "".join(f"{breakdowns[n].gc_pauses:>16}" for n in names)
    )
    lines.append(
        f"{'  ms paused, in all':<34}" + "".join(f"{breakdowns[n].gc_ms:>16.1f}" for n in names)
    )
    return lines
