"""The load generators: wrk (parsed from its ``--latency`` output) and a built-in aiohttp
generator for machines without wrk. Both send ``workload.BODY`` to one URL from a fixed
number of connections, one request at a time on each, and return a ``Load``."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.errors import BenchError
from bench.services import BENCH
from bench.workload import BODY

WRK_TIMEOUT = "10s"  # wrk's default (2s) would count slow answers as errors


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


# -- wrk ---------------------------------------------------------------------------------

# wrk prints durations with these units (and, in its thread table only, counts like 1.23k).
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)(k|M)?\s*$", re.M)
_WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b", re.M)
_WRK_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_SUFFIX = {None: 1.0, "": 1.0, "k": 1e3, "M": 1e6}


def to_ms(value: str, unit: str) -> float:
    """A wrk duration (``812.00us``, ``3.49ms``, ``1.02s``, ``2.00m``) in milliseconds."""
    return float(value) * _UNITS_MS[unit]


def parse_wrk(output: str) -> Load:
    """requests/s, p50, p99, totals and errors from ``wrk --latency`` output. Raises
    ``BenchError`` when the output lacks any of them."""
    rps, total = _WRK_RPS.search(output), _WRK_TOTAL.search(output)
    percentiles = {float(p): to_ms(v, u) for p, v, u in _WRK_PERCENTILE.findall(output)}
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
        seconds=to_ms(total.group(2), total.group(3)) / 1e3,
        requests=requests,
        ok=requests - bad,
        non_2xx=bad,
        errors=errors,
        rps=float(rps.group(1)) * _SUFFIX[rps.group(2)],
        p50_ms=percentiles[50.0],
        p99_ms=percentiles[99.0],
    )


def wrk_argv(
    wrk: str, url: str, token: str, *, threads: int, connections: int, seconds: int
) -> list[str]:
    return [
        wrk,
        "--threads",
        str(min(threads, connections)),
        "--connections",
        str(connections),
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


def run_wrk(
    wrk: str, url: str, token: str, *, threads: int, connections: int, seconds: int
) -> Load:
    argv = wrk_argv(wrk, url, token, threads=threads, connections=connections, seconds=seconds)
    env = {**os.environ, "BENCH_BODY": BODY}
    proc = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return parse_wrk(proc.stdout)


def find_wrk() -> str | None:
    found = shutil.which("wrk")
    if found:
        return found
    return "/usr/bin/wrk" if os.access("/usr/bin/wrk", os.X_OK) else None


def parse_wrk_version(output: str) -> str:
    """``wrk 4.1.0 [epoll]`` from ``wrk --version``'s first line, less its copyright."""
    first = output.strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk"


def wrk_version(wrk: str) -> str:
    proc = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return parse_wrk_version(proc.stdout or proc.stderr)


# -- the built-in generator --------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (what wrk reports too, from its histogram);
    NaN for no values."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def split_connections(connections: int, processes: int) -> list[int]:
    """``connections`` shared out over at most ``processes`` processes, none left empty."""
    count = max(1, min(processes, connections))
    return [connections // count + (i < connections % count) for i in range(count)]


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


def tally(outcomes: Sequence[dict[str, Any]], who: str) -> tuple[Counter[int], Counter[str]]:
    """The statuses and errors of several worker processes, added up. Raises
    ``BenchError`` naming ``who`` if any worker failed."""
    failed = [o["failed"] for o in outcomes if "failed" in o]
    if failed:
        raise BenchError(f"{who} failed: {'; '.join(failed)}")
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    for o in outcomes:
        statuses.update(o["statuses"])
        errors.update(o["errors"])
    return statuses, errors


def combine(outcomes: Sequence[dict[str, Any]]) -> Load:
    """One ``Load`` from the workers' outcomes (latencies in seconds, statuses, errors,
    monotonic start and finish). Raises ``BenchError`` if any worker failed."""
    statuses, errors = tally(outcomes, "the python load generator")
    latencies = sorted(x for o in outcomes for x in o["latencies"])
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


def run_python(url: str, token: str, *, threads: int, connections: int, seconds: int) -> Load:
    """The fallback load generator: ``threads`` processes (one event loop each) sharing
    ``connections`` connections, each connection a worker sending one request at a time."""
    shares = split_connections(connections, threads)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(shares))
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
    return combine(outcomes)


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
