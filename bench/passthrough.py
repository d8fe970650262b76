"""A bare aiohttp pass-through proxy: the baseline the gateway is measured against.

It forwards every request to ``--upstream`` the way the gateway forwards a metered one,
minus everything that makes it a gateway: one shared ``ClientSession`` configured like
``gateway.proxy.new_session``, the request body streamed to the upstream, the response
streamed back chunk by chunk, hop-by-hop headers dropped. No authentication, no rules, no
ledger, no limits, no ``X-Forwarded-*`` headers. The difference between this and the
gateway is the price of metering; the difference between this and the upstream is the
price of any aiohttp proxy hop.

    python bench/passthrough.py --port 9200 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

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
TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)  # rules.yaml's ai_backend

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def forwardable(headers: CIMultiDictProxy[str], *, drop: frozenset[str]) -> CIMultiDict[str]:
    """``headers`` without the hop-by-hop ones (and those ``Connection`` names) or ``drop``."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    skip = HOP_BY_HOP | named | drop
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_any():
        yield chunk


async def forward(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=forwardable(request.headers, drop=frozenset({"host"})),
            data=_body(request) if request.body_exists else None,
            timeout=TIMEOUT,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response(
            {"error": f"upstream failed: {type(exc).__name__}: {exc}"}, status=502
        )
    try:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        response.headers.extend(forwardable(upstream.headers, drop=frozenset()))
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.release()


async def _session(app: web.Application) -> AsyncIterator[None]:
    # The same client configuration as gateway.proxy.new_session.
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, ttl_dns_cache=60),
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept", "Content-Type"),
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    yield
    await app[SESSION].close()


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9100")
    args = parser.parse_args(argv)
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        handler_cancellation=False,  # as the gateway runs
    )


if __name__ == "__main__":
    main()
