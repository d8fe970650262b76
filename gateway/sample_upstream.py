"""A small OpenAI-compatible AI backend for the demo and the benchmark.

``POST /v1/chat/completions`` answers a chat completion with its ``usage``, streamed as
server-sent events when the body says ``"stream": true`` (ending with a usage chunk, as
OpenAI does, when ``stream_options.include_usage`` is true). The usage is deterministic, so
a usage-priced route charges a predictable amount: ``prompt_tokens`` is the length of the
messages' text // 4 + 1, ``completion_tokens`` is ``max_tokens`` (or
``max_completion_tokens``) capped at 50, 50 when absent, and nothing is cached.
Any other path answers a JSON result. Query parameters steer it for demonstrations:
``?fail=503`` answers that status, ``?delay=2`` waits two seconds first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from aiohttp import web

COMPLETION_CAP = 50  # the completion_tokens reported when max_tokens is absent or larger


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


def _text_length(messages: object) -> int:
    """The characters of text in ``messages``: string contents and text parts."""
    if not isinstance(messages, list):
        return 0
    length = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            length += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                if isinstance(text, str):
                    length += len(text)
    return length


def usage_for(body: dict[str, object]) -> dict[str, object]:
    """The usage reported for a request ``body``, in OpenAI's format."""
    prompt = _text_length(body.get("messages")) // 4 + 1
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    completion = COMPLETION_CAP
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        completion = min(limit, COMPLETION_CAP)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    failed = await _steer(request)
    if failed is not None:
        return failed
    body = await _read_json(request)
    words = ["Metered", " answers", " arrive", " token", " by", " token", "."]
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:12]}"
    created = int(time.time())
    model = body.get("model", "sample-1")
    if body.get("stream"):
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(choices: list[dict[str, object]], usage: object = None) -> None:
            event: dict[str, object] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if include_usage:
                event["usage"] = usage  # null on every chunk but the last, as OpenAI does
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        for i, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            await send([{"index": 0, "delta": delta, "finish_reason": None}])
            await asyncio.sleep(0.05)
        await send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if include_usage:
            await send([], usage_for(body))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(words)},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage_for(body),
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
