"""The machine the run measures on: what it is, how busy it was, and where CPU time went
during each measurement (read from /proc, Linux only)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# pid -> (command name, parent pid, CPU seconds used so far)
ProcessTable = dict[int, tuple[str, int, float]]


def cpu_model(cpuinfo: str) -> str:
    """The first ``model name`` of /proc/cpuinfo, or ``unknown``."""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        model = cpu_model(Path("/proc/cpuinfo").read_text())
    import aiohttp

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "loadavg_before": os.getloadavg()[0],
        "busy_before_percent": busy_percent(1.0),
    }


def parse_cpu_ticks(proc_stat: str) -> tuple[float, float, float]:
    """(busy, total, in processes) clock ticks of all CPUs from /proc/stat's first line:
    busy counts interrupts and time stolen by the hypervisor too, "in processes" only
    user, nice and system time."""
    values = [float(v) for v in proc_stat.split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values), values[0] + values[1] + values[2]


def _cpu_ticks() -> tuple[float, float, float]:
    return parse_cpu_ticks(Path("/proc/stat").read_text())


def busy_percent(seconds: float) -> float:
    """How busy all CPUs are over the next ``seconds``, in percent."""
    busy, total, _ = _cpu_ticks()
    time.sleep(seconds)
    busy2, total2, _ = _cpu_ticks()
    return round(100 * (busy2 - busy) / (total2 - total), 1) if total2 > total else 0.0


def parse_process_stat(stat: str, ticks_per_second: float) -> tuple[str, int, float]:
    """(command name, parent pid, CPU seconds) from one /proc/<pid>/stat. The command name
    is in parentheses and may itself hold spaces and parentheses, hence the rindex."""
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    # fields[1] is the parent; [11] and [12] are utime and stime, in clock ticks.
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks_per_second


def _processes() -> ProcessTable:
    ticks = os.sysconf("SC_CLK_TCK")
    table: ProcessTable = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            table[int(entry.name)] = parse_process_stat((entry / "stat").read_text(), ticks)
    return table


@dataclass
class CpuWindow:
    """CPU used during one measurement: each named server with all its descendants (the
    gateway may run worker processes), PostgreSQL and Redis/Valkey wherever they run, the
    load generator, and the machine as a whole."""

    NAMED: ClassVar[dict[str, frozenset[str]]] = {
        "postgres": frozenset({"postgres"}),
        "redis": frozenset({"valkey-server", "redis-server"}),
    }
    roots: dict[str, int] = field(default_factory=dict)
    start: dict[int, float] = field(default_factory=dict)
    machine_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    children_start: float = 0.0
    started: float = 0.0

    def groups(self, table: ProcessTable) -> dict[str, set[int]]:
        """The pids of each root's tree (less postgres and redis processes, counted on
        their own) and of every postgres and redis process."""
        groups: dict[str, set[int]] = {name: set() for name in (*self.roots, *self.NAMED)}
        for pid, (comm, _, _) in table.items():
            for name, comms in self.NAMED.items():
                if comm in comms:
                    groups[name].add(pid)
        named = set().union(*(groups[n] for n in self.NAMED))
        for name, root in self.roots.items():
            for pid in table:
                ancestor, hops = pid, 0
                while ancestor > 1 and ancestor != root and hops < 64:
                    ancestor, hops = table[ancestor][1] if ancestor in table else 0, hops + 1
                if ancestor == root and pid not in named:
                    groups[name].add(pid)
        return groups

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited for: the generator
        return usage.ru_utime + usage.ru_stime

    def begin(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self.start = {pid: cpu for pid, (_, _, cpu) in _processes().items()}
        self.machine_start = _cpu_ticks()
        self.children_start = self._children()
        self.started = time.monotonic()

    def end(self) -> dict[str, float]:
        """Percent of one CPU used by each group since ``begin``; ``machine`` is the percent
        of all CPUs busy. A process that exited meanwhile is not counted."""
        elapsed = time.monotonic() - self.started
        table = _processes()
        used = {
            name: sum(table[pid][2] - self.start.get(pid, 0.0) for pid in pids)
            for name, pids in self.groups(table).items()
        }
        used["load gen"] = self._children() - self.children_start
        busy, total, in_processes = _cpu_ticks()
        process_seconds = (in_processes - self.machine_start[2]) / os.sysconf("SC_CLK_TCK")
        used["other"] = max(0.0, process_seconds - sum(used.values()))  # this script, the rest
        out = {name: round(100 * seconds / elapsed, 1) for name, seconds in used.items()}
        span = total - self.machine_start[1]
        out["machine"] = round(100 * (busy - self.machine_start[0]) / span, 1) if span else 0.0
        return out
