"""The decision rules alone: no PostgreSQL, no Redis."""

from __future__ import annotations

import uuid
from typing import Any

from shared.codec import Kind, OperationRequest, Outcome, Reason, Status
from shared.money import MAX_BALANCE_MINOR
from worker.decide import (
    LOCAL_CREDIT,
    SKIPPED,
    Decided,
    Entry,
    Found,
    LedgerRow,
    Recorded,
    TransferMove,
    TransferStart,
    Wallet,
    WalletState,
    decide,
)

A, B = str(uuid.uuid4()), str(uuid.uuid4())
T = str(uuid.uuid4())


def entry(
    kind: str, amount: int, wallet: str = A, op_id: str | None = None, at: str = "5-1", **kw: Any
) -> Entry:
    return Entry(
        at, OperationRequest(op_id or str(uuid.uuid4()), wallet, kind, amount, "", 0, **kw)
    )


def wallets(**balances: int) -> dict[str, Wallet]:
    ids = {"a": A, "b": B}
    return {ids[name]: Wallet(WalletState(balance, 3)) for name, balance in balances.items()}


def run(entries: list[Entry], found: dict[str, Wallet]) -> Decided:
    return decide(entries, Found(found))


def statuses(decided: Decided) -> list[Any]:
    return [
        d.status if isinstance(d, Outcome) else (d.row["status"], d.row["reason"])
        for d in decided.decisions
    ]


def test_a_deposit_adds_to_the_balance_and_takes_the_next_seq() -> None:
    found = wallets(a=100)
    decided = run([entry(Kind.DEPOSIT, 50, at="5-1")], found)
    [row] = decided.rows
    assert (row.kind, row.status, row.reason, row.balance_after, row.seq) == (
        Kind.DEPOSIT,
        Status.APPLIED,
        None,
        150,
        4,
    )
    assert (found[A].balance, found[A].op_seq, found[A].entry) == (150, 4, "5-1")
    assert decided.started == []
    assert decided.moves == []


def test_a_deposit_past_the_largest_balance_is_rejected_and_moves_nothing() -> None:
    found = wallets(a=MAX_BALANCE_MINOR - 1)
    decided = run([entry(Kind.DEPOSIT, 2)], found)
    assert statuses(decided) == [(Status.REJECTED, Reason.BALANCE_LIMIT)]
    assert decided.rows[0].balance_after == MAX_BALANCE_MINOR - 1
    assert found[A].op_seq == 4  # a rejected operation is in the ledger too


def test_a_withdrawal_takes_from_the_balance_unless_it_is_short() -> None:
    found = wallets(a=100)
    decided = run([entry(Kind.WITHDRAW, 60), entry(Kind.WITHDRAW, 60)], found)
    assert statuses(decided) == [
        (Status.APPLIED, None),
        (Status.REJECTED, Reason.INSUFFICIENT_FUNDS),
    ]
    assert [r.balance_after for r in decided.rows] == [40, 40]
    assert found[A].balance == 40


def test_an_unknown_wallet_is_answered_and_writes_nothing() -> None:
    decided = run([entry(Kind.DEPOSIT, 1, wallet=B)], wallets(a=0))
    [outcome] = decided.decisions
    assert isinstance(outcome, Outcome)
    assert outcome.status == Status.WALLET_NOT_FOUND
    assert decided.rows == []


def test_an_operation_recorded_before_is_a_replay_and_another_under_its_key_is_refused() -> None:
    op_id = str(uuid.uuid4())
    earlier = {"kind": Kind.DEPOSIT, "amount": 5, "counterparty": None, "status": "applied"}
    found = wallets(a=10)
    decided = decide(
        [entry(Kind.DEPOSIT, 5, op_id=op_id), entry(Kind.WITHDRAW, 5, op_id=op_id)],
        Found(found, {(A, op_id): earlier}),
    )
    replay, reused = decided.decisions
    assert replay == Recorded(earlier, True)
    assert isinstance(reused, Outcome)
    assert (reused.status, reused.kind, reused.amount) == (Status.KEY_REUSED, Kind.DEPOSIT, 5)
    assert decided.rows == []
    assert found[A].balance == 10


def test_an_entry_delivered_again_is_answered_as_before_not_as_a_replay() -> None:
    op_id = str(uuid.uuid4())
    earlier = {"kind": Kind.DEPOSIT, "amount": 5, "counterparty": None, "status": "applied"}
    found = {A: Wallet(WalletState(10, 3), applied_before=(5, 2))}
    decided = decide(
        [entry(Kind.DEPOSIT, 5, op_id=op_id, at="5-2")], Found(found, {(A, op_id): earlier})
    )
    assert decided.decisions == [Recorded(earlier, False)]
    assert found[A].entry == ""  # nothing newer than what was applied


def test_the_same_id_twice_in_one_batch_applies_once() -> None:
    op_id = str(uuid.uuid4())
    decided = run(
        [
            entry(Kind.DEPOSIT, 5, op_id=op_id, at="5-1"),
            entry(Kind.DEPOSIT, 5, op_id=op_id, at="5-2"),
        ],
        found := wallets(a=0),
    )
    assert len(decided.rows) == 1
    assert isinstance(decided.decisions[1], Recorded)
    assert decided.decisions[1].replayed
    assert found[A].balance == 5


def transfer_out(amount: int) -> Entry:
    return entry(Kind.TRANSFER_OUT, amount, op_id=T, transfer_id=T, counterparty=B)


def test_a_debit_starts_its_transfer_in_flight_or_refuses_it() -> None:
    decided = run([transfer_out(30)], wallets(a=100))
    assert decided.started == [
        TransferStart(A, T, B, 30, Status.IN_FLIGHT, None, 70),
    ]
    refused = run([transfer_out(300)], wallets(a=100))
    assert refused.started == [
        TransferStart(A, T, B, 300, Status.REJECTED, Reason.INSUFFICIENT_FUNDS, 100),
    ]


def local_credit(amount: int) -> Entry:
    request = OperationRequest(T, B, Kind.TRANSFER_IN, amount, "", 0, transfer_id=T, counterparty=A)
    return Entry(LOCAL_CREDIT, request)


def test_a_local_credit_completes_its_transfer_in_the_same_batch() -> None:
    found = wallets(a=100, b=0)
    decided = run([transfer_out(30), local_credit(30)], found)
    assert decided.started == [TransferStart(A, T, B, 30, Status.COMPLETED, None, 70)]
    assert (found[A].balance, found[B].balance) == (70, 30)
    assert decided.moves == []


def test_a_local_credit_the_destination_cannot_take_starts_the_transfer_returning() -> None:
    found = wallets(a=100, b=MAX_BALANCE_MINOR)
    decided = run([transfer_out(30), local_credit(30)], found)
    assert decided.started == [
        TransferStart(A, T, B, 30, Status.RETURNING, Reason.BALANCE_LIMIT, 70),
    ]


def test_a_local_credit_after_a_refused_debit_is_skipped() -> None:
    found = wallets(a=10, b=0)
    decided = run([transfer_out(30), local_credit(30)], found)
    skipped = decided.decisions[1]
    assert isinstance(skipped, Outcome)
    assert skipped.status == SKIPPED
    assert found[B].balance == 0
    assert [r.kind for r in decided.rows] == [Kind.TRANSFER_OUT]


def credit(amount: int) -> Entry:
    return entry(Kind.TRANSFER_IN, amount, wallet=B, op_id=T, transfer_id=T, counterparty=A)


def test_a_credit_completes_its_transfer_or_sends_it_back() -> None:
    decided = run([credit(30)], wallets(b=0))
    assert decided.moves == [TransferMove(A, T, Status.COMPLETED, None, None, False)]
    refused = run([credit(30)], wallets(b=MAX_BALANCE_MINOR))
    assert refused.moves == [
        TransferMove(A, T, Status.RETURNING, Reason.BALANCE_LIMIT, None, False),
    ]
    assert refused.rows[0].status == Status.REJECTED


def transfer_return(amount: int) -> Entry:
    return entry(
        Kind.TRANSFER_RETURN,
        amount,
        transfer_id=T,
        counterparty=B,
        reason=Reason.BALANCE_LIMIT,
    )


def test_a_return_settles_its_transfer_rejected_with_the_source_s_balance() -> None:
    decided = run([transfer_return(30)], found := wallets(a=70))
    assert decided.moves == [
        TransferMove(A, T, Status.REJECTED, Reason.BALANCE_LIMIT, 100, False),
    ]
    assert decided.rows == [
        LedgerRow(
            A,
            4,
            decided.rows[0].id,
            Kind.TRANSFER_RETURN,
            30,
            Status.APPLIED,
            None,
            100,
            T,
            B,
            None,
            0,
        )
    ]
    assert found[A].balance == 100


def test_a_return_with_no_room_waits_recorded_nowhere() -> None:
    found = wallets(a=MAX_BALANCE_MINOR - 10)
    decided = run([transfer_return(30)], found)
    [waiting] = decided.decisions
    assert isinstance(waiting, Outcome)
    assert waiting.status == Status.RETURN_WAITING
    assert decided.rows == []
    assert decided.moves == [
        TransferMove(A, T, Status.RETURNING, Reason.BALANCE_LIMIT, None, True),
    ]
    assert (found[A].balance, found[A].op_seq) == (MAX_BALANCE_MINOR - 10, 3)


def test_a_waiting_return_and_a_copy_that_fits_later_in_the_batch_make_one_move() -> None:
    """PostgreSQL would apply one of two moves of one transfer at random: the last wins."""
    found = wallets(a=MAX_BALANCE_MINOR - 10)
    op_id = str(uuid.uuid4())
    withdraw = entry(Kind.WITHDRAW, 100)
    first, copy = (
        entry(
            Kind.TRANSFER_RETURN,
            30,
            op_id=op_id,
            transfer_id=T,
            counterparty=B,
            reason=Reason.BALANCE_LIMIT,
        )
        for _ in range(2)
    )
    decided = run([first, withdraw, copy], found)
    assert [d.status if isinstance(d, Outcome) else d.row["status"] for d in decided.decisions] == [
        Status.RETURN_WAITING,
        Status.APPLIED,
        Status.APPLIED,
    ]
    assert decided.moves == [
        TransferMove(A, T, Status.REJECTED, Reason.BALANCE_LIMIT, MAX_BALANCE_MINOR - 80, False),
    ]


def test_a_replayed_credit_or_return_moves_its_transfer_on_again() -> None:
    """Should the move that went with the first delivery have been lost, the replay makes
    it (PostgreSQL moves a transfer only forward, so it is harmless otherwise)."""
    credit_row = {
        "kind": Kind.TRANSFER_IN,
        "amount": 30,
        "counterparty": A,
        "status": Status.REJECTED,
        "reason": Reason.BALANCE_LIMIT,
        "balance_after": 0,
    }
    decided = decide([credit(30)], Found(wallets(b=0), {(B, T): credit_row}))
    assert decided.moves == [
        TransferMove(A, T, Status.RETURNING, Reason.BALANCE_LIMIT, None, False),
    ]
    back = transfer_return(30)
    return_row = {
        "kind": Kind.TRANSFER_RETURN,
        "amount": 30,
        "counterparty": B,
        "status": Status.APPLIED,
        "reason": None,
        "balance_after": 100,
    }
    decided = decide([back], Found(wallets(a=100), {(A, back.request.op_id): return_row}))
    assert decided.moves == [
        TransferMove(A, T, Status.REJECTED, Reason.BALANCE_LIMIT, 100, False),
    ]
    assert decided.rows == []
