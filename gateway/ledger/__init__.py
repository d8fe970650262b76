"""The ledger: balances, reservations and the journal on PostgreSQL."""

from gateway.ledger.ledger import (
    Account,
    Ledger,
    Reservation,
    ReserveOutcome,
    Settlement,
    Violation,
)

__all__ = ["Account", "Ledger", "Reservation", "ReserveOutcome", "Settlement", "Violation"]
