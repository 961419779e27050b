"""The rules that decide a batch: each entry in stream order, over the wallets as the batch
found them. Pure (no Redis, no PostgreSQL), so each rule is tested alone
(tests/test_decide.py); worker/apply.py reads the wallets, and writes what is decided here.

- A deposit, a transfer's credit or its return adds to the balance, unless that would take
  it past the largest balance: a deposit or a credit is then rejected (`balance_limit`),
  and a return waits, recorded nowhere (it is sent again until it fits).
- A withdrawal or a transfer's debit takes from the balance, unless the balance is short:
  rejected (`insufficient_funds`).
- An operation whose id the wallet has recorded before is answered from that record: as a
  replay if it is a client's retry, as it was if it is the same entry delivered again, and
  as a reused key if the record is of another operation.
- A transfer's debit starts the transfer (`in_flight`, or `rejected`); its credit moves it
  on (`completed`, or `returning`); its return settles it (`rejected`). When one writer
  writes both wallets, the credit follows the debit in the batch and the transfer is
  started as it ends up.
- Holds: worker/holds.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shared.codec import (
    DEBITS,
    HOLD_ENDINGS,
    HoldStatus,
    Kind,
    OperationRequest,
    Outcome,
    Reason,
    Status,
    key_reused,
)
from shared.ids import expiry_op_id
from shared.money import MAX_BALANCE_MINOR
from worker.holds import HoldRow, HoldState, amount_moved, ended, ending_refusal, placed, refused

# The entry id of a credit that follows its transfer's debit in the same batch (the writer
# writes both wallets): it comes from no stream, and is applied only if the debit is.
LOCAL_CREDIT = ""
# The outcome of such a credit when its debit was not applied now (refused, or a replay):
# nothing is written, and nobody is answered for it.
SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: its id in the wallet's stream and the operation it carries."""

    entry_id: str
    request: OperationRequest


class WalletState(NamedTuple):
    """A wallet as a committed batch left it."""

    balance: int
    op_seq: int
    held: int = 0


@dataclass(slots=True)
class Wallet:
    """A wallet while its batch is decided: as the batch found it, and as it goes."""

    start: WalletState
    # The newest stream entry applied before this batch; entries up to it are redeliveries.
    applied_before: tuple[int, int] = (-1, -1)
    # Read for this batch, with its operations recorded before among the batch's (else
    # remembered from an earlier batch: what it recorded before is not known).
    read: bool = True
    balance: int = field(init=False)
    op_seq: int = field(init=False)
    held: int = field(init=False)
    entry: str = ""  # the newest entry of the batch, if newer than applied_before

    def __post_init__(self) -> None:
        self.balance, self.op_seq, self.held = self.start

    @property
    def available(self) -> int:
        return self.balance - self.held


class LedgerRow(NamedTuple):
    """A new row of a wallet's ledger, in the columns RECORD_BATCH takes."""

    wallet_id: str
    seq: int
    id: str
    kind: str
    amount: int
    status: str
    reason: str | None
    balance_after: int
    transfer_id: str | None
    counterparty: str | None
    hold_id: str | None
    held_after: int


class TransferStart(NamedTuple):
    """A transfer its debit starts (or refuses)."""

    source_id: str
    id: str
    destination_id: str
    amount: int
    status: str
    reason: str | None
    source_balance_after: int


class TransferMove(NamedTuple):
    """A transfer a later step moves on: to `status`, with the reason the amount comes
    back, the source's balance after a return, whether its return waits for room."""

    source_id: str
    id: str
    status: str
    reason: str | None
    balance: int | None
    return_waiting: bool


class Recorded(NamedTuple):
    """An entry answered by a ledger row (new, or recorded before), and whether the entry
    repeats an operation recorded earlier (a client's retry)."""

    row: Mapping[str, Any]
    replayed: bool


# What became of one entry: an answer already, or the ledger row that answers it.
Decision = Outcome | Recorded


@dataclass(slots=True)
class Decided:
    """What a batch writes: the ledger rows, the transfers started and moved on; and each
    entry's decision, in the entries' order."""

    rows: list[LedgerRow] = field(default_factory=list)
    started: list[TransferStart] = field(default_factory=list)
    moves: list[TransferMove] = field(default_factory=list)
    holds: list[HoldRow] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    # A remembered wallet's hold was found ended: the entry may be a retry of what ended
    # it, which only the wallet's records tell (the batch is decided again, read).
    unsure: bool = False
    # transfer id -> its start's place in `started`, for a debit applied in this batch
    debited: dict[str, int] = field(default_factory=dict)
    # (source, transfer id) -> its move's place in `moves`
    moved: dict[tuple[str, str], int] = field(default_factory=dict)
    # hold id -> its row's place in `holds`
    held_at: dict[str, int] = field(default_factory=dict)


def entry_order(entry_id: str | None) -> tuple[int, int]:
    """A stream entry id ("1700000000000-3") as something that sorts like it."""
    if not entry_id:
        return (-1, -1)
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq))


@dataclass(slots=True)
class Found:
    """What a batch is decided over: its wallets; the rows they recorded before under the
    batch's operation ids, by (wallet, id); the holds its entries name; the time (ms)."""

    wallets: dict[str, Wallet]
    recorded: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    holds: dict[str, HoldState] = field(default_factory=dict)
    now_ms: int = 0


def decide(entries: list[Entry], found: Found) -> Decided:
    """Each entry's fate, in order, moving the wallets and holds of `found` (the batch's new
    rows are added to its records); what the batch writes."""
    decided = Decided()
    for entry in entries:
        decided.decisions.append(_decide_entry(entry, found, decided))
    return decided


def _decide_entry(entry: Entry, found: Found, decided: Decided) -> Decision:
    r = entry.request
    if entry.entry_id == LOCAL_CREDIT and r.transfer_id not in decided.debited:
        return Outcome(r.tag, r.op_id, r.wallet_id, SKIPPED, r.kind, r.amount)
    wallet, recorded = found.wallets.get(r.wallet_id), found.recorded
    if wallet is None:
        return _unknown_wallet(r)
    redelivered = entry_order(entry.entry_id) <= wallet.applied_before
    if not redelivered:
        wallet.entry = entry.entry_id
    earlier = recorded.get((r.wallet_id, r.op_id))
    if earlier is not None:
        reused = key_reused(r, earlier)
        if reused is not None:
            return reused
        _move_again(r, earlier, decided)
        # Not a client's retry if the entry was applied before: the same entry read anew
        # after its first delivery died between COMMIT and acknowledgement.
        return Recorded(earlier, not redelivered)
    if r.kind in HOLD_ENDINGS:
        return _end_hold(entry, wallet, found, decided)
    reason = _refusal(r, wallet)
    if reason == Reason.BALANCE_LIMIT and r.kind == Kind.TRANSFER_RETURN:
        # Refused, the amount would be in no balance: it waits, resent, for room.
        _move(
            decided,
            TransferMove(
                r.wallet_id, r.transfer_id, Status.RETURNING, r.reason or None, None, True
            ),
        )
        return Outcome(r.tag, r.op_id, r.wallet_id, Status.RETURN_WAITING, r.kind, r.amount)
    if reason is None and r.kind == Kind.HOLD:
        wallet.held += r.amount
        _hold_row(decided, placed(r))
        found.holds[r.hold_id] = HoldState(r.wallet_id, r.amount, HoldStatus.HELD, r.expires_at)
    elif reason is None:
        wallet.balance += -r.amount if r.kind in DEBITS else r.amount
    return _record(entry, wallet, r.kind, r.op_id, r.amount, reason, found, decided)


def _record(
    entry: Entry,
    wallet: Wallet,
    kind: str,
    op_id: str,
    amount: int,
    reason: Reason | None,
    found: Found,
    decided: Decided,
) -> Recorded:
    """The ledger row of what was just decided, the wallet as it leaves it."""
    r = entry.request
    paid = kind != Kind.HOLD_EXPIRE  # an expiry a capture sets off pays nobody
    wallet.op_seq += 1
    row = LedgerRow(
        r.wallet_id,
        wallet.op_seq,
        op_id,
        kind,
        amount,
        Status.APPLIED if reason is None else Status.REJECTED,
        reason,
        wallet.balance,
        (r.transfer_id or None) if paid else None,
        (r.counterparty or None) if paid else None,
        r.hold_id or None,
        wallet.held,
    )
    decided.rows.append(row)
    as_recorded = row._asdict()
    found.recorded[(r.wallet_id, op_id)] = as_recorded
    if r.transfer_id and paid:
        _move_transfer(entry, row, as_recorded, decided)
    return Recorded(as_recorded, False)


def _end_hold(entry: Entry, wallet: Wallet, found: Found, decided: Decided) -> Decision:
    """A capture, void or expiry of a hold (worker/holds.py)."""
    r = entry.request
    hold = found.holds.get(r.hold_id)
    why, expire_first = ending_refusal(r, hold, found.now_ms)
    if hold is not None and expire_first:
        expiry = Kind.HOLD_EXPIRE
        op_id = r.op_id if r.kind == expiry else expiry_op_id(r.hold_id)
        _end(wallet, r, hold, expiry, found, decided)
        expired = _record(entry, wallet, expiry, op_id, hold.amount, None, found, decided)
        if why is None:
            return expired
    if why is not None:
        if hold is not None and hold.status != HoldStatus.HELD and not wallet.read:
            decided.unsure = True
        return refused(r.kind, why, r)
    assert hold is not None
    amount = _end(wallet, r, hold, r.kind, found, decided)
    return _record(entry, wallet, r.kind, r.op_id, amount, None, found, decided)


def _end(
    wallet: Wallet, r: OperationRequest, hold: HoldState, kind: str, found: Found, decided: Decided
) -> int:
    """Ends the hold as `kind` does, moving the wallet; the ledger row's amount."""
    amount, to_balance, to_held = amount_moved(kind, r.amount, hold)
    wallet.balance += to_balance
    wallet.held += to_held
    row = ended(r, hold, kind)
    found.holds[r.hold_id] = hold._replace(status=row.status)
    _hold_row(decided, row)
    return amount


def _hold_row(decided: Decided, row: HoldRow) -> None:
    """A hold placed and ended in one batch is inserted as it ends."""
    at = decided.held_at.get(row.id)
    if at is None:
        decided.held_at[row.id] = len(decided.holds)
        decided.holds.append(row)
    else:
        decided.holds[at] = row._replace(placed=True)


def _unknown_wallet(r: OperationRequest) -> Outcome:
    return Outcome(
        r.tag,
        r.op_id,
        r.wallet_id,
        Status.WALLET_NOT_FOUND,
        kind=r.kind,
        amount=r.amount,
        transfer_id=r.transfer_id,
        counterparty=r.counterparty,
    )


def _refusal(r: OperationRequest, wallet: Wallet) -> Reason | None:
    """Why the operation cannot apply to the wallet, if it cannot: what it takes or
    reserves must be available."""
    if r.kind in DEBITS or r.kind == Kind.HOLD:
        return Reason.INSUFFICIENT_FUNDS if wallet.available < r.amount else None
    return Reason.BALANCE_LIMIT if wallet.balance + r.amount > MAX_BALANCE_MINOR else None


def _move_transfer(
    entry: Entry, row: LedgerRow, as_recorded: Mapping[str, Any], decided: Decided
) -> None:
    """What a transfer's leg, just decided as `row`, does to its transfer."""
    r = entry.request
    if r.starts_transfer():
        if row.reason is None:
            decided.debited[r.transfer_id] = len(decided.started)
        decided.started.append(
            TransferStart(
                r.wallet_id,
                r.transfer_id,
                r.counterparty,
                r.amount,
                Status.IN_FLIGHT if row.reason is None else Status.REJECTED,
                row.reason,
                row.balance_after,
            )
        )
    elif entry.entry_id == LOCAL_CREDIT:
        # Both sides in this transaction: the transfer is started as it ends up.
        at = decided.debited[r.transfer_id]
        status = Status.COMPLETED if row.reason is None else Status.RETURNING
        decided.started[at] = decided.started[at]._replace(status=status, reason=row.reason)
    else:
        _move_again(r, as_recorded, decided)


def _move_again(r: OperationRequest, row: Mapping[str, Any], decided: Decided) -> None:
    """What a transfer's credit or return, recorded as `row` (now, or before: a replay
    moves its transfer on again, should an earlier move have been lost), does to its
    transfer. PostgreSQL moves a transfer only forward (RECORD_BATCH)."""
    if r.kind == Kind.TRANSFER_IN:
        applied = row["status"] == Status.APPLIED
        status = Status.COMPLETED if applied else Status.RETURNING
        reason = None if applied else row["reason"]
        _move(decided, TransferMove(r.counterparty, r.transfer_id, status, reason, None, False))
    elif r.kind == Kind.TRANSFER_RETURN and row["status"] == Status.APPLIED:
        settled = TransferMove(
            r.wallet_id,
            r.transfer_id,
            Status.REJECTED,
            r.reason or None,
            row["balance_after"],
            False,
        )
        _move(decided, settled)


def _move(decided: Decided, move: TransferMove) -> None:
    """One move per transfer in a batch, the last decided: PostgreSQL would apply one of
    two at random."""
    key = (move.source_id, move.id)
    at = decided.moved.get(key)
    if at is None:
        decided.moved[key] = len(decided.moves)
        decided.moves.append(move)
    else:
        decided.moves[at] = move
