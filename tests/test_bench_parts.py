"""The benchmark's parts without running a benchmark: the stream ladder's arithmetic, the
verdict against each bar, the side-by-side and stream tables, the whole-run ledger check,
the bench's routes (loaded as the gateway loads rules) and the bench upstream (its counts,
its usage path, its N-event streams), each asserted to the exact value."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bench import run, upstream
from bench.breakdown import breakdown, breakdown_lines, parse_metrics
from bench.errors import BenchError
from bench.hot_account import HotAccount
from bench.ledger_check import JournalSummary, Snapshot, judge_run
from bench.limits import add_bench_routes, bench_rules
from bench.load import Load
from bench.report import (
    Bar,
    Outcome,
    Result,
    bars,
    run_ledger_lines,
    side_by_side,
    streams_table,
    verdict_table,
)
from bench.services import counted_between
from bench.sse import (
    StreamStep,
    combine_streams,
    held,
    ladder,
    ladder_steps,
    ladders,
    stagger,
)
from bench.workload import (
    BODY,
    FORWARDED_BY_GATEWAY,
    PATH,
    STREAM_BODY,
    USAGE_PATH,
    usage_charge,
)
from gateway.rules.loading import load_rules

ROOT = Path(__file__).resolve().parent.parent


def load(rps: float = 100.0, p50: float = 10.0, p99: float = 20.0) -> Load:
    return Load("wrk", 10.0, 1000, 1000, 0, {}, rps, p50, p99)


def step(streams: int, p99: float, **kw: object) -> StreamStep:
    fields: dict[str, object] = {
        "target": "gateway",
        "streams": streams,
        "measured": 2 * streams,
        "ttfb_p50_ms": p99 / 2,
        "ttfb_p99_ms": p99,
        "non_2xx": 0,
        "incomplete": 0,
        "errors": {},
    }
    fields.update(kw)
    return StreamStep(**fields)  # type: ignore[arg-type]


# -- options -----------------------------------------------------------------------------


def test_only_selects_parts_in_the_run_order() -> None:
    assert run.parse_args(["--only", "hot,throughput"]).only == ("throughput", "hot")
    assert run.parts(" sse , latency ") == ("latency", "sse")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^unknown part\(s\) speed; choose"):
        run.parts("speed,hot")
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "workers", "--gateway-workers", "2"])


def test_ladder_steps_are_increasing_positive_numbers() -> None:
    assert ladder_steps("25,50,100") == (25, 50, 100)
    for bad in ("", "50,25", "0,10", "10,10"):
        with pytest.raises(ValueError, match=r"^must be increasing positive numbers"):
            ladder_steps(bad)
    assert run.parse_args(["--sse-steps", "10,20"]).sse_steps == (10, 20)


# -- streams -----------------------------------------------------------------------------


def test_streams_start_spread_over_the_ramp_and_the_processes() -> None:
    assert stagger(4, 2, 1.0) == [[0.0, 0.5], [0.25, 0.75]]
    assert stagger(3, 8, 0.3) == [[0.0], [pytest.approx(0.1)], [pytest.approx(0.2)]]


def test_a_step_holds_when_every_stream_is_whole_and_p99_within_the_limit() -> None:
    assert step(25, 50.0).holds()
    assert step(25, 50.1).why_not() == "TTFB p99 50.1 ms > 50 ms"
    broken = step(25, 10.0, non_2xx=2, incomplete=1, errors={"ClientOSError": 3})
    assert not broken.holds()
    assert broken.why_not() == "2 non-2xx; 1 incomplete; errors ClientOSError 3"
    assert step(25, math.nan, measured=0).why_not() == "no stream started within the window"


def test_held_is_the_largest_held_step_below_every_miss() -> None:
    assert held([step(25, 5.0), step(50, 20.0), step(100, 80.0)]) == 50
    assert held([step(25, 60.0), step(50, 20.0)]) == 0
    assert held([]) == 0
    # a halving that held, one that missed, and a noisy hold above a miss (not counted)
    assert held([step(50, 9.0), step(100, 80.0), step(75, 40.0), step(87, 51.0)]) == 75
    assert held([step(50, 9.0), step(100, 80.0), step(75, 60.0), step(90, 40.0)]) == 50


def test_the_ladder_climbs_to_the_first_miss_then_halves_the_gap() -> None:
    """A target that holds up to 160 streams: the doublings say 100 to 199, three halvings
    say 150 to 161."""
    asked: list[int] = []

    def target(n: int) -> StreamStep:
        asked.append(n)
        return step(n, 10.0 if n <= 160 else 90.0)

    steps = ladder((25, 50, 100, 200, 400), 3, target)
    assert asked == [25, 50, 100, 200, 150, 175, 162]
    assert [s.streams for s in steps] == asked
    assert held(steps) == 150
    # the halvings stop once the gap is closed; none when every step held or none asked
    asked.clear()
    assert held(ladder((158, 163), 10, target)) == 160
    assert asked == [158, 163, 160, 161]
    asked.clear()
    assert held(ladder((25, 50), 3, target)) == 50 and asked == [25, 50]
    asked.clear()
    into: list[StreamStep] = []
    assert ladder((100, 200), 0, target, into) is into and asked == [100, 200]


def test_ladders_side_by_side_take_a_step_of_each_in_turn() -> None:
    """Each round runs the next step of every ladder still climbing, the order turned
    round every round; each ladder climbs and halves exactly as it would alone."""
    asked: list[tuple[str, int]] = []

    def target(label: str, limit: int) -> Callable[[int], StreamStep]:
        def run(n: int) -> StreamStep:
            asked.append((label, n))
            return step(n, 10.0 if n <= limit else 90.0)

        return run

    done: dict[str, list[StreamStep]] = {"a": [], "b": []}
    ladders((25, 50, 100, 200), 2, {"a": target("a", 160), "b": target("b", 60)}, done)
    assert asked == [
        ("a", 25), ("b", 25),
        ("b", 50), ("a", 50),
        ("a", 100), ("b", 100),  # b's first miss: it halves from here
        ("b", 75), ("a", 200),  # a's first miss
        ("a", 150), ("b", 62),  # b's last halving
        ("a", 175),
    ]  # fmt: skip
    alone = {label: ladder((25, 50, 100, 200), 2, target(label, limit)) for label, limit in
             (("a", 160), ("b", 60))}  # fmt: skip
    assert {k: [s.streams for s in v] for k, v in done.items()} == {
        k: [s.streams for s in v] for k, v in alone.items()
    }
    assert (held(done["a"]), held(done["b"])) == (150, 50)


def test_stream_outcomes_combine_into_one_step() -> None:
    outcomes = [
        {"ttfbs": [0.004, 0.001], "statuses": {200: 2}, "errors": {}, "incomplete": 1},
        {"ttfbs": [0.002, 0.003], "statuses": {200: 1, 429: 1}, "errors": {"X": 1},
         "incomplete": 0},
    ]  # fmt: skip
    assert combine_streams("passthrough", 4, outcomes) == StreamStep(
        target="passthrough",
        streams=4,
        measured=4,
        ttfb_p50_ms=2.0,
        ttfb_p99_ms=4.0,
        non_2xx=1,
        incomplete=1,
        errors={"X": 1},
    )
    with pytest.raises(BenchError, match=r"^the stream clients failed: OSError: boom$"):
        combine_streams("gateway", 4, [{"failed": "OSError: boom"}])


# -- the verdict -------------------------------------------------------------------------


def outcome() -> Outcome:
    return Outcome(
        throughput=[
            Result("upstream", "u", load(rps=4000.0), {"upstream": 80.0}),
            Result("passthrough", "p", load(rps=1000.0), {"passthrough": 60.0, "upstream": 30.0}),
            Result(
                "gateway",
                "g",
                load(rps=350.0, p99=80.0),
                {"gateway": 70.0, "postgres": 35.0, "redis": 7.0},
            ),
            Result("gateway usage", "g", load(rps=200.0), {}),
        ],
        latency=[
            Result("upstream", "u", load(p50=0.2, p99=1.0), {}),
            Result("passthrough", "p", load(p50=0.8, p99=2.0), {}),
            Result("gateway", "g", load(p50=1.5, p99=5.0), {}),
        ],
        streams={
            "passthrough": [step(25, 5.0), step(50, 9.0), step(100, 70.0)],
            "gateway": [step(25, 20.0), step(50, 60.0)],
            "gateway usage": [step(25, 55.0)],
        },
        hot=HotAccount(pairs=30_000, seconds=5.0, concurrency=64, violations=0),
        hot_leased=HotAccount(pairs=60_000, seconds=5.0, concurrency=64, violations=0, leased=True),
        workers=[
            Result(
                "gateway 1 worker",
                "g",
                load(rps=300.0),
                {"gateway": 90.0, "load gen": 20.0, "machine": 80.0},
            ),
            Result(
                "gateway 2 workers",
                "g",
                load(rps=510.0),
                {"gateway": 160.0, "load gen": 30.0, "machine": 97.0},
            ),
        ],
    )


def test_each_part_is_judged_against_its_bar() -> None:
    assert bars(outcome()) == [
        Bar("throughput", "req/s at 32 connections, gateway / passthrough", "0.35x", ">= 0.3x",
            True),
        Bar("  extra", "the same, usage-priced route", "0.20x", "", None),
        Bar("latency", "p50 added at 1 connection, gateway - passthrough", "+0.70 ms",
            "<= 1.0 ms", True),
        Bar("latency", "p99 added at 1 connection, gateway - passthrough", "+3.00 ms",
            "<= 2.5 ms", False),
        Bar("hot account", "durable reserve+commit pairs/s, 64 callers", "6,000/s",
            ">= 5,000/s", True),
        Bar("  extra", "the same, holds made 64 a round trip (leases)", "12,000/s", "", None),
        Bar("sse", "20-event streams held (TTFB p99 <= 50 ms), 25 / 50", "0.50x", ">= 0.85x",
            False),
        Bar("  extra", "streams held on the usage-priced route: 0", "0.00x", "", None),
        Bar("workers", "req/s 2 workers / 1; load gen 30% CPU, machine 97%", "1.70x",
            ">= 1.6x", True),
        Bar("  extra", "gateway CPU ms per request, 1 worker / 2", "3.00 / 3.14", "", None),
        Bar("  extra", "the machine's ceiling: all CPUs busy, against 80% with 1 worker",
            "1.25x", "", None),
    ]  # fmt: skip


def test_a_part_not_run_is_not_judged_and_nan_is_not_a_pass() -> None:
    assert bars(Outcome()) == []
    nothing = Outcome(
        throughput=[
            Result("passthrough", "p", load(rps=0.0), {}),
            Result("gateway", "g", load(rps=0.0), {}),
        ]
    )
    assert [(b.value, b.passed, b.mark()) for b in bars(nothing)] == [("nanx", None, "")]


def test_verdict_and_side_by_side_tables() -> None:
    lines = verdict_table(bars(outcome())[:2])
    assert lines == [
        "part         measure                                                             value"
        "  bar        result",
        "throughput   req/s at 32 connections, gateway / passthrough                      0.35x"
        "  >= 0.3x    PASS",
        "  extra      the same, usage-priced route                                        0.20x",
    ]
    assert side_by_side(outcome()) == [
        "                                         upstream    passthrough        gateway"
        "  gateway usage",
        "req/s, 32 connections                       4,000          1,000            350"
        "            200",
        "  p99 ms, 32 connections                    20.00          20.00          80.00"
        "          20.00",
        "  CPU ms per request: server                 0.20           0.60           2.00"
        "            nan",
        "  ... with postgres and redis                   -              -           3.20"
        "            nan",
        "p50 ms, 1 connection                         0.20           0.80           1.50"
        "              -",
        "p99 ms, 1 connection                         1.00           2.00           5.00"
        "              -",
        "streams held (TTFB p99 <= 50 ms)                -             50             25"
        "              0",
    ]
    assert side_by_side(Outcome()) == []


def test_streams_table_shows_every_step_with_its_verdict() -> None:
    steps = [
        step(25, 20.0, cpu={"gateway": 40.0, "upstream": 10.0, "load gen": 30.0, "machine": 80.0}),
        step(50, 60.0),
    ]
    assert streams_table({"gateway": steps}) == [
        "streams: 20 events each; TTFB = request sent to first byte of body",
        "target          streams measured  TTFB p50  TTFB p99  server % upstream % clients %"
        " machine %  verdict",
        "gateway              25       50     10.00     20.00        40         10        30"
        "        80  holds",
        "gateway              50      100     30.00     60.00         -          -         -"
        "         -  TTFB p99 60.0 ms > 50 ms",
    ]
    assert streams_table({}) == []


# -- the whole run's ledger --------------------------------------------------------------


def snapshot(available: int, still_held: int = 0) -> Snapshot:
    return Snapshot(available=available, reserved=0, held=still_held, last_entry=0)


def test_the_ledger_accounts_for_every_forwarded_request_at_its_price() -> None:
    prices = {PATH: 1, USAGE_PATH: 11}
    journal = JournalSummary({"commit": 110, "refund": 7, "reserve": 117}, {})
    check = judge_run(
        snapshot(10_000), snapshot(10_000 - 100 - 110), journal,
        forwarded={PATH: 100, USAGE_PATH: 10}, prices=prices, violations=[],
    )  # fmt: skip
    assert (check.problems, check.expected_drop, check.verdict()) == ([], 210, "ok")
    assert run_ledger_lines(check) == [
        "ledger check (the whole run, every part): ok",
        "  requests the upstream answered the gateway, by path, at their price:",
        "    /v1/chat/completions                    100 x 1",
        "    /v1/usage/chat/completions               10 x 11",
        "  'general' balance fell by 210 (forwarded requests cost 210)",
        "  journal: 110 commit(s) for 110 forwarded, 7 refund(s) (not forwarded: the client had "
        "gone), 0 expiry(ies); 0 held after",
        "  audit: every invariant holds",
    ]

    journal = JournalSummary({"commit": 109, "expire": 1}, {})
    check = judge_run(
        snapshot(10_000), snapshot(9_800, still_held=2), journal,
        forwarded={PATH: 100, USAGE_PATH: 10, "/v1/other": 1}, prices=prices,
        violations=["x: y"],
    )  # fmt: skip
    assert check.problems == [
        "the upstream answered the gateway on unexpected path(s): ['/v1/other']",
        "109 commits for 111 requests forwarded",
        "the balance fell by 200, the forwarded requests cost 210",
        "1 expired reservation(s)",
        "2 reservation(s) still held",
        "ledger audit: 1 violation(s)",
    ]
    assert run_ledger_lines(check)[-7:-6] == ["  audit: violation: x: y"]


def test_counts_between_two_readings() -> None:
    assert counted_between({PATH: 5}, {PATH: 8, USAGE_PATH: 2}) == {PATH: 3, USAGE_PATH: 2}
    assert counted_between({PATH: 5}, {PATH: 5}) == {}


def test_prices_of_the_bench_paths() -> None:
    # "Hello": 2 prompt tokens, 50 completion tokens: (2 * 100 + 50 * 200) / 1000, rounded up.
    assert usage_charge(2, 50) == 11
    assert usage_charge(0, 5) == 1
    assert run.prices() == {PATH: 1, USAGE_PATH: 11}


# -- the bench's rules -------------------------------------------------------------------


def test_bench_routes_come_first_and_load_as_the_gateway_loads_them(tmp_path: Path) -> None:
    doc = add_bench_routes({"upstreams": {"backend": {}}, "routes": [{"name": "theirs"}]})
    assert doc["routes"][:2] == [
        {"name": "bench_fixed", "method": "POST", "upstream": "backend", "token_type": "general",
         "path": PATH, "cost": 1},
        {"name": "bench_usage", "method": "POST", "upstream": "backend", "token_type": "general",
         "path": USAGE_PATH, "usage": {"format": "openai", "rates": {"input": 100, "output": 200},
                                       "hold": 20, "on_missing_usage": "hold"}},
    ]  # fmt: skip
    assert doc["routes"][2] == {"name": "theirs"}

    written = bench_rules(ROOT / "rules.yaml", "bench", tmp_path / "rules.yaml")
    rules = load_rules(written)
    assert [r.config.name for r in rules.routes][:2] == ["bench_fixed", "bench_usage"]
    assert yaml.safe_load(written.read_text())["routes"][0]["upstream"] == "ai_backend"


# -- the bench upstream ------------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = TestClient(TestServer(upstream.make_app(), host="127.0.0.1"))
    await client.start_server()
    yield client
    await client.close()


async def test_the_upstream_counts_what_the_gateway_forwarded(
    client: TestClient[web.Request, web.Application],
) -> None:
    gateway = {FORWARDED_BY_GATEWAY: "bench"}
    for headers in (gateway, gateway, {}):
        async with client.post(PATH, data=BODY, headers=headers) as resp:
            assert resp.status == 200
    async with client.post(USAGE_PATH, data=BODY, headers=gateway) as resp:
        answer = await resp.json()
    assert answer["usage"]["prompt_tokens"] == 2
    assert answer["usage"]["completion_tokens"] == 50
    async with client.get("/_bench/forwarded") as resp:
        assert await resp.json() == {
            "gateway": {PATH: 2, USAGE_PATH: 1},
            "direct": {PATH: 1},
        }


async def test_the_upstream_streams_n_events_then_usage_and_done(
    client: TestClient[web.Request, web.Application],
) -> None:
    async with client.post(f"{PATH}?events=3", data=STREAM_BODY) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        text = await resp.text()
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [
        {"role": "assistant", "content": "word"},
        {"content": " word"},
        {"content": " word"},
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert [c["usage"] for c in chunks[:4]] == [None] * 4
    assert (chunks[4]["choices"], chunks[4]["usage"]["total_tokens"]) == ([], 52)
    assert len(chunks) == 5


# -- the gateway's time per request ------------------------------------------------------

METRICS_BEFORE = """\
# HELP gateway_request_duration_seconds Whole metered request, until settled
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{le="0.005",route="bench_fixed"} 1.0
gateway_request_duration_seconds_count{route="bench_fixed"} 10.0
gateway_request_duration_seconds_sum{route="bench_fixed"} 0.1
gateway_ledger_duration_seconds_count{operation="reserve"} 10.0
gateway_ledger_duration_seconds_sum{operation="reserve"} 0.02
gateway_redis_duration_seconds_sum 0.01
"""
METRICS_AFTER = """\
gateway_request_duration_seconds_count{route="bench_fixed"} 110.0
gateway_request_duration_seconds_sum{route="bench_fixed"} 1.1
gateway_request_duration_seconds_count{route="bench_usage"} 100.0
gateway_request_duration_seconds_sum{route="bench_usage"} 1.0
gateway_ledger_duration_seconds_sum{operation="reserve"} 0.22
gateway_ledger_duration_seconds_sum{operation="commit"} 0.3
gateway_ledger_duration_seconds_sum{operation="refund"} 5.0
gateway_redis_duration_seconds_sum 0.11
gateway_upstream_duration_seconds_sum{upstream="ai_backend"} 0.8
gateway_gc_pause_seconds_count{generation="0"} 40.0
gateway_gc_pause_seconds_sum{generation="0"} 0.012
gateway_gc_pause_seconds_count{generation="2"} 1.0
gateway_gc_pause_seconds_sum{generation="2"} 0.0605
"""


def test_the_gateways_histograms_break_a_request_down() -> None:
    assert (
        parse_metrics(METRICS_BEFORE)[
            ("gateway_request_duration_seconds_count", 'route="bench_fixed"')
        ]
        == 10.0
    )
    found = breakdown(parse_metrics(METRICS_BEFORE), parse_metrics(METRICS_AFTER))
    assert found.requests == 200
    assert found.whole_ms == pytest.approx(10.0)
    assert found.phases == pytest.approx(
        {"limits (Redis)": 0.5, "ledger reserve": 1.0, "upstream exchange": 4.0,
         "ledger commit": 1.5}
    )  # fmt: skip
    assert found.own_ms == pytest.approx(3.0)
    assert (found.gc_pauses, found.gc_ms) == (41, pytest.approx(72.5))
    assert math.isnan(breakdown({}, {}).whole_ms)
    assert breakdown_lines({"c=1": found}) == [
        "where a gateway request's time goes: mean ms per request, from its /metrics",
        "phase                                          c=1",
        "limits (Redis)                                0.50",
        "ledger reserve                                1.00",
        "upstream exchange                             4.00",
        "ledger commit                                 1.50",
        "own work and waits for a CPU                  3.00",
        "whole request, until settled                 10.00",
        "requests observed                              200",
        "collector pauses (all requests)                 41",
        "  ms paused, in all                           72.5",
    ]
    assert breakdown_lines({}) == []
