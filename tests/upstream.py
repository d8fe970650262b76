"""A real local AI backend for the tests, steered by the query string:

``?behave=ok`` (default) JSON echo of what arrived; ``status=N`` answers N;
``hang`` never answers; ``reset`` drops the connection before answering;
``sse`` streams events, the second only once ``sse_gate`` is set;
``sse_reset`` sends one event and drops the connection; ``slow=S`` waits S seconds first.
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
            headers={"X-Upstream": "test", "X-Tokens-Charged": "999"},
        )
        self.finished.append(request.path)
        return response
