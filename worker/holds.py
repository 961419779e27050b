"""The rules of holds, as a wallet's writer decides them (worker/decide.py calls them). Pure.

- A hold reserves part of the balance: it is placed if the wallet's available funds
  (balance - held) cover it, else refused (`insufficient_funds`, recorded like a refused
  withdrawal). Withdrawals, transfers and new holds are decided on what is available.
- A held hold ends once: captured (the captured amount leaves the balance, what it does not
  capture is released), voided, or expired. A capture, void or expiry of a hold that has
  ended is answered `hold_not_active` and records nothing; an expiry not yet due likewise.
- A hold past its expiry is never captured: a capture that finds it so expires it first.
"""

from __future__ import annotations

from typing import NamedTuple

from shared.codec import HOLD_ENDINGS, HoldStatus, Kind, OperationRequest, Outcome, Status


class HoldState(NamedTuple):
    """A hold as the batch finds it (cached or read) and leaves it."""

    wallet_id: str
    amount: int
    status: str
    expires_at: int  # ms since the epoch


class HoldRow(NamedTuple):
    """A hold placed or ended by the batch, in the columns RECORD_BATCH takes: inserted if
    placed by it (`placed`), else moved from held to its end."""

    wallet_id: str
    id: str
    amount: int
    status: str
    captured: int
    expires_at: int
    transfer_id: str | None
    destination_id: str | None
    placed: bool


def refused(kind: str, status: str, r: OperationRequest) -> Outcome:
    """An answer recorded nowhere."""
    return Outcome(
        r.tag, r.op_id, r.wallet_id, status, kind=kind, amount=r.amount, hold_id=r.hold_id
    )


def ending_refusal(
    r: OperationRequest, hold: HoldState | None, now_ms: int
) -> tuple[str | None, bool]:
    """Why the capture, void or expiry `r` cannot end its hold, if it cannot (a Status), and
    whether the hold is past its expiry and still held (a capture then expires it)."""
    if hold is None or hold.wallet_id != r.wallet_id:
        return Status.HOLD_NOT_FOUND, False
    if hold.status != HoldStatus.HELD:
        return Status.HOLD_NOT_ACTIVE, False
    due = now_ms >= hold.expires_at
    if r.kind == Kind.HOLD_EXPIRE:
        return (None, True) if due else (Status.HOLD_NOT_ACTIVE, False)
    if due:
        return Status.HOLD_NOT_ACTIVE, True
    if r.kind == Kind.HOLD_CAPTURE and r.amount > hold.amount:
        return Status.ABOVE_HOLD, False
    return None, False


def ended(r: OperationRequest, hold: HoldState, kind: str | None = None) -> HoldRow:
    """The hold as `r` (or, with `kind`, its expiry) ends it."""
    kind = kind or r.kind
    capture = kind == Kind.HOLD_CAPTURE
    return HoldRow(
        r.wallet_id,
        r.hold_id,
        hold.amount,
        HOLD_ENDINGS[Kind(kind)],
        r.amount if capture else 0,
        hold.expires_at,
        (r.transfer_id or None) if capture else None,
        (r.counterparty or None) if capture else None,
        False,
    )


def placed(r: OperationRequest) -> HoldRow:
    return HoldRow(
        r.wallet_id, r.hold_id, r.amount, HoldStatus.HELD, 0, r.expires_at, None, None, True
    )


def amount_moved(kind: str, r_amount: int, hold: HoldState) -> tuple[int, int, int]:
    """What ending `hold` by `kind` does: (the ledger row's amount, the change to the balance,
    the change to what is held)."""
    if kind == Kind.HOLD_CAPTURE:
        return r_amount, -r_amount, -hold.amount
    return hold.amount, 0, -hold.amount
