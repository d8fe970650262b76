"""Spike alerts: a structured log event and, when configured, a signed webhook POST
(see ``gateway.webhooks`` for the signature)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import aiohttp

from gateway.limits.config import Spike
from gateway.limits.limiter import SpikeAlert
from gateway.webhooks import deliver, sign, verify

__all__ = ["Alerter", "sign", "verify"]

log = logging.getLogger("gateway.alerts")


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
