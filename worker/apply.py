"""Applying a batch of operations to PostgreSQL in one transaction.

The caller is the only writer of these wallets, so it decides each operation in stream
order from the balance it has locked. PostgreSQL guards the result: balances and every
ledger row's balance_after are CHECKed non-negative, (wallet_id, id) is unique, and the
balance is updated by a delta whose result must match what was decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.codec import (
    APPLIED,
    BALANCE_LIMIT,
    DEPOSIT,
    INSUFFICIENT_FUNDS,
    KEY_REUSED,
    REJECTED,
    WALLET_NOT_FOUND,
    OperationRequest,
    Outcome,
    format_time,
    ledger_outcome,
)
from shared.money import MAX_BALANCE_MINOR

# Locks the batch's wallets and, in the same round trip, finds the operations among the
# batch's ids that they recorded before (redelivered entries, retried Idempotency-Keys):
# one row per such operation, or one row with op_id NULL for a wallet that has none.
LOCK_WALLETS = """
WITH locked AS (
    SELECT id, balance, op_seq FROM wallets WHERE id = any($1::uuid[]) ORDER BY id FOR UPDATE
),
-- MATERIALIZED: looked up by id alone, through the unique (id, wallet_id) index. Joined
-- with the wallets, the planner may instead read a wallet's whole ledger through the
-- primary key's wallet_id prefix (it did, before statistics existed).
earlier AS MATERIALIZED (
    SELECT wallet_id, id, seq, kind, amount, status, reason, balance_after, created_at
    FROM operations WHERE id = any($2::uuid[])
)
SELECT l.id::text AS wallet_id, l.balance AS wallet_balance, l.op_seq, now() AS now,
       e.id::text AS op_id, e.seq, e.kind, e.amount, e.status, e.reason, e.balance_after,
       e.created_at
FROM locked l LEFT JOIN earlier e ON e.wallet_id = l.id
"""

# One statement, so one round trip: the new ledger rows, then every wallet's balance (moved
# by the batch's net delta), ledger length and applied stream position.
RECORD_BATCH = """
WITH recorded AS (
    INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason, balance_after)
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[],
                         $6::text[], $7::text[], $8::bigint[])
)
UPDATE wallets AS w
SET balance = w.balance + v.delta, op_seq = v.op_seq, applied_entry = v.entry, updated_at = now()
FROM unnest($9::uuid[], $10::bigint[], $11::bigint[], $12::text[]) AS v(id, delta, op_seq, entry)
WHERE w.id = v.id
RETURNING w.id::text, w.balance
"""


# The ledger columns RECORD_BATCH takes, in its order.
ROW_FIELDS = ("wallet_id", "seq", "id", "kind", "amount", "status", "reason", "balance_after")


class LedgerConflict(RuntimeError):
    """PostgreSQL disagrees with what the writer decided: another writer touched the wallet."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry: its id in the wallet's stream and the operation it carries."""

    entry_id: str
    request: OperationRequest


@dataclass(slots=True)
class _Wallet:
    balance: int
    op_seq: int
    start_balance: int
    entry: str = ""


async def apply_batch(conn: Any, entries: list[Entry]) -> list[Outcome]:
    """Decides, records and commits `entries` (each wallet's in stream order); returns one
    outcome per entry, in the same order. Nothing is written unless all of it is."""
    wallet_ids = list({e.request.wallet_id: None for e in entries})
    async with conn.transaction():
        locked = await conn.fetch(LOCK_WALLETS, wallet_ids, [e.request.op_id for e in entries])
        if not locked:
            return [
                Outcome(e.request.tag, e.request.op_id, e.request.wallet_id, WALLET_NOT_FOUND)
                for e in entries
            ]
        now = format_time(locked[0]["now"])
        wallets: dict[str, _Wallet] = {}
        recorded: dict[tuple[str, str], Any] = {}
        for r in locked:
            wallets[r["wallet_id"]] = _Wallet(r["wallet_balance"], r["op_seq"], r["wallet_balance"])
            if r["op_id"] is not None:
                recorded[(r["wallet_id"], r["op_id"])] = {
                    **r,
                    "created_at": format_time(r["created_at"]),
                }
        new_rows: list[tuple[str, int, str, str, int, str, str | None, int]] = []
        outcomes: list[Outcome] = []
        for e in entries:
            r = e.request
            wallet = wallets.get(r.wallet_id)
            if wallet is None:
                outcomes.append(Outcome(r.tag, r.op_id, r.wallet_id, WALLET_NOT_FOUND))
                continue
            wallet.entry = e.entry_id
            earlier = recorded.get((r.wallet_id, r.op_id))
            if earlier is not None:
                if earlier["kind"] != r.kind or earlier["amount"] != r.amount:
                    outcomes.append(
                        Outcome(
                            r.tag,
                            r.op_id,
                            r.wallet_id,
                            KEY_REUSED,
                            kind=earlier["kind"],
                            amount=earlier["amount"],
                        )
                    )
                else:
                    outcomes.append(
                        ledger_outcome(
                            earlier,
                            op_id=r.op_id,
                            wallet_id=r.wallet_id,
                            created_at=earlier["created_at"],
                            tag=r.tag,
                            replayed=True,
                        )
                    )
                continue
            reason = None
            if r.kind == DEPOSIT:
                if wallet.balance + r.amount > MAX_BALANCE_MINOR:
                    reason = BALANCE_LIMIT
                else:
                    wallet.balance += r.amount
            elif wallet.balance < r.amount:
                reason = INSUFFICIENT_FUNDS
            else:
                wallet.balance -= r.amount
            wallet.op_seq += 1
            status = APPLIED if reason is None else REJECTED
            new_rows.append(
                (
                    r.wallet_id,
                    wallet.op_seq,
                    r.op_id,
                    r.kind,
                    r.amount,
                    status,
                    reason,
                    wallet.balance,
                )
            )
            row = dict(zip(ROW_FIELDS, new_rows[-1], strict=True), created_at=now)
            recorded[(r.wallet_id, r.op_id)] = row
            outcomes.append(
                ledger_outcome(row, op_id=r.op_id, wallet_id=r.wallet_id, created_at=now, tag=r.tag)
            )

        ids = list(wallets)
        updated = await conn.fetch(
            RECORD_BATCH,
            *(zip(*new_rows, strict=True) if new_rows else [()] * len(ROW_FIELDS)),
            ids,
            [wallets[i].balance - wallets[i].start_balance for i in ids],
            [wallets[i].op_seq for i in ids],
            [wallets[i].entry or None for i in ids],
        )
        for row in updated:
            if row["balance"] != wallets[row["id"]].balance:
                raise LedgerConflict(
                    f"wallet {row['id']}: PostgreSQL has {row['balance']}, "
                    f"the writer decided {wallets[row['id']].balance}"
                )
    return outcomes
