"""The one error path, and what every request carries.

Handlers raise ``GatewayError``; ``problems`` (the application's outermost middleware)
logs the refusal, counts it, counts it toward a block when it suggests abuse, and answers
problem+json. Anything else a handler raises is a bug: logged with its traceback and
answered 500 ``internal_error``, never with a traceback in the body.

Handlers record what they learn on the request, so the refusal is counted against the
right caller and route: ``request[PRINCIPAL]`` once authenticated, ``request[ROUTE_NAME]``
once matched. ``request_id(request)`` is the one id of the request, the caller's
``X-Request-Id`` when it is a safe token.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.auth import Principal
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NoRoute,
    PayloadTooLarge,
)
from gateway.state import STATE

log = logging.getLogger("gateway.requests")

PRINCIPAL = web.RequestKey("principal", Principal)
ROUTE_NAME = web.RequestKey("route_name", str)
_REQUEST_ID = web.RequestKey("request_id", str)

_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Refusals that count toward blocking a principal (or an address, for 401s).
_COUNTED_REFUSALS = frozenset({401, 402, 403, 429})
# A JSON body of the gateway's own APIs is small; its nesting is bounded well below
# Python's recursion limit so that a hostile body is a 400, not a RecursionError.
MAX_JSON_DEPTH = 32
MAX_JSON_BYTES = 1 << 20
# Whole tokens fit PostgreSQL's bigint.
MAX_TOKENS = (1 << 63) - 1


def request_id(request: web.Request) -> str:
    """The request's id: the caller's ``X-Request-Id`` when it is a safe token, else new."""
    found = request.get(_REQUEST_ID)
    if found is None:
        given = request.headers.get("X-Request-Id", "")
        found = given if _SAFE_REQUEST_ID.match(given) else uuid.uuid4().hex
        request[_REQUEST_ID] = found
    return found


async def authenticate(request: web.Request) -> Principal:
    """The verified caller of ``request`` (raises ``InvalidToken``)."""
    principal = await request.config_dict[STATE].active.auth.authenticate(
        request.headers.get("Authorization")
    )
    request[PRINCIPAL] = principal
    return principal


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object (``{}`` when there is none). Raises
    ``InvalidRequest`` for anything else: not JSON, too deep, a number too long to be
    one, a NUL or a lone surrogate in a string; ``PayloadTooLarge`` past 1 MiB."""
    if not request.body_exists:
        return {}
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"the body is over {MAX_JSON_BYTES} bytes")
    raw = await request.content.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"the body is over {MAX_JSON_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        _check_depth(text)
        body = json.loads(text)
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not UTF-8: {exc.reason}") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {_short(exc)}") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    _check_strings(body, "body")
    return body


def whole_tokens(value: object, name: str, *, minimum: int = 0) -> int:
    """``value`` as a whole number of tokens that the ledger can hold, else
    ``InvalidRequest`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be a whole number of tokens")
    if not minimum <= value <= MAX_TOKENS:
        raise InvalidRequest(f"'{name}' must be from {minimum} to {MAX_TOKENS}")
    return value


def clean_text(value: str, name: str) -> str:
    """``value`` if PostgreSQL can store it as text (no NUL, no lone surrogate)."""
    if "\x00" in value:
        raise InvalidRequest(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{name} contains a lone surrogate") from exc
    return value


def _check_depth(text: str) -> None:
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        elif char in "]}":
            depth -= 1


def _check_strings(node: object, where: str) -> None:
    if isinstance(node, str):
        clean_text(node, where)
    elif isinstance(node, dict):
        for key, value in node.items():
            clean_text(key, f"a key in {where}")
            _check_strings(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _check_strings(value, f"{where}[{index}]")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every endpoint's refusals: logged, counted, answered as problem+json."""
    if not request.raw_path.startswith("/"):
        # An absolute-form target (``POST http://host/path``) is for forward proxies.
        return await _refuse(
            request, InvalidRequest("the request target must be a path, not an absolute URL")
        )
    try:
        return await handler(request)
    except GatewayError as exc:
        return await _refuse(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return await _refuse(request, _from_http(request, exc))
    except Exception:
        log.exception(
            "internal error on %s %s request_id=%s",
            request.method,
            request.path,
            request_id(request),
        )
        return await _refuse(
            request, InternalError("the gateway failed; the error is logged with this request id")
        )


def _from_http(request: web.Request, exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NoRoute(f"nothing is served at {request.method} {request.path}")
    if exc.status == 405:
        return MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
    if exc.status == 413:
        return PayloadTooLarge(exc.text or "the body is too large")
    return InvalidRequest(exc.text or exc.reason)


async def _refuse(request: web.Request, exc: GatewayError) -> web.Response:
    state = request.config_dict[STATE]
    rid = request_id(request)
    principal = request.get(PRINCIPAL)
    route = request.get(ROUTE_NAME, "")
    log.info(
        "refused %s %s status=%d code=%s request_id=%s: %s",
        request.method,
        request.path,
        exc.status,
        exc.code,
        rid,
        exc.detail,
        extra={"request_id": rid, "status": exc.status, "code": exc.code},
    )
    metrics = state.metrics
    metrics.refusals.labels(exc.code).inc()
    metrics.requests.labels(route, "refused", str(exc.status)).inc()
    if exc.code == "ledger_unavailable":
        metrics.store_errors.labels("ledger").inc()
    elif exc.code == "limits_unavailable":
        metrics.store_errors.labels("redis").inc()
    if exc.status in _COUNTED_REFUSALS and exc.code != "blocked":
        await state.limiter.record_refusal(
            principal.org if principal else None,
            principal.user if principal else None,
            request.remote,
        )
    return exc.response(instance=request.path, headers={"X-Request-Id": rid})
