"""Prometheus metrics, one registry per application (no module globals).

With ``gateway serve --workers N`` the workers share a multiprocess directory
(``PROMETHEUS_MULTIPROC_DIR``, set by the parent before any worker starts) and ``/metrics``
on any worker reports the sum over all of them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Metered requests by route, outcome (committed, refunded, refused, shadow) and status",
            ["route", "outcome", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens moved by the request path, by token type and movement "
            "(reserved, committed, refunded, expired, shadow, unbilled, unpaid)",
            ["token_type", "movement"],
            registry=r,
        )
        self.refusals = Counter(
            "gateway_refusals", "Refusals by problem code", ["code"], registry=r
        )
        self.shadow_refusals = Counter(
            "gateway_shadow_refusals",
            "Refusals that shadow-mode routes would have made, by route and code",
            ["route", "code"],
            registry=r,
        )
        self.leased_holds = Counter(
            "gateway_leased_holds",
            "Holds made ahead of demand (ledger.leases), by event: made, drawn by a request, "
            "returned undrawn",
            ["event"],
            registry=r,
        )
        self.leased_admissions = Counter(
            "gateway_leased_admissions",
            "Admissions made ahead of demand by the limits (ledger.leases), by event: made, "
            "drawn by a request, returned undrawn",
            ["event"],
            registry=r,
        )
        self.store_errors = Counter(
            "gateway_store_errors", "Errors reaching a store (ledger, redis)", ["store"], registry=r
        )
        self.reloads = Counter(
            "gateway_rules_reloads",
            "Rules reloads by outcome (ok, refused)",
            ["outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Whole metered request, until settled",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ledger_seconds = Histogram(
            "gateway_ledger_duration_seconds",
            "Ledger round trips by operation",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redis_seconds = Histogram(
            "gateway_redis_duration_seconds",
            "Limit checks on Redis, per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds",
            "Upstream exchanges, from sending to the end of the answer",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "gateway_gc_pause_seconds",
            "Garbage-collector pauses (each stops every request of the process), by generation",
            ["generation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight",
            "Requests being forwarded now",
            registry=r,
            multiprocess_mode="livesum",
        )

    @contextlib.contextmanager
    def gc_pauses(self) -> Iterator[None]:
        """Within: each garbage collection's pause is observed in ``gc_pause_seconds``."""
        started = 0.0

        def observe(phase: str, info: dict[str, Any]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                pause = time.perf_counter() - started
                self.gc_pause_seconds.labels(str(info["generation"])).observe(pause)

        gc.callbacks.append(observe)
        try:
            yield
        finally:
            gc.callbacks.remove(observe)

    def render(self) -> tuple[bytes, str]:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
