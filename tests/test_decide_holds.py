"""The rules of holds alone (worker/holds.py through worker/decide.py): no servers."""

from __future__ import annotations

import uuid
from typing import Any

from shared.codec import HoldStatus, Kind, OperationRequest, Outcome, Reason, Status
from shared.ids import expiry_op_id
from shared.metrics import WorkerMetrics
from worker.decide import Decided, Entry, Found, Recorded, Wallet, WalletState, decide
from worker.expiries import Expiries
from worker.holds import HoldRow, HoldState

A, B = str(uuid.uuid4()), str(uuid.uuid4())
NOW = 1_800_000_000_000
LATER = NOW + 60_000


def request(kind: str, amount: int, hold: str = "", **kw: Any) -> Entry:
    r = OperationRequest(str(uuid.uuid4()), A, kind, amount, "", 0, hold_id=hold, **kw)
    return Entry("5-1", r)


def place(amount: int, hold: str | None = None, expires_at: int = LATER) -> Entry:
    return request(Kind.HOLD, amount, hold or str(uuid.uuid4()), expires_at=expires_at)


def found(
    balance: int, held: int = 0, holds: dict[str, HoldState] | None = None, read: bool = True
) -> Found:
    return Found({A: Wallet(WalletState(balance, 3, held), read=read)}, {}, holds or {}, NOW)


def held(amount: int, expires_at: int = LATER, status: str = HoldStatus.HELD) -> HoldState:
    return HoldState(A, amount, status, expires_at)


def outcome_status(decided: Decided) -> list[Any]:
    return [
        d.status if isinstance(d, Outcome) else (d.row["kind"], d.row["status"], d.row["reason"])
        for d in decided.decisions
    ]


def test_a_hold_reserves_what_is_available_and_moves_no_money() -> None:
    batch = found(100, held=30)
    decided = decide([place(70)], batch)
    [row] = decided.rows
    assert (row.kind, row.status, row.amount, row.balance_after, row.held_after) == (
        Kind.HOLD,
        Status.APPLIED,
        70,
        100,
        100,
    )
    [hold] = decided.holds
    assert (hold.amount, hold.status, hold.placed, hold.expires_at) == (
        70,
        HoldStatus.HELD,
        True,
        LATER,
    )
    assert (batch.wallets[A].balance, batch.wallets[A].held) == (100, 100)


def test_a_hold_above_what_is_available_is_refused_and_recorded() -> None:
    decided = decide([place(71)], found(100, held=30))
    assert outcome_status(decided) == [(Kind.HOLD, Status.REJECTED, Reason.INSUFFICIENT_FUNDS)]
    assert decided.holds == []


def test_withdrawals_and_transfers_are_decided_on_what_is_available() -> None:
    t = str(uuid.uuid4())
    entries = [
        request(Kind.WITHDRAW, 80),
        request(Kind.TRANSFER_OUT, 80, transfer_id=t, counterparty=B),
        request(Kind.WITHDRAW, 70),
    ]
    decided = decide(entries, batch := found(100, held=30))
    assert outcome_status(decided) == [
        (Kind.WITHDRAW, Status.REJECTED, Reason.INSUFFICIENT_FUNDS),
        (Kind.TRANSFER_OUT, Status.REJECTED, Reason.INSUFFICIENT_FUNDS),
        (Kind.WITHDRAW, Status.APPLIED, None),
    ]
    assert (batch.wallets[A].balance, batch.wallets[A].held) == (30, 30)


def test_a_partial_capture_takes_its_amount_and_releases_the_rest() -> None:
    h = str(uuid.uuid4())
    batch = found(100, held=50, holds={h: held(50)})
    decided = decide([request(Kind.HOLD_CAPTURE, 20, h)], batch)
    [row] = decided.rows
    assert (row.kind, row.amount, row.balance_after, row.held_after, row.hold_id) == (
        Kind.HOLD_CAPTURE,
        20,
        80,
        0,
        h,
    )
    [ended] = decided.holds
    assert (ended.status, ended.captured, ended.placed) == (HoldStatus.CAPTURED, 20, False)
    assert batch.holds[h].status == HoldStatus.CAPTURED


def test_a_capture_above_the_held_amount_is_refused_recording_nothing() -> None:
    h = str(uuid.uuid4())
    decided = decide([request(Kind.HOLD_CAPTURE, 51, h)], found(100, 50, {h: held(50)}))
    assert outcome_status(decided) == [Status.ABOVE_HOLD]
    assert decided.rows == []
    assert decided.holds == []


def test_a_void_releases_the_whole_hold() -> None:
    h = str(uuid.uuid4())
    batch = found(100, 50, {h: held(50)})
    decided = decide([request(Kind.HOLD_VOID, 50, h)], batch)
    assert outcome_status(decided) == [(Kind.HOLD_VOID, Status.APPLIED, None)]
    assert (batch.wallets[A].balance, batch.wallets[A].held) == (100, 0)
    assert decided.holds[0].status == HoldStatus.VOIDED


def test_an_expiry_applies_once_due_and_not_before() -> None:
    h = str(uuid.uuid4())
    early = decide([request(Kind.HOLD_EXPIRE, 50, h)], found(100, 50, {h: held(50, NOW + 1)}))
    assert outcome_status(early) == [Status.HOLD_NOT_ACTIVE]
    assert early.rows == []
    due = decide([request(Kind.HOLD_EXPIRE, 50, h)], batch := found(100, 50, {h: held(50, NOW)}))
    assert outcome_status(due) == [(Kind.HOLD_EXPIRE, Status.APPLIED, None)]
    assert batch.wallets[A].held == 0


def test_a_capture_of_a_hold_past_its_expiry_expires_it_instead() -> None:
    h = str(uuid.uuid4())
    batch = found(100, 50, {h: held(50, NOW)})
    decided = decide([request(Kind.HOLD_CAPTURE, 50, h)], batch)
    assert outcome_status(decided) == [Status.HOLD_NOT_ACTIVE]
    [row] = decided.rows
    assert (row.kind, row.id, row.amount, row.balance_after) == (
        Kind.HOLD_EXPIRE,
        expiry_op_id(h),
        50,
        100,
    )
    assert batch.holds[h].status == HoldStatus.EXPIRED


def test_only_the_first_of_a_capture_a_void_and_an_expiry_ends_a_hold() -> None:
    h = str(uuid.uuid4())
    entries = [
        request(Kind.HOLD_VOID, 50, h),
        request(Kind.HOLD_CAPTURE, 50, h),
        request(Kind.HOLD_EXPIRE, 50, h),
    ]
    decided = decide(entries, found(100, 50, {h: held(50, NOW)} | {}))
    # Due already: the void finds it past its expiry, and it expires.
    assert outcome_status(decided)[1:] == [Status.HOLD_NOT_ACTIVE, Status.HOLD_NOT_ACTIVE]
    assert len(decided.holds) == 1
    decided = decide(entries, found(100, 50, {h: held(50)}))
    assert outcome_status(decided) == [
        (Kind.HOLD_VOID, Status.APPLIED, None),
        Status.HOLD_NOT_ACTIVE,
        Status.HOLD_NOT_ACTIVE,
    ]


def test_an_ended_hold_on_a_remembered_wallet_sends_the_batch_the_long_way() -> None:
    """Only the wallet's records tell a retry of what ended it from a late rival."""
    h = str(uuid.uuid4())
    ended = {h: held(50, status=HoldStatus.VOIDED)}
    assert decide([request(Kind.HOLD_VOID, 50, h)], found(100, 0, ended, read=False)).unsure
    assert not decide([request(Kind.HOLD_VOID, 50, h)], found(100, 0, ended, read=True)).unsure


def test_a_retry_of_a_capture_is_answered_as_recorded() -> None:
    h = str(uuid.uuid4())
    capture = request(Kind.HOLD_CAPTURE, 20, h)
    earlier = {"kind": Kind.HOLD_CAPTURE, "amount": 20, "hold_id": h, "status": "applied"}
    batch = found(80, 0, {h: held(50, status=HoldStatus.CAPTURED)})
    batch.recorded[(A, capture.request.op_id)] = earlier
    assert decide([capture], batch).decisions == [Recorded(earlier, True)]
    other = {**earlier, "hold_id": str(uuid.uuid4())}
    batch.recorded[(A, capture.request.op_id)] = other
    [reused] = decide([capture], batch).decisions
    assert isinstance(reused, Outcome)
    assert reused.status == Status.KEY_REUSED


def test_an_unknown_hold_or_another_wallet_s_is_not_found() -> None:
    h = str(uuid.uuid4())
    assert outcome_status(decide([request(Kind.HOLD_VOID, 5, h)], found(100))) == [
        Status.HOLD_NOT_FOUND
    ]
    theirs = {h: HoldState(B, 5, HoldStatus.HELD, LATER)}
    assert outcome_status(decide([request(Kind.HOLD_VOID, 5, h)], found(100, 0, theirs))) == [
        Status.HOLD_NOT_FOUND
    ]


def test_a_hold_placed_and_captured_in_one_batch_is_inserted_as_captured() -> None:
    h = str(uuid.uuid4())
    decided = decide([place(40, h), request(Kind.HOLD_CAPTURE, 40, h)], found(100))
    [row] = decided.holds
    assert (row.status, row.captured, row.placed) == (HoldStatus.CAPTURED, 40, True)
    assert [r.kind for r in decided.rows] == [Kind.HOLD, Kind.HOLD_CAPTURE]


def test_a_capture_paid_to_a_wallet_starts_a_transfer() -> None:
    h, t = str(uuid.uuid4()), str(uuid.uuid4())
    capture = request(Kind.HOLD_CAPTURE, 30, h, transfer_id=t, counterparty=B)
    decided = decide([capture], found(100, 50, {h: held(50)}))
    [start] = decided.started
    assert (start.source_id, start.id, start.destination_id, start.amount, start.status) == (
        A,
        t,
        B,
        30,
        Status.IN_FLIGHT,
    )
    [ended] = decided.holds
    assert (ended.transfer_id, ended.destination_id) == (t, B)


def test_the_expiries_lag_is_how_long_the_held_hold_longest_past_its_expiry_has_been_due() -> None:
    expiries = Expiries(lambda wallet: 0, WorkerMetrics())
    assert expiries.overdue_seconds(NOW) == 0

    def held(hold: str, expires_at: int, status: str = HoldStatus.HELD) -> HoldRow:
        return HoldRow(A, hold, 100, status, 0, expires_at, None, None, False)

    expiries.update([held("h1", NOW + 5_000), held("h2", NOW - 2_500)], counted=False)
    assert expiries.overdue_seconds(NOW) == 2.5
    expiries.update([held("h2", NOW - 2_500, HoldStatus.EXPIRED)], counted=False)
    assert expiries.overdue_seconds(NOW) == 0  # the one left is not due yet
    assert expiries.overdue_seconds(NOW + 6_000) == 1.0
