"""Alerts: usage thresholds, spend spikes, and the signed webhooks that deliver both.

A webhook's body is JSON; the ``X-Gateway-Signature`` header is ``t=<unix seconds>,v1=<hex
HMAC-SHA256 of "<t>.<body>" with the secret>``, so a receiver can check both the sender
and the freshness (reject a ``t`` older than a few minutes). ``verify`` does both.
Failed deliveries are retried, then kept in the ledger's ``webhook_dead_letters``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp

from gateway.ledger import Ledger, ReserveOutcome, Settlement
from gateway.limits.config import Spike
from gateway.limits.limiter import SpikeAlert
from gateway.rules import AlertsConfig

log = logging.getLogger("gateway.alerts")

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


class Thresholds:
    """Announces, once per threshold per token type per period, that an organization has
    used that fraction of its allowance: a log event and, when configured, a signed
    webhook (retried, then dead-lettered in the ledger)."""

    def __init__(
        self, ledger: Ledger, session: aiohttp.ClientSession, environ: Mapping[str, str]
    ) -> None:
        self._ledger = ledger
        self._session = session
        self._environ = environ
        self._announced: set[tuple[str, str, datetime, float]] = set()
        self._tasks: set[asyncio.Task[bool]] = set()
        self.events: list[dict[str, Any]] = []  # the latest, for tests and debugging

    @staticmethod
    def used_fraction(allocated: int, allowance: int) -> float:
        return (allocated - allowance) / allocated if allocated > 0 else 0.0

    def warning(self, config: AlertsConfig, token_type: str, outcome: ReserveOutcome) -> str | None:
        """The low-balance header's value for a proxied call, if any threshold is reached."""
        if not config.thresholds:
            return None
        used = self.used_fraction(outcome.allocated, outcome.allowance)
        if outcome.allocated <= 0 or used < min(config.thresholds):
            return None
        return f"{token_type}: {used:.0%} of this period's allowance used"

    async def after_commit(self, config: AlertsConfig, settlement: Settlement) -> None:
        if settlement.allocated <= 0 or settlement.period_start is None:
            return
        used = self.used_fraction(settlement.allocated, settlement.allowance)
        for threshold in sorted(config.thresholds):
            if used < threshold:
                break
            key = (settlement.org_id, settlement.token_type, settlement.period_start, threshold)
            if key in self._announced:
                continue
            first = await self._ledger.threshold_crossed(
                settlement.org_id, settlement.token_type, settlement.period_start, threshold
            )
            self._announced.add(key)
            if first:
                self._announce(config, settlement, threshold, used)

    def _announce(
        self, config: AlertsConfig, settlement: Settlement, threshold: float, used: float
    ) -> None:
        event = {
            "type": "usage_threshold",
            "organization": settlement.org_id,
            "token_type": settlement.token_type,
            "threshold": threshold,
            "used_fraction": round(used, 4),
            "allocated": settlement.allocated,
            "available": settlement.allowance + settlement.purchased,
            "period_start": settlement.period_start.isoformat()
            if settlement.period_start
            else None,
        }
        self.events.append(event)
        del self.events[:-100]
        log.warning(
            "organization '%s' has used %.0f%% of its %s allowance (threshold %.0f%%)",
            settlement.org_id,
            used * 100,
            settlement.token_type,
            threshold * 100,
            extra={"event": "usage_threshold", **event},
        )
        if config.webhook_url:
            task = asyncio.create_task(
                deliver(
                    self._session,
                    config.webhook_url,
                    event,
                    secret=self._environ.get(config.webhook_secret_env),
                    retries=config.retries,
                    dead_letter=self._ledger.dead_letter,
                )
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)


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
        payload = {
            "type": "spend_spike",
            "organization": alert.org,
            "recent_tokens": alert.recent,
            "baseline_tokens_per_window": alert.baseline,
            "window_minutes": alert.window_minutes,
            "blocked": alert.blocked,
        }
        if await deliver(self._session, self._config.webhook_url, payload, secret=self._secret):
            self.sent += 1

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
