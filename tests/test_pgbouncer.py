"""The ledger behind PgBouncer in transaction pooling mode (GATEWAY_DB_POOLER=pgbouncer),
the pool sizes (GATEWAY_DB_POOL_MIN, GATEWAY_DB_POOL_MAX), and connections refused for
want of slots, by PostgreSQL or by PgBouncer: a 503 to clients, and a log line that says
who refused and how to size the pools.

Each PgBouncer test starts a pgbouncer of its own (Debian's, which
scripts/install-pgbouncer.sh installs) in front of the tests' PostgreSQL. Without one they
skip, except under CI, where they fail. The tests log in as roles of their own: the
schema of a role behind the pooler is its search_path on the server, as the README says."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import build_app
from gateway.errors import LedgerUnavailable
from gateway.ledger import Ledger
from gateway.limits.limiter import Limiter
from gateway.rules import Rules
from gateway.runtime import free_port, open_ledger
from gateway.settings import Settings
from tests.conftest import ENVIRON, bearer
from tests.upstream import Upstream

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
SIZING = "workers x replicas x GATEWAY_DB_POOL_MAX must stay under"


@dataclass(frozen=True)
class Role:
    """A login role of one test's own, with a password (the server may ask for one)."""

    name: str
    password: str


def dsn(database_url: str, role: Role, *, port: int | None = None) -> str:
    """``database_url`` as ``role``, on another ``port`` (a PgBouncer's) if given."""
    parts = urlsplit(database_url)
    host = parts.hostname or "127.0.0.1"
    return (
        f"postgresql://{role.name}:{role.password}@{host}:{port or parts.port or 5432}"
        f"{parts.path or '/postgres'}"
    )


@pytest.fixture
async def roles(database_url: str, schema: str) -> AsyncIterator[Callable[..., Awaitable[Role]]]:
    """Makes roles that own this test's schema (and so may migrate it); drops them
    afterwards. With ``search_path``, the schema is the role's own (``ALTER ROLE ... SET
    search_path``); ``limit`` is its CONNECTION LIMIT."""
    made: list[Role] = []

    async def make(*, search_path: bool = True, limit: int = -1) -> Role:
        role = Role(f"gw_{secrets.token_hex(6)}", secrets.token_hex(12))
        conn = await asyncpg.connect(database_url)
        try:
            # Names made here, never from input: quoted, since DDL takes no parameters.
            await conn.execute(
                f"CREATE ROLE \"{role.name}\" LOGIN PASSWORD '{role.password}'"
                f" CONNECTION LIMIT {limit}"
            )
            made.append(role)
            if search_path:
                await conn.execute(f'ALTER ROLE "{role.name}" SET search_path = "{schema}"')
            await conn.execute(f'ALTER SCHEMA "{schema}" OWNER TO "{role.name}"')
        finally:
            await conn.close()
        return role

    yield make
    conn = await asyncpg.connect(database_url)
    try:
        for role in made:
            # The schema goes back to the tests' user, whose fixture drops it.
            await conn.execute(f'REASSIGN OWNED BY "{role.name}" TO CURRENT_USER')
            await conn.execute(f'DROP OWNED BY "{role.name}"')
            await conn.execute(f'DROP ROLE "{role.name}"')
    finally:
        await conn.close()


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found:
        return found
    reason = "pgbouncer is not installed (scripts/install-pgbouncer.sh installs Debian's)"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PgBouncer tests: {reason}")
    pytest.skip(reason)


@dataclass
class Bouncer:
    port: int
    database_url: str

    def dsn(self, role: Role) -> str:
        return dsn(self.database_url, role, port=self.port)


@pytest.fixture
async def bouncer(database_url: str) -> AsyncIterator[Callable[..., Awaitable[Bouncer]]]:
    """Starts pgbouncers in transaction pooling mode in front of the tests' PostgreSQL
    (its own host, port and database; trust from the clients, the roles' passwords to
    the server); stops them afterwards."""
    binary = pgbouncer_binary()
    server = urlsplit(database_url)
    started: list[tuple[asyncio.subprocess.Process, Path]] = []

    async def start(
        *users: Role, default_pool_size: int = 5, max_client_conn: int = 100
    ) -> Bouncer:
        workdir = Path(tempfile.mkdtemp(prefix="gateway-pgbouncer-"))
        port = free_port()
        (workdir / "users.txt").write_text("".join(f'"{u.name}" "{u.password}"\n' for u in users))
        # No ignore_startup_parameters: the gateway sends only parameters PgBouncer keeps
        # per client (client_encoding, timezone, application_name).
        (workdir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {workdir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {default_pool_size}\n"
            f"max_client_conn = {max_client_conn}\n"
        )
        log = workdir / "pgbouncer.log"
        # PgBouncer refuses to run as root; it reads its files before it drops to nobody.
        as_nobody = ["-u", "nobody"] if os.geteuid() == 0 else []
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                binary, *as_nobody, str(workdir / "pgbouncer.ini"), stdout=out, stderr=out
            )
        started.append((proc, workdir))
        for _ in range(100):
            if proc.returncode is not None:
                break
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return Bouncer(port, database_url)
        raise AssertionError(f"pgbouncer did not start:\n{log.read_text()}")

    yield start
    for proc, workdir in started:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def backends(database_url: str, role: Role) -> int:
    """The server connections ``role`` has open now."""
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role.name
        )
        return count
    finally:
        await conn.close()


async def all_gone(database_url: str, role: Role) -> None:
    """Until the server has ended every connection of ``role`` (a backend exits a moment
    after its client has closed)."""
    for _ in range(100):
        if await backends(database_url, role) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"role {role.name} still has server connections")


def environment(url: str, schema: str, **extra: str) -> Settings:
    return Settings.from_env({"DATABASE_URL": url, "GATEWAY_DB_SCHEMA": schema, **extra})


async def problem(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = json.loads(await resp.read())
    return body


# -- settings ------------------------------------------------------------------------------


def test_pool_sizes_and_the_pooler_come_from_the_environment() -> None:
    default = Settings.from_env({})
    assert (default.db_pool_min, default.db_pool_max, default.db_pooler) == (2, 20, None)
    settings = Settings.from_env(
        {"GATEWAY_DB_POOL_MIN": "0", "GATEWAY_DB_POOL_MAX": "5", "GATEWAY_DB_POOLER": "PgBouncer"}
    )
    assert (settings.db_pool_min, settings.db_pool_max, settings.db_pooler) == (0, 5, "pgbouncer")
    assert Settings.from_env({"GATEWAY_DB_POOLER": "none"}).db_pooler is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"GATEWAY_DB_POOL_MIN": "-1", "GATEWAY_DB_POOL_MAX": "many"},
            "GATEWAY_DB_POOL_MIN: must be at least 0, got '-1'; "
            "GATEWAY_DB_POOL_MAX: 'many' is not a whole number",
        ),
        ({"GATEWAY_DB_POOL_MAX": "0"}, "GATEWAY_DB_POOL_MAX: must be at least 1, got '0'"),
        (
            {"GATEWAY_DB_POOL_MIN": "30"},
            "GATEWAY_DB_POOL_MIN: 30 is more than GATEWAY_DB_POOL_MAX (20)",
        ),
        (
            {"GATEWAY_DB_POOLER": "pgpool"},
            "GATEWAY_DB_POOLER: must be pgbouncer or none, got 'pgpool'",
        ),
    ],
)
def test_bad_pool_settings_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        Settings.from_env(environ)
    assert str(info.value) == message


# -- through PgBouncer ---------------------------------------------------------------------


async def test_the_ledger_stays_exact_through_pgbouncer(
    database_url: str,
    schema: str,
    rules: Rules,
    roles: Callable[..., Awaitable[Role]],
    bouncer: Callable[..., Awaitable[Bouncer]],
) -> None:
    role = await roles()
    pgb = await bouncer(role, default_pool_size=5)
    # No schema given: the role's search_path is the ledger's.
    ledger = await Ledger.connect(pgb.dsn(role), pooler=True, max_size=20)
    try:
        assert await ledger.migrate() != []
        assert await ledger.migrate() == []  # the migrations were recorded in the schema
        await ledger.sync_plans(rules.plan_allowances())
        await ledger.create_org("acme", "pro")
        await ledger.grant("acme", "general", 50)  # 100 allowance + 50 purchased

        async def spend() -> str:
            held = await ledger.reserve("acme", "general", 1, ttl_seconds=60)
            await ledger.balances("acme")  # a read in between: one more client connection
            if held.reservation_id is None:
                return held.status
            await ledger.commit(held.reservation_id)
            return "committed"

        outcomes = await asyncio.gather(*(spend() for _ in range(200)))
        assert outcomes.count("committed") == 150
        assert outcomes.count("insufficient") == 50
        [general] = [a for a in await ledger.balances("acme") if a.token_type == "general"]
        assert (general.allowance, general.purchased, general.reserved) == (0, 0, 0)
        kinds = [row["kind"] for row in await ledger.journal("acme", limit=1000)]
        assert (kinds.count("reserve"), kinds.count("commit")) == (150, 150)
        assert await ledger.audit() == []
        # Up to 20 client connections shared PgBouncer's 5 server connections.
        assert 0 < await backends(database_url, role) <= 5
    finally:
        await ledger.close()


async def test_a_request_through_pgbouncer_is_metered(
    schema: str,
    rules: Rules,
    limiter: Limiter,
    upstream: tuple[Upstream, str],
    roles: Callable[..., Awaitable[Role]],
    bouncer: Callable[..., Awaitable[Bouncer]],
) -> None:
    role = await roles()
    pgb = await bouncer(role)
    settings = environment(
        pgb.dsn(role),
        schema,
        GATEWAY_DB_POOLER="pgbouncer",
        GATEWAY_DB_POOL_MIN="1",
        GATEWAY_DB_POOL_MAX="4",
    )
    async with open_ledger(settings, rules) as ledger:
        await ledger.create_org("acme", "pro")
        app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
            assert resp.status == 200
            assert resp.headers["X-Tokens-Charged"] == "1"
            assert resp.headers["X-Tokens-Remaining"] == "99"
            await resp.read()
        finally:
            await client.close()  # waits for the exchange to settle
        kinds = [row["kind"] for row in reversed(await ledger.journal("acme"))]
        assert kinds[-2:] == ["reserve", "commit"]
        assert len(upstream[0].seen) == 1
        assert await ledger.audit() == []


async def test_behind_pgbouncer_the_schema_is_the_roles_search_path(
    database_url: str,
    schema: str,
    rules: Rules,
    roles: Callable[..., Awaitable[Role]],
    bouncer: Callable[..., Awaitable[Bouncer]],
) -> None:
    role = await roles(search_path=False)
    pgb = await bouncer(role)
    settings = environment(pgb.dsn(role), schema, GATEWAY_DB_POOLER="pgbouncer")
    with pytest.raises(LedgerUnavailable) as info:
        async with open_ledger(settings, rules):
            pass
    fix = f"ALTER ROLE {role.name} SET search_path = {schema}"
    assert str(info.value) == (
        f"behind a pooler, the ledger's schema '{schema}' must come from the server, and "
        f"its connections' search_path puts 'public' first: run {fix}, then have the "
        "pooler open new server connections (PgBouncer: RECONNECT on its admin console), "
        "or set GATEWAY_DB_SCHEMA to the schema in use"
    )

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(fix)  # what the message says to do
    finally:
        await conn.close()
    pgb = await bouncer(role)  # new server connections, which take the role's search_path
    settings = environment(pgb.dsn(role), schema, GATEWAY_DB_POOLER="pgbouncer")
    async with open_ledger(settings, rules) as ledger:
        await ledger.create_org("acme", "pro")
        assert [a.available for a in await ledger.balances("acme")] != []


async def test_pgbouncer_without_the_pooler_setting_is_named(
    schema: str,
    rules: Rules,
    roles: Callable[..., Awaitable[Role]],
    bouncer: Callable[..., Awaitable[Bouncer]],
) -> None:
    role = await roles()
    pgb = await bouncer(role)
    with pytest.raises(LedgerUnavailable) as info:
        async with open_ledger(environment(pgb.dsn(role), schema), rules):
            pass
    assert str(info.value) == (
        f"cannot reach PostgreSQL at 127.0.0.1:{pgb.port}: unsupported startup parameter: "
        "search_path; PgBouncer answers there: set GATEWAY_DB_POOLER=pgbouncer"
    )


async def test_pgbouncer_refusing_clients_says_how_to_size_the_pools(
    schema: str,
    rules: Rules,
    roles: Callable[..., Awaitable[Role]],
    bouncer: Callable[..., Awaitable[Bouncer]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = await roles()
    pgb = await bouncer(role, max_client_conn=3)
    pooled = {"GATEWAY_DB_POOLER": "pgbouncer"}

    # A pool that opens more connections than PgBouncer takes cannot start.
    too_many = environment(pgb.dsn(role), schema, GATEWAY_DB_POOL_MIN="4", **pooled)
    with pytest.raises(LedgerUnavailable) as info:
        async with open_ledger(too_many, rules):
            pass
    assert str(info.value) == (
        "PgBouncer refused a connection (no more connections allowed (max_client_conn)): "
        "every gateway process may hold GATEWAY_DB_POOL_MAX (20) connections, so "
        "workers x replicas x GATEWAY_DB_POOL_MAX must stay under PgBouncer's "
        "max_client_conn; lower GATEWAY_DB_POOL_MAX or raise max_client_conn"
    )

    # One that grows past it under load: the calls it cannot serve are LedgerUnavailable.
    growing = environment(
        pgb.dsn(role), schema, GATEWAY_DB_POOL_MIN="1", GATEWAY_DB_POOL_MAX="10", **pooled
    )
    async with open_ledger(growing, rules) as ledger:
        await ledger.create_org("acme", "pro")
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="gateway.ledger"):
            results = await asyncio.gather(
                *(ledger.balances("acme") for _ in range(10)), return_exceptions=True
            )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert failures and all(isinstance(f, LedgerUnavailable) for f in failures)
        assert len(failures) < len(results)
        lines = {r.getMessage() for r in caplog.records}
        assert lines == {
            "ledger unavailable: PgBouncer refused a connection (no more connections allowed "
            "(max_client_conn)): every gateway process may hold GATEWAY_DB_POOL_MAX (10) "
            f"connections, so {SIZING} PgBouncer's max_client_conn; lower "
            "GATEWAY_DB_POOL_MAX or raise max_client_conn"
        }


async def test_pgbouncer_refused_by_postgresql_says_so(
    schema: str,
    rules: Rules,
    roles: Callable[..., Awaitable[Role]],
    bouncer: Callable[..., Awaitable[Bouncer]],
) -> None:
    role = await roles(limit=0)  # the server takes no connection of this role
    pgb = await bouncer(role)
    settings = environment(pgb.dsn(role), schema, GATEWAY_DB_POOLER="pgbouncer")
    with pytest.raises(LedgerUnavailable) as info:
        async with open_ledger(settings, rules):
            pass
    assert str(info.value) == (
        "PgBouncer could not open a server connection, PostgreSQL refused it (too many "
        f'connections for role "{role.name}"): PgBouncer\'s server connections '
        "(default_pool_size per database and user, or max_db_connections) must stay under "
        "the server's max_connections less its reserved slots (and under the role's or "
        "database's CONNECTION LIMIT)"
    )


# -- PostgreSQL refusing connections (no PgBouncer needed) ---------------------------------


async def test_a_pool_larger_than_the_connection_limit_cannot_start(
    database_url: str,
    schema: str,
    rules: Rules,
    roles: Callable[..., Awaitable[Role]],
) -> None:
    role = await roles(limit=2)
    settings = environment(dsn(database_url, role), schema, GATEWAY_DB_POOL_MIN="3")
    with pytest.raises(LedgerUnavailable) as info:
        async with open_ledger(settings, rules):
            pass
    assert str(info.value) == (
        f'PostgreSQL refused a connection (too many connections for role "{role.name}"): '
        "every gateway process may hold GATEWAY_DB_POOL_MAX (20) connections, so "
        f"{SIZING} the server's max_connections less its reserved slots (and under the "
        "role's or database's CONNECTION LIMIT); lower GATEWAY_DB_POOL_MAX, raise the "
        "limit, or put PgBouncer in front"
    )


async def test_refused_connections_are_a_503_and_a_log_line(
    database_url: str,
    schema: str,
    rules: Rules,
    limiter: Limiter,
    upstream: tuple[Upstream, str],
    roles: Callable[..., Awaitable[Role]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    role = await roles(limit=2)
    url = dsn(database_url, role)
    async with open_ledger(environment(url, schema), rules) as setup:
        await setup.create_org("acme", "pro")
    await all_gone(database_url, role)
    # The gateway's pool opens connections as it needs them; other processes hold the
    # role's two slots.
    ledger = await Ledger.connect(url, schema=schema, min_size=0, max_size=4)
    others = [await asyncpg.connect(url) for _ in range(2)]
    app = build_app(rules, ledger, limiter, environ=ENVIRON, sweeper=False)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        with caplog.at_level(logging.ERROR, logger="gateway.ledger"):
            resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
            body = await problem(resp)
        assert (resp.status, body["code"]) == (503, "ledger_unavailable")
        assert upstream[0].seen == []
        refused = [r.getMessage() for r in caplog.records if SIZING in r.getMessage()]
        assert refused and refused[0].startswith(
            "ledger unavailable: PostgreSQL refused a connection (too many connections for "
            f'role "{role.name}"): every gateway process may hold GATEWAY_DB_POOL_MAX (4) '
        )

        for other in others:
            await other.close()
        await all_gone(database_url, role)
        resp = await client.post("/v1/chat/x", json=CHAT, headers=bearer())
        assert resp.status == 200  # the slots are free again: no restart needed
        await resp.read()
    finally:
        await client.close()
        for other in others:
            await other.close()
        assert await ledger.audit() == []
        await ledger.close()
