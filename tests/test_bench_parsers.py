"""The benchmark's parsers and report, without running a benchmark: wrk's output, the
python generator's tally, /proc, postmaster.pid, the ratios, the tables, the ledger verdict
and the log summary, each asserted to the exact value."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import run
from bench.errors import BenchError
from bench.ledger_check import JournalSummary, LedgerCheck, Snapshot, judge, summarize_journal
from bench.limits import (
    BENCH_LEASES,
    UNBOUND_CONCURRENCY,
    UNBOUND_RATE,
    adjust_leases,
    adjust_limits,
    bench_rules,
)
from bench.load import (
    Load,
    combine,
    parse_wrk,
    parse_wrk_version,
    percentile,
    split_connections,
    to_ms,
)
from bench.machine import CpuWindow, cpu_model, parse_cpu_ticks, parse_process_stat
from bench.report import (
    Outcome,
    Result,
    cpu_table,
    header,
    ledger_lines,
    ratio,
    ratios,
    ratios_table,
    results_table,
    summarize_log,
    summary,
)
from bench.services import parse_postmaster_pid

ROOT = Path(__file__).resolve().parent.parent

WRK_OK = """\
Running 10s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.59ms    1.02ms  20.00ms   87.50%
    Req/Sec     4.48k   312.10     5.01k    70.00%
  Latency Distribution
     50%    3.49ms
     75%    4.01ms
     90%    4.72ms
     99%    6.25ms
  89076 requests in 10.00s, 17.84MB read
Requests/sec:   8905.12
Transfer/sec:      1.78MB
"""

WRK_ERRORS = """\
Running 5s test @ http://127.0.0.1:8080/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   250.00us  100.00us   1.50s    99.00%
    Req/Sec     1.50k   200.00     2.00k    60.00%
  Latency Distribution
     50%  250.00us
     75%  500.00us
     90%  750.00us
     99%    1.50s
  3000 requests in 2.00m, 1.00MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 17
Requests/sec:      1.50k
Transfer/sec:    512.00KB
"""


def load(
    generator: str = "wrk",
    *,
    rps: float = 100.0,
    p50: float = 10.0,
    p99: float = 20.0,
    requests: int = 1000,
    ok: int | None = None,  # default: every request
) -> Load:
    ok = requests if ok is None else ok
    return Load(generator, 10.0, requests, ok, requests - ok, {}, rps, p50, p99)


# -- wrk ---------------------------------------------------------------------------------


def test_wrk_output_gives_rps_percentiles_and_totals() -> None:
    assert parse_wrk(WRK_OK) == Load(
        generator="wrk",
        seconds=10.0,
        requests=89076,
        ok=89076,
        non_2xx=0,
        errors={},
        rps=8905.12,
        p50_ms=3.49,
        p99_ms=6.25,
    )


def test_wrk_output_in_us_s_and_minutes_with_k_suffix_errors_and_non_2xx() -> None:
    parsed = parse_wrk(WRK_ERRORS)
    assert parsed.seconds == 120.0
    assert parsed.rps == 1500.0
    assert parsed.p50_ms == pytest.approx(0.25, rel=1e-12)
    assert parsed.p99_ms == 1500.0
    assert (parsed.requests, parsed.ok, parsed.non_2xx) == (3000, 2983, 17)
    assert parsed.errors == {"read": 3, "timeout": 2}
    assert parsed.error_count == 5


@pytest.mark.parametrize(
    ("value", "unit", "ms"),
    [("250", "us", 0.25), ("3.5", "ms", 3.5), ("1.25", "s", 1250.0), ("2", "m", 120_000.0)],
)
def test_wrk_durations_in_milliseconds(value: str, unit: str, ms: float) -> None:
    assert to_ms(value, unit) == pytest.approx(ms, rel=1e-12)


def test_wrk_output_without_latency_distribution_is_refused() -> None:
    without = "\n".join(line for line in WRK_OK.splitlines() if "%    " not in line)
    with pytest.raises(BenchError, match=r"^cannot read wrk's output \(was --latency given\?\)"):
        parse_wrk(without)


def test_wrk_version_drops_the_copyright() -> None:
    assert parse_wrk_version("wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer\n") == (
        "wrk 4.1.0 [epoll]"
    )
    assert parse_wrk_version("") == "wrk"


# -- the python generator ----------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 10) == 1.0
    assert percentile(values, 0) == 1.0
    assert math.isnan(percentile([], 50))


def test_connections_are_shared_out_over_processes() -> None:
    assert split_connections(32, 2) == [16, 16]
    assert split_connections(7, 3) == [3, 2, 2]
    assert split_connections(2, 8) == [1, 1]
    assert split_connections(5, 0) == [5]


def test_worker_outcomes_combine_into_one_load() -> None:
    outcomes = [
        {
            "latencies": [0.004, 0.001],
            "statuses": {200: 2},
            "errors": {"ServerDisconnectedError": 1},
            "started": 100.0,
            "finished": 102.0,
        },
        {
            "latencies": [0.002, 0.003],
            "statuses": {200: 1, 429: 1},
            "errors": {},
            "started": 100.5,
            "finished": 104.0,
        },
    ]
    assert combine(outcomes) == Load(
        generator="python",
        seconds=4.0,
        requests=4,
        ok=3,
        non_2xx=1,
        errors={"ServerDisconnectedError": 1},
        rps=1.0,
        p50_ms=2.0,
        p99_ms=4.0,
        statuses={"200": 3, "429": 1},
    )


def test_a_failed_worker_fails_the_load() -> None:
    with pytest.raises(BenchError, match=r"^the python load generator failed: OSError: boom$"):
        combine([{"failed": "OSError: boom"}])


# -- ratios and tables -------------------------------------------------------------------


def test_ratio_of_zero_is_nan() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert math.isnan(ratio(3.0, 0.0))


def test_ratios_between_measured_targets() -> None:
    loads = {
        "upstream": load(rps=1000.0, p50=2.0, p99=5.0),
        "passthrough": load(rps=500.0, p50=4.0, p99=10.0),
        "gateway": load(rps=100.0, p50=20.0, p99=40.0),
    }
    assert ratios(loads) == {
        "gateway / upstream": {"throughput": 0.1, "p50": 10.0, "p99": 8.0},
        "gateway / passthrough": {"throughput": 0.2, "p50": 5.0, "p99": 4.0},
        "passthrough / upstream": {"throughput": 0.5, "p50": 2.0, "p99": 2.0},
    }
    del loads["passthrough"]
    assert list(ratios(loads)) == ["gateway / upstream"]


def test_results_and_ratios_tables() -> None:
    results = [
        Result("upstream", "u", load(rps=8905.12, p50=3.49, p99=6.22, requests=89076), {}),
        Result("gateway", "g", load(rps=323.4, p50=96.19, p99=152.64, requests=3236, ok=3230), {}),
    ]
    assert results_table(results) == [
        "target                 req/s    p50 ms    p99 ms   requests  non-2xx  errors",
        "upstream               8,905      3.49      6.22      89076        0       0",
        "gateway                  323     96.19    152.64       3236        6       0",
    ]
    table = ratios({r.target: r.load for r in results})
    assert ratios_table(table) == [
        "ratio                       throughput       p50       p99",
        "gateway / upstream               0.04x    27.56x    24.54x",
    ]
    assert ratios_table({}) == []


def test_cpu_table_and_its_warnings() -> None:
    results = [
        Result("upstream", "u", load(), {"upstream": 98.6, "postgres": 12.0, "other": 3.0}),
        Result("gateway", "g", load(), {"gateway": 100.4, "postgres": 60.0, "other": 30.0}),
    ]
    assert cpu_table(results, "throughput") == [
        "CPU during throughput, % of one CPU (machine: % of all CPUs busy)",
        "target                upstream passthrough     gateway    postgres       redis    load gen"
        "       other     machine",
        "upstream                    99           -           -          12           -           -"
        "           3           -",
        "gateway                      -           -         100          60           -           -"
        "          30           -",
        "  WARNING: other processes were busy during: upstream, gateway",
    ]
    quiet = [Result("gateway", "g", load(), {"postgres": 60.0})]
    assert cpu_table(quiet)[0] == "CPU during each run, % of one CPU (machine: % of all CPUs busy)"
    assert cpu_table(quiet)[-1] == (
        "gateway                      -           -           -          60           -           -"
        "           -           -"
    )


def test_header_says_what_was_measured() -> None:
    info = {
        "nproc": 2,
        "cpu_model": "Test CPU",
        "kernel": "Linux 6.1 x86_64",
        "python": "3.11.9",
        "aiohttp": "3.10.0",
        "busy_before_percent": 4.4,
    }
    config = {
        "parts": ["throughput", "hot"],
        "generator": "wrk 4.1.0",
        "concurrency": 32,
        "threads": 2,
        "duration_s": 10,
        "warmup_s": 2,
        "path": "/v1/chat/completions",
        "body_bytes": 73,
        "limits": "off",
    }
    text = header(info, config, "embedded PostgreSQL", "every limit off")
    assert text.splitlines() == [
        "machine: 2 CPU(s), Test CPU; Linux 6.1 x86_64; Python 3.11.9, aiohttp 3.10.0",
        "parts: throughput, hot",
        "load: wrk 4.1.0",
        "      32 connections, 2 thread(s), 10s per target after 2s warm-up (latency: 1 "
        "connection); POST /v1/chat/completions (73-byte JSON body)",
        "      all CPUs 4% busy in the second before the run",
        "note: the load generator, the three servers and PostgreSQL share these 2 CPU(s);",
        "      absolute numbers are lower than on separate machines, read the ratios.",
        "ledger: embedded PostgreSQL",
        "limits: --limits off: every limit off",
    ]


def test_summary_holds_results_ratios_and_failures() -> None:
    outcome = Outcome(
        throughput=[
            Result("upstream", "http://u", load(rps=200.0), {"upstream": 50.0}),
            Result("gateway", "http://g", load(rps=50.0), {}),
        ]
    )
    document = summary({"nproc": 2}, {"limits": "bench"}, outcome, ["gateway: 1 non-2xx"])
    assert document["results"]["upstream"] == {
        "url": "http://u",
        "generator": "wrk",
        "seconds": 10.0,
        "requests": 1000,
        "ok": 1000,
        "non_2xx": 0,
        "errors": {},
        "rps": 200.0,
        "p50_ms": 10.0,
        "p99_ms": 20.0,
        "statuses": None,
        "cpu_percent": {"upstream": 50.0},
    }
    assert document["ratios"] == {
        "gateway / upstream": {"throughput": 0.25, "p50": 1.0, "p99": 1.0}
    }
    assert document["ledger_check"] is None
    assert document["run_ledger_check"] is None
    assert (document["streams"], document["hot_account"], document["workers"]) == ({}, None, {})
    assert document["verdict"] == []  # no passthrough: no ratio to judge
    assert document["failures"] == ["gateway: 1 non-2xx"]
    json.dumps(document)  # it is written as JSON


# -- the ledger verdict ------------------------------------------------------------------


def test_journal_summary_counts_one_token_type_and_ranks_reasons() -> None:
    entries = [
        {"kind": "reserve", "token_type": "general", "reason": None},
        {"kind": "commit", "token_type": "general", "reason": None},
        {"kind": "refund", "token_type": "general", "reason": "Can not write request body"},
        {"kind": "refund", "token_type": "general", "reason": "Can not write request body"},
        {"kind": "expire", "token_type": "general", "reason": None},
        {"kind": "refund", "token_type": "forecast", "reason": "elsewhere"},
    ]
    assert summarize_journal(entries, "general") == JournalSummary(
        kinds={"commit": 1, "expire": 1, "refund": 2, "reserve": 1},
        refund_reasons={"Can not write request body": 2, "": 1},
    )


def settled(available: int, held: int = 0) -> Snapshot:
    return Snapshot(available=available, reserved=0, held=held, last_entry=0)


def journal(commits: int, refunds: int = 0, expires: int = 0) -> JournalSummary:
    kinds = {"commit": commits, "refund": refunds, "expire": expires}
    return JournalSummary(kinds, {"Can not write request body": refunds} if refunds else {})


def test_python_generator_must_match_the_fall_exactly() -> None:
    check = judge(
        settled(1000), settled(900), journal(100), load("python", ok=100), concurrency=8,
        violations=[],
    )  # fmt: skip
    assert check.problems == []
    assert check.verdict() == "ok"
    assert (check.balance_drop, check.commits, check.exact) == (100, 100, True)

    check = judge(
        settled(1000), settled(899, held=1), journal(101, refunds=1, expires=2),
        load("python", ok=100), concurrency=8, violations=["balance: off by one"],
    )  # fmt: skip
    assert check.problems == [
        "1 refund(s) during the run",
        "2 expired reservation(s) during the run",
        "1 reservation(s) still held",
        "the balance fell by 101 for 100 2xx answers",
        "ledger audit: 1 violation(s)",
    ]
    assert check.verdict() == "FAILED"


def test_wrk_may_leave_one_request_per_connection_in_flight() -> None:
    check = judge(
        settled(1000), settled(895), journal(105, refunds=3), load("wrk", ok=100),
        concurrency=8, violations=[],
    )  # fmt: skip
    assert check.problems == []

    check = judge(
        settled(1000), settled(890), journal(105, refunds=1), load("wrk", ok=100),
        concurrency=8, violations=[],
    )  # fmt: skip
    assert check.problems == [
        "105 commits but the balance fell by 110",
        "1 refund(s) and 10 charge(s) beyond the 2xx answers: more than the 8 requests that "
        "can have been in flight when wrk stopped",
        "the balance fell by 110 for 100 2xx answers completed within the run; expected "
        "between 100 and 108 (up to one request per connection in flight when wrk stopped)",
    ]


def test_holds_a_lease_gave_back_are_no_request_refunds() -> None:
    returns = JournalSummary(
        {"commit": 100, "refund": 70}, {"lease: not drawn within 1s": 64, "Can not write": 6}
    )
    assert (returns.lease_returns, returns.refunds) == (64, 6)
    check = judge(
        settled(1000), settled(900), returns, load("python", ok=100), concurrency=8,
        violations=[],
    )  # fmt: skip
    assert check.problems == ["6 refund(s) during the run"]
    check = judge(
        settled(1000), settled(900), JournalSummary({"commit": 100, "refund": 64},
        {"lease: not drawn within 1s": 64}), load("python", ok=100), concurrency=8,
        violations=[],
    )  # fmt: skip
    assert check.problems == [] and check.refunds == 0


def test_ledger_lines_explain_the_verdict() -> None:
    check = LedgerCheck(
        ok_responses=100,
        balance_drop=103,
        commits=103,
        refunds=2,
        expires=0,
        held_after=0,
        exact=False,
        concurrency=8,
        refund_reasons={"Can not write request body": 2},
    )
    assert ledger_lines(check) == [
        "ledger check (gateway, 32 connections): ok",
        "  2xx answers received by the load generator: 100",
        "  'general' balance fell by:              103",
        "  journal: 103 commit(s), 2 refund(s), 0 expiry(ies); 0 reservation(s) held after",
        "    2 refunded or expired: Can not write request body",
        "  wrk counts only responses completed within the run and drops the connections at "
        "its end:\n  3 more were charged and 2 refunded, requests in flight when it stopped "
        "(5 of at most 8,\n  one per connection); the gateway still settled each of them",
        "  audit: every invariant holds",
    ]
    check.violations, check.problems = ["x: y"], ["ledger audit: 1 violation(s)"]
    assert ledger_lines(check)[-2:] == [
        "  audit: violation: x: y",
        "  PROBLEM: ledger audit: 1 violation(s)",
    ]


# -- the log -----------------------------------------------------------------------------


def test_log_summary_counts_distinct_records() -> None:
    lines = [
        '{"level": "warning", "logger": "gateway.spike", "message": "spend spike: bench"}',
        "2024-05-01 10:00:00,123 WARNING plain line",
        "",
        '{"level": "warning", "logger": "gateway.spike", "message": "spend spike: bench"}',
        '{"level": "error", "logger": "gateway.proxy", "message": "upstream failed", '
        '"exception": "Traceback...\\nClientOSError: reset"}',
        "2024-05-01T10:00:01.5Z WARNING plain line",
    ]
    assert summarize_log(lines) == [
        "     2 x WARNING gateway.spike: spend spike: bench",
        "     2 x WARNING plain line",
        "     1 x ERROR gateway.proxy: upstream failed [ClientOSError: reset]",
    ]
    assert summarize_log(lines, limit=1) == [
        "     2 x WARNING gateway.spike: spend spike: bench",
        "       ... and 2 other distinct line(s)",
    ]


# -- the machine and the embedded server -------------------------------------------------


def test_postmaster_pid_gives_the_socket_or_the_address() -> None:
    socket = "1234\n/data/postgres\n1714550000\n5433\n/tmp/pg\n127.0.0.1\n  5433001  0\nready\n"
    assert parse_postmaster_pid(socket) == "postgresql://postgres@/postgres?host=/tmp/pg&port=5433"
    address = "1234\n/data/postgres\n1714550000\n5433\n\n10.0.0.5\n"
    assert parse_postmaster_pid(address) == "postgresql://postgres@10.0.0.5:5433/postgres"
    anywhere = "1234\n/data/postgres\n1714550000\n5433\n\n*\n"
    assert parse_postmaster_pid(anywhere) == "postgresql://postgres@127.0.0.1:5433/postgres"
    assert parse_postmaster_pid("1234\n/data/postgres\n") is None


def test_proc_parsers() -> None:
    assert cpu_model("processor\t: 0\nmodel name\t: Test CPU @ 2.0GHz\n") == "Test CPU @ 2.0GHz"
    assert cpu_model("processor\t: 0\n") == "unknown"
    # user nice system idle iowait irq softirq steal
    assert parse_cpu_ticks("cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 1 2 3\n") == (170.0, 990.0, 155.0)
    stat = "4242 (tmux: server) S 17 4242 4242 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 1 0 1"
    assert parse_process_stat(stat, 100) == ("tmux: server", 17, 3.0)


def test_cpu_window_groups_each_server_with_its_descendants() -> None:
    table = {
        10: ("gateway", 1, 0.0),
        11: ("gateway", 10, 0.0),  # a worker
        12: ("postgres", 10, 0.0),  # the embedded server it started: counted as postgres
        20: ("python", 1, 0.0),
        30: ("valkey-server", 1, 0.0),
    }
    window = CpuWindow(roots={"gateway": 10, "upstream": 20})
    assert window.groups(table) == {
        "gateway": {10, 11},
        "upstream": {20},
        "postgres": {12},
        "redis": {30},
    }


# -- the rules ---------------------------------------------------------------------------


def test_bench_limits_keep_each_kind_but_out_of_reach() -> None:
    doc = {
        "limits": {
            "default": {"rate": "30/minute", "min_interval": {"seconds": 3, "per": "user"}},
            "plans": {"enterprise": {"rate": [{"limit": "120/minute", "per": "user"}]}},
            "blocks": {"after": 20},
        },
        "routes": [{"name": "chat", "limits": {"concurrency": {"max": 2, "per": "user"}}}],
    }
    assert adjust_limits(doc, "bench") == {
        "limits": {
            "default": {"rate": "30/minute", "min_interval": {"seconds": 3, "per": "user"}},
            "plans": {
                "enterprise": {
                    "rate": [{"limit": UNBOUND_RATE, "per": "user"}],
                    "min_interval": None,
                    "concurrency": None,
                }
            },
            "blocks": {"after": 20},
        },
        "routes": [
            {"name": "chat", "limits": {"concurrency": {"max": UNBOUND_CONCURRENCY, "per": "user"}}}
        ],
    }


def test_limits_off_removes_every_limit() -> None:
    doc = {"limits": {"plans": {"pro": {"rate": "1/second"}}}, "routes": [{"limits": {}}]}
    assert adjust_limits(doc, "off") == {
        "limits": {
            "plans": {},
            "default": {"rate": [], "min_interval": None, "concurrency": None},
            "blocks": None,
            "spike": None,
        },
        "routes": [{}],
    }


def test_leases_on_off_or_as_the_rules_say() -> None:
    assert adjust_leases({}, "on") == {"ledger": {"leases": BENCH_LEASES}}
    own = {"ledger": {"leases": {"seconds": 5}, "sweep_interval_seconds": 3}}
    assert adjust_leases(dict(own), "on") == own
    assert adjust_leases(dict(own), "off") == {"ledger": {"sweep_interval_seconds": 3}}
    assert adjust_leases(dict(own), "rules") == own
    assert adjust_leases({}, "rules") == {}


def test_bench_rules_writes_a_copy_with_an_absolute_key_file(tmp_path: Path) -> None:
    source = tmp_path / "conf" / "rules.yaml"
    source.parent.mkdir()
    limits = {"plans": {"enterprise": {"rate": "1/second"}}}
    doc = {"auth": {"public_key_file": "key.pem"}, "routes": [], "limits": limits}
    source.write_text(yaml.safe_dump(doc))
    written = bench_rules(source, "off", tmp_path / "out.yaml")
    assert written == tmp_path / "out.yaml"
    assert written.read_text().startswith(
        f"# {source} for bench/run.py --limits off --leases rules: "
    )
    copy = yaml.safe_load(written.read_text())
    assert copy["auth"] == {"public_key_file": str(source.parent / "key.pem")}
    assert [r["name"] for r in copy["routes"]] == ["bench_fixed", "bench_usage"]
    # --limits rules: the limits as they are, but still the bench's routes.
    copy = yaml.safe_load(bench_rules(source, "rules", tmp_path / "rules.yaml").read_text())
    assert (copy["limits"], len(copy["routes"])) == (limits, 2)


# -- the command -------------------------------------------------------------------------


def test_options_and_their_defaults() -> None:
    args = run.parse_args([])
    assert (args.duration, args.concurrency, args.threads, args.warmup) == (10, 32, 2, 2)
    assert (args.generator, args.limits, args.gateway_workers) == ("auto", "bench", 1)
    assert args.leases == "on"
    assert args.only == ("throughput", "latency", "sse", "hot", "workers")
    assert (args.latency_duration, args.sse_window, args.hot_seconds) == (5, 2.0, 5.0)
    assert (args.sse_steps, args.sse_refine) == ((25, 50, 100, 200, 400, 800), 3)
    assert args.rules == ROOT / "rules.yaml"
    with pytest.raises(SystemExit):
        run.parse_args(["--duration", "0"])
    with pytest.raises(SystemExit):
        run.parse_args(["--sse-refine", "-1"])
    assert run.parse_args(["--sse-refine", "0"]).sse_refine == 0


def test_run_py_starts_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: run.py [-h] [--duration DURATION]")
