"""Load benchmark: the sample upstream, a bare aiohttp proxy and the metering gateway.

One run starts the three servers as subprocesses, drives each in turn with the same load
(POST /v1/chat/completions, a small JSON body, fixed concurrency and duration), prints
requests/s and p50/p99 latency with their ratios, and checks the gateway's ledger against
what the load generator saw. See bench/README.md.

    .venv/bin/python bench/run.py [--duration 10] [--concurrency 32] [--threads 2]
        [--warmup 2] [--generator auto|wrk|python] [--limits bench|off|rules]
        [--gateway-workers 1] [--json FILE] [--keep-logs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BIN = Path(sys.executable).parent  # .venv/bin: the gateway command lives next to python
PATH = "/v1/chat/completions"
BODY = json.dumps({"model": "sample-1", "messages": [{"role": "user", "content": "Hello"}]})
ORG, USER, TOKEN_TYPE, PLAN = "bench", "bench", "general", "enterprise"
GRANT = 100_000_000
TARGETS = ("upstream", "passthrough", "gateway")
WRK_TIMEOUT = "10s"  # wrk's default (2s) would count slow answers as errors
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


class BenchError(Exception):
    """The benchmark cannot go on or its result is not to be trusted; the message says why."""


class Interrupted(BaseException):
    """SIGTERM: unwind like Ctrl-C so that every subprocess is stopped."""


# -- the machine -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
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


def _cpu_ticks() -> tuple[float, float, float]:
    """(busy, total, in processes) clock ticks of all CPUs since boot, from /proc/stat:
    busy counts interrupts and time stolen by the hypervisor too, "in processes" only
    user, nice and system time."""
    values = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values), values[0] + values[1] + values[2]


def busy_percent(seconds: float) -> float:
    """How busy all CPUs are over the next ``seconds``, in percent."""
    busy, total, _ = _cpu_ticks()
    time.sleep(seconds)
    busy2, total2, _ = _cpu_ticks()
    return round(100 * (busy2 - busy) / (total2 - total), 1) if total2 > total else 0.0


def _processes() -> dict[int, tuple[str, int, float]]:
    """Every process: pid -> (command name, parent pid, CPU seconds used so far)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[str, int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            # fields[1] is the parent; [11] and [12] are utime and stime, in clock ticks.
            table[int(entry.name)] = (
                comm,
                int(fields[1]),
                (int(fields[11]) + int(fields[12])) / ticks,
            )
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

    def _groups(self, table: dict[int, tuple[str, int, float]]) -> dict[str, set[int]]:
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
            for name, pids in self._groups(table).items()
        }
        used["load gen"] = self._children() - self.children_start
        busy, total, in_processes = _cpu_ticks()
        process_seconds = (in_processes - self.machine_start[2]) / os.sysconf("SC_CLK_TCK")
        used["other"] = max(0.0, process_seconds - sum(used.values()))  # this script, the rest
        out = {name: round(100 * seconds / elapsed, 1) for name, seconds in used.items()}
        span = total - self.machine_start[1]
        out["machine"] = round(100 * (busy - self.machine_start[0]) / span, 1) if span else 0.0
        return out


# -- subprocesses ------------------------------------------------------------------------


class Service:
    """A server subprocess with its output in a log file; stopped with SIGTERM, then
    SIGKILL. It runs in its own session so that Ctrl-C reaches only this script, which
    stops the servers in order (the gateway first, so it settles what is in flight)."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  {self.name} did not stop within {timeout:.0f}s: killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def tail(self, lines: int = 30) -> str:
        return "\n".join(f"    | {line}" for line in self.log_lines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, service: Service, timeout: float) -> None:
    """Wait until ``url`` answers (any status below 500) or the service exits."""
    deadline = time.monotonic() + timeout
    while True:
        if not service.alive():
            raise BenchError(f"{service.name} exited while starting:\n{service.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{service.name} did not answer {url} within {timeout:.0f}s:\n{service.tail()}"
            )
        time.sleep(0.2)


class Gateway:
    """How to run the gateway command against this run's ledger."""

    def __init__(self, rules: Path, env: dict[str, str]) -> None:
        self.rules = rules
        self.env = env
        self.exe = str(BIN / "gateway")

    def argv(self, *args: str) -> list[str]:
        return [self.exe, "--rules", str(self.rules), *args]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.argv(*args),
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        if check and proc.returncode != 0:
            raise BenchError(
                f"`gateway {' '.join(args)}` exited {proc.returncode}:\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def balance(self) -> tuple[int, int]:
        """(available, reserved) of the bench organization's token type."""
        data = json.loads(self.cli("balance", ORG, "--json").stdout)
        account = data["accounts"][TOKEN_TYPE]
        return int(account["available"]), int(account["reserved"])


# -- the rules ---------------------------------------------------------------------------


def _rates(value: object) -> list[dict[str, Any]]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [{"limit": r} if isinstance(r, str) else dict(r) for r in items]


def _loosened(level: dict[str, Any]) -> dict[str, Any]:
    """The same kinds of limit, none of which can refuse the bench's load."""
    out = dict(level)
    if "rate" in out:
        out["rate"] = [{**r, "limit": UNBOUND_RATE} for r in _rates(out["rate"])]
    if "min_interval" in out:
        out["min_interval"] = None  # no interval is short enough for concurrent requests
    if isinstance(out.get("concurrency"), dict):
        out["concurrency"] = {**out["concurrency"], "max": UNBOUND_CONCURRENCY}
    return out


def bench_rules(source: Path, mode: str, dest: Path) -> Path:
    """The rules the gateway runs with: ``source`` with its ``limits`` adjusted for a load
    test by ``mode`` (see LIMITS_MODES); everything else as it is."""
    if mode == "rules":
        return source
    import yaml

    doc = yaml.safe_load(source.read_text())
    auth = doc.get("auth") or {}
    key_file = auth.get("public_key_file")
    if isinstance(key_file, str) and not Path(key_file).is_absolute():
        auth["public_key_file"] = str(source.parent / key_file)
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
        plans[PLAN] = _loosened(effective)
        limits["plans"] = plans
        for route in routes:
            if isinstance(route.get("limits"), dict):
                route["limits"] = _loosened(route["limits"])
    doc["limits"] = limits
    dest.write_text(
        f"# {source} for bench/run.py --limits {mode}: {LIMITS_MODES[mode]}\n"
        + yaml.safe_dump(doc, sort_keys=False)
    )
    return dest


# -- the ledger's database ---------------------------------------------------------------


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _journal(dsn: str, schema: str | None, after_id: int) -> dict[str, Any]:
    """Journal rows of the bench account by kind, the refunds' reasons since ``after_id``,
    the last row's id, and the reservations still held."""
    import asyncpg

    settings = {"search_path": schema} if schema else {}
    conn = await asyncpg.connect(dsn, timeout=10, server_settings=settings)
    try:
        rows = await conn.fetch(
            "SELECT kind, count(*) AS n FROM journal WHERE org_id = $1 AND token_type = $2 "
            "GROUP BY kind",
            ORG,
            TOKEN_TYPE,
        )
        reasons = await conn.fetch(
            "SELECT coalesce(reason, '') AS reason, count(*) AS n FROM journal "
            "WHERE org_id = $1 AND kind IN ('refund', 'expire') AND id > $2 "
            "GROUP BY 1 ORDER BY 2 DESC",
            ORG,
            after_id,
        )
        last_id = await conn.fetchval("SELECT coalesce(max(id), 0) FROM journal")
        held = await conn.fetchval(
            "SELECT count(*) FROM reservations WHERE org_id = $1 AND state = 'held'", ORG
        )
    finally:
        await conn.close()
    return {
        "kinds": {str(r["kind"]): int(r["n"]) for r in rows},
        "refund_reasons": {str(r["reason"]): int(r["n"]) for r in reasons},
        "last_id": int(last_id),
        "held": int(held),
    }


def embedded_dsn(data_dir: Path) -> str | None:
    """The DSN of the embedded PostgreSQL the gateway started, from its postmaster.pid
    (pid, data dir, start time, port, socket dir, listen address, ...)."""
    try:
        lines = (data_dir / "postgres" / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    if len(lines) < 5:
        return None
    port, socket_dir = lines[3].strip(), lines[4].strip()
    if socket_dir:
        return f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
    host = lines[5].strip() if len(lines) > 5 and lines[5].strip() not in ("", "*") else "127.0.0.1"
    return f"postgresql://postgres@{host}:{port}/postgres"


@dataclass
class Snapshot:
    available: int
    reserved: int
    journal: dict[str, Any] | None  # see _journal; None: not read


class LedgerProbe:
    def __init__(self, gateway: Gateway, dsn: str | None, schema: str | None) -> None:
        self.gateway = gateway
        self.dsn = dsn
        self.schema = schema

    def settled(self, since: Snapshot | None = None, timeout: float = 60.0) -> Snapshot:
        """A snapshot once nothing is held and the balance has stopped moving: requests a
        load generator abandoned at its end are still settled by the gateway."""
        deadline = time.monotonic() + timeout
        previous: tuple[int, int] | None = None
        while True:
            current = self.gateway.balance()
            if current[1] == 0 and current == previous:
                break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the ledger did not settle within {timeout:.0f}s: {current[1]} token(s) "
                    "still reserved"
                )
            previous = current
            time.sleep(0.3)
        journal = None
        if self.dsn is not None:
            try:
                after_id = since.journal["last_id"] if since and since.journal else 0
                journal = asyncio.run(_journal(self.dsn, self.schema, after_id))
            except Exception as exc:
                print(f"  (journal not read: {type(exc).__name__}: {exc})")
        return Snapshot(current[0], current[1], journal)


# -- load generators ---------------------------------------------------------------------


@dataclass
class Load:
    """What a load generator measured against one target."""

    generator: str
    seconds: float
    requests: int  # responses completed within the run
    ok: int  # 2xx (wrk: completed minus its "Non-2xx or 3xx" count; no 3xx here)
    non_2xx: int
    errors: dict[str, int]  # socket errors and timeouts, by kind
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int] | None = None  # per status, when the generator knows them

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", re.M)
_WRK_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(output: str) -> Load:
    """requests/s, p50, p99, totals and errors from ``wrk --latency`` output."""
    rps, total = _WRK_RPS.search(output), _WRK_TOTAL.search(output)
    percentiles = {float(p): float(v) * _UNITS[u] for p, v, u in _WRK_PERCENTILE.findall(output)}
    if rps is None or total is None or 50.0 not in percentiles or 99.0 not in percentiles:
        raise BenchError(f"cannot read wrk's output (was --latency given?):\n{output}")
    non_2xx = _WRK_NON_2XX.search(output)
    socket_errors = _WRK_SOCKET.search(output)
    errors: dict[str, int] = {}
    if socket_errors:
        kinds = ("connect", "read", "write", "timeout")
        errors = {k: int(n) for k, n in zip(kinds, socket_errors.groups(), strict=True) if int(n)}
    requests = int(total.group(1))
    bad = int(non_2xx.group(1)) if non_2xx else 0
    return Load(
        generator="wrk",
        seconds=float(total.group(2)) * _UNITS[total.group(3)] / 1e3,
        requests=requests,
        ok=requests - bad,
        non_2xx=bad,
        errors=errors,
        rps=float(rps.group(1)),
        p50_ms=percentiles[50.0],
        p99_ms=percentiles[99.0],
    )


def run_wrk(wrk: str, url: str, token: str, args: argparse.Namespace, seconds: int) -> Load:
    argv = [
        wrk,
        "--threads",
        str(min(args.threads, args.concurrency)),
        "--connections",
        str(args.concurrency),
        "--duration",
        f"{seconds}s",
        "--timeout",
        WRK_TIMEOUT,
        "--latency",
        "--script",
        str(BENCH / "post.lua"),
        "--header",
        f"Authorization: Bearer {token}",
        url,
    ]
    env = {**os.environ, "BENCH_BODY": BODY}
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return parse_wrk(proc.stdout)


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (what wrk reports too, from its histogram)."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _load_worker(
    url: str, token: str, connections: int, seconds: float, barrier: Any
) -> dict[str, Any]:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = BODY.encode()
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.to_thread(barrier.wait)  # every process starts at once
        started = time.monotonic()
        deadline = started + seconds

        async def one_connection() -> None:
            # Requests start until the deadline; the last one is waited for, so every
            # request this generator sent is counted (which makes the ledger check exact).
            while time.monotonic() < deadline:
                began = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.01)
                    continue
                latencies.append(time.perf_counter() - began)
                statuses[status] += 1

        await asyncio.gather(*(one_connection() for _ in range(connections)))
        finished = time.monotonic()
    return {
        "latencies": latencies,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "started": started,
        "finished": finished,
    }


def _load_process(
    url: str, token: str, connections: int, seconds: float, barrier: Any, results: Any
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        results.put(asyncio.run(_load_worker(url, token, connections, seconds, barrier)))
    except BaseException as exc:
        barrier.abort()
        results.put({"failed": f"{type(exc).__name__}: {exc}"})


def run_python(url: str, token: str, args: argparse.Namespace, seconds: int) -> Load:
    """The fallback load generator: ``--threads`` processes (one event loop each) sharing
    ``--concurrency`` connections, each connection a worker sending one request at a time."""
    processes = max(1, min(args.threads, args.concurrency))
    shares = [
        args.concurrency // processes + (i < args.concurrency % processes) for i in range(processes)
    ]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_load_process,
            args=(url, token, share, float(seconds), barrier, results),
            daemon=True,
        )
        for share in shares
    ]
    for w in workers:
        w.start()
    try:
        outcomes = [results.get(timeout=seconds + 120) for _ in workers]
    finally:
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.terminate()
                w.join()
    failed = [o["failed"] for o in outcomes if "failed" in o]
    if failed:
        raise BenchError(f"the python load generator failed: {'; '.join(failed)}")
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for o in outcomes:
        statuses.update(o["statuses"])
        errors.update(o["errors"])
    elapsed = max(o["finished"] for o in outcomes) - min(o["started"] for o in outcomes)
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    return Load(
        generator="python",
        seconds=elapsed,
        requests=len(latencies),
        ok=ok,
        non_2xx=len(latencies) - ok,
        errors=dict(errors),
        rps=len(latencies) / elapsed if elapsed else 0.0,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        statuses={str(k): v for k, v in sorted(statuses.items())},
    )


def probe_once(url: str, token: str) -> str:
    """One request as the load generator sends it: its status and the start of its body."""
    request = urllib.request.Request(
        url,
        data=BODY.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return f"no answer ({exc})"
    return f"{status} {' '.join(body[:300].decode(errors='replace').split())}"


def find_wrk() -> str | None:
    found = shutil.which("wrk")
    if found:
        return found
    return "/usr/bin/wrk" if os.access("/usr/bin/wrk", os.X_OK) else None


def wrk_version(wrk: str) -> str:
    proc = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


# -- the run -----------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    url: str
    load: Load
    cpu: dict[str, float]


@dataclass
class LedgerCheck:
    ok_responses: int  # 2xx the load generator received
    balance_drop: int
    commits: int | None
    refunds: int | None
    expires: int | None
    held_after: int | None
    exact: bool  # the generator waited for every request it sent
    concurrency: int
    refund_reasons: dict[str, int] = field(default_factory=dict)
    audit: str = ""
    problems: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        return "FAILED" if self.problems else "ok"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wrk = find_wrk() if args.generator in ("auto", "wrk") else None
        if args.generator == "wrk" and self.wrk is None:
            raise BenchError("--generator wrk: wrk is not installed (apt-get install wrk)")
        self.work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        os.chmod(self.work, 0o755)  # the embedded PostgreSQL runs as its own user under root
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.data_dir = self.work / "data"
        self.services: list[Service] = []
        self.database_url = os.environ.get("DATABASE_URL") or None
        self.schema: str | None = None
        self.failures: list[str] = []
        self.results: list[Result] = []
        self.ledger: LedgerCheck | None = None
        self.token = ""
        self.pids: dict[str, int] = {}
        self.generator = ""

    # setup

    def _service(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Service:
        service = Service(name, argv, env, self.logs)
        self.services.append(service)
        service.start()
        return service

    def start(self) -> tuple[dict[str, str], Gateway, LedgerProbe]:
        python = sys.executable
        up_port, pass_port, gw_port = free_port(), free_port(), free_port()
        upstream_url = f"http://127.0.0.1:{up_port}"
        base_env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DB_SCHEMA"}

        print(f"starting the sample upstream on {upstream_url}")
        upstream = self._service(
            "upstream", [python, "-m", "gateway.sample_upstream", "--port", str(up_port)], base_env
        )
        print(f"starting the pass-through proxy on http://127.0.0.1:{pass_port}")
        passthrough = self._service(
            "passthrough",
            [
                python,
                str(BENCH / "passthrough.py"),
                "--port",
                str(pass_port),
                "--upstream",
                upstream_url,
            ],
            base_env,
        )

        env = {
            **base_env,
            "AI_BACKEND_URL": upstream_url,
            "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
            "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_DATA_DIR": str(self.data_dir),  # embedded servers, if any, live here
        }
        if self.database_url:
            self.schema = f"bench_{secrets.token_hex(6)}"
            asyncio.run(_execute(self.database_url, f'CREATE SCHEMA "{self.schema}"'))
            env["GATEWAY_DB_SCHEMA"] = self.schema
            print(f"ledger: DATABASE_URL, fresh schema {self.schema}")
        else:
            print(f"ledger: embedded PostgreSQL in {self.data_dir} (DATABASE_URL is not set)")
        rules = bench_rules(self.args.rules, self.args.limits, self.work / "rules.yaml")
        gateway = Gateway(rules, env)
        gateway.cli("rules", "check", str(rules))
        print(f"limits (--limits {self.args.limits}): {LIMITS_MODES[self.args.limits]}")
        n = self.args.gateway_workers
        workers = ["--workers", str(n)] if n else []
        print(
            f"starting the gateway on http://127.0.0.1:{gw_port} "
            f"({f'{n} worker(s)' if n else 'its default number of workers'})"
        )
        gw = self._service(
            "gateway",
            gateway.argv("serve", "--host", "127.0.0.1", "--port", str(gw_port), *workers),
            env,
        )
        wait_http(f"{upstream_url}/", upstream, 30)
        wait_http(f"http://127.0.0.1:{pass_port}/", passthrough, 30)
        wait_http(f"http://127.0.0.1:{gw_port}/healthz", gw, 120)

        print(f"seeding: organization '{ORG}' on enterprise, {GRANT} '{TOKEN_TYPE}' tokens")
        gateway.cli("org", "create", ORG, "--plan", "enterprise")
        gateway.cli("grant", ORG, TOKEN_TYPE, str(GRANT), "--reason", "bench")
        self.token = gateway.cli(
            "token", "--org", ORG, "--user", USER, "--ttl", "1h"
        ).stdout.strip()
        self.pids = {"upstream": upstream.pid, "passthrough": passthrough.pid, "gateway": gw.pid}
        dsn = self.database_url or embedded_dsn(self.data_dir)
        urls = {
            "upstream": f"{upstream_url}{PATH}",
            "passthrough": f"http://127.0.0.1:{pass_port}{PATH}",
            "gateway": f"http://127.0.0.1:{gw_port}{PATH}",
        }
        return urls, gateway, LedgerProbe(gateway, dsn, self.schema)

    # measuring

    def load(self, url: str, seconds: int) -> Load:
        if self.wrk is not None:
            return run_wrk(self.wrk, url, self.token, self.args, seconds)
        return run_python(url, self.token, self.args, seconds)

    def measure(
        self, target: str, url: str, probe: LedgerProbe | None = None
    ) -> tuple[Result, Snapshot | None]:
        """Warm up, then measure. With ``probe``, the ledger is snapshotted in between,
        once the warm-up's requests have settled."""
        args = self.args
        if args.warmup:
            warm = self.load(url, args.warmup)
            if warm.ok == 0:
                raise BenchError(
                    f"{target}: no 2xx answer in {warm.requests} request(s) during the warm-up "
                    f"(errors {warm.errors or 'none'}); one more request now answers "
                    f"{probe_once(url, self.token)}"
                )
        before = probe.settled() if probe is not None else None
        serving = {"upstream": ["upstream"], "passthrough": ["passthrough", "upstream"]}.get(
            target, ["gateway", "upstream"]
        )
        cpu = CpuWindow()
        cpu.begin({name: self.pids[name] for name in serving})
        load = self.load(url, args.duration)
        usage = cpu.end()
        result = Result(target, url, load, usage)
        print(
            f"  {target}: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, "
            f"p99 {load.p99_ms:.2f} ms; {load.requests} requests, {load.non_2xx} non-2xx, "
            f"{load.error_count} errors"
        )
        if load.non_2xx or load.error_count:
            what = f"{load.non_2xx} non-2xx response(s), errors {load.errors or 'none'}"
            if load.statuses:
                what += f", statuses {load.statuses}"
            what += f"; one more request now answers {probe_once(url, self.token)}"
            self.failures.append(f"{target}: {what}")
        return result, before

    def run(self) -> None:
        args = self.args
        urls, gateway, probe = self.start()
        self.generator = (
            f"{wrk_version(self.wrk)} ({self.wrk})"
            if self.wrk
            else "python (aiohttp client, one event loop per process)"
        )
        print(
            f"\nload generator: {self.generator}; {args.concurrency} connections over "
            f"{min(args.threads, args.concurrency)} thread(s)/process(es); "
            f"{args.warmup}s warm-up then {args.duration}s per target"
        )
        for target in TARGETS:
            print(f"\n== {target}: POST {urls[target]}")
            metered = target == "gateway"
            result, before = self.measure(target, urls[target], probe if metered else None)
            self.results.append(result)
            if before is not None:
                self.ledger = self.check_ledger(gateway, probe, before, result.load)

    def check_ledger(
        self, gateway: Gateway, probe: LedgerProbe, before: Snapshot, load: Load
    ) -> LedgerCheck:
        after = probe.settled(since=before)
        drop = before.available - after.available

        def delta(kind: str) -> int | None:
            if before.journal is None or after.journal is None:
                return None
            return int(after.journal["kinds"].get(kind, 0) - before.journal["kinds"].get(kind, 0))

        check = LedgerCheck(
            ok_responses=load.ok,
            balance_drop=drop,
            commits=delta("commit"),
            refunds=delta("refund"),
            expires=delta("expire"),
            held_after=after.journal["held"] if after.journal is not None else after.reserved,
            exact=load.generator == "python",
            concurrency=self.args.concurrency,
            refund_reasons=after.journal["refund_reasons"] if after.journal else {},
        )
        problems = check.problems
        if check.commits is not None and check.commits != drop:
            problems.append(f"{check.commits} commits but the balance fell by {drop}")
        if check.refunds and check.exact:
            problems.append(f"{check.refunds} refund(s) during the run")
        elif check.refunds and drop + check.refunds > load.ok + self.args.concurrency:
            problems.append(
                f"{check.refunds} refund(s) and {drop - load.ok} charge(s) beyond the 2xx "
                f"answers: more than the {self.args.concurrency} requests that can have been "
                "in flight when wrk stopped"
            )
        if check.expires:
            problems.append(f"{check.expires} expired reservation(s) during the run")
        if check.held_after:
            problems.append(f"{check.held_after} reservation(s) still held")
        if check.exact:
            if drop != load.ok:
                problems.append(f"the balance fell by {drop} for {load.ok} 2xx answers")
        elif not load.ok <= drop <= load.ok + self.args.concurrency:
            problems.append(
                f"the balance fell by {drop} for {load.ok} 2xx answers completed within the "
                f"run; expected between {load.ok} and {load.ok + self.args.concurrency} "
                "(up to one request per connection in flight when wrk stopped)"
            )
        audit = gateway.cli("audit", check=False)
        check.audit = (audit.stdout + audit.stderr).strip()
        if audit.returncode != 0:
            problems.append(f"gateway audit exited {audit.returncode}")
        self.failures.extend(f"ledger: {p}" for p in problems)
        return check

    # cleanup

    def stop(self) -> None:
        for service in reversed(self.services):  # the gateway first: it settles in flight
            try:
                service.stop()
            except Exception as exc:
                print(f"  stopping {service.name}: {exc}", file=sys.stderr)
        self._stop_leftovers()
        if self.schema and self.database_url:
            try:
                asyncio.run(_execute(self.database_url, f'DROP SCHEMA "{self.schema}" CASCADE'))
            except Exception as exc:
                print(f"  could not drop schema {self.schema}: {exc}", file=sys.stderr)

    def _stop_leftovers(self) -> None:
        """The gateway stops the embedded servers it started when it exits; should one
        survive (the gateway was killed), stop the processes that use this run's data
        directory, which no one else can be using."""
        marker = str(self.data_dir)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                print(f"  stopping leftover process {entry.name}: {cmdline[:120]}")
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGINT)  # PostgreSQL: fast shutdown

    def remove_work_dir(self, keep_logs: bool) -> Path | None:
        kept = None
        if keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="gateway-bench-logs-"))
            for log in self.logs.iterdir():
                shutil.copy(log, kept / log.name)
        shutil.rmtree(self.work, ignore_errors=True)
        return kept


# -- the report --------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def ratios(results: dict[str, Result]) -> dict[str, dict[str, float]]:
    pairs = [
        ("gateway / upstream", "gateway", "upstream"),
        ("gateway / passthrough", "gateway", "passthrough"),
        ("passthrough / upstream", "passthrough", "upstream"),
    ]
    out: dict[str, dict[str, float]] = {}
    for name, a, b in pairs:
        if a in results and b in results:
            x, y = results[a].load, results[b].load
            out[name] = {
                "throughput": ratio(x.rps, y.rps),
                "p50": ratio(x.p50_ms, y.p50_ms),
                "p99": ratio(x.p99_ms, y.p99_ms),
            }
    return out


def report(bench: Bench, info: dict[str, Any]) -> dict[str, Any]:
    args = bench.args
    results = {r.target: r for r in bench.results}
    print("\n" + "=" * 78)
    print(
        f"machine: {info['nproc']} CPU(s), {info['cpu_model']}; {info['kernel']}; "
        f"Python {info['python']}, aiohttp {info['aiohttp']}"
    )
    print(
        f"load: {bench.generator}\n      {args.concurrency} connections, "
        f"{min(args.threads, args.concurrency)} thread(s), {args.duration}s per target after "
        f"{args.warmup}s warm-up; POST {PATH} ({len(BODY)}-byte JSON body)"
    )
    print(f"      all CPUs {info['busy_before_percent']:.0f}% busy in the second before the run")
    print(
        f"note: the load generator, the three servers and PostgreSQL share these "
        f"{info['nproc']} CPU(s);\n      absolute numbers are lower than on separate machines, "
        "read the ratios."
    )
    if bench.database_url:
        print(f"ledger: DATABASE_URL, schema {bench.schema} (dropped at the end)")
    else:
        print("ledger: embedded PostgreSQL in a temporary data directory")
    print(f"limits: --limits {args.limits}: {LIMITS_MODES[args.limits]}\n")
    print(
        f"{'target':<14}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'requests':>11}"
        f"{'non-2xx':>9}{'errors':>8}"
    )
    for r in bench.results:
        x = r.load
        print(
            f"{r.target:<14}{x.rps:>10,.0f}{x.p50_ms:>10.2f}{x.p99_ms:>10.2f}{x.requests:>11}"
            f"{x.non_2xx:>9}{x.error_count:>8}"
        )
    table = ratios(results)
    if table:
        print(f"\n{'ratio':<26}{'throughput':>12}{'p50':>10}{'p99':>10}")
        for name, row in table.items():
            print(f"{name:<26}{row['throughput']:>11.2f}x{row['p50']:>9.2f}x{row['p99']:>9.2f}x")
    if bench.results:
        print("\nCPU during each run, % of one CPU (machine: % of all CPUs busy)")
        columns = [
            "upstream",
            "passthrough",
            "gateway",
            "postgres",
            "redis",
            "load gen",
            "other",
            "machine",
        ]
        print(f"{'target':<14}" + "".join(f"{c:>12}" for c in columns))
        for r in bench.results:
            cells = [f"{r.cpu[c]:.0f}" if c in r.cpu else "-" for c in columns]
            print(f"{r.target:<14}" + "".join(f"{c:>12}" for c in cells))
        print(
            "  postgres and redis count every such process on the machine; other is everything "
            "else busy\n  (this script included): a large share means something else ran "
            "meanwhile and disturbed the numbers"
        )
        for r in bench.results:
            if r.cpu.get("other", 0) > 25 or (r.target != "gateway" and r.cpu["postgres"] > 10):
                print(f"  WARNING: other processes were busy during the {r.target} run")
    check = bench.ledger
    if check is not None:
        print(f"\nledger check (gateway run): {check.verdict()}")
        print(f"  2xx answers received by the load generator: {check.ok_responses}")
        print(f"  '{TOKEN_TYPE}' balance fell by:              {check.balance_drop}")
        if check.commits is not None:
            print(
                f"  journal: {check.commits} commit(s), {check.refunds} refund(s), "
                f"{check.expires} expiry(ies); {check.held_after} reservation(s) held after"
            )
            for reason, n in check.refund_reasons.items():
                print(f"    {n} refunded or expired: {reason or '(no reason recorded)'}")
        else:
            print("  journal: not read (no DSN for the embedded server)")
        extra = check.balance_drop - check.ok_responses
        if check.exact:
            print(
                "  the python generator waits for every request it sent: the fall must equal "
                "the 2xx count,\n  with no refund"
            )
        else:
            refunded = check.refunds or 0
            print(
                f"  wrk counts only responses completed within the run and drops the "
                f"connections at its end:\n  {extra} more were charged and {refunded} "
                f"refunded, requests in flight when it stopped ({extra + refunded} of at most "
                f"{check.concurrency},\n  one per connection); the gateway still settled "
                "each of them"
            )
        for line in check.audit.splitlines():
            print(f"  audit: {line}")
        for problem in check.problems:
            print(f"  PROBLEM: {problem}")
    return {
        "machine": info,
        "config": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "threads": min(args.threads, args.concurrency),
            "generator": bench.generator,
            "ledger": "database_url" if bench.database_url else "embedded",
            "limits": args.limits,
            "body_bytes": len(BODY),
        },
        "results": {
            r.target: {"url": r.url, **asdict(r.load), "cpu_percent": r.cpu} for r in bench.results
        },
        "ratios": table,
        "ledger_check": asdict(check) if check is not None else None,
        "failures": bench.failures,
    }


def gateway_stderr(bench: Bench) -> list[str]:
    for service in bench.services:
        if service.name == "gateway":
            return service.log_lines()
    return []


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


# -- main --------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Requests/s and p50/p99 latency of the sample upstream, a bare aiohttp "
        "pass-through proxy and the metering gateway, in one run.",
    )
    parser.add_argument("--duration", type=positive, default=10, help="seconds per target")
    parser.add_argument("--concurrency", type=positive, default=32, help="open connections")
    parser.add_argument(
        "--threads", type=positive, default=2, help="wrk threads (python: processes)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of load before each run (0: none)"
    )
    parser.add_argument(
        "--generator",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk when installed, else the built-in python generator",
    )
    parser.add_argument(
        "--rules", type=Path, default=ROOT / "rules.yaml", help="default: the repo's rules.yaml"
    )
    parser.add_argument(
        "--limits",
        choices=tuple(LIMITS_MODES),
        default="bench",
        help="; ".join(f"{k}: {v}" for k, v in LIMITS_MODES.items()) + " (default: bench)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        metavar="N",
        help="gateway serve --workers N (default 1, like the one-process pass-through; "
        "0: the gateway's default, one per core)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs (kept on failure)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.gateway_workers < 0:
        parser.error("--gateway-workers must be 0 or more")
    args.rules = args.rules.resolve()
    return args


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    def raise_interrupted(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    if info["busy_before_percent"] > 15:
        print(
            f"WARNING: the machine is already {info['busy_before_percent']:.0f}% busy before "
            "the run: something else is running, and the numbers will be lower and noisier"
        )
    bench: Bench | None = None
    code = 0
    summary: dict[str, Any] | None = None
    with sigterm_unwinds():
        try:
            bench = Bench(args)
            bench.run()
        except BenchError as exc:
            print(f"\nbench: {exc}", file=sys.stderr)
            code = 1
        except (KeyboardInterrupt, Interrupted):
            print("\nbench: interrupted; stopping the servers", file=sys.stderr)
            code = 130
        finally:
            # A second Ctrl-C must not leave servers behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if bench is not None:
                bench.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if bench is None:
        return code
    if code != 130 and bench.results:
        summary = report(bench, info)
    stderr = [line for line in gateway_stderr(bench) if line.strip()]
    if stderr:
        print(f"\ngateway log: {len(stderr)} line(s) at WARNING or above, by count:")
        for line in summarize_log(stderr):
            print(f"  {line}")
    if bench.failures:
        code = code or 1
        print("\nFAILED:", file=sys.stderr)
        for failure in bench.failures:
            print(f"  {failure}", file=sys.stderr)
    if summary is not None and args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    kept = bench.remove_work_dir(keep_logs=args.keep_logs or code != 0)
    if kept is not None:
        print(f"servers' logs kept in {kept}")
    return code


if __name__ == "__main__":
    sys.exit(main())
