"""Load benchmark: the sample upstream, a bare aiohttp proxy and the metering gateway.

One run starts the three servers as subprocesses, drives each in turn with the same load
(POST /v1/chat/completions, a small JSON body, fixed concurrency and duration), prints
requests/s and p50/p99 latency with their ratios, and checks the gateway's ledger against
what the load generator saw. See bench/README.md. This module holds the options and the
order of the run; the other modules of bench/ hold the pieces.

    .venv/bin/python bench/run.py [--duration 10] [--concurrency 32] [--threads 2]
        [--warmup 2] [--generator auto|wrk|python] [--limits bench|off|rules]
        [--gateway-workers 1] [--json FILE] [--keep-logs]
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python bench/run.py`: Python put bench/ first on the path; put the repository
    # there instead, so that the modules import as the package `bench` (as the tests do).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from bench import load as generators
from bench import services
from bench.errors import BenchError, Interrupted
from bench.ledger_check import LedgerCheck, LedgerProbe, Snapshot, judge
from bench.limits import LIMITS_MODES, bench_rules
from bench.load import Load, probe_once
from bench.machine import CpuWindow, machine
from bench.report import Result, print_report, summarize_log, summary
from bench.services import ROOT, GatewayCommand, Service, free_port, wait_http
from bench.workload import BODY, GRANT, ORG, PATH, PLAN, TARGETS, TOKEN_TYPE, USER


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.wrk = generators.find_wrk() if args.generator in ("auto", "wrk") else None
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
        self.probe: LedgerProbe | None = None
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

    def start(self) -> tuple[dict[str, str], LedgerProbe]:
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
                str(services.BENCH / "passthrough.py"),
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
            services.create_schema(self.database_url, self.schema)
            env["GATEWAY_DB_SCHEMA"] = self.schema
            print(f"ledger: DATABASE_URL, fresh schema {self.schema}")
        else:
            print(f"ledger: embedded PostgreSQL in {self.data_dir} (DATABASE_URL is not set)")
        rules = bench_rules(self.args.rules, self.args.limits, self.work / "rules.yaml")
        gateway = GatewayCommand(rules, env)
        gateway.run("rules", "check", str(rules))
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

        # The gateway has migrated the ledger and synced the plans by now.
        dsn = self.database_url or services.embedded_dsn(self.data_dir)
        if dsn is None:
            raise BenchError(f"cannot find the embedded PostgreSQL's address in {self.data_dir}")
        self.probe = LedgerProbe(dsn, self.schema)
        print(f"seeding: organization '{ORG}' on {PLAN}, {GRANT} '{TOKEN_TYPE}' tokens")
        self.probe.seed(PLAN, GRANT)
        self.token = gateway.run("token", "--org", ORG, "--user", USER, "--ttl", "1h").strip()
        self.pids = {"upstream": upstream.pid, "passthrough": passthrough.pid, "gateway": gw.pid}
        urls = {
            "upstream": f"{upstream_url}{PATH}",
            "passthrough": f"http://127.0.0.1:{pass_port}{PATH}",
            "gateway": f"http://127.0.0.1:{gw_port}{PATH}",
        }
        return urls, self.probe

    # measuring

    def load(self, url: str, seconds: int) -> Load:
        shape = {"threads": self.args.threads, "connections": self.args.concurrency}
        if self.wrk is not None:
            return generators.run_wrk(self.wrk, url, self.token, seconds=seconds, **shape)
        return generators.run_python(url, self.token, seconds=seconds, **shape)

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
        result = Result(target, url, load, cpu.end())
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
        urls, probe = self.start()
        self.generator = (
            f"{generators.wrk_version(self.wrk)} ({self.wrk})"
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
                after = probe.settled()
                self.ledger = judge(
                    before,
                    after,
                    probe.journal_since(before),
                    result.load,
                    concurrency=args.concurrency,
                    violations=probe.audit(),
                )
                self.failures.extend(f"ledger: {p}" for p in self.ledger.problems)

    # reporting

    def config(self) -> dict[str, Any]:
        args = self.args
        return {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "threads": min(args.threads, args.concurrency),
            "generator": self.generator,
            "ledger": "database_url" if self.database_url else "embedded",
            "limits": args.limits,
            "path": PATH,
            "body_bytes": len(BODY),
        }

    def ledger_description(self) -> str:
        if self.database_url:
            return f"DATABASE_URL, schema {self.schema} (dropped at the end)"
        return "embedded PostgreSQL in a temporary data directory"

    def gateway_log(self) -> list[str]:
        for service in self.services:
            if service.name == "gateway":
                return service.log_lines()
        return []

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
    reported = code != 130 and bool(bench.results)
    if reported:
        print_report(
            info,
            bench.config(),
            bench.results,
            bench.ledger,
            ledger=bench.ledger_description(),
            limits=LIMITS_MODES[args.limits],
        )
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
        document = summary(info, bench.config(), bench.results, bench.ledger, bench.failures)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    kept = bench.remove_work_dir(keep_logs=args.keep_logs or code != 0)
    if kept is not None:
        print(f"servers' logs kept in {kept}")
    return code


if __name__ == "__main__":
    sys.exit(main())
