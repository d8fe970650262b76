"""gateway.sweeper: of many gateway processes, exactly one sweeps the ledger, and when it
stops or dies another takes over within one interval. Real PostgreSQL; several sweepers
(each with its own pool, as separate processes have), several apps, and real processes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.errors import ConfigError
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.metrics import Metrics
from gateway.rules import parse_rules
from gateway.runtime import free_port
from gateway.sweeper import Sweeper, sweeper_mode
from tests.conftest import ENVIRON, Clock, process_env, rules_yaml, start_serve

Client = TestClient[web.Request, web.Application]

INTERVAL = 0.2
PATIENCE = 15.0  # seconds to wait for what should happen within an interval or two

# The sweeper lock of one schema, as pg_locks shows it.
LOCK_HOLDERS = """
SELECT pid FROM pg_locks
 WHERE locktype = 'advisory' AND granted AND objsubid = 2
   AND classid = hashtext('metering-gateway')::oid AND objid = hashtext('sweeper:' || $1)::oid
"""


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll ``check`` until it holds, failing after ``PATIENCE`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while True:
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {PATIENCE}s: {what}")
        await asyncio.sleep(0.05)


def expired_tokens(metrics: Metrics, token_type: str = "general") -> float:
    value = metrics.registry.get_sample_value(
        "gateway_tokens_total", {"token_type": token_type, "movement": "expired"}
    )
    return value or 0.0


def leader_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("gateway_sweeper_leader")


class Process:
    """What one gateway process brings to the election: its own pool, metrics and sweeper."""

    def __init__(self, ledger: Ledger, sweeper: Sweeper, metrics: Metrics) -> None:
        self.ledger = ledger
        self.sweeper = sweeper
        self.metrics = metrics
        self.task = asyncio.create_task(sweeper.run())

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@asynccontextmanager
async def processes(
    n: int, database_url: str, schema: str, clock: Clock, *, mode: str = "leader"
) -> AsyncIterator[list[Process]]:
    started: list[Process] = []
    try:
        for _ in range(n):
            ledger = await Ledger.connect(
                database_url, schema=schema, clock=clock, min_size=1, max_size=2
            )
            metrics = Metrics()
            sweeper = Sweeper(
                ledger,
                metrics,
                interval=lambda: INTERVAL,
                mode=sweeper_mode({"GATEWAY_SWEEPER": mode}),
            )
            started.append(Process(ledger, sweeper, metrics))
        yield started
    finally:
        for p in started:
            await p.stop()
            await p.ledger.close()


@pytest.fixture
async def admin(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn: asyncpg.Connection = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


async def lock_holders(admin: asyncpg.Connection, schema: str) -> list[int]:
    return [r["pid"] for r in await admin.fetch(LOCK_HOLDERS, schema)]


def leaders(procs: list[Process]) -> list[Process]:
    return [p for p in procs if p.sweeper.leading]


async def test_one_of_several_sweepers_leads_and_expires_each_hold_once(
    ledger: Ledger, database_url: str, schema: str, clock: Clock, admin: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "pro")
    for _ in range(30):
        await ledger.reserve("acme", "general", 1, ttl_seconds=10)
    live = await ledger.reserve("acme", "general", 1, ttl_seconds=3600)
    async with processes(4, database_url, schema, clock) as procs:

        async def one_leads() -> bool:
            return len(leaders(procs)) == 1 and len(await lock_holders(admin, schema)) == 1

        await eventually(one_leads, "exactly one sweeper leads")
        [leader] = leaders(procs)
        assert [leader_gauge(p.metrics) for p in procs].count(1.0) == 1
        clock.advance(seconds=11)

        async def only_the_live_hold_is_left() -> bool:
            held = await ledger.held_reservations("acme")
            return [r.id for r in held] == [live.reservation_id]

        await eventually(only_the_live_hold_is_left, "the overdue holds expire")
        await asyncio.sleep(3 * INTERVAL)  # rounds that must find nothing more to do
        assert len(leaders(procs)) == 1 and leader.sweeper.leading
        assert [expired_tokens(p.metrics) for p in procs if p is not leader] == [0.0] * 3
        assert expired_tokens(leader.metrics) == 30.0
    journal = await ledger.journal("acme", limit=1000)
    expires = [row for row in journal if row["kind"] == "expire"]
    assert len(expires) == 30 and {row["actor"] for row in expires} == {"sweeper"}
    assert len({row["reservation_id"] for row in expires}) == 30
    assert await lock_holders(admin, schema) == []  # stopping released it
    await ledger.commit(live.reservation_id)  # type: ignore[arg-type]


async def test_a_stopped_leader_hands_the_role_over_within_an_interval(
    ledger: Ledger,
    database_url: str,
    schema: str,
    clock: Clock,
    admin: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.sweeper")
    await ledger.create_org("acme", "pro")
    async with processes(3, database_url, schema, clock) as procs:
        await eventually(lambda: len(leaders(procs)) == 1, "one sweeper leads")
        [first] = leaders(procs)
        await first.stop()
        assert not first.sweeper.leading and leader_gauge(first.metrics) == 0.0
        rest = [p for p in procs if p is not first]
        await eventually(lambda: len(leaders(rest)) == 1, "another sweeper takes over")
        [second] = leaders(rest)
        assert len(await lock_holders(admin, schema)) == 1
        # The new leader sweeps: a hold left behind now expires.
        await ledger.reserve("acme", "general", 3, ttl_seconds=1)
        clock.advance(seconds=2)
        await eventually(
            lambda: _holds(ledger, "acme", 0), "the new leader expires the overdue hold"
        )
        assert expired_tokens(second.metrics) == 3.0
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.sweeper"]
    became = [m for m in messages if m.startswith("this process is now the ledger sweeper")]
    stopped = [m for m in messages if m.startswith("this process is no longer")]
    assert len(became) == 2
    assert all(
        re.fullmatch(r".*holds the sweeper lock in PostgreSQL server process \d+", m)
        for m in became
    )
    # The first stepped down when stopped; the second when the test's end stopped it.
    assert stopped == ["this process is no longer the ledger sweeper: shutting down"] * 2


async def test_a_leader_whose_session_dies_is_replaced(
    ledger: Ledger, database_url: str, schema: str, clock: Clock, admin: asyncpg.Connection
) -> None:
    async with processes(3, database_url, schema, clock) as procs:
        await eventually(lambda: len(leaders(procs)) == 1, "one sweeper leads")
        [old_pid] = await lock_holders(admin, schema)
        # As when the leader's host or connection dies: PostgreSQL ends its session.
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", old_pid)

        async def one_new_holder() -> bool:
            holders = await lock_holders(admin, schema)
            return len(holders) == 1 and holders != [old_pid] and len(leaders(procs)) == 1

        await eventually(one_new_holder, "a sweeper leads on a new session")
        await asyncio.sleep(3 * INTERVAL)
        assert len(leaders(procs)) == 1


async def test_each_schema_elects_its_own_sweeper(
    ledger: Ledger, database_url: str, schema: str, clock: Clock, admin: asyncpg.Connection
) -> None:
    other = f"t_{uuid.uuid4().hex[:16]}"
    await admin.execute(f'CREATE SCHEMA "{other}"')
    try:
        other_ledger = await Ledger.connect(database_url, schema=other, clock=clock, max_size=2)
        try:
            await other_ledger.migrate()
        finally:
            await other_ledger.close()
        async with (
            processes(2, database_url, schema, clock) as here,
            processes(2, database_url, other, clock) as there,
        ):
            await eventually(
                lambda: len(leaders(here)) == len(leaders(there)) == 1,
                "one leader in each schema",
            )
            assert len(await lock_holders(admin, schema)) == 1
            assert len(await lock_holders(admin, other)) == 1
    finally:
        await admin.execute(f'DROP SCHEMA "{other}" CASCADE')


async def test_shared_mode_sweeps_everywhere_without_a_lock(
    ledger: Ledger, database_url: str, schema: str, clock: Clock, admin: asyncpg.Connection
) -> None:
    await ledger.create_org("acme", "pro")
    for _ in range(40):
        await ledger.reserve("acme", "general", 1, ttl_seconds=10)
    async with processes(3, database_url, schema, clock, mode="shared") as procs:
        await eventually(lambda: len(leaders(procs)) == 3, "every process sweeps")
        assert [leader_gauge(p.metrics) for p in procs] == [1.0] * 3
        clock.advance(seconds=11)
        await eventually(lambda: _holds(ledger, "acme", 0), "the overdue holds expire")
        assert sum(expired_tokens(p.metrics) for p in procs) == 40.0
        assert await lock_holders(admin, schema) == []
    expires = [r for r in await ledger.journal("acme", limit=1000) if r["kind"] == "expire"]
    assert len(expires) == 40


@pytest.mark.parametrize(
    ("environ", "mode"),
    [
        ({}, "leader"),
        ({"GATEWAY_SWEEPER": "leader"}, "leader"),
        ({"GATEWAY_SWEEPER": "Shared"}, "shared"),
        ({"GATEWAY_DB_POOLER": "none"}, "leader"),
        # Behind a transaction pooler no session is ours to hold a lock with.
        ({"GATEWAY_DB_POOLER": "pgbouncer"}, "shared"),
        ({"GATEWAY_DB_POOLER": "pgbouncer", "GATEWAY_SWEEPER": "shared"}, "shared"),
    ],
)
def test_sweeper_mode_from_the_environment(environ: dict[str, str], mode: str) -> None:
    assert sweeper_mode(environ) == mode


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"GATEWAY_SWEEPER": "bouncer"},
            "GATEWAY_SWEEPER: must be 'leader' or 'shared', got 'bouncer'",
        ),
        (
            {"GATEWAY_SWEEPER": "leader", "GATEWAY_DB_POOLER": "pgbouncer"},
            "GATEWAY_SWEEPER: 'leader' needs a PostgreSQL session of its own, which "
            "GATEWAY_DB_POOLER=pgbouncer (a transaction pooler) does not give; use 'shared'",
        ),
    ],
)
def test_a_sweeper_mode_that_cannot_work_is_refused_by_name(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        sweeper_mode(environ)
    assert str(exc.value) == message


async def test_apps_elect_one_sweeper_and_show_it_in_metrics(
    ledger: Ledger, limiter: Limiter
) -> None:
    text = rules_yaml("http://127.0.0.1:9").replace(
        "sweep_interval_seconds: 3600", f"sweep_interval_seconds: {INTERVAL}"
    )
    rules = parse_rules(text.encode(), "tests/rules_test.yaml")
    clients = [
        TestClient(TestServer(build_app(rules, ledger, limiter, environ=ENVIRON), host="127.0.0.1"))
        for _ in range(3)
    ]
    for client in clients:
        await client.start_server()
    try:

        async def gauges(of: list[Client]) -> list[str]:
            found = []
            for client in of:
                resp = await client.get("/metrics")
                body = await resp.text()
                match = re.search(r"^gateway_sweeper_leader (\S+)$", body, re.M)
                found.append(match.group(1) if match else "missing")
            return found

        async def one_leader(of: list[Client]) -> bool:
            return sorted(await gauges(of)) == ["0.0"] * (len(of) - 1) + ["1.0"]

        await eventually(lambda: one_leader(clients), "one app's /metrics shows the sweeper")
        leader = clients[(await gauges(clients)).index("1.0")]
        await leader.close()  # the app's cleanup stops its sweeper and ends its session
        rest = [c for c in clients if c is not leader]
        await eventually(lambda: one_leader(rest), "another app becomes the sweeper")
    finally:
        for client in clients:
            await client.close()


@pytest.mark.slow
async def test_a_killed_gateway_process_hands_over_and_its_holds_expire(
    tmp_path: Path,
    database_url: str,
    redis_url: str,
    schema: str,
    ledger: Ledger,
    http: aiohttp.ClientSession,
) -> None:
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(
        rules_yaml("http://127.0.0.1:9").replace(
            "sweep_interval_seconds: 3600", f"sweep_interval_seconds: {INTERVAL}"
        )
    )
    env = process_env(database_url, redis_url, schema, rules_file)
    ports = [free_port(), free_port()]
    procs = [await start_serve(env, port) for port in ports]
    try:

        async def gauge(port: int) -> str:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                match = re.search(r"^gateway_sweeper_leader (\S+)$", await resp.text(), re.M)
                return match.group(1) if match else "missing"

        async def one_leader(of: list[int]) -> bool:
            return sorted([await gauge(p) for p in of]) == ["0.0"] * (len(of) - 1) + ["1.0"]

        await eventually(lambda: one_leader(ports), "one process leads")
        gauges = [await gauge(p) for p in ports]
        dead = gauges.index("1.0")
        # Holds of requests in flight when the process dies (made here: the process has
        # none of its own); the survivor expires them once they are due.
        await ledger.create_org("acme", "pro")
        for _ in range(5):
            await ledger.reserve("acme", "general", 2, ttl_seconds=1)
        procs[dead].send_signal(signal.SIGKILL)
        await procs[dead].wait()
        survivor = ports[1 - dead]
        await eventually(lambda: one_leader([survivor]), "the other process takes over")
        await eventually(lambda: _holds(ledger, "acme", 0), "the dead process's holds expire")
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout=20)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
    expires = [r for r in await ledger.journal("acme", limit=100) if r["kind"] == "expire"]
    assert len(expires) == 5 and {r["actor"] for r in expires} == {"sweeper"}
    general = {a.token_type: a for a in await ledger.balances("acme")}["general"]
    assert (general.available, general.reserved) == (100, 0)


async def _holds(ledger: Ledger, org: str, n: int) -> bool:
    return len(await ledger.held_reservations(org)) == n
