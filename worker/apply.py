"""Applying a batch of operations to PostgreSQL in one transaction.

The caller is the only writer of these wallets, so it decides each operation in stream
order from the balance it has locked. PostgreSQL guards the result: balances and every
ledger row's balance_after are CHECKed non-negative, (wallet_id, id) is unique, and the
balance is updated by a delta whose result must match what was decided. The transaction
commits only if the shards' epochs are still the ones the caller got when it took them
(the fence): a worker that lost a shard, however long it slept, cannot write to it.
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
    SELECT id, balance, op_seq, applied_entry
    FROM wallets WHERE id = any($1::uuid[]) ORDER BY id FOR UPDATE
),
-- MATERIALIZED: looked up by id alone, through the unique (id, wallet_id) index. Joined
-- with the wallets, the planner may instead read a wallet's whole ledger through the
-- primary key's wallet_id prefix (it did, before statistics existed).
earlier AS MATERIALIZED (
    SELECT wallet_id, id, seq, kind, amount, status, reason, balance_after, created_at
    FROM operations WHERE id = any($2::uuid[])
)
SELECT l.id::text AS wallet_id, l.balance AS wallet_balance, l.op_seq, l.applied_entry,
       now() AS now,
       e.id::text AS op_id, e.seq, e.kind, e.amount, e.status, e.reason, e.balance_after,
       e.created_at
FROM locked l LEFT JOIN earlier e ON e.wallet_id = l.id
"""

# One statement, so one round trip: the new ledger rows, then every wallet's balance (moved
# by the batch's net delta), ledger length and applied stream position. Nothing is written,
# and so nothing returned, unless every shard of the batch still has the caller's epoch; the
# shard rows stay share-locked until COMMIT, so a new owner's epoch bump waits for it.
# Checked before the ledger insert: a former owner's batch that waited for a wallet while a
# new owner wrote to it must meet the fence, not a duplicate key.
RECORD_BATCH = """
WITH fence AS (
    SELECT s.shard FROM shards s
    JOIN unnest($13::int[], $14::bigint[]) AS held(shard, epoch)
      ON s.shard = held.shard AND s.epoch = held.epoch
    FOR SHARE OF s
),
allowed AS (
    SELECT (SELECT count(*) FROM fence) = cardinality($13::int[]) AS ok
),
recorded AS (
    INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason, balance_after)
    SELECT r.* FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[],
                           $6::text[], $7::text[], $8::bigint[]) AS r, allowed
    WHERE allowed.ok
)
UPDATE wallets AS w
SET balance = w.balance + v.delta, op_seq = v.op_seq, applied_entry = v.entry, updated_at = now()
FROM unnest($9::uuid[], $10::bigint[], $11::bigint[], $12::text[]) AS v(id, delta, op_seq, entry),
     allowed
WHERE w.id = v.id AND allowed.ok
RETURNING w.id::text, w.balance
"""

EPOCHS = "SELECT shard, epoch FROM shards WHERE shard = any($1::int[])"


# The ledger columns RECORD_BATCH takes, in its order.
ROW_FIELDS = ("wallet_id", "seq", "id", "kind", "amount", "status", "reason", "balance_after")


class LedgerConflict(RuntimeError):
    """PostgreSQL disagrees with what the writer decided: another writer touched the wallet."""


class Fenced(RuntimeError):
    """The batch was refused: another worker has taken over these shards since."""

    def __init__(self, shards: list[int], message: str) -> None:
        super().__init__(message)
        self.shards = shards


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
    # The newest stream entry applied before this batch; entries up to it are redeliveries.
    applied_before: tuple[int, int]
    entry: str = ""


def entry_order(entry_id: str | None) -> tuple[int, int]:
    """A stream entry id ("1700000000000-3") as something that sorts like it."""
    if not entry_id:
        return (-1, -1)
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq))


async def apply_batch(conn: Any, entries: list[Entry], epochs: dict[int, int]) -> list[Outcome]:
    """Decides, records and commits `entries` (each wallet's in stream order) if every shard
    in `epochs` still has the epoch given there, else raises Fenced; returns one outcome per
    entry, in the same order. Nothing is written unless all of it is."""
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
            wallets[r["wallet_id"]] = _Wallet(
                r["wallet_balance"],
                r["op_seq"],
                r["wallet_balance"],
                entry_order(r["applied_entry"]),
            )
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
                            # Not a client's retry but the same entry again, read anew after
                            # its first delivery died between COMMIT and acknowledgement.
                            replayed=entry_order(e.entry_id) > wallet.applied_before,
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
            list(epochs),
            list(epochs.values()),
        )
        if len(updated) < len(ids):
            current = dict(await conn.fetch(EPOCHS, list(epochs)))
            moved = sorted(s for s, epoch in epochs.items() if current.get(s) != epoch)
            if not moved:
                raise LedgerConflict(f"wallets {ids}: {len(ids) - len(updated)} not updated")
            raise Fenced(
                moved,
                "; ".join(f"shard {s}: epoch {epochs[s]} is now {current.get(s)}" for s in moved),
            )
        for row in updated:
            if row["balance"] != wallets[row["id"]].balance:
                raise LedgerConflict(
                    f"wallet {row['id']}: PostgreSQL has {row['balance']}, "
                    f"the writer decided {wallets[row['id']].balance}"
                )
    return outcomes


# Taking a shard over: the new epoch is the fencing token of every batch the new owner
# commits. It waits for a batch of the former owner that holds the shard row (RECORD_BATCH).
TAKE_SHARD = """
INSERT INTO shards (shard, epoch, owner) VALUES ($1, 1, $2)
ON CONFLICT (shard) DO UPDATE
SET epoch = shards.epoch + 1, owner = excluded.owner, acquired_at = now()
RETURNING epoch
"""


async def take_shard(conn: Any, shard: int, owner: str) -> int:
    """Makes `owner` the shard's writer in PostgreSQL; returns its epoch."""
    return int(await conn.fetchval(TAKE_SHARD, shard, owner))
