"""The profile's summary from py-spy's raw stacks: frames parsed, the loop's frames
dropped, each sample charged to one area, functions counted self and inclusive."""

from __future__ import annotations

from bench.profile import (
    AIOHTTP_SHARED,
    EVENT_LOOP,
    Frame,
    by_area,
    by_function,
    parse_frame,
    parse_raw,
    summary_lines,
)

ROOT = (
    'process 42:"python gateway serve";<module> (gateway:6);main (gateway/cli.py:209);'
    "run_async (gateway/runtime.py:311);run (uvloop/__init__.py:92);"
    "Runner.run (asyncio/runners.py:118)"
)
RAW = "\n".join(
    [
        f"{ROOT} 10",  # the loop's own work (uvloop is C)
        f"{ROOT};handle (gateway/pipeline.py:40);admit (gateway/limits/store.py:88);"
        "execute_command (redis/asyncio/client.py:600);write (asyncio/streams.py:30) 5",
        f"{ROOT};handle (gateway/pipeline.py:40);verify (gateway/auth.py:99);"
        "decode (jwt/api_jwt.py:200);compare_digest (hmac.py:40) 3",
        f"{ROOT};Exchange._send (gateway/exchange.py:300);ClientSession._request "
        "(aiohttp/client.py:700);StreamWriter._write (aiohttp/http_writer.py:80) 4",
        f"{ROOT};RequestHandler.start (aiohttp/web_protocol.py:500);"
        "StreamWriter._write (aiohttp/http_writer.py:80) 2",
        f"{ROOT};StreamWriter._write (aiohttp/http_writer.py:80) 1",
        f"{ROOT};handle (gateway/pipeline.py:40);uuid4 (uuid.py:700) 2",
        f"{ROOT};LedgerSeam._fetch (gateway/ledger/seam.py:221);"
        "Connection._do_execute (asyncpg/connection.py:2069) 3",
        "not a stack line",
    ]
)


def test_frames_parse_function_and_file() -> None:
    assert parse_frame("Exchange.run (gateway/exchange.py:130)") == Frame(
        "Exchange.run", "gateway/exchange.py"
    )
    assert parse_frame("<module> (gateway:6)") == Frame("<module>", "gateway")
    assert parse_frame('process 42:"python x"') == Frame('process 42:"python x"', "")
    long = Frame("f", "/usr/lib/python3.11/site-packages/aiohttp/web.py")
    assert long.label == "f (aiohttp/web.py)"


def test_each_sample_is_charged_to_one_area() -> None:
    stacks = parse_raw(RAW)
    assert sum(stacks.values()) == 30
    assert by_area(stacks) == {
        EVENT_LOOP: 10,
        "Redis client": 5,
        "JWT": 3,
        "aiohttp client": 4,
        "aiohttp server": 2,
        AIOHTTP_SHARED: 1,
        "our code": 2,
        "asyncpg": 3,
    }


def test_functions_self_and_inclusive_without_the_loops_frames() -> None:
    stacks = parse_raw(RAW)
    assert by_function(stacks, inclusive=False).most_common(2) == [
        ("Runner.run (asyncio/runners.py)", 10),
        ("StreamWriter._write (aiohttp/http_writer.py)", 7),
    ]
    inclusive = by_function(stacks, inclusive=True)
    assert inclusive["handle (gateway/pipeline.py)"] == 10
    assert "main (gateway/cli.py)" not in inclusive  # above the loop: under everything


def test_summary_in_percent_of_samples() -> None:
    lines = summary_lines(parse_raw(RAW), limit=2)
    assert lines[:4] == [
        "profile of the gateway: 30 samples of a busy process (py-spy)",
        "by area (each sample charged to the innermost library or our code on its stack):",
        f"   33.3%  {EVENT_LOOP}",
        "   16.7%  Redis client",
    ]
    assert lines[-3:] == [
        "by function, inclusive (ours):",
        "   33.3%  handle (gateway/pipeline.py)",
        "   16.7%  admit (gateway/limits/store.py)",
    ]
    assert summary_lines(parse_raw("")) == ["profile: no samples"]
