"""Load benchmark: the sample upstream, a bare aiohttp proxy and the metering gateway.

One run starts the three servers as subprocesses and measures, side by side (see
bench/README.md): throughput at 32 connections, latency at 1 connection, the streams each
proxy holds, one hot account's reserve+commit pairs through the ledger seam, and 2 gateway
workers against 1; then it checks the gateway's ledger against what reached the upstream
and prints each figure against its bar. This module holds the options and the order of the
run; the other modules of bench/ hold the pieces.

    .venv/bin/python bench/run.py [--only throughput,latency,sse,hot,workers]
        [--duration 10] [--concurrency 32] [--threads 2] [--warmup 2]
        [--generator auto|wrk|python] [--limits bench|off|rules] [--leases on|off|rules]
        [--json FILE] ...
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/run.py`: Python put bench/ first on the path; put the repository
    # there instead, so that the modules import as the package `bench` (as the tests do).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench import load as generators
from bench import services
from bench.breakdown import breakdown, read_metrics
from bench.errors import BenchError, Interrupted
from bench.hot_account import hot_account
from bench.ledger_check import LedgerProbe, Snapshot, judge, judge_run
from bench.limits import LEASES_MODES, LIMITS_MODES, bench_rules
from bench.load import Load, probe_once
from bench.machine import CpuWindow, machine
from bench.profile import parse_raw, start_py_spy, summary_lines
from bench.report import Outcome, Result, print_report, summarize_log, summary
from bench.services import ROOT, GatewayCommand, Service, free_port, wait_http
from bench.sse import DEFAULT_STEPS, StreamStep, ladder_steps, ladders, run_streams
from bench.workload import (
    BODY,
    EVENT_INTERVAL,
    FIXED_COST,
    GRANT,
    ORG,
    PATH,
    PLAN,
    STREAM_BODY,
    STREAM_EVENTS,
    STREAM_QUERY,
    TOKEN_TYPE,
    USAGE_PATH,
    USER,
    usage_charge,
)
from gateway.sample_upstream import usage_for

PARTS = ("throughput", "latency", "sse", "hot", "workers")
# What each kind of target keeps busy: the CPU table counts these processes' trees.
SERVING = {
    "upstream": ("upstream",),
    "passthrough": ("passthrough", "upstream"),
    "gateway": ("gateway", "upstream"),
}
STREAM_SECONDS = STREAM_EVENTS * EVENT_INTERVAL  # how long one stream lasts, about


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wrk = generators.find_wrk() if args.generator in ("auto", "wrk") else None
        if args.generator == "wrk" and self.wrk is None:
            raise BenchError(
                "--generator wrk: wrk is not installed (scripts/install-bench-tools.sh)"
            )
        self.work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        os.chmod(self.work, 0o755)  # the embedded PostgreSQL runs as its own user under root
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.data_dir = self.work / "data"
        self.services: list[Service] = []
        self.database_url = os.environ.get("DATABASE_URL") or None
        self.schema: str | None = None
        self.probe: LedgerProbe | None = None
        self.failures: list[str] = []
        self.outcome = Outcome()
        self.token = ""
        self.pids: dict[str, int] = {}
        self.generator = ""
        self.upstream_url = ""
        self.gateway_env: dict[str, str] = {}
        self.gateway: GatewayCommand | None = None
        self.gateway_service: Service | None = None
        self.profile: list[str] = []

    # setup

    def _service(self, name: str, argv: Sequence[str], env: dict[str, str]) -> Service:
        service = Service(name, argv, env, self.logs)
        self.services.append(service)
        service.start()
        return service

    def _start_gateway(self, workers: int, label: str) -> str:
        """Start ``gateway serve`` (``workers``: 0 for its default) and wait until it is
        up; its base URL."""
        assert self.gateway is not None
        port = free_port()
        argv = ["--workers", str(workers)] if workers else []
        print(
            f"starting the gateway on http://127.0.0.1:{port} "
            f"({f'{workers} worker(s)' if workers else 'its default number of workers'})"
        )
        service = self._service(
            label,
            self.gateway.argv("serve", "--host", "127.0.0.1", "--port", str(port), *argv),
            self.gateway_env,
        )
        wait_http(f"http://127.0.0.1:{port}/healthz", service, 120)
        self.gateway_service = service
        self.pids["gateway"] = service.pid
        return f"http://127.0.0.1:{port}"

    def _open_probe(self) -> LedgerProbe:
        dsn = self.database_url or services.embedded_dsn(self.data_dir)
        if dsn is None:
            raise BenchError(f"cannot find the embedded PostgreSQL's address in {self.data_dir}")
        self.probe = LedgerProbe(dsn, self.schema)
        return self.probe

    def start(self) -> dict[str, str]:
        """Start the three servers, seed the ledger, mint the token; each target's base URL."""
        python = sys.executable
        up_port, pass_port = free_port(), free_port()
        self.upstream_url = f"http://127.0.0.1:{up_port}"
        base_env = {k: v for k, v in os.environ.items() if k != "GATEWAY_DB_SCHEMA"}

        print(f"starting the sample upstream (bench/upstream.py) on {self.upstream_url}")
        upstream = self._service(
            "upstream",
            [python, str(services.BENCH / "upstream.py"), "--port", str(up_port)],
            base_env,
        )
        print(f"starting the pass-through proxy on http://127.0.0.1:{pass_port}")
        passthrough = self._service(
            "passthrough",
            [
                python,
                str(services.BENCH / "passthrough.py"),
                "--port",
                str(pass_port),
                "--upstream",
                self.upstream_url,
            ],
            base_env,
        )
        self.gateway_env = env = {
            **base_env,
            "AI_BACKEND_URL": self.upstream_url,
            "GATEWAY_JWT_SECRET": secrets.token_urlsafe(48),
            "GATEWAY_LOG_LEVEL": "WARNING",
            "GATEWAY_DATA_DIR": str(self.data_dir),  # embedded servers, if any, live here
        }
        if self.database_url:
            self.schema = f"bench_{secrets.token_hex(6)}"
            services.create_schema(self.database_url, self.schema)
            env["GATEWAY_DB_SCHEMA"] = self.schema
            print(f"ledger: DATABASE_URL, fresh schema {self.schema}")
        else:
            print(f"ledger: embedded PostgreSQL in {self.data_dir} (DATABASE_URL is not set)")
        rules = bench_rules(
            self.args.rules, self.args.limits, self.work / "rules.yaml", self.args.leases
        )
        self.gateway = GatewayCommand(rules, env)
        self.gateway.run("rules", "check", str(rules))
        print(f"limits (--limits {self.args.limits}): {LIMITS_MODES[self.args.limits]}")
        print(f"leases (--leases {self.args.leases}): {LEASES_MODES[self.args.leases]}")
        wait_http(f"{self.upstream_url}/", upstream, 30)
        wait_http(f"http://127.0.0.1:{pass_port}/", passthrough, 30)
        gateway_url = self._start_gateway(self.args.gateway_workers, "gateway")

        # The gateway has migrated the ledger and synced the plans by now.
        probe = self._open_probe()
        print(f"seeding: organization '{ORG}' on {PLAN}, {GRANT} '{TOKEN_TYPE}' tokens")
        probe.seed(PLAN, GRANT)
        self.token = self.gateway.run("token", "--org", ORG, "--user", USER, "--ttl", "1h")
        self.token = self.token.strip()
        self.pids.update(upstream=upstream.pid, passthrough=passthrough.pid)
        return {
            "upstream": self.upstream_url,
            "passthrough": f"http://127.0.0.1:{pass_port}",
            "gateway": gateway_url,
        }

    # measuring

    def load(self, url: str, seconds: int, connections: int) -> Load:
        shape = {"threads": min(self.args.threads, connections), "connections": connections}
        if self.wrk is not None:
            return generators.run_wrk(self.wrk, url, self.token, seconds=seconds, **shape)
        return generators.run_python(url, self.token, seconds=seconds, **shape)

    def measure(
        self,
        label: str,
        kind: str,
        url: str,
        *,
        connections: int,
        seconds: int,
        probe: LedgerProbe | None = None,
        breakdown_as: str = "",
    ) -> tuple[Result, tuple[Snapshot, dict[str, int]] | None]:
        """Warm up, then measure ``url`` (served by ``kind``: upstream, passthrough or
        gateway). With ``probe``, the ledger and the upstream's count of what the gateway
        forwarded are read in between, once the warm-up's requests have settled. With
        ``breakdown_as``, the gateway's /metrics are read around the measurement and the
        breakdown of its requests' time is kept under that name."""
        args = self.args
        if args.warmup:
            warm = self.load(url, args.warmup, connections)
            if warm.ok == 0:
                raise BenchError(
                    f"{label}: no 2xx answer in {warm.requests} request(s) during the warm-up "
                    f"(errors {warm.errors or 'none'}); one more request now answers "
                    f"{probe_once(url, self.token)}"
                )
        before = (probe.settled(), self.forwarded()) if probe is not None else None
        base = url.split("/v1/", 1)[0]
        metrics_before = read_metrics(base) if breakdown_as else None
        cpu = CpuWindow()
        cpu.begin({name: self.pids[name] for name in SERVING[kind]})
        spy = None
        if args.profile and label == "gateway" and connections == args.concurrency:
            spy = start_py_spy(self.pids["gateway"], max(1, seconds - 1), args.profile)
        load = self.load(url, seconds, connections)
        result = Result(label, url, load, cpu.end())
        if metrics_before is not None:
            self.outcome.breakdowns[breakdown_as] = breakdown(metrics_before, read_metrics(base))
        if spy is not None:
            _, err = spy.communicate(timeout=60)
            if spy.returncode != 0 or not args.profile.exists():
                raise BenchError(f"py-spy exited {spy.returncode}: {err.decode().strip()}")
            self.profile = summary_lines(parse_raw(args.profile.read_text()))
            self.profile.append(f"  (py-spy's raw stacks: {args.profile})")
        print(
            f"  {label}: {load.rps:,.0f} req/s, p50 {load.p50_ms:.2f} ms, "
            f"p99 {load.p99_ms:.2f} ms; {load.requests} requests, {load.non_2xx} non-2xx, "
            f"{load.error_count} errors; load generator {result.cpu.get('load gen', 0):.0f}% "
            f"of a CPU"
        )
        if load.non_2xx or load.error_count:
            what = f"{load.non_2xx} non-2xx response(s), errors {load.errors or 'none'}"
            if load.statuses:
                what += f", statuses {load.statuses}"
            what += f"; one more request now answers {probe_once(url, self.token)}"
            self.failures.append(f"{label}: {what}")
        return result, before

    def part_throughput(self, urls: dict[str, str], probe: LedgerProbe) -> None:
        args = self.args
        targets = [
            ("upstream", "upstream", PATH),
            ("passthrough", "passthrough", PATH),
            ("gateway", "gateway", PATH),
            ("gateway usage", "gateway", USAGE_PATH),
        ]
        for label, kind, path in targets:
            url = urls[kind] + path
            print(f"\n== throughput, {label}: POST {url}, {args.concurrency} connections")
            checked = label == "gateway"
            result, before = self.measure(
                label,
                kind,
                url,
                connections=args.concurrency,
                seconds=args.duration,
                probe=probe if checked else None,
                breakdown_as={"gateway": f"c={args.concurrency}", "gateway usage": "usage"}.get(
                    label, ""
                ),
            )
            self.outcome.throughput.append(result)
            if before is not None:
                snapshot, forwarded_before = before
                after = probe.settled()
                forwarded = services.counted_between(forwarded_before, self.forwarded())
                self.outcome.ledger = judge(
                    snapshot,
                    after,
                    probe.journal_since(snapshot),
                    result.load,
                    concurrency=args.concurrency,
                    violations=probe.audit(),
                    forwarded=sum(forwarded.values()),
                )
                self.failures.extend(f"ledger: {p}" for p in self.outcome.ledger.problems)

    def forwarded(self) -> dict[str, int]:
        return services.forwarded_by_gateway(self.upstream_url)

    def part_latency(self, urls: dict[str, str]) -> None:
        for kind in ("upstream", "passthrough", "gateway"):
            url = urls[kind] + PATH
            print(f"\n== latency, {kind}: POST {url}, 1 connection")
            result, _ = self.measure(
                kind,
                kind,
                url,
                connections=1,
                seconds=self.args.latency_duration,
                breakdown_as="c=1" if kind == "gateway" else "",
            )
            self.outcome.latency.append(result)

    def part_sse(self, urls: dict[str, str], probe: LedgerProbe) -> None:
        """The stream ladders, side by side: each round runs the next step of each target
        (``ladders``). Each of the gateway's steps starts from a settled ledger, so that
        what a step that missed left behind (commits and leased holds still to settle)
        does not count against the next."""
        args = self.args
        runs: dict[str, Callable[[int], StreamStep]] = {}
        for label, kind, path in (
            ("passthrough", "passthrough", PATH),
            ("gateway", "gateway", PATH),
            ("gateway usage", "gateway", USAGE_PATH),
        ):
            url = urls[kind] + path + STREAM_QUERY
            print(f"== sse, {label}: POST {url} (stream)")

            def one_step(
                n: int, label: str = label, kind: str = kind, url: str = url
            ) -> StreamStep:
                if kind == "gateway":
                    probe.settled()
                cpu = CpuWindow()
                cpu.begin({name: self.pids[name] for name in SERVING[kind]})
                step = run_streams(
                    label,
                    url,
                    self.token,
                    STREAM_BODY,
                    streams=n,
                    processes=args.threads,
                    ramp=STREAM_SECONDS,
                    window=args.sse_window,
                )
                step.cpu = cpu.end()
                print(
                    f"  {label}, {n} streams: TTFB p50 {step.ttfb_p50_ms:.2f} ms, p99 "
                    f"{step.ttfb_p99_ms:.2f} ms over {step.measured} streams; "
                    f"{'holds' if step.holds() else step.why_not()}"
                )
                return step

            runs[label] = one_step
            self.outcome.streams[label] = []
        print(
            f"   steps {args.sse_steps}, then {args.sse_refine} halving(s) of the gap at "
            "each ladder's first miss; the ladders side by side, a step of each in turn"
        )
        ladders(args.sse_steps, args.sse_refine, runs, self.outcome.streams)

    def part_hot(self) -> None:
        args = self.args
        dsn = self.database_url or services.embedded_dsn(self.data_dir)
        if dsn is None:
            raise BenchError(f"cannot find the embedded PostgreSQL's address in {self.data_dir}")
        print(
            f"\n== hot account: {args.hot_concurrency} callers reserve and commit on one "
            f"account for {args.hot_seconds}s (bench/hot_account.py, a schema of its own)"
        )
        for leased in (False, True):
            hot = asyncio.run(
                hot_account(
                    dsn, seconds=args.hot_seconds, concurrency=args.hot_concurrency, leased=leased
                )
            )
            if leased:
                self.outcome.hot_leased = hot
            else:
                self.outcome.hot = hot
            print(
                f"  {hot.per_second:,.0f} pairs/s ({hot.pairs} pairs"
                f"{', holds made as leases make them' if leased else ''}), "
                f"audit violations {hot.violations}"
            )
            if hot.violations:
                self.failures.append(f"hot account: {hot.violations} audit violation(s)")

    def part_workers(self, urls: dict[str, str]) -> dict[str, str]:
        """1 gateway worker, then 2 (the first gateway is stopped and a second started on
        the same ledger); the URLs with the new gateway's."""
        args = self.args
        print(f"\n== workers, 1: POST {urls['gateway']}{PATH}, {args.concurrency} connections")
        one, _ = self.measure(
            "gateway 1 worker",
            "gateway",
            urls["gateway"] + PATH,
            connections=args.concurrency,
            seconds=args.duration,
        )
        assert self.gateway_service is not None
        if self.probe is not None and not self.database_url:
            self.probe.close()  # the embedded PostgreSQL stops with the gateway
            self.probe = None
        self.gateway_service.stop()  # settles what it has in flight first
        gateway_url = self._start_gateway(2, "gateway-2-workers")
        if self.probe is None:
            self._open_probe()
        print(f"== workers, 2: POST {gateway_url}{PATH}, {args.concurrency} connections")
        two, _ = self.measure(
            "gateway 2 workers",
            "gateway",
            gateway_url + PATH,
            connections=args.concurrency,
            seconds=args.duration,
        )
        self.outcome.workers = [one, two]
        return {**urls, "gateway": gateway_url}

    def run(self) -> None:
        args = self.args
        urls = self.start()
        assert self.probe is not None
        self.generator = (
            f"{generators.wrk_version(self.wrk)} ({self.wrk})"
            if self.wrk
            else "python (aiohttp client, one event loop per process)"
        )
        print(
            f"\nparts: {', '.join(args.only)}\nload generator: {self.generator}; "
            f"{args.concurrency} connections over {min(args.threads, args.concurrency)} "
            f"thread(s)/process(es); {args.warmup}s warm-up then {args.duration}s per target"
        )
        run_before = self.probe.settled()
        forwarded_before = self.forwarded()
        if "throughput" in args.only:
            self.part_throughput(urls, self.probe)
        if "latency" in args.only:
            self.part_latency(urls)
        if "sse" in args.only:
            self.part_sse(urls, self.probe)
        if "hot" in args.only:
            self.part_hot()
        if "workers" in args.only:
            urls = self.part_workers(urls)
        probe = self.probe
        assert probe is not None
        print("\n== ledger: waiting for the ledger to settle, then auditing")
        run_after = probe.settled()
        self.outcome.run_ledger = check = judge_run(
            run_before,
            run_after,
            probe.journal_since(run_before),
            forwarded=services.counted_between(forwarded_before, self.forwarded()),
            prices=prices(),
            violations=probe.audit(),
        )
        self.failures.extend(f"ledger: {p}" for p in check.problems)

    # reporting

    def config(self) -> dict[str, Any]:
        args = self.args
        return {
            "parts": list(args.only),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "threads": min(args.threads, args.concurrency),
            "latency_duration_s": args.latency_duration,
            "sse_steps": list(args.sse_steps),
            "sse_refine": args.sse_refine,
            "sse_window_s": args.sse_window,
            "stream_events": STREAM_EVENTS,
            "hot_seconds": args.hot_seconds,
            "hot_concurrency": args.hot_concurrency,
            "generator": self.generator,
            "ledger": "database_url" if self.database_url else "embedded",
            "limits": args.limits,
            "leases": args.leases,
            "path": PATH,
            "usage_path": USAGE_PATH,
            "body_bytes": len(BODY),
        }

    def ledger_description(self) -> str:
        if self.database_url:
            return f"DATABASE_URL, schema {self.schema} (dropped at the end)"
        return "embedded PostgreSQL in a temporary data directory"

    def gateway_log(self) -> list[str]:
        return [
            line
            for service in self.services
            if service.name.startswith("gateway")
            for line in service.log_lines()
        ]

    # cleanup

    def stop(self) -> None:
        if self.probe is not None:
            try:
                self.probe.close()
            except Exception as exc:
                print(f"  closing the ledger: {exc}", file=sys.stderr)
        for service in reversed(self.services):  # the gateway first: it settles in flight
            try:
                service.stop()
            except Exception as exc:
                print(f"  stopping {service.name}: {exc}", file=sys.stderr)
        services.stop_leftovers(self.data_dir)
        if self.schema and self.database_url:
            try:
                services.drop_schema(self.database_url, self.schema)
            except Exception as exc:
                print(f"  could not drop schema {self.schema}: {exc}", file=sys.stderr)

    def remove_work_dir(self, keep_logs: bool) -> Path | None:
        kept = None
        if keep_logs:
            kept = Path(tempfile.mkdtemp(prefix="gateway-bench-logs-"))
            for log in self.logs.iterdir():
                shutil.copy(log, kept / log.name)
        shutil.rmtree(self.work, ignore_errors=True)
        return kept


def prices() -> dict[str, int]:
    """What one request to each of the bench's paths costs: the fixed route's cost, and the
    usage-priced route's charge for the usage the sample upstream reports for the bench's
    bodies (the same for the plain and the streamed one)."""
    usage = usage_for(json.loads(BODY))
    assert usage == usage_for(json.loads(STREAM_BODY))
    charge = usage_charge(int(str(usage["prompt_tokens"])), int(str(usage["completion_tokens"])))
    return {PATH: FIXED_COST, USAGE_PATH: charge}


# -- main --------------------------------------------------------------------------------


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def parts(text: str) -> tuple[str, ...]:
    """``hot,throughput`` as the parts in the run's order. Unknown names are refused."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(PARTS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(PARTS)}"
        )
    return tuple(part for part in PARTS if part in chosen)


def steps(text: str) -> tuple[int, ...]:
    try:
        return ladder_steps(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The sample upstream, a bare aiohttp pass-through proxy and the metering "
        "gateway side by side, in one run: throughput, latency, streams, one hot account and "
        "gateway workers, each against its bar; then the ledger check.",
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
        "--leases",
        choices=tuple(LEASES_MODES),
        default="on",
        help="; ".join(f"{k}: {v}" for k, v in LEASES_MODES.items()) + " (default: on)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        metavar="N",
        help="gateway serve --workers N (default 1, like the one-process pass-through; "
        "0: the gateway's default, one per core)",
    )
    parser.add_argument(
        "--only",
        type=parts,
        default=PARTS,
        metavar="PARTS",
        help=f"the parts to run, comma-separated (default: all of {','.join(PARTS)})",
    )
    parser.add_argument(
        "--latency-duration",
        type=positive,
        default=5,
        metavar="S",
        help="seconds per target at 1 connection",
    )
    parser.add_argument(
        "--sse-steps",
        type=steps,
        default=DEFAULT_STEPS,
        metavar="N,N,...",
        help="concurrent streams of each step, until TTFB p99 passes 50 ms "
        f"(default {','.join(map(str, DEFAULT_STEPS))})",
    )
    parser.add_argument(
        "--sse-refine",
        type=int,
        default=3,
        metavar="N",
        help="after the first step that misses, N more steps halving the gap between the "
        "most streams held and the fewest missed (0: the steps alone; default 3)",
    )
    parser.add_argument(
        "--sse-window",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds of streams measured per step, after a ramp of one stream's length",
    )
    parser.add_argument("--hot-seconds", type=float, default=5.0, metavar="S")
    parser.add_argument("--hot-concurrency", type=positive, default=128, metavar="N")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="py-spy the gateway during its 32-connection measurement (its numbers are then "
        "taken under the sampler); raw stacks to FILE, a summary at the end",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs (kept on failure)"
    )
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.gateway_workers < 0:
        parser.error("--gateway-workers must be 0 or more")
    if "workers" in args.only and args.gateway_workers != 1:
        parser.error("--only workers compares 2 gateway workers with 1: needs --gateway-workers 1")
    if args.sse_window <= 0 or args.hot_seconds <= 0:
        parser.error("--sse-window and --hot-seconds must be positive")
    if args.sse_refine < 0:
        parser.error("--sse-refine must be 0 or more")
    args.rules = args.rules.resolve()
    if args.profile is not None:
        args.profile = args.profile.resolve()
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
    outcome = bench.outcome
    reported = code != 130 and bool(
        outcome.results() or outcome.streams or outcome.hot or outcome.run_ledger
    )
    if reported:
        print_report(
            info,
            bench.config(),
            outcome,
            ledger=bench.ledger_description(),
            limits=LIMITS_MODES[args.limits],
        )
    if bench.profile:
        print("\n-- profile\n" + "\n".join(bench.profile))
    logged = [line for line in bench.gateway_log() if line.strip()]
    if logged:
        print(f"\ngateway log: {len(logged)} line(s) at WARNING or above, by count:")
        for line in summarize_log(logged):
            print(f"  {line}")
    if bench.failures:
        code = code or 1
        print("\nFAILED:", file=sys.stderr)
        for failure in bench.failures:
            print(f"  {failure}", file=sys.stderr)
    if reported and args.json:
        document = summary(info, bench.config(), outcome, bench.failures)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    kept = bench.remove_work_dir(keep_logs=args.keep_logs or code != 0)
    if kept is not None:
        print(f"servers' logs kept in {kept}")
    return code


if __name__ == "__main__":
    sys.exit(main())
