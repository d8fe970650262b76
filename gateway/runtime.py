"""What a running gateway needs around the application: the objects built from the rules,
the stores (configured or embedded), signals and the event loop. Shared by the ``gateway``
command, the demo and the application; it imports none of them.

    build_active      every load-time construction from the rules that can fail
    check_serving     build_active, then close what it built: what ``rules check`` runs
    open_ledger       PostgreSQL (DATABASE_URL or embedded): connect, migrate, sync plans
    open_limiter      Redis (REDIS_URL or an embedded Valkey)
    listening         an application served on a port for the duration of a block, its
                      connections bounded in time and size against slow clients
    wait_for_signal   until SIGINT or SIGTERM (or, for a worker, its supervisor's death)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import web

from gateway.alerts import Alerter
from gateway.auth import Authenticator
from gateway.embedded import start_postgres, start_valkey
from gateway.errors import CommandError as CommandError  # re-exported for the commands
from gateway.errors import ConfigError, LedgerUnavailable
from gateway.ledger import Ledger
from gateway.ledger.seam import refusal
from gateway.limits.limiter import Limiter
from gateway.proxy import new_session
from gateway.rules import Rules
from gateway.settings import HEADER_TIMEOUT, KEEPALIVE_TIMEOUT, SUPERVISOR_PID, Settings
from gateway.state import Active

log = logging.getLogger("gateway.runtime")

T = TypeVar("T")

# PostgreSQL's SQLSTATE for invalid_schema_name: a search_path naming no existing schema
# leaves nowhere to create the ledger's tables.
_INVALID_SCHEMA_NAME = "3F000"


def build_active(
    rules: Rules, environ: Mapping[str, str], session: aiohttp.ClientSession
) -> Active:
    """The rules in force and every object ``serve`` builds from them (the JWT keys, the
    spike alerter). Raises ``ConfigError`` from ``rules.source`` listing each value that
    cannot be put in force, by its path (``auth.public_key_file: cannot read ...``);
    nothing is built then and ``session`` is left unused."""
    try:
        auth = Authenticator(rules.document.auth, environ=environ)
    except ConfigError as exc:
        raise ConfigError(rules.source, exc.errors) from exc
    return Active(
        rules=rules,
        auth=auth,
        alerter=Alerter(rules.document.limits.spike, session, environ),
        loaded_at=time.time(),
    )


async def check_serving(rules: Rules, environ: Mapping[str, str]) -> None:
    """Build what ``serve`` builds from ``rules`` (``build_active``), then close it.
    Raises ``ConfigError`` as ``build_active`` does."""
    async with new_session() as session:
        active = build_active(rules, environ, session)
        await active.auth.close()
        await active.alerter.close()


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings, rules: Rules) -> AsyncIterator[Ledger]:
    """Connect to the configured (or embedded) PostgreSQL, directly or through the pooler
    ``GATEWAY_DB_POOLER`` names, with a pool of ``GATEWAY_DB_POOL_MIN`` to
    ``GATEWAY_DB_POOL_MAX`` connections; migrate, and sync plans. Raises
    ``LedgerUnavailable`` saying which server could not be reached, that it refused
    connections (and how to size the pools), that ``GATEWAY_DB_SCHEMA`` names no schema,
    or, behind a pooler, that the server's connections are not in it;
    ``EmbeddedUnavailable`` when the embedded server cannot start."""
    dsn = settings.database_url
    if dsn is None:
        dsn = await asyncio.to_thread(start_postgres, settings.data_dir)
    try:
        ledger = await Ledger.connect(
            dsn,
            schema=settings.database_schema,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            pooler=settings.db_pooler is not None,
        )
    except LedgerUnavailable as exc:
        if exc.__cause__ is None or refusal(exc.__cause__, settings.db_pool_max):
            raise  # the server answered: the seam says what it refused, and what to do
        message = _unreachable(dsn, exc)
        if settings.db_pooler is None and "unsupported startup parameter" in message:
            # PgBouncer's answer to the search_path that it cannot keep per client.
            message += "; PgBouncer answers there: set GATEWAY_DB_POOLER=pgbouncer"
        raise LedgerUnavailable(message) from exc
    try:
        try:
            applied = await ledger.migrate()
        except LedgerUnavailable as exc:
            schema = settings.database_schema
            if schema and getattr(exc.__cause__, "sqlstate", None) == _INVALID_SCHEMA_NAME:
                raise LedgerUnavailable(
                    f"GATEWAY_DB_SCHEMA '{schema}': no such schema in database "
                    f"{_where(dsn)}; create it (CREATE SCHEMA {schema}) or unset the variable"
                ) from exc
            raise
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        await ledger.sync_plans(rules.plan_allowances())
        yield ledger
    finally:
        await ledger.close()


def _where(dsn: str) -> str:
    """``'test' at 127.0.0.1:5432`` from a PostgreSQL URL, never its password."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        return "(DATABASE_URL)"
    name = unquote(parts.path.lstrip("/")) or unquote(parts.username or "") or "postgres"
    return f"'{name}' at {_address(dsn)}"


def _address(dsn: str) -> str:
    parts = urlsplit(dsn)
    try:
        port = parts.port or 5432
    except ValueError:  # not a number: asyncpg says so
        port = 5432
    return f"{parts.hostname or 'localhost'}:{port}"


def _unreachable(dsn: str, exc: LedgerUnavailable) -> str:
    cause = exc.__cause__
    if isinstance(cause, ConnectionRefusedError):
        reason = "connection refused"
    elif isinstance(cause, socket.gaierror):
        reason = f"unknown host ({cause.strerror})"
    elif isinstance(cause, TimeoutError):
        reason = "no answer in time"
    elif isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror.lower()
    else:
        reason = str(cause or exc)
    password = urlsplit(dsn).password if "://" in dsn else None
    if password:
        reason = reason.replace(password, "***")
    if urlsplit(dsn).scheme not in ("postgres", "postgresql"):
        return f"cannot reach PostgreSQL (DATABASE_URL): {reason}"
    return f"cannot reach PostgreSQL at {_address(dsn)}: {reason}"


@contextlib.asynccontextmanager
async def open_limiter(settings: Settings, rules: Rules) -> AsyncIterator[Limiter]:
    """Connect to the configured (or embedded) Redis."""
    url, stop = settings.redis_url, None
    if url is None:
        url, stop = await asyncio.to_thread(start_valkey, settings.data_dir)
    assert url is not None
    limiter = Limiter.from_url(url, rules.document.limits, prefix=settings.redis_prefix)
    try:
        yield limiter
    finally:
        await limiter.close()
        if stop is not None:
            await asyncio.to_thread(stop)


# aiohttp's bounds on a request's head, stated here so that they stay in force whatever its
# defaults become: a longer request line or header, or more headers, is answered 400.
MAX_LINE_SIZE = 8190  # bytes in the request line
MAX_FIELD_SIZE = 8190  # bytes in one header
MAX_HEADERS = 128  # header lines


class _Connection(web.RequestHandler):
    """aiohttp's HTTP connection, plus a deadline for each request's headers.

    aiohttp bounds only how long a connection may wait for a request (its keep-alive
    timer), and not the time a client may take to send a request's head: a client that
    sends it a byte at a time would hold the connection for as long as the keep-alive
    timeout. Here the head must be complete ``header_timeout`` seconds after the connection
    opens or, on a kept-alive connection, after the next request's first byte; past that,
    a connection still waiting for it is closed. Bytes arriving do not extend the deadline.

    The deadline reads aiohttp's private ``_request_count`` and ``_waiter``;
    tests/test_slow_clients.py fails if an aiohttp upgrade changes what they mean."""

    __slots__ = ("_header_timeout", "_header_timer")

    def __init__(self, manager: web.Server, *, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count  # aiohttp counts the request heads it has parsed
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()
        elif data and self._header_timer is None and self._awaiting_request():
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _awaiting_request(self) -> bool:
        # What aiohttp's keep-alive timer checks: no request is queued or being handled.
        return self._waiter is not None and not self._waiter.done()

    def _arm(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._awaiting_request():
            self.force_close()


@contextlib.asynccontextmanager
async def listening(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    shutdown_timeout: float = 60.0,
    header_timeout: float = HEADER_TIMEOUT,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    hint: str = "",
) -> AsyncIterator[None]:
    """Serve ``app`` on ``host:port`` until the block ends, then stop accepting and let
    handlers finish for up to ``shutdown_timeout`` seconds before the app's cleanup runs.
    A connection is closed when a request's headers are not complete ``header_timeout``
    seconds after it opened (or after the request's first byte, when kept alive), and when
    it has been idle between requests for ``keepalive_timeout`` seconds.
    Raises ``CommandError`` (ending with ``hint``) when the port cannot be bound."""
    runner = web.AppRunner(app, handler_cancellation=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    server = runner.server
    assert server is not None
    loop = asyncio.get_running_loop()

    # The connections are ours, not the runner's (whose handler class cannot be chosen);
    # they still report to its server, which closes them at shutdown.
    def connection() -> _Connection:
        return _Connection(
            server,
            loop=loop,
            header_timeout=header_timeout,
            keepalive_timeout=keepalive_timeout,
            max_line_size=MAX_LINE_SIZE,
            max_field_size=MAX_FIELD_SIZE,
            max_headers=MAX_HEADERS,
            access_log=None,
        )

    try:
        listener = await loop.create_server(
            connection,
            host,
            port,
            backlog=128,  # aiohttp's TCPSite's
            reuse_address=not reuse_port,
            reuse_port=reuse_port or None,
        )
    except OSError as exc:
        await runner.cleanup()
        raise CommandError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from exc
    try:
        yield
    finally:
        listener.close()
        await runner.cleanup()


# The garbage collector's thresholds while serving (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (20_000, 20, 100)


def tune_gc() -> None:
    """Fewer and shorter collector pauses on the request path, once serving has started.

    The objects made at startup (modules, rules, pools, the app) are frozen out of every
    collection, and the youngest generation is collected after 20,000 net allocations
    instead of 700. A request leaves no cyclic garbage (its objects are freed by reference
    counting; tests check it with ``cyclic_garbage``), so under load a collection is rare,
    while each one stops the event loop: with the defaults, a full collection of the heap
    stalled every request for 50-90 ms under 400 streams, and younger ones for 3-13 ms
    several times a second."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def die_with_parent() -> None:
    """On Linux, have the kernel send this process SIGTERM (a graceful stop) when its
    parent dies: a worker must not outlive its supervisor."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        log.warning("cannot ask to be stopped with the supervisor; polling for it instead")


def supervisor_pid() -> int:
    """The pid of this worker's supervisor (``GATEWAY_SUPERVISOR_PID``, set by ``serve
    --workers``; else the parent). Not getppid() alone: a supervisor that dies while its
    worker is still starting would leave the worker reading the parent it was reparented
    to, and outliving its supervisor."""
    value = os.environ.get(SUPERVISOR_PID, "")
    return int(value) if value.isdigit() else os.getppid()


async def wait_for_signal(*, supervisor: int | None = None) -> None:
    """Until SIGINT or SIGTERM; with ``supervisor`` (the pid a worker of ``serve
    --workers`` was started by), also until that supervisor is gone, so that no worker
    outlives it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    async def watch_parent(parent: int) -> None:
        # Polling: nothing signals a parent's death portably.
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(1)
        log.error("the supervisor (pid %d) is gone; shutting down", parent)
        stop.set()

    watcher = asyncio.create_task(watch_parent(supervisor)) if supervisor is not None else None
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_secret(data_dir: Path) -> str:
    """A per-installation secret for the demo, kept in ``data_dir`` so that minted tokens
    survive restarts and ``gateway token`` can find it."""
    path = data_dir / "demo-jwt-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret
