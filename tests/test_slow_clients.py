"""Slow clients (slowloris) against a real ``gateway serve`` process, over real sockets: a
client that sends its request's head a byte at a time, or keeps a connection idle, is cut
off by the header and keep-alive timeouts, and others are served meanwhile.

The bounds are generous (the timeout plus seconds) but always shorter than the other
timeout, so that each close can only come from the timeout under test."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from gateway.cli import main
from gateway.runtime import MAX_FIELD_SIZE, MAX_HEADERS, free_port
from gateway.settings import Settings
from tests.conftest import process_env, rules_yaml, start_serve
from tests.upstream import Upstream

REPO = Path(__file__).parent.parent
HEADER_TIMEOUT = 0.5
KEEPALIVE_TIMEOUT = 6.0
SLACK = 3.5  # what a noisy machine may add to a timeout; less than KEEPALIVE_TIMEOUT - 2
# A request whose head never ends: trickled at TRICKLE seconds a byte, it lasts far longer
# than any bound below.
ENDLESS_HEAD = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Padding: " + b"a" * 400
TRICKLE = 0.05
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


@pytest.fixture
def serve_env(
    database_url: str, redis_url: str, schema: str, upstream: tuple[Upstream, str], tmp_path: Path
) -> dict[str, str]:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(rules_yaml(upstream[1]))
    return process_env(
        database_url, redis_url, schema, rules_file, GATEWAY_DATA_DIR=str(tmp_path / "data")
    )


@pytest.fixture
async def port(serve_env: dict[str, str]) -> AsyncIterator[int]:
    """The port of a ``gateway serve`` given its timeouts through the environment."""
    env = serve_env | {
        "GATEWAY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "GATEWAY_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
    }
    port = free_port()
    proc = await start_serve(env, port)
    yield port
    await stop(proc)


async def stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        assert await asyncio.wait_for(proc.wait(), timeout=20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` a byte at a time until all is sent or the server hangs up."""
    for byte in data:
        if writer.transport.is_closing():
            return
        writer.write(bytes([byte]))
        try:
            await writer.drain()
        except ConnectionError:
            return
        await asyncio.sleep(TRICKLE)


async def until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """What the server sent before it closed the connection; fails unless it closed it
    within ``within`` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        pytest.fail(f"the connection was still open after {within}s")


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One response to HEALTHZ: its status line."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0]


async def test_a_client_trickling_its_headers_is_cut_off_while_others_are_served(
    port: int, http: aiohttp.ClientSession
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    trickling = asyncio.create_task(trickle(writer, ENDLESS_HEAD))
    try:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        # Cut off mid-head, unanswered, although bytes kept coming: they do not extend
        # the deadline.
        assert await until_closed(reader, HEADER_TIMEOUT + SLACK) == b""
    finally:
        trickling.cancel()
        writer.close()


async def test_a_kept_alive_connection_has_the_same_deadline_for_its_next_request(
    port: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEALTHZ)
    assert await answer(reader) == b"HTTP/1.1 200 OK"
    await asyncio.sleep(0.3)
    trickling = asyncio.create_task(trickle(writer, ENDLESS_HEAD))
    try:
        # Sooner than the keep-alive timeout: the next request's first byte started a
        # header deadline.
        assert await until_closed(reader, HEADER_TIMEOUT + SLACK) == b""
    finally:
        trickling.cancel()
        writer.close()


@pytest.mark.slow
async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    port: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEALTHZ)
        assert await answer(reader) == b"HTTP/1.1 200 OK"
        # Idle for three header timeouts, but kept alive: the header deadline ended with
        # the first request's head.
        await asyncio.sleep(3 * HEADER_TIMEOUT)
        writer.write(HEALTHZ)
        assert await answer(reader) == b"HTTP/1.1 200 OK"
        assert await until_closed(reader, KEEPALIVE_TIMEOUT + SLACK) == b""
    finally:
        writer.close()


async def test_two_hundred_trickling_connections_do_not_stop_a_request(
    port: int, http: aiohttp.ClientSession
) -> None:
    connections = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", port) for _ in range(200))
    )
    trickling = [asyncio.create_task(trickle(w, ENDLESS_HEAD)) for _, w in connections]
    try:
        closed = asyncio.gather(*(until_closed(r, HEADER_TIMEOUT + SLACK) for r, _ in connections))
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        assert await closed == [b""] * 200
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
    finally:
        for task in trickling:
            task.cancel()
        for _, writer in connections:
            writer.close()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([b"X-Long: " + b"a" * MAX_FIELD_SIZE], b"200"),
        ([b"X-Long: " + b"a" * (MAX_FIELD_SIZE + 1)], b"400"),
        ([b"X-%d: 1" % i for i in range(MAX_HEADERS - 1)], b"200"),  # Host is one
        ([b"X-%d: 1" % i for i in range(MAX_HEADERS)], b"400"),
    ],
    ids=["longest-header", "longer-header", "most-headers", "more-headers"],
)
async def test_a_request_head_is_bounded_in_size(
    port: int, headers: list[bytes], status: bytes
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEALTHZ[:-2] + b"".join(h + b"\r\n" for h in headers) + b"\r\n")
        response = await until_closed(reader, 10) if status == b"400" else await answer(reader)
        assert response.split(b"\r\n", 1)[0].split(b" ")[1] == status
    finally:
        writer.close()


@pytest.mark.slow
async def test_the_options_override_the_environment_in_every_worker(
    serve_env: dict[str, str],
) -> None:
    env = serve_env | {"GATEWAY_HEADER_TIMEOUT": "60", "GATEWAY_KEEPALIVE_TIMEOUT": "60"}
    port = free_port()
    supervisor = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway.cli", "serve", "--workers", "2"),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--header-timeout", str(HEADER_TIMEOUT), "--keepalive-timeout", "30"),
        env=env,
        cwd=REPO,
    )
    connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    trickling: list[asyncio.Task[None]] = []

    def listeners() -> int:
        workers = psutil.Process(supervisor.pid).children()
        return sum(
            any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)
            for conns in (w.net_connections("tcp") for w in workers)
        )

    try:
        for _ in range(300):
            if listeners() == 2:
                break
            await asyncio.sleep(0.1)
        assert listeners() == 2
        # The kernel spreads connections over both workers: with 20, each gets some.
        connections = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(20))
        )
        trickling = [asyncio.create_task(trickle(w, ENDLESS_HEAD)) for _, w in connections]
        closed = [until_closed(r, HEADER_TIMEOUT + SLACK) for r, _ in connections]
        assert await asyncio.gather(*closed) == [b""] * 20
    finally:
        for task in trickling:
            task.cancel()
        for _, writer in connections:
            writer.close()
        await stop(supervisor)


def test_the_timeouts_are_serve_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    usage = capsys.readouterr().out
    assert "--header-timeout SECONDS" in usage and "--keepalive-timeout SECONDS" in usage


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--header-timeout", "0"], "must be a positive number of seconds, got '0'"),
        (["--keepalive-timeout", "soon"], "'soon' is not a number of seconds"),
    ],
)
def test_serve_refuses_a_timeout_that_is_not_a_duration(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", *argv])
    assert info.value.code == 2
    assert f"gateway serve: error: argument {argv[0]}: {message}\n" in capsys.readouterr().err


def test_the_environment_is_checked_whole() -> None:
    with pytest.raises(ValueError) as info:
        Settings.from_env({"GATEWAY_HEADER_TIMEOUT": "-1", "GATEWAY_KEEPALIVE_TIMEOUT": "inf"})
    assert str(info.value) == (
        "GATEWAY_HEADER_TIMEOUT: must be a positive number of seconds, got '-1'; "
        "GATEWAY_KEEPALIVE_TIMEOUT: must be a positive number of seconds, got 'inf'"
    )
    settings = Settings.from_env({"GATEWAY_HEADER_TIMEOUT": "2.5"})
    assert (settings.header_timeout, settings.keepalive_timeout) == (2.5, 15.0)
