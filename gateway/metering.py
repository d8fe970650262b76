"""Reading what a backend reports it used, as its answer passes through.

``inspect_request`` reads a usage-priced request's body once, before the hold: its model,
output limit and whether it streams (and, for OpenAI streams, asks for the final usage
chunk). ``UsageReader`` is fed the answer's bytes as they are relayed, a JSON body or an
SSE stream in either vendor's format, and says at the end what was used, or None when the
backend reported nothing usable. Neither ever buffers more than one SSE line (bounded) or
the JSON body the caller chose to keep.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.rules import Usage, UsageConfig, hold_for

MAX_SSE_LINE = 1024 * 1024  # a usage event is small; a longer line is relayed, not parsed


@dataclass(frozen=True)
class UsageRequest:
    """A usage-priced request as read before forwarding."""

    body: bytes  # what to forward (the client's, or with include_usage added)
    model: str | None
    stream: bool
    hold: int


def inspect_request(config: UsageConfig, body: bytes, content_encoding: str) -> UsageRequest:
    """Read the request's model, output limit and stream flag (the body was read within
    ``max_request_bytes`` by the pipeline); compute its hold. For an
    OpenAI stream, ``stream_options.include_usage`` is set to true (whatever the client
    sent: a stream without its usage could not be charged by it). Raises
    ``InvalidRequest`` for a body that is not a JSON object."""
    if content_encoding not in ("", "identity"):
        raise InvalidRequest(
            "this route is priced by usage; send its request body uncompressed "
            f"(Content-Encoding {content_encoding!r} is not read)"
        )
    parsed: Any = {}
    if body.strip():
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = parsed.get("model")
    # Any truthy "stream" counts: a lenient backend may stream for "stream": 1 too, and a
    # stream whose usage was never asked for could go uncharged.
    stream = bool(parsed.get("stream"))
    if stream and config.format == "openai":
        options = parsed.get("stream_options")
        if not isinstance(options, dict) or options.get("include_usage") is not True:
            parsed["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            body = json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()
    return UsageRequest(
        body=body,
        model=model if isinstance(model, str) else None,
        stream=stream,
        hold=hold_for(config, parsed, len(body)),
    )


def _count(source: dict[str, Any], name: str) -> int | None:
    value = source.get(name)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


@dataclass
class _Counters:
    input: int | None = None  # as the vendor reports it (OpenAI's includes cached)
    cached: int = 0
    cache_creation: int = 0
    output: int | None = None


class UsageReader:
    """Fed an answer's bytes in order; ``usage()`` at the end. ``stream`` selects SSE
    (``text/event-stream``) over one JSON body; a compressed answer (gzip, deflate) is
    decompressed for reading only: the bytes relayed are untouched."""

    def __init__(
        self,
        fmt: str,
        model: str | None,
        *,
        stream: bool,
        content_encoding: str = "",
        max_body_bytes: int,
    ) -> None:
        self.format = fmt
        self.model = model
        self.stream = stream
        self.max_body_bytes = max_body_bytes
        self.counters = _Counters()
        self.seen = False
        self.unreadable = False
        self._pending = b""
        self._skipping = False  # inside an over-long SSE line
        self._body: list[bytes] = []
        self._body_size = 0
        self._decoder: Any = None
        encoding = content_encoding.lower().strip()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            self.unreadable = True

    def feed(self, chunk: bytes) -> None:
        if self.unreadable or not chunk:
            return
        if self._decoder is not None:
            try:
                chunk = self._decoder.decompress(chunk, self.max_body_bytes)
            except zlib.error:
                self.unreadable = True
                return
        if self.stream:
            self._feed_lines(chunk)
            return
        self._body_size += len(chunk)
        if self._body_size > self.max_body_bytes:
            self.unreadable = True
            self._body = []
            return
        self._body.append(chunk)

    def _feed_lines(self, chunk: bytes) -> None:
        data = self._pending + chunk
        lines = data.split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False  # the end of the over-long line
                continue
            self._line(line.rstrip(b"\r"))
        if len(self._pending) > MAX_SSE_LINE:
            self._pending = b""
            self._skipping = True

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or b"usage" not in line:
            return
        try:
            event = json.loads(line[5:])
        except (ValueError, RecursionError):
            return
        if isinstance(event, dict):
            self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        if self.format == "openai":
            self._usage(event.get("usage"))
        elif event.get("type") == "message_start":
            message = event.get("message")
            if isinstance(message, dict):
                self._usage(message.get("usage"))
        elif event.get("type") == "message_delta":
            self._usage(event.get("usage"))

    def _usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        c = self.counters
        if self.format == "openai":
            prompt, completion = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
            if prompt is None or completion is None:
                return
            details = usage.get("prompt_tokens_details")
            cached = _count(details, "cached_tokens") if isinstance(details, dict) else None
            c.input, c.output, c.cached = prompt, completion, min(cached or 0, prompt)
            self.seen = True
            return
        # Anthropic: message_start carries the input counters (and an initial output),
        # each message_delta the cumulative output (and, lately, the input counters again).
        found = False
        for name, attr in (
            ("input_tokens", "input"),
            ("output_tokens", "output"),
            ("cache_read_input_tokens", "cached"),
            ("cache_creation_input_tokens", "cache_creation"),
        ):
            value = _count(usage, name)
            if value is not None:
                setattr(c, attr, value)
                found = True
        self.seen = self.seen or found

    def usage(self) -> Usage | None:
        """What the backend reported, or None when it reported nothing usable."""
        if self.unreadable:
            return None
        if not self.stream:
            try:
                body = json.loads(b"".join(self._body))
            except (ValueError, RecursionError):
                return None
            if isinstance(body, dict):
                self._usage(body.get("usage"))
        elif self._pending and not self._skipping:
            self._line(self._pending.rstrip(b"\r"))
            self._pending = b""
        c = self.counters
        if not self.seen or c.input is None or c.output is None:
            return None
        # OpenAI's prompt count includes the cached part; Anthropic's input excludes both
        # cache reads and cache writes (charged here as input).
        uncached = c.input - c.cached if self.format == "openai" else c.input + c.cache_creation
        return Usage(input=uncached, cached_input=c.cached, output=c.output, model=self.model)
