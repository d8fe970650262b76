"""A small OpenAI-style AI backend for the demo and the benchmark.

``POST /v1/chat/completions`` answers a chat completion, streamed as server-sent events
when the body says ``"stream": true``. Any other path answers a JSON result. Query
parameters steer it for demonstrations: ``?fail=503`` answers that status, ``?delay=2``
waits two seconds first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from aiohttp import web


async def _read_json(request: web.Request) -> dict[str, object]:
    if not request.body_exists:
        return {}
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


async def _steer(request: web.Request) -> web.Response | None:
    delay = request.query.get("delay")
    if delay:
        await asyncio.sleep(min(float(delay), 300.0))
    fail = request.query.get("fail")
    if fail:
        status = int(fail) if fail.isdigit() else 500
        return web.json_response(
            {"error": {"message": f"sample upstream failing with {status} on request"}},
            status=status,
        )
    return None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    failed = await _steer(request)
    if failed is not None:
        return failed
    body = await _read_json(request)
    words = ["Metered", " answers", " arrive", " token", " by", " token", "."]
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    if body.get("stream"):
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for word in words:
            event = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}}],
            }
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
            await asyncio.sleep(0.05)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "sample-1"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(words)},
                    "finish_reason": "stop",
                }
            ],
        }
    )


async def anything(request: web.Request) -> web.Response:
    failed = await _steer(request)
    if failed is not None:
        return failed
    body = await _read_json(request)
    return web.json_response(
        {
            "path": request.path,
            "organization": request.headers.get("X-Gateway-Organization"),
            "user": request.headers.get("X-Gateway-User"),
            "request_id": request.headers.get("X-Request-Id"),
            "input": body,
            "result": f"sample result for {request.path}",
        }
    )


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args(argv)
    web.run_app(make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
