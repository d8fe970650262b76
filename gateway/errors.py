"""The gateway's errors, and the problem+json contract they map to.

Every refusal a client can see is a ``GatewayError`` with a stable machine ``code``
and an HTTP status (RFC 9457 problem details)::

    GatewayError
    ├── InvalidToken            401 invalid_token
    ├── InsufficientTokens      402 insufficient_tokens
    ├── QuotaExceeded           402 quota_exceeded
    ├── PlanForbidden           403 plan_forbidden
    ├── UnknownOrganization     403 unknown_organization
    ├── LicenseSuspended        403 license_suspended
    ├── FeatureDegraded         403 feature_degraded
    ├── AdminOnly               403 admin_only
    ├── InvalidRequest          400 invalid_request
    ├── InvalidSignature        400 invalid_signature
    ├── NoRoute                 404 no_route
    ├── NotFound                404 not_found
    ├── NoReservation           404 no_reservation
    ├── BillingNotConfigured    404 billing_not_configured
    ├── MethodNotAllowed        405 method_not_allowed
    ├── ReservationSettled      409 reservation_settled
    ├── Conflict                409 conflict
    ├── PayloadTooLarge         413 payload_too_large
    ├── InvalidCharge           422 invalid_charge
    ├── IdempotencyKeyReused    422 idempotency_key_reused
    ├── RateLimited             429 rate_limited
    ├── TooFrequent             429 too_frequent
    ├── TooManyInFlight         429 too_many_in_flight
    ├── Blocked                 429 blocked
    ├── InternalError           500 internal_error (a bug: logged with its traceback)
    ├── UpstreamError           502 upstream_error
    ├── UpstreamTimeout         504 upstream_timeout
    ├── LedgerUnavailable       503 ledger_unavailable
    └── LimiterUnavailable      503 limits_unavailable (only with on_store_error: closed)

Operator-facing failures that never reach a client as such:

    ConfigError                 rules.yaml (or the environment) is invalid; lists every error
    LedgerError                 a ledger operation was refused (already settled, over the
                                held amount, ...)
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

PROBLEM_JSON = "application/problem+json"


class GatewayError(Exception):
    """A refusal with an HTTP status and a stable machine code."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        problem: dict[str, Any] = {
            "type": f"https://metering-gateway.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
        }
        if instance is not None:
            problem["instance"] = instance
        problem.update(self.extra)
        return problem

    def response(
        self, *, instance: str | None = None, headers: dict[str, str] | None = None
    ) -> web.Response:
        all_headers = {**self.headers, **(headers or {})}
        return web.Response(
            status=self.status,
            body=json.dumps(self.body(instance)).encode(),
            content_type=PROBLEM_JSON,
            headers=all_headers,
        )


class InvalidToken(GatewayError):
    status = 401
    code = "invalid_token"
    title = "Invalid token"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(
            detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}, **extra
        )


class InsufficientTokens(GatewayError):
    status = 402
    code = "insufficient_tokens"
    title = "Insufficient tokens"


class QuotaExceeded(GatewayError):
    status = 402
    code = "quota_exceeded"
    title = "Quota exceeded"


class PlanForbidden(GatewayError):
    status = 403
    code = "plan_forbidden"
    title = "Not included in your plan"


class UnknownOrganization(GatewayError):
    status = 403
    code = "unknown_organization"
    title = "Unknown organization"


class InvalidRequest(GatewayError):
    status = 400
    code = "invalid_request"
    title = "Invalid request"


class NoReservation(GatewayError):
    status = 404
    code = "no_reservation"
    title = "No such reservation"


class ReservationSettled(GatewayError):
    status = 409
    code = "reservation_settled"
    title = "Reservation already settled"


class InvalidCharge(GatewayError):
    status = 422
    code = "invalid_charge"
    title = "Invalid charge"


class LicenseSuspended(GatewayError):
    status = 403
    code = "license_suspended"
    title = "License suspended"


class FeatureDegraded(GatewayError):
    status = 403
    code = "feature_degraded"
    title = "Feature switched off"


class NoRoute(GatewayError):
    status = 404
    code = "no_route"
    title = "No route"


class RateLimited(GatewayError):
    status = 429
    code = "rate_limited"
    title = "Rate limited"


class TooFrequent(GatewayError):
    status = 429
    code = "too_frequent"
    title = "Too frequent"


class TooManyInFlight(GatewayError):
    status = 429
    code = "too_many_in_flight"
    title = "Too many requests in flight"


class Blocked(GatewayError):
    status = 429
    code = "blocked"
    title = "Blocked"


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"
    title = "Upstream error"


class UpstreamTimeout(GatewayError):
    status = 504
    code = "upstream_timeout"
    title = "Upstream timeout"


class LedgerUnavailable(GatewayError):
    status = 503
    code = "ledger_unavailable"
    title = "Ledger unavailable"


class LimiterUnavailable(GatewayError):
    status = 503
    code = "limits_unavailable"
    title = "Limits unavailable"


class AdminOnly(GatewayError):
    status = 403
    code = "admin_only"
    title = "Operators only"


class NotFound(GatewayError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(GatewayError):
    status = 409
    code = "conflict"
    title = "Conflict"


class InvalidSignature(GatewayError):
    status = 400
    code = "invalid_signature"
    title = "Invalid webhook signature"


class BillingNotConfigured(GatewayError):
    status = 404
    code = "billing_not_configured"
    title = "Billing is not configured"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class RequestTimeout(GatewayError):
    status = 408
    code = "request_timeout"
    title = "Request timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class DuplicateRequest(GatewayError):
    """A proxied request repeating an Idempotency-Key already used for this route: it is
    not forwarded again (the body names the earlier reservation and its charge)."""

    status = 409
    code = "duplicate_request"
    title = "Duplicate request"


class IdempotencyKeyReused(GatewayError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class InternalError(GatewayError):
    status = 500
    code = "internal_error"
    title = "Internal error"


def contract() -> dict[str, type[GatewayError]]:
    """Every error a client can see, by code (each code is one class and one status)."""
    found: dict[str, type[GatewayError]] = {}
    pending: list[type[GatewayError]] = list(GatewayError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.code in found and found[cls.code] is not cls:
            raise AssertionError(f"code {cls.code!r} is used by {found[cls.code]} and {cls}")
        found[cls.code] = cls
    return found


class ConfigError(Exception):
    """Invalid configuration; ``errors`` holds every problem, each prefixed by its path."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {e}" for e in self.errors)


class CommandError(Exception):
    """A command failed in a way the operator can fix; the message says how."""


class EmbeddedUnavailable(RuntimeError):
    """The embedded servers are not installed (the ``embedded`` extra) or failed to start."""


class LedgerError(Exception):
    """A ledger operation was refused; ``reason`` is a stable word such as
    ``already_committed``, ``already_refunded``, ``expired``, ``exceeds_amount``, ``not_found``,
    ``unknown_organization``, ``invalid_amount``, ``unknown_plan``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
