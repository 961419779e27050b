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
)
from shared.money import MAX_BALANCE_MINOR

LOCK_WALLETS = """
SELECT id::text, balance, op_seq, now() AS now
FROM wallets WHERE id = any($1::uuid[])
ORDER BY id
FOR UPDATE
"""

FIND_OPERATIONS = """
SELECT o.wallet_id::text, o.id::text, o.seq, o.kind, o.amount, o.status, o.reason,
       o.balance_after, o.created_at
FROM operations o
JOIN unnest($1::uuid[], $2::uuid[]) AS k(wallet_id, id)
  ON o.wallet_id = k.wallet_id AND o.id = k.id
"""

INSERT_OPERATIONS = """
INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason, balance_after)
SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[],
                     $6::text[], $7::text[], $8::bigint[])
"""

UPDATE_WALLETS = """
UPDATE wallets AS w
SET balance = w.balance + v.delta, op_seq = v.op_seq, applied_entry = v.entry, updated_at = now()
FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::text[]) AS v(id, delta, op_seq, entry)
WHERE w.id = v.id
RETURNING w.id::text, w.balance
"""


# The columns INSERT_OPERATIONS takes, in its order.
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


def _outcome(request: OperationRequest, row: Any, replayed: bool) -> Outcome:
    return Outcome(
        tag=request.tag,
        op_id=request.op_id,
        wallet_id=request.wallet_id,
        status=row["status"],
        kind=row["kind"],
        amount=row["amount"],
        balance_after=row["balance_after"],
        reason=row["reason"],
        created_at=row["created_at"],
        seq=row["seq"],
        replayed=replayed,
    )


async def apply_batch(conn: Any, entries: list[Entry]) -> list[Outcome]:
    """Decides, records and commits `entries` (each wallet's in stream order); returns one
    outcome per entry, in the same order. Nothing is written unless all of it is."""
    wallet_ids = list({e.request.wallet_id: None for e in entries})
    async with conn.transaction():
        locked = await conn.fetch(LOCK_WALLETS, wallet_ids)
        if not locked:
            return [
                Outcome(e.request.tag, e.request.op_id, e.request.wallet_id, WALLET_NOT_FOUND)
                for e in entries
            ]
        now = format_time(locked[0]["now"])
        wallets = {r["id"]: _Wallet(r["balance"], r["op_seq"], r["balance"]) for r in locked}
        known = [e.request for e in entries if e.request.wallet_id in wallets]
        # Operations recorded before: redelivered entries and retried Idempotency-Keys.
        recorded: dict[tuple[str, str], Any] = {
            (r["wallet_id"], r["id"]): {**r, "created_at": format_time(r["created_at"])}
            for r in await conn.fetch(
                FIND_OPERATIONS, [r.wallet_id for r in known], [r.op_id for r in known]
            )
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
                    outcomes.append(_outcome(r, earlier, replayed=True))
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
            outcomes.append(_outcome(r, row, replayed=False))

        if new_rows:
            await conn.execute(INSERT_OPERATIONS, *zip(*new_rows, strict=True))
        ids = list(wallets)
        updated = await conn.fetch(
            UPDATE_WALLETS,
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
