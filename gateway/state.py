"""The application's typed state, shared by the app, the pipeline and the APIs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.limits.config import Effective, effective
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.alerts import Alerter, Thresholds
    from gateway.auth import Authenticator
    from gateway.leases import Leases
    from gateway.ledger import Ledger
    from gateway.limits.limiter import Limiter, SpikeAlert
    from gateway.rules import Route, Rules

# How long a gateway trusts its copy of an organization's plan when choosing per-plan
# limits (the ledger itself always uses the plan in force).
PLAN_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class Active:
    """The rules in force and what was built from them, swapped as one on reload."""

    rules: Rules
    auth: Authenticator
    alerter: Alerter
    loaded_at: float


@dataclass
class GatewayState:
    active: Active
    ledger: Ledger
    session: aiohttp.ClientSession
    limiter: Limiter
    metrics: Metrics
    thresholds: Thresholds
    leases: Leases
    environ: Mapping[str, str] = field(default_factory=dict)
    inflight: set[asyncio.Task[None]] = field(default_factory=set)
    last_reload: dict[str, Any] = field(default_factory=dict)
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    _plans: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    _limits: dict[tuple[str | None, int], Effective] = field(default_factory=dict)
    _limits_rules: Rules | None = None

    @property
    def rules(self) -> Rules:
        return self.active.rules

    async def plan_of(self, org: str) -> str | None:
        now = time.monotonic()
        cached = self._plans.get(org)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = await self.ledger.organization(org)
        plan = str(found["plan"]) if found else None
        if len(self._plans) > 100_000:
            self._plans.clear()
        self._plans[org] = (now + PLAN_CACHE_SECONDS, plan)
        return plan

    async def limits_for(self, org: str, route: Route, rules: Rules | None = None) -> Effective:
        """The limits of ``route`` for ``org`` under ``rules`` (the request's snapshot:
        ``route`` belongs to it), cached per rules in force."""
        rules = rules or self.rules
        config = rules.document.limits
        plan = await self.plan_of(org) if config.plans else None
        if self._limits_rules is not rules:
            self._limits, self._limits_rules = {}, rules
        key = (plan, route.index)
        if key not in self._limits:
            self._limits[key] = effective(config, plan, route.config.limits)
        return self._limits[key]

    def alert(self, alert: SpikeAlert) -> None:
        self.active.alerter.spike(alert)


STATE = web.AppKey("gateway", GatewayState)
