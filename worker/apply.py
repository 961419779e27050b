"""Applying a batch of operations to PostgreSQL in one statement, so one COMMIT.

The caller is the only writer of these wallets, so it decides each operation in stream
order from the wallets' balances. PostgreSQL guards the result: balances and every ledger
row's balance_after are CHECKed non-negative, (wallet_id, id) is unique, and nothing is
written unless each wallet is still as the decision found it. The statement commits only
if the shards' epochs are still the ones the caller got when it took them (the fence): a
worker that lost a shard, however long it slept, cannot write to it.

Usually the caller knows how its last batch left each wallet, and the batch is that one
statement: one round trip with its COMMIT. The wallets it does not know are read first,
with their earlier operations among the batch's: two round trips. When the statement finds
a wallet changed, or an operation of a remembered wallet recorded before (a redelivered
entry, a client's retry), the batch goes the long way: every wallet read, then written.
Nothing is locked in between: the statement's own check covers it, as it does for what
the caller remembered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import asyncpg

from shared.codec import (
    APPLIED,
    BALANCE_LIMIT,
    COMPLETED,
    DEBITS,
    IN_FLIGHT,
    INSUFFICIENT_FUNDS,
    REJECTED,
    RETURN_WAITING,
    RETURNING,
    TRANSFER_IN,
    TRANSFER_OUT,
    TRANSFER_RETURN,
    WALLET_NOT_FOUND,
    OperationRequest,
    Outcome,
    format_time,
    key_reused,
    ledger_outcome,
)
from shared.money import MAX_BALANCE_MINOR

# Reads the batch's wallets and, in the same round trip, the operations among the batch's
# ids that they recorded before (redelivered entries, retried Idempotency-Keys): one row per
# such operation, or one row with op_id NULL for a wallet that has none.
READ_WALLETS = """
WITH found AS (
    SELECT id, balance, op_seq, applied_entry FROM wallets WHERE id = any($1::uuid[])
),
-- MATERIALIZED: looked up by id alone, through the unique (id, wallet_id) index. Joined
-- with the wallets, the planner may instead read a wallet's whole ledger through the
-- primary key's wallet_id prefix (it did, before statistics existed).
earlier AS MATERIALIZED (
    SELECT wallet_id, id, seq, kind, amount, status, reason, balance_after, created_at,
           transfer_id, counterparty
    FROM operations WHERE id = any($2::uuid[])
)
SELECT f.id::text AS wallet_id, f.balance AS wallet_balance, f.op_seq, f.applied_entry,
       e.id::text AS op_id, e.seq, e.kind, e.amount, e.status, e.reason, e.balance_after,
       e.created_at, e.transfer_id::text, e.counterparty::text
FROM found f LEFT JOIN earlier e ON e.wallet_id = f.id
"""

# One statement: the new ledger rows, the transfers the batch starts or moves on, then every
# wallet's balance, ledger length and applied stream position. Nothing is written, and
# nothing returned, unless every wallet still has the balance and ledger length the decision
# started from and every shard of the batch still has the caller's epoch. Both are locked
# until COMMIT: the wallets against another writer (there should be none), the shard rows so
# that a new owner's epoch bump waits for it. The wallets first (CASE keeps the order): a
# batch waiting for a wallet's row then holds no shard row, so a takeover need not wait for
# it, and the batch meets the fence once it has the row. Both are checked before the ledger
# insert, so that such a batch is refused rather than failing on a duplicate key. A transfer
# moves on only from the state its step follows (a credit or its refusal from in_flight, the
# return from in_flight or returning). Every read of a table also names its keys with
# `= any(...)`, so that it finds its rows by the primary key whatever the plan: joined with
# unnest alone, a batch of many wallets was planned as a scan of the whole table (11 ms of
# 19 for 80 wallets among 30,000), and the plan the worker keeps, made once small tables
# had statistics, as a merge join reading whole indexes.
RECORD_BATCH = """
WITH unchanged AS (
    SELECT w.id FROM wallets w
    JOIN unnest($11::uuid[], $12::bigint[], $13::bigint[]) AS was(id, balance, op_seq)
      ON w.id = was.id AND w.balance = was.balance AND w.op_seq = was.op_seq
    WHERE w.id = any($11::uuid[])
    ORDER BY w.id FOR UPDATE OF w
),
fence AS (
    SELECT s.shard FROM shards s
    JOIN unnest($17::int[], $18::bigint[]) AS held(shard, epoch)
      ON s.shard = held.shard AND s.epoch = held.epoch
    WHERE s.shard = any($17::int[])
    FOR SHARE OF s
),
allowed AS (
    SELECT CASE WHEN (SELECT count(*) FROM unchanged) = cardinality($11::uuid[])
                THEN (SELECT count(*) FROM fence) = cardinality($17::int[])
                ELSE false END AS ok
),
recorded AS (
    INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason, balance_after,
                            transfer_id, counterparty)
    SELECT r.* FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[], $5::bigint[],
                           $6::text[], $7::text[], $8::bigint[], $9::uuid[], $10::uuid[]) AS r,
                    allowed
    WHERE allowed.ok
),
started AS (
    INSERT INTO transfers (source_id, id, destination_id, amount, status, reason,
                           source_balance_after, source_shard, resend_at)
    SELECT t.*, now() + make_interval(secs => $33) FROM unnest(
               $19::uuid[], $20::uuid[], $21::uuid[], $22::bigint[], $23::text[], $24::text[],
               $25::bigint[], $31::int[]) AS t,
           allowed
    WHERE allowed.ok
),
moved AS (
    UPDATE transfers AS t
    SET status = m.status, reason = coalesce(t.reason, m.reason),
        source_balance_after = coalesce(m.balance, t.source_balance_after), updated_at = now(),
        -- A step that moved it on restarts the resend clock; a return that waits again
        -- backs off further (RESCHEDULE's rule).
        return_waiting = m.waits,
        resends = CASE WHEN m.waits THEN t.resends ELSE 0 END,
        resend_at = now() + make_interval(secs => CASE WHEN m.waits
            THEN least($33 * power(2, t.resends), $34) ELSE $33 END)
    FROM unnest($26::uuid[], $27::uuid[], $28::text[], $29::text[], $30::bigint[], $32::bool[])
           AS m(source_id, id, status, reason, balance, waits),
         allowed
    WHERE t.source_id = any($26::uuid[]) AND t.id = any($27::uuid[])
      AND t.source_id = m.source_id AND t.id = m.id
      AND allowed.ok
      -- A CASE, so that the planner does not take it for the unsettled index's predicate
      -- and scan all of that index for these few rows.
      AND CASE WHEN m.status = 'rejected' OR m.waits THEN t.status IN ('in_flight', 'returning')
               ELSE t.status = 'in_flight' END
)
UPDATE wallets AS w
SET balance = v.balance, op_seq = v.op_seq, applied_entry = coalesce(v.entry, w.applied_entry),
    updated_at = now()
FROM unnest($11::uuid[], $14::bigint[], $15::bigint[], $16::text[])
       AS v(id, balance, op_seq, entry),
     allowed
WHERE w.id = any($11::uuid[]) AND w.id = v.id AND allowed.ok
RETURNING now() AS now
"""

EPOCHS = "SELECT shard, epoch FROM shards WHERE shard = any($1::int[])"
RESEND_DELAY_MAX = 300.0  # seconds: the longest a transfer's step waits to be sent again


# The columns RECORD_BATCH takes, in its order: of the ledger, of a transfer started, of a
# transfer moved on.
ROW_FIELDS = (
    "wallet_id",
    "seq",
    "id",
    "kind",
    "amount",
    "status",
    "reason",
    "balance_after",
    "transfer_id",
    "counterparty",
)
TRANSFER_FIELDS = 7
MOVE_FIELDS = 6


class LedgerConflict(RuntimeError):
    """PostgreSQL disagrees with what the writer decided: another writer touched the wallet."""


# The entry id of a credit that follows its transfer's debit in the same batch (the writer
# writes both wallets): it comes from no stream, and is applied only if the debit is.
LOCAL_CREDIT = ""
# The outcome of such a credit when its debit was not applied now (refused, or a replay):
# nothing is written, and nobody is answered for it.
SKIPPED = "skipped"


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


class WalletState(NamedTuple):
    """A wallet as a committed batch left it."""

    balance: int
    op_seq: int


class Applied(NamedTuple):
    outcomes: list[Outcome]  # one per entry, in the entries' order
    states: dict[str, WalletState]  # each existing wallet of the batch after COMMIT


@dataclass(slots=True)
class _Wallet:
    start: WalletState  # as the batch found it
    # The newest stream entry applied before this batch; entries up to it are redeliveries.
    applied_before: tuple[int, int] = (-1, -1)
    balance: int = field(init=False)
    op_seq: int = field(init=False)
    entry: str = ""

    def __post_init__(self) -> None:
        self.balance, self.op_seq = self.start


def entry_order(entry_id: str | None) -> tuple[int, int]:
    """A stream entry id ("1700000000000-3") as something that sorts like it."""
    if not entry_id:
        return (-1, -1)
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq))


# What became of one entry: an answer already, or the ledger row that answers it and
# whether the entry repeats an operation recorded earlier.
Decision = Outcome | tuple[Mapping[str, Any], bool]
Row = tuple[str, int, str, str, int, str, str | None, int, str | None, str | None]
# A transfer started: source, id, destination, amount, status, reason, source balance after.
Started = tuple[str, str, str, int, str, str | None, int]
# A transfer moved on: source, id, new status, reason, the source's balance after a return,
# whether its return waits for room in the source.
Move = tuple[str, str, str, str | None, int | None, bool]


@dataclass(frozen=True, slots=True)
class Resending:
    """How a batch schedules the resending of the transfers it starts or moves on: the
    shard whose owner resends (the source's), and after how long a step unsettled is sent
    again, doubling for each time it was, up to `most` seconds."""

    shard_of: Callable[[str], int]
    after: float
    most: float = RESEND_DELAY_MAX


@dataclass(slots=True)
class Decided:
    """What a batch writes: the ledger rows, the transfers started and moved on; and each
    entry's decision, in the entries' order."""

    rows: list[Row] = field(default_factory=list)
    started: list[Started] = field(default_factory=list)
    moves: list[Move] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)


async def apply_batch(
    conn: Any,
    entries: list[Entry],
    epochs: dict[int, int],
    known: Mapping[str, WalletState] | None = None,
    *,
    resending: Resending,
) -> Applied:
    """Decides, records and commits `entries` (each wallet's in stream order) if every shard
    in `epochs` still has the epoch given there, else raises Fenced. Nothing is written
    unless all of it is. `known`: how the caller's last batches left the wallets; those are
    not read, so a batch of known wallets takes one round trip."""
    wallet_ids = list({e.request.wallet_id: None for e in entries})
    cached = {w: known[w] for w in wallet_ids if w in known} if known else {}
    if cached:
        unknown = [w for w in wallet_ids if w not in cached]
        applied = await _read_decide_record(conn, entries, epochs, cached, unknown, resending)
        if applied is not None:
            return applied
    # The long way: a remembered wallet was not as remembered, or an operation of the batch
    # was recorded before (a redelivered entry, a client's retry).
    applied = await _read_decide_record(conn, entries, epochs, {}, wallet_ids, resending)
    if applied is None:
        raise LedgerConflict(f"wallets {wallet_ids} changed between reading and writing")
    return applied


async def _read_decide_record(
    conn: Any,
    entries: list[Entry],
    epochs: dict[int, int],
    cached: Mapping[str, WalletState],
    unread: list[str],
    resending: Resending,
) -> Applied | None:
    """Reads the `unread` wallets with their earlier operations among the batch's, takes
    the `cached` ones as they are, decides and records. None if a wallet was not as found
    or, with cached wallets, an operation of theirs was recorded before."""
    wallets = {w: _Wallet(state) for w, state in cached.items()}
    recorded: dict[tuple[str, str], Mapping[str, Any]] = {}
    if unread:
        reading = set(unread)
        op_ids = [e.request.op_id for e in entries if e.request.wallet_id in reading]
        for r in await conn.fetch(READ_WALLETS, unread, op_ids):
            wallets[r["wallet_id"]] = _Wallet(
                WalletState(r["wallet_balance"], r["op_seq"]), entry_order(r["applied_entry"])
            )
            if r["op_id"] is not None:
                recorded[(r["wallet_id"], r["op_id"])] = {
                    **r,
                    "created_at": format_time(r["created_at"]),
                }
    decided = _decide(entries, wallets, recorded)
    if not wallets:
        return _applied(entries, decided.decisions, wallets, "")
    try:
        now = await _record(conn, decided, wallets, epochs, resending)
    except asyncpg.UniqueViolationError:
        if not cached:
            raise
        return None  # a cached wallet's operation was recorded before
    if now is None:
        return None
    return _applied(entries, decided.decisions, wallets, now)


def _decide(
    entries: list[Entry],
    wallets: dict[str, _Wallet],
    recorded: dict[tuple[str, str], Mapping[str, Any]],
) -> Decided:
    """Each entry's fate, in order, moving the wallets' balances; what the batch writes."""
    decided = Decided()
    decisions = decided.decisions
    # transfer id -> its debit's place in decided.started, for a debit applied now
    debited: dict[str, int] = {}
    for e in entries:
        r = e.request
        wallet = wallets.get(r.wallet_id)
        if e.entry_id == LOCAL_CREDIT and r.transfer_id not in debited:
            decisions.append(Outcome(r.tag, r.op_id, r.wallet_id, SKIPPED, r.kind, r.amount))
            continue
        if wallet is None:
            decisions.append(
                Outcome(
                    r.tag,
                    r.op_id,
                    r.wallet_id,
                    WALLET_NOT_FOUND,
                    kind=r.kind,
                    amount=r.amount,
                    transfer_id=r.transfer_id,
                    counterparty=r.counterparty,
                )
            )
            continue
        if entry_order(e.entry_id) > wallet.applied_before:  # else a redelivery
            wallet.entry = e.entry_id
        earlier = recorded.get((r.wallet_id, r.op_id))
        if earlier is not None:
            reused = key_reused(r, earlier)
            if reused is not None:
                decisions.append(reused)
            else:
                # Not a client's retry if the entry was applied before: the same entry read
                # anew after its first delivery died between COMMIT and acknowledgement.
                decisions.append((earlier, entry_order(e.entry_id) > wallet.applied_before))
            continue
        reason = None
        if r.kind in DEBITS:
            if wallet.balance < r.amount:
                reason = INSUFFICIENT_FUNDS
            else:
                wallet.balance -= r.amount
        elif wallet.balance + r.amount > MAX_BALANCE_MINOR:
            if r.kind == TRANSFER_RETURN:
                # Refused, the amount would be in no balance: it waits, resent, for room.
                decided.moves.append(
                    (r.wallet_id, r.transfer_id, RETURNING, r.reason or None, None, True)
                )
                decisions.append(
                    Outcome(r.tag, r.op_id, r.wallet_id, RETURN_WAITING, r.kind, r.amount)
                )
                continue
            reason = BALANCE_LIMIT
        else:
            wallet.balance += r.amount
        wallet.op_seq += 1
        status = APPLIED if reason is None else REJECTED
        transfer = r.transfer_id or None
        counterparty = r.counterparty or None
        decided.rows.append(
            (
                r.wallet_id,
                wallet.op_seq,
                r.op_id,
                r.kind,
                r.amount,
                status,
                reason,
                wallet.balance,
                transfer,
                counterparty,
            )
        )
        row = dict(zip(ROW_FIELDS, decided.rows[-1], strict=True))
        recorded[(r.wallet_id, r.op_id)] = row
        decisions.append((row, False))
        if r.kind == TRANSFER_OUT:
            if reason is None:
                debited[r.transfer_id] = len(decided.started)
            decided.started.append(
                (
                    r.wallet_id,
                    r.transfer_id,
                    r.counterparty,
                    r.amount,
                    IN_FLIGHT if reason is None else REJECTED,
                    reason,
                    wallet.balance,
                )
            )
        elif e.entry_id == LOCAL_CREDIT:
            # Both sides in this transaction: the transfer is recorded as it ends up.
            at = debited[r.transfer_id]
            status = COMPLETED if reason is None else RETURNING
            decided.started[at] = (*decided.started[at][:4], status, reason, decided.started[at][6])
        elif r.kind == TRANSFER_IN:
            move = COMPLETED if reason is None else RETURNING
            decided.moves.append((r.counterparty, r.transfer_id, move, reason, None, False))
        elif r.kind == TRANSFER_RETURN and reason is None:
            decided.moves.append(
                (r.wallet_id, r.transfer_id, REJECTED, r.reason or None, wallet.balance, False)
            )
    return decided


def _columns(tuples: list[Any], width: int) -> list[Any]:
    """Rows as the columns unnest() takes."""
    return list(zip(*tuples, strict=True)) if tuples else [()] * width


async def _record(
    conn: Any,
    decided: Decided,
    wallets: dict[str, _Wallet],
    epochs: dict[int, int],
    resending: Resending,
) -> str | None:
    """Writes the batch (RECORD_BATCH); returns the time it was written, or None if a wallet
    was not as the decision found it. Raises Fenced if a shard has a new owner."""
    ids = list(wallets)
    written = await conn.fetch(
        RECORD_BATCH,
        *_columns(decided.rows, len(ROW_FIELDS)),
        ids,
        [wallets[i].start.balance for i in ids],
        [wallets[i].start.op_seq for i in ids],
        [wallets[i].balance for i in ids],
        [wallets[i].op_seq for i in ids],
        [wallets[i].entry or None for i in ids],
        list(epochs),
        list(epochs.values()),
        *_columns(decided.started, TRANSFER_FIELDS),
        *_columns([m[:5] for m in decided.moves], MOVE_FIELDS - 1),
        [resending.shard_of(t[0]) for t in decided.started],
        [m[5] for m in decided.moves],
        resending.after,
        resending.most,
    )
    if written:
        return format_time(written[0]["now"])
    current = dict(await conn.fetch(EPOCHS, list(epochs)))
    moved = sorted(s for s, epoch in epochs.items() if current.get(s) != epoch)
    if moved:
        raise Fenced(
            moved,
            "; ".join(f"shard {s}: epoch {epochs[s]} is now {current.get(s)}" for s in moved),
        )
    return None


def _applied(
    entries: list[Entry], decisions: list[Decision], wallets: dict[str, _Wallet], now: str
) -> Applied:
    outcomes = []
    for e, decision in zip(entries, decisions, strict=True):
        if isinstance(decision, Outcome):
            outcomes.append(decision)
            continue
        row, replayed = decision
        r = e.request
        outcomes.append(
            ledger_outcome(
                row,
                op_id=r.op_id,
                wallet_id=r.wallet_id,
                created_at=row.get("created_at", now),
                tag=r.tag,
                replayed=replayed,
            )
        )
    states = {w: WalletState(wallet.balance, wallet.op_seq) for w, wallet in wallets.items()}
    return Applied(outcomes, states)


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
