"""The sample upstream as the bench runs it: ``gateway.sample_upstream``'s application
with three additions, all in one middleware, so that its answers stay the sample's own,
and the gateway's collector settings (``tune_gc``, once it serves):

- it counts the requests it answered, by path and by who sent them (the gateway adds
  ``X-Gateway-Organization`` to every request it forwards; wrk and the pass-through do
  not), and ``GET /_bench/forwarded`` returns the counts: the ledger check compares the
  ledger with what actually reached the backend;
- ``POST /v1/usage/chat/completions`` is answered as ``/v1/chat/completions``, so that the
  bench's usage-priced route has a backend path of its own;
- a streamed chat completion with ``?events=N`` sends N chunks ``EVENT_INTERVAL`` apart
  (the sample sends 7 words), then the finish chunk, the usage chunk when asked for, and
  ``[DONE]``.

With Python's defaults its collector stopped every stream in flight for up to 30-48 ms
(full collections) under 500 streams, for the pass-through and the gateway alike: noise in
both ladders that is neither proxy's.

    python bench/upstream.py --port 9100
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from bench.workload import EVENT_INTERVAL, FORWARDED_BY_GATEWAY, PATH, USAGE_PATH
from gateway import sample_upstream
from gateway.runtime import tune_gc

COUNTS = web.AppKey("counts", Counter[tuple[str, str]])
COUNTS_PATH = "/_bench/forwarded"
MAX_EVENTS = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def chunk(completion_id: str, model: object, choices: Sequence[object], usage: object) -> bytes:
    """One server-sent event; ``usage`` is ``...`` to leave the key out (as OpenAI does
    unless the request asked for usage)."""
    event: dict[str, object] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": list(choices),
    }
    if usage is not ...:
        event["usage"] = usage  # null on every chunk but the last
    return f"data: {json.dumps(event)}\n\n".encode()


async def stream(request: web.Request, events: int) -> web.StreamResponse:
    """``events`` content chunks, EVENT_INTERVAL apart, in OpenAI's streaming format, with
    the sample upstream's usage in a last chunk when ``stream_options.include_usage``."""
    body = await request.json()
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    model = body.get("model", "sample-1")
    no_usage: object = None if include_usage else ...
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    for i in range(events):
        if i:
            await asyncio.sleep(EVENT_INTERVAL)
        delta = {"role": "assistant", "content": "word"} if i == 0 else {"content": " word"}
        await response.write(
            chunk(
                completion_id,
                model,
                [{"index": 0, "delta": delta, "finish_reason": None}],
                no_usage,
            )
        )
    finish = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    await response.write(chunk(completion_id, model, finish, no_usage))
    if include_usage:
        await response.write(chunk(completion_id, model, [], sample_upstream.usage_for(body)))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def events_asked(request: web.Request) -> int | None:
    text = request.query.get("events", "")
    return min(int(text), MAX_EVENTS) if text.isdigit() and int(text) > 0 else None


@web.middleware
async def bench_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == COUNTS_PATH:
        counts = request.app[COUNTS]
        out: dict[str, dict[str, int]] = {"gateway": {}, "direct": {}}
        for (source, path), n in sorted(counts.items()):
            out[source][path] = n
        return web.json_response(out)
    source = "gateway" if FORWARDED_BY_GATEWAY in request.headers else "direct"
    try:
        events = events_asked(request)
        if request.method == "POST" and request.path in (PATH, USAGE_PATH):
            if events is not None:
                return await stream(request, events)
            if request.path == USAGE_PATH:
                return await sample_upstream.chat_completions(request)
        return await handler(request)
    finally:
        # Every request that reached the backend, answered in full or not: the gateway
        # charges what it forwarded.
        request.app[COUNTS][source, request.path] += 1


async def _tune_gc(app: web.Application) -> None:
    tune_gc()


def make_app() -> web.Application:
    app = sample_upstream.make_app()
    app[COUNTS] = Counter()
    app.middlewares.append(bench_middleware)
    app.on_startup.append(_tune_gc)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
