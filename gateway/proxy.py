"""Forwarding to upstreams: the one seam to aiohttp's client.

``open_upstream`` sends the request (its body streamed, never buffered) and returns once the
upstream's status and headers have arrived; reading the body is the caller's loop. Client
failures are translated here: ``UpstreamTimeout`` for timeouts, ``UpstreamError`` for
refused, reset or otherwise broken connections.

``UpstreamBody.write_through`` lets a body's chunks go to the client as aiohttp's reader
receives them, without a turn of the reading loop per chunk, whenever none waits to be
read and the client takes them at once. It depends on aiohttp's reader class (its
``feed_data``) and its writer's ``write(..., drain=False)``; with any other reader or
writer every chunk goes through the reads, as before.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.auth import Principal
from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.rules import Route


class ExchangeOverdue(Exception):
    """The exchange reached its deadline before the upstream finished."""


class Meter(Protocol):
    """What reads a body's chunks on the way (``metering.UsageReader``)."""

    def feed(self, chunk: bytes) -> None: ...


class WriteThrough:
    """Counts of the chunks written straight through to clients (for tests and tuning)."""

    chunks = 0


class _Sink:
    """Where an upstream body's chunks go while they can go straight to the client."""

    __slots__ = ("meter", "reader", "transport", "writer")

    def __init__(
        self,
        reader: StreamReader,
        writer: StreamWriter,
        transport: asyncio.Transport,
        meter: Meter | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.transport = transport
        self.meter = meter

    def write(self, data: bytes) -> bool:
        """Write ``data`` to the client now, if it can take it without waiting."""
        if not data:
            return False
        transport = self.transport
        if transport.is_closing():
            return False
        if transport.get_write_buffer_size():
            return False  # the client lags: the relay writes it, waiting for the client
        step = self.writer.write(data, drain=False)  # with drain=False, waits for nothing
        try:
            step.send(None)
        except StopIteration:
            pass
        else:  # it waited before writing (a compressing writer would): the relay writes it
            step.close()
            return False
        if self.meter is not None:
            self.meter.feed(data)
        WriteThrough.chunks += 1
        return True


# The sinks of the bodies being written through, by their reader's id (a sink holds its
# reader, so no other object can have that id while its sink is here).
_SINKS: dict[int, _Sink] = {}


class _WrittenThrough(StreamReader):
    """aiohttp's reader of a response body, whose chunks go straight to a ``_Sink`` while
    nothing waits in its buffer and the client takes them at once; else (and once the sink
    is gone) they wait in its buffer for the relay as in any reader."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        sink = _SINKS.get(id(self))
        if sink is not None and not self._buffer and sink.write(data):
            return False
        return super().feed_data(data, size)


class UpstreamBody:
    """The upstream's body as it comes, chunk by chunk (``async for``). ``wait_seconds``
    (from ``started``, monotonic) counts only the time spent waiting for the upstream, never
    the time the caller spends between chunks (a slow client): past it a read raises
    ``TimeoutError``; past ``deadline`` (monotonic) raises ``ExchangeOverdue`` (or
    ``TimeoutError`` in the middle of a read). ``close`` when done with it, whatever
    happened.

    One timer for the whole body, not one per chunk: armed at a read's start for what is
    left, it is moved only when it fires. Then it cancels a read (its task) that has used
    up what was left, or is armed again for the rest. It can fire early, never late: what
    is left only shrinks while a read waits.

    A class, not an async generator arming a closure: the closure named itself (to arm
    again) and the task, a reference cycle per exchange that only the garbage collector
    freed (every request's task piled up in the youngest generation, and each collection
    paused every request for longer); and a read is one coroutine, without a generator's
    layer per chunk."""

    __slots__ = (
        "_content",
        "_deadline",
        "_expired",
        "_handle",
        "_left",
        "_loop",
        "_reading_since",
        "_task",
        "_through",
    )

    def __init__(
        self, upstream: aiohttp.ClientResponse, wait_seconds: float, started: float, deadline: float
    ) -> None:
        self._content = upstream.content
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[Any] | None = None  # the reading task, while a read waits
        self._handle: asyncio.TimerHandle | None = None
        self._left = wait_seconds - (time.monotonic() - started)  # at a read's start
        self._deadline = deadline
        self._reading_since: float | None = None  # set only while a read waits
        self._expired = False
        self._through = False

    def __aiter__(self) -> UpstreamBody:
        return self

    async def __anext__(self) -> bytes:
        now = time.monotonic()
        if self._deadline - now < self._left:
            # The client's slowness has used up the exchange's time: past its deadline
            # the reservation could expire under a live exchange.
            self._left = self._deadline - now
            if self._left <= 0:
                raise ExchangeOverdue()
        if self._handle is None:
            self._handle = self._loop.call_later(self._left, self._fire)
        self._task = task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        self._reading_since = now
        try:
            chunk = await self._content.readany()
        except asyncio.CancelledError:
            # Ours (and no one else's as well): the read ran out of time.
            if self._expired and task.uncancel() <= cancelling:
                raise TimeoutError() from None
            raise
        finally:
            self._reading_since = self._task = None
        if not chunk:
            self.close()
            raise StopAsyncIteration
        self._left -= time.monotonic() - now
        return chunk

    def _fire(self) -> None:
        self._handle = None
        if self._reading_since is None or self._task is None:
            return  # between reads: armed again at the next read's start
        now = time.monotonic()
        rest = min(self._left - (now - self._reading_since), self._deadline - now)
        if rest > 0:
            self._handle = self._loop.call_later(rest, self._fire)
        else:
            self._expired = True
            self._task.cancel()  # the read is the only thing the task waits for meanwhile

    def write_through(self, writer: StreamWriter, meter: Meter | None = None) -> None:
        """From now on, a chunk that arrives while none waits to be read and the client
        can take it at once is written to ``writer`` (then fed to ``meter``) as it
        arrives, without waking the reading task; the reads see the others, and the end
        or the failure, as before. The time a read waits meanwhile is the upstream's: the
        client never made it wait."""
        reader = self._content
        if type(reader) is not StreamReader or reader.is_eof() or writer.transport is None:
            return  # not aiohttp's plain reader: every chunk goes through the reads
        reader.__class__ = _WrittenThrough
        _SINKS[id(reader)] = _Sink(reader, writer, writer.transport, meter)
        self._through = True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None  # it holds _fire, and so this body
        if self._through:
            self._through = False
            del _SINKS[id(self._content)]
            self._content.__class__ = StreamReader


def write_through(
    chunks: AsyncIterator[bytes],
    writer: AbstractStreamWriter | None,
    meter: Meter | None = None,
) -> None:
    """``UpstreamBody.write_through`` when ``chunks`` is one and ``writer`` is aiohttp's
    (a body already partly read, or another writer: every chunk goes through the reads).
    Only for a body with no last byte to hold back."""
    if isinstance(chunks, UpstreamBody) and isinstance(writer, StreamWriter):
        chunks.write_through(writer, meter)


async def prefixed(prefix: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks of ``prefix`` (a body's start, already read), then ``rest``."""
    for chunk in prefix:
        yield chunk
    async for chunk in rest:
        yield chunk


# RFC 9110 section 7.6.1, plus the de-facto proxy ones.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway for the upstream; a client must not be able to forge them.
GATEWAY_REQUEST_HEADERS = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "x-gateway-organization",
        "x-gateway-user",
        "x-gateway-roles",
        "forwarded",
    }
)
# Set by the gateway for the client; an upstream must not be able to forge them.
GATEWAY_RESPONSE_HEADERS = frozenset(
    {
        "x-tokens-charged",
        "x-tokens-held",
        "x-tokens-remaining",
        "x-tokens-warning",
        "x-reservation-id",
        "x-request-id",
        "ratelimit",
        "ratelimit-policy",
    }
)


def _canonical(name: str) -> str:
    # Many servers (CGI, WSGI, some proxies) read X-Gateway_User as X-Gateway-User.
    return name.lower().replace("_", "-")


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


def upstream_request_headers(
    request: web.Request, route: Route, caller: Principal, request_id: str
) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | GATEWAY_REQUEST_HEADERS | _connection_tokens(request.headers)
    if not route.config.forward_authorization:
        drop = drop | {"authorization"}
    headers = CIMultiDict((k, v) for k, v in request.headers.items() if _canonical(k) not in drop)
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    headers["X-Forwarded-Proto"] = request.scheme
    headers["X-Forwarded-Host"] = request.host
    headers["X-Request-Id"] = request_id
    headers["X-Gateway-Organization"] = caller.org
    headers["X-Gateway-User"] = caller.user
    if caller.roles:
        headers["X-Gateway-Roles"] = " ".join(sorted(caller.roles))
    if route.config.usage is not None:
        # The answer is read for its usage: uncompressed, so that every byte is readable.
        headers["Accept-Encoding"] = "identity"
    # The upstream's own credentials, whatever the client sent under those names.
    for name, value in route.upstream.headers.items():
        headers[name] = value
    return headers


def client_response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | GATEWAY_RESPONSE_HEADERS | _connection_tokens(upstream.headers)
    return CIMultiDict((k, v) for k, v in upstream.headers.items() if _canonical(k) not in drop)


def new_session(*, max_connections: int = 1000) -> aiohttp.ClientSession:
    """The shared client session: no decompression (bytes pass through with their
    Content-Encoding), no redirects followed, no headers invented for the caller."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max_connections, ttl_dns_cache=60),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept", "Content-Type"),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def map_client_error(exc: BaseException, upstream_name: str) -> UpstreamError | UpstreamTimeout:
    """Translate an aiohttp client failure into the gateway's error contract."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamTimeout(f"upstream '{upstream_name}' did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"cannot connect to upstream '{upstream_name}': {exc.os_error}")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return UpstreamError(f"upstream '{upstream_name}' closed the connection")
    return UpstreamError(f"upstream '{upstream_name}' failed: {type(exc).__name__}: {exc}")


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        yield chunk


async def open_upstream(
    session: aiohttp.ClientSession,
    request: web.Request,
    route: Route,
    caller: Principal,
    request_id: str,
    *,
    body: bytes | None = None,
) -> aiohttp.ClientResponse:
    """Send ``request`` to the route's upstream and return its response with the body still
    to read (the caller must release it): ``body`` when given (a body the gateway has read,
    sent with its own length), else the client's, streamed. Raises ``UpstreamTimeout`` or
    ``UpstreamError``."""
    upstream = route.upstream
    url = URL(upstream.url + request.raw_path, encoded=True)
    # No total timeout here: the caller budgets the upstream's time over its own reads
    # only, so that a slow client cannot make the upstream look late.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.connect_timeout_seconds)
    headers = upstream_request_headers(request, route, caller, request_id)
    data: bytes | AsyncIterator[bytes] | None
    if body is not None:
        headers.popall("Content-Length", None)
        data = body
    else:
        data = _body(request) if request.body_exists else None
    try:
        async with asyncio.timeout(upstream.timeout_seconds):
            return await session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                timeout=timeout,
                allow_redirects=False,
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise map_client_error(exc, route.config.upstream) from exc
