"""Local stand-ins for the OpenAI and Anthropic APIs, speaking their wire formats closely
enough for the official SDKs, so the gateway's usage pricing is tested against what those
vendors really send.

``POST /v1/chat/completions`` answers as OpenAI does: a ``chat.completion`` object, or with
``"stream": true`` ``data: {chat.completion.chunk}`` lines, a final chunk with ``choices: []``
and ``usage`` when ``stream_options.include_usage`` is true, then ``data: [DONE]``.
``POST /v1/messages`` answers as Anthropic does: a ``message`` object, or the named events
``message_start`` ... ``message_stop``. Both check their vendor's key (``Authorization:
Bearer`` for OpenAI; ``x-api-key`` or, as Anthropic's newer SDKs send it, ``Authorization:
Bearer``, and an ``anthropic-version``, for Anthropic) and answer 401 in the vendor's error
format otherwise.

The usage each answer reports is the server's ``openai_usage`` / ``anthropic_usage``, which
a test sets. The header ``X-Test-Behaviour`` picks how a request is answered:

``normal`` (default); ``no-usage`` reports no usage at all; ``cut`` drops the connection
before the usage (a stream, after its text; a JSON answer, halfway through its body);
``slow`` waits ``X-Test-Delay`` seconds (default 0.2) before every event, and before a JSON
answer; ``chunked`` sends a JSON answer without a Content-Length, in 64-byte chunks;
``multi-delta`` (Anthropic streams) sends two ``message_delta`` events, the
second with the final cumulative ``output_tokens``.

Every request is recorded in ``seen`` (headers and JSON body) with the exact bytes of the
answer's body as written.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDictProxy

OPENAI_KEY = "sk-test-openai-" + "o" * 32
ANTHROPIC_KEY = "sk-ant-test-" + "a" * 32
ANTHROPIC_VERSION = "2023-06-01"
BEHAVIOUR = "X-Test-Behaviour"
DELAY = "X-Test-Delay"
WORDS = ["Metered", " answers", " arrive", " token", " by", " token", "."]
ANSWER = "".join(WORDS)


@dataclass
class OpenAIUsage:
    """OpenAI's counters: ``prompt_tokens`` includes the ``cached_tokens``."""

    prompt_tokens: int = 1200
    cached_tokens: int = 200
    completion_tokens: int = 300

    def as_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


@dataclass
class AnthropicUsage:
    """Anthropic's counters: ``input_tokens`` excludes cache reads and cache writes."""

    input_tokens: int = 1000
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int = 300

    def as_json(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass
class VendorRequest:
    """One request as the vendor received it, and what it answered."""

    path: str
    headers: CIMultiDictProxy[str]
    body: Any  # the parsed JSON body (None when it was not JSON)
    status: int = 0
    sent: bytearray = field(default_factory=bytearray)  # the response body, as written
    complete: bool = False  # the whole answer was written

    @property
    def behaviour(self) -> str:
        return self.headers.get(BEHAVIOUR, "normal")


@dataclass
class Vendors:
    openai_usage: OpenAIUsage = field(default_factory=OpenAIUsage)
    anthropic_usage: AnthropicUsage = field(default_factory=AnthropicUsage)
    seen: list[VendorRequest] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        # Under any prefix too, so that one server can stand behind several routes.
        app.router.add_post("/{prefix:.*}v1/chat/completions", self.openai_chat)
        app.router.add_post("/{prefix:.*}v1/messages", self.anthropic_messages)
        return app

    async def _record(self, request: web.Request) -> VendorRequest:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        seen = VendorRequest(request.path, request.headers, body)
        self.seen.append(seen)
        return seen

    # -- OpenAI --------------------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        if request.headers.get("Authorization") != f"Bearer {OPENAI_KEY}":
            return _answer(seen, 401, _openai_error(request.headers.get("Authorization")))
        body = seen.body if isinstance(seen.body, dict) else {}
        if not isinstance(body.get("messages"), list) or not isinstance(body.get("model"), str):
            error = {
                "error": {
                    "message": "you must provide a model parameter and a messages list",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
            return _answer(seen, 400, error)
        completion_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        model = body["model"]
        if body.get("stream") is True:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return await self._openai_stream(
                request, seen, completion_id, created, model, include_usage
            )
        answer: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "service_tier": "default",
            "system_fingerprint": "fp_test",
        }
        if seen.behaviour != "no-usage":
            answer["usage"] = self.openai_usage.as_json()
        return await _json_answer(request, seen, answer, {"x-request-id": "req_" + completion_id})

    async def _openai_stream(
        self,
        request: web.Request,
        seen: VendorRequest,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = await _start_stream(request, seen, {"x-request-id": "req_" + completion_id})

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            event: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_test",
                "choices": choices,
            }
            if include_usage:
                event["usage"] = None  # as OpenAI does: null on every chunk but the last
            event.update(extra)
            return f"data: {json.dumps(event)}\n\n".encode()

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        await _emit(request, seen, response, chunk([choice({"role": "assistant", "content": ""})]))
        for word in WORDS:
            await _emit(request, seen, response, chunk([choice({"content": word})]))
        await _emit(request, seen, response, chunk([choice({}, "stop")]))
        if seen.behaviour == "cut":
            return await _cut(request, response)
        if include_usage and seen.behaviour != "no-usage":
            usage_chunk = chunk([], usage=self.openai_usage.as_json())
            await _emit(request, seen, response, usage_chunk)
        await _emit(request, seen, response, b"data: [DONE]\n\n")
        return await _finish(seen, response)

    # -- Anthropic -----------------------------------------------------------------------

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        seen = await self._record(request)
        # Anthropic takes the key as x-api-key; its newer SDKs send it as a bearer token.
        keys = {request.headers.get("x-api-key"), request.headers.get("Authorization")}
        if not keys & {ANTHROPIC_KEY, f"Bearer {ANTHROPIC_KEY}"}:
            return _answer(seen, 401, _anthropic_error("authentication_error", "invalid x-api-key"))
        if not request.headers.get("anthropic-version"):
            message = "anthropic-version: header is required"
            return _answer(seen, 400, _anthropic_error("invalid_request_error", message))
        body = seen.body if isinstance(seen.body, dict) else {}
        for name, kind in (("model", str), ("messages", list), ("max_tokens", int)):
            if not isinstance(body.get(name), kind):
                message = f"{name}: Field required"
                return _answer(seen, 400, _anthropic_error("invalid_request_error", message))
        message_id = "msg_" + secrets.token_hex(12)
        headers = {"request-id": "req_" + message_id}
        if body.get("stream") is True:
            return await self._anthropic_stream(request, seen, message_id, body["model"], headers)
        answer: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": ANSWER}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
        }
        if seen.behaviour != "no-usage":
            answer["usage"] = self.anthropic_usage.as_json()
        return await _json_answer(request, seen, answer, headers)

    async def _anthropic_stream(
        self,
        request: web.Request,
        seen: VendorRequest,
        message_id: str,
        model: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = await _start_stream(request, seen, headers)
        usage = self.anthropic_usage

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n".encode()

        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if seen.behaviour != "no-usage":
            # As Anthropic does: the input counters, and an early output count of 1.
            message["usage"] = {**usage.as_json(), "output_tokens": 1}
        await _emit(request, seen, response, event("message_start", {"message": message}))
        block = {"type": "text", "text": ""}
        await _emit(
            request,
            seen,
            response,
            event("content_block_start", {"index": 0, "content_block": block}),
        )
        await _emit(request, seen, response, event("ping", {}))
        for word in WORDS:
            delta = {"index": 0, "delta": {"type": "text_delta", "text": word}}
            await _emit(request, seen, response, event("content_block_delta", delta))
        await _emit(request, seen, response, event("content_block_stop", {"index": 0}))
        if seen.behaviour == "cut":
            return await _cut(request, response)
        stop = {"stop_reason": "end_turn", "stop_sequence": None}
        if seen.behaviour == "no-usage":
            await _emit(request, seen, response, event("message_delta", {"delta": stop}))
        else:
            if seen.behaviour == "multi-delta":
                early = {
                    "delta": {"stop_reason": None, "stop_sequence": None},
                    "usage": {"output_tokens": max(1, usage.output_tokens // 2)},
                }
                await _emit(request, seen, response, event("message_delta", early))
            final = {"delta": stop, "usage": {"output_tokens": usage.output_tokens}}
            await _emit(request, seen, response, event("message_delta", final))
        await _emit(request, seen, response, event("message_stop", {}))
        return await _finish(seen, response)


def _openai_error(authorization: str | None) -> dict[str, Any]:
    if not authorization:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    key = authorization.removeprefix("Bearer ")
    message = f"Incorrect API key provided: {key[:3]}***{key[-4:]}."
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def _anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": "req_" + secrets.token_hex(12),
    }


def _answer(seen: VendorRequest, status: int, payload: dict[str, Any]) -> web.Response:
    body = json.dumps(payload).encode()
    seen.status = status
    seen.sent += body
    seen.complete = True
    return web.Response(status=status, body=body, content_type="application/json")


def _delay(request: web.Request) -> float:
    return float(request.headers.get(DELAY, "0.2"))


async def _json_answer(
    request: web.Request, seen: VendorRequest, payload: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    if seen.behaviour == "slow":
        await asyncio.sleep(_delay(request))
    if seen.behaviour == "chunked":
        return await _chunked_answer(request, seen, payload, headers)
    if seen.behaviour != "cut":
        whole = _answer(seen, 200, payload)
        whole.headers.update(headers)
        return whole
    body = json.dumps(payload).encode()
    response = web.StreamResponse(
        headers={**headers, "Content-Type": "application/json", "Content-Length": str(len(body))}
    )
    seen.status = 200
    await response.prepare(request)
    half = body[: len(body) // 2]
    await response.write(half)
    seen.sent += half
    return await _cut(request, response)


async def _chunked_answer(
    request: web.Request, seen: VendorRequest, payload: dict[str, Any], headers: dict[str, str]
) -> web.StreamResponse:
    """A JSON answer without a Content-Length, in chunks, as servers that stream their
    serialization send it."""
    body = json.dumps(payload).encode()
    response = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
    response.enable_chunked_encoding()
    seen.status = 200
    await response.prepare(request)
    for start in range(0, len(body), 64):
        await response.write(body[start : start + 64])
        seen.sent += body[start : start + 64]
    return await _finish(seen, response)


async def _start_stream(
    request: web.Request, seen: VendorRequest, headers: dict[str, str]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
        }
    )
    seen.status = 200
    await response.prepare(request)
    return response


async def _emit(
    request: web.Request, seen: VendorRequest, response: web.StreamResponse, data: bytes
) -> None:
    if seen.behaviour == "slow":
        await asyncio.sleep(_delay(request))
    await response.write(data)
    seen.sent += data


async def _cut(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Drop the connection mid-answer, as a crashed or disconnected backend does."""
    await asyncio.sleep(0.05)  # let what was written reach the gateway first
    assert request.transport is not None
    request.transport.abort()
    return response


async def _finish(seen: VendorRequest, response: web.StreamResponse) -> web.StreamResponse:
    await response.write_eof()
    seen.complete = True
    return response
