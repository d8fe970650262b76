"""A real local AI backend for the tests, steered by the query string:

``?behave=ok`` (default) JSON echo of what arrived; ``status=N`` answers N;
``hang`` never answers; ``reset`` drops the connection before answering;
``sse`` streams events, the second only once ``sse_gate`` is set;
``sse_reset`` sends one event and drops the connection; ``slow=S`` waits S seconds first;
``size=N`` answers N bytes at once, chunked in writes of ``chunk=M`` bytes when given.
``usage`` answers like an OpenAI-compatible chat backend reporting ``prompt=``,
``cached=`` and ``completion=`` (JSON, or SSE when the body says ``"stream": true``; its
final usage chunk only when ``stream_options.include_usage`` is true); ``anthropic`` the
same in Anthropic's format (``cache_read=``); with ``nousage`` no usage at all, with
``cut`` a stream is dropped before its usage, with ``pause=S`` each event waits S seconds.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDictProxy


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Upstream:
    seen: list[Seen] = field(default_factory=list)
    sse_gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by every request
    finished: list[str] = field(default_factory=list)  # paths whose answer was fully written
    in_flight: int = 0
    max_in_flight: int = 0
    sent: int = 0  # bytes of chunked large answers written so far (``size`` with ``chunk``)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, request.headers, body))
        self.arrived.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._behave(request, body)
        finally:
            self.in_flight -= 1

    async def _behave(self, request: web.Request, body: bytes) -> web.StreamResponse:
        q = request.query
        if "slow" in q:
            await asyncio.sleep(float(q["slow"]))
        behave = q.get("behave", "ok")
        if behave == "hang":
            await asyncio.sleep(3600)
        if behave == "reset" and request.transport is not None:
            request.transport.abort()
            return web.Response()
        if behave in ("sse", "sse_reset"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: first\n\n")
            if behave == "sse_reset":
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
                return response
            await asyncio.wait_for(self.sse_gate.wait(), timeout=15)
            for i in range(3):
                await response.write(f"data: event {i}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            self.finished.append(request.path)
            return response
        if behave in ("usage", "anthropic"):
            return await self._usage(request, body, behave == "anthropic")
        if "size" in q and "chunk" in q:  # the same, chunked, counting what it has sent
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            size, chunk, sent = int(q["size"]), b"x" * int(q["chunk"]), 0
            while sent < size:
                piece = chunk[: size - sent]
                await response.write(piece)
                sent += len(piece)
                self.sent += len(piece)
            await response.write_eof()
            self.finished.append(request.path)
            return response
        if "size" in q:  # a large answer, sent as fast as the connection takes it
            self.finished.append(request.path)
            return web.Response(body=b"x" * int(q["size"]), content_type="application/octet-stream")
        status = int(q.get("status", "200"))
        payload = {
            "method": request.method,
            "path_qs": request.path_qs,
            "body": body.decode(errors="replace") if len(body) < 65536 else None,
            "body_length": len(body),
        }
        response = web.Response(
            status=status,
            body=json.dumps(payload).encode(),
            content_type="application/json",
            headers={"X-Upstream": "test", "X-Tokens-Charged": "999", "X-Tokens-Held": "999"},
        )
        self.finished.append(request.path)
        return response

    async def _usage(
        self, request: web.Request, body: bytes, anthropic: bool
    ) -> web.StreamResponse:
        q = request.query
        sent = json.loads(body or b"{}")
        prompt, cached, completion = (
            int(q.get(k, "0")) for k in ("prompt", "cached", "completion")
        )
        cache_read = int(q.get("cache_read", "0"))
        reported = "nousage" not in q
        if anthropic:
            usage = {"input_tokens": prompt, "output_tokens": completion}
            if cache_read:
                usage["cache_read_input_tokens"] = cache_read
        else:
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
        if not sent.get("stream"):
            answer: dict[str, object] = {"id": "x", "model": sent.get("model"), "content": "hi"}
            if reported:
                answer["usage"] = usage
            self.finished.append(request.path)
            return web.json_response(answer)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        pause = float(q.get("pause", "0"))
        if anthropic:
            start = {
                "type": "message_start",
                "message": {
                    "id": "m",
                    "model": sent.get("model"),
                    "usage": {**usage, "output_tokens": 1} if reported else {},
                },
            }
            events = [("message_start", start)]
            events += [
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": f"part {i}"},
                    },
                )
                for i in range(3)
            ]
            final = (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": completion},
                },
            )
            lines = [f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events]
            tail = [f"event: {final[0]}\ndata: {json.dumps(final[1])}\n\n"] if reported else []
            tail.append('event: message_stop\ndata: {"type": "message_stop"}\n\n')
        else:
            with_usage = (sent.get("stream_options") or {}).get("include_usage") is True
            chunk = {
                "id": "x",
                "object": "chat.completion.chunk",
                "choices": [{"delta": {"content": "hi"}}],
            }
            if with_usage:
                chunk["usage"] = None
            lines = [f"data: {json.dumps(chunk)}\n\n" for _ in range(3)]
            tail = []
            if with_usage and reported:
                tail.append(f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n")
            tail.append("data: [DONE]\n\n")
        for line in lines:
            await response.write(line.encode())
            await asyncio.sleep(pause)
        if "cut" in q:
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        for line in tail:
            await response.write(line.encode())
        await response.write_eof()
        self.finished.append(request.path)
        return response
