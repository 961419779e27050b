"""Rows and outcomes as the bodies the API answers (api/bodies.py declares them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

from api.bodies import Hold, Operation, Transfer, TransferStatus, Wallet
from shared.codec import (
    COMPLETED,
    IN_FLIGHT,
    REJECTED,
    RETURNING,
    Outcome,
    format_time,
    ledger_outcome,
)
from shared.money import format_minor


def wallet_body(row: Any) -> Wallet:
    return Wallet(
        id=row["id"],
        balance=format_minor(row["balance"]),
        held=format_minor(row["held"]),
        available=format_minor(row["balance"] - row["held"]),
        created_at=format_time(row["created_at"]),
        updated_at=format_time(row["updated_at"]),
    )


def operation_body(o: Outcome) -> Operation:
    return Operation(
        id=o.op_id,
        wallet_id=o.wallet_id,
        operation_type=o.kind,  # type: ignore[arg-type]
        amount=format_minor(o.amount),
        status=o.status,  # type: ignore[arg-type]
        reason=o.reason,  # type: ignore[arg-type]
        balance=format_minor(o.balance_after),
        seq=o.seq,
        created_at=o.created_at,
        transfer_id=o.transfer_id or None,
        counterparty=o.counterparty or None,
        hold_id=o.hold_id or None,
        available=format_minor(o.balance_after - o.held_after),
    )


def transfer_body(
    transfer_id: str,
    source: str,
    destination: str,
    amount: int,
    status: TransferStatus,
    reason: str | None = None,
    balance: int | None = None,
    created_at: str | None = None,
) -> Transfer:
    return Transfer(
        id=transfer_id,
        from_=source,
        to=destination,
        amount=format_minor(amount),
        status=status,
        reason=reason,  # type: ignore[arg-type]
        balance=None if balance is None else format_minor(balance),
        created_at=created_at,
        href=f"/api/v1/transfers/{transfer_id}",
    )


# A transfer's state as the client sees it: returning is still in flight.
CLIENT_STATUS: dict[str, TransferStatus] = {
    IN_FLIGHT: "in_flight",
    RETURNING: "in_flight",
    COMPLETED: "completed",
    REJECTED: "rejected",
}


def transfer_from_row(row: Any) -> Transfer:
    status = CLIENT_STATUS[row["status"]]
    return transfer_body(
        row["id"],
        row["source_id"],
        row["destination_id"],
        row["amount"],
        status,
        row["reason"] if status == "rejected" else None,
        row["source_balance_after"],
        format_time(row["created_at"]),
    )


def outcome_from_row(row: Any) -> Outcome:
    return ledger_outcome(
        row, op_id=row["id"], wallet_id=row["wallet_id"], created_at=format_time(row["created_at"])
    )


class HoldFacts(NamedTuple):
    """What never changes of a hold: enough, with an outcome, to answer without reading it."""

    wallet_id: str
    amount: int
    expires_at: str
    created_at: str


def hold_facts(row: Any) -> HoldFacts:
    return HoldFacts(
        row["wallet_id"],
        row["amount"],
        format_time(row["expires_at"]),
        format_time(row["created_at"]),
    )


def time_of_ms(ms: int) -> str:
    """A time in ms since the epoch, as the API writes times."""
    return format_time(
        datetime.fromtimestamp(ms // 1000, UTC).replace(microsecond=ms % 1000 * 1000)
    )


def hold_from_outcome(hold_id: str, facts: HoldFacts, o: Outcome, status: str) -> Hold:
    """A hold as the writer's outcome (placing it, or ending it) just left it."""
    return Hold(
        id=hold_id,
        wallet_id=facts.wallet_id,
        amount=format_minor(facts.amount),
        status=status,  # type: ignore[arg-type]
        captured=format_minor(o.amount) if status == "captured" else None,
        expires_at=facts.expires_at,
        created_at=facts.created_at,
        updated_at=o.created_at,
        balance=format_minor(o.balance_after),
        available=format_minor(o.balance_after - o.held_after),
        href=hold_url(hold_id),
    )


def hold_url(hold_id: str) -> str:
    return f"/api/v1/holds/{hold_id}"


def hold_body(row: Any) -> Hold:
    """A hold as api/queries.py's HOLD_COLUMNS read it."""
    transfer = row["transfer_status"]
    return Hold(
        id=row["id"],
        wallet_id=row["wallet_id"],
        amount=format_minor(row["amount"]),
        status=row["status"],
        captured=format_minor(row["captured"]) if row["status"] == "captured" else None,
        expires_at=format_time(row["expires_at"]),
        created_at=format_time(row["created_at"]),
        updated_at=format_time(row["updated_at"]),
        balance=format_minor(row["balance"]),
        available=format_minor(row["balance"] - row["held"]),
        to=row["destination_id"],
        transfer_id=row["transfer_id"],
        transfer_status=CLIENT_STATUS[transfer] if transfer else None,
        href=hold_url(row["id"]),
    )
