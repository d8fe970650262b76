"""Signed webhooks, for spike alerts and usage thresholds.

The body is JSON; the ``X-Gateway-Signature`` header is ``t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<body>" with the secret>``, so a receiver can check both the sender
and the freshness (reject a ``t`` older than a few minutes). ``verify`` does both.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

log = logging.getLogger("gateway.webhooks")

DeadLetter = Callable[[str, dict[str, Any], int, str], Awaitable[None]]


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300) -> bool:
    """Check a signature header as a webhook receiver would."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


async def deliver(
    session: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    *,
    secret: str | None,
    retries: int = 3,
    backoff: float = 0.5,
    dead_letter: DeadLetter | None = None,
) -> bool:
    """POST ``payload``; retry on failure (``backoff`` doubling), then hand it to
    ``dead_letter``. Returns whether it was delivered. Never raises."""
    body = json.dumps(payload).encode()
    error = ""
    for attempt in range(retries + 1):
        headers = {"Content-Type": "application/json"}
        if secret:
            headers["X-Gateway-Signature"] = sign(secret, body, int(time.time()))
        try:
            async with session.post(
                url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status < 300:
                    return True
                error = f"answered {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        log.warning("webhook %s failed (attempt %d): %s", url, attempt + 1, error)
        if attempt < retries:
            await asyncio.sleep(backoff * 2**attempt)
    log.error("webhook %s undelivered after %d attempts: %s", url, retries + 1, error)
    if dead_letter is not None:
        try:
            await dead_letter(url, payload, retries + 1, error)
        except Exception:
            log.exception("could not record the undelivered webhook")
    return False
