"""What the ledger answers: statuses, outcomes and rows, as frozen dataclasses."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

Clock = Callable[[], datetime]

# What the gate (gw_gate) answers: may this caller spend this now.
GateStatus = Literal[
    "ok",
    "unknown_organization",
    "license_suspended",
    "feature_degraded",
    "plan_forbidden",
    "quota_exceeded",
    "insufficient",
]
# What a reserve answers: the gate's status, or what became of its idempotency key.
ReserveStatus = Literal[
    "ok",
    "unknown_organization",
    "license_suspended",
    "feature_degraded",
    "plan_forbidden",
    "quota_exceeded",
    "insufficient",
    "duplicate",
    "idempotency_key_reused",
]
LicenseState = Literal["active", "past_due", "suspended", "canceled"]
# Who made a reservation, and so who may settle it: the proxy's exchange (or the
# sweeper), or the two-phase API of the same organization.
Source = Literal["proxy", "api"]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ReserveOutcome:
    """A reserve's (or the gate's) answer. Only ``ok`` and ``duplicate`` carry a
    reservation; the gate never does."""

    status: ReserveStatus
    reservation_id: uuid.UUID | None
    from_allowance: int
    from_purchased: int
    allowance: int  # available after the reservation
    purchased: int
    plan: str | None
    period_end: datetime | None
    allocated: int
    license_date: datetime | None  # when the license gate closed (or closes) this
    detail: str | None  # JSON: the quota that refused it, {subject, quota, spent}

    @property
    def remaining(self) -> int:
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Settlement:
    charged: int
    allowance: int
    purchased: int
    token_type: str
    org_id: str
    allocated: int
    period_start: datetime | None
    unbilled: int = 0  # usage above the hold that the balance could not cover

    @property
    def remaining(self) -> int:
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Account:
    org_id: str
    token_type: str
    allowance: int
    purchased: int
    reserved: int
    allocated: int
    period_start: datetime
    period_end: datetime
    last_used_at: datetime | None
    # Allowance used this period beyond what the plan now allocates (after a move to a
    # smaller plan): allowance released by holds pays it off before coming back.
    overdrawn: int = 0

    @property
    def available(self) -> int:
        return self.allowance + self.purchased


@dataclass(frozen=True)
class Reservation:
    id: uuid.UUID
    org_id: str
    token_type: str
    amount: int
    state: str
    charged: int | None
    route: str | None
    user_id: str | None
    created_at: datetime
    expires_at: datetime
    source: Source = "proxy"
    unbilled: int = 0
    usage: dict[str, Any] | None = None  # what the backend reported (usage-priced routes)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"
