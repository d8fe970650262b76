"""Spike alerts: a structured log event and, when configured, a signed webhook POST.

The webhook body is JSON; the ``X-Gateway-Signature`` header is ``t=<unix seconds>,
v1=<hex HMAC-SHA256 of "<t>.<body>" with the secret>``, so a receiver can check both the
sender and the freshness (reject a ``t`` older than a few minutes).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping

import aiohttp

from gateway.limits.config import Spike
from gateway.limits.limiter import SpikeAlert

log = logging.getLogger("gateway.alerts")


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


class Alerter:
    def __init__(
        self, config: Spike | None, session: aiohttp.ClientSession, environ: Mapping[str, str]
    ) -> None:
        self._config = config
        self._session = session
        self._secret = environ.get(config.webhook_secret_env) if config else None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0

    def spike(self, alert: SpikeAlert) -> None:
        log.warning(
            "spend spike: organization '%s' spent %d tokens in the last %d minutes, above "
            "its baseline of %.1f per window%s",
            alert.org,
            alert.recent,
            alert.window_minutes,
            alert.baseline,
            "; organization blocked" if alert.blocked else "",
            extra={"event": "spend_spike", "organization": alert.org},
        )
        if self._config is None or not self._config.webhook_url:
            return
        task = asyncio.create_task(self._post(alert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, alert: SpikeAlert) -> None:
        assert self._config is not None and self._config.webhook_url
        body = json.dumps(
            {
                "type": "spend_spike",
                "organization": alert.org,
                "recent_tokens": alert.recent,
                "baseline_tokens_per_window": alert.baseline,
                "window_minutes": alert.window_minutes,
                "blocked": alert.blocked,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers["X-Gateway-Signature"] = sign(self._secret, body, int(time.time()))
        for attempt in range(3):
            try:
                async with self._session.post(
                    self._config.webhook_url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as resp:
                    if resp.status < 300:
                        self.sent += 1
                        return
                    log.warning("spike webhook answered %d", resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("spike webhook failed: %s", exc)
            await asyncio.sleep(0.5 * 2**attempt)
        log.error("spike alert for '%s' could not be delivered", alert.org)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
