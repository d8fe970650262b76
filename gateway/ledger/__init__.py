"""The ledger: balances, reservations and the journal on PostgreSQL."""

from gateway.ledger.ledger import Ledger
from gateway.ledger.records import (
    Account,
    GateStatus,
    LicenseState,
    Reservation,
    ReserveOutcome,
    ReserveStatus,
    Settlement,
    Source,
    Violation,
)
from gateway.ledger.seam import FUNCTION_FILES, wait_for_ledger

__all__ = [
    "FUNCTION_FILES",
    "Account",
    "GateStatus",
    "Ledger",
    "LicenseState",
    "Reservation",
    "ReserveOutcome",
    "ReserveStatus",
    "Settlement",
    "Source",
    "Violation",
    "wait_for_ledger",
]
