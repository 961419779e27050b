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
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from shared.codec import Outcome, format_time, ledger_outcome
from worker.decide import (
    Decided,
    Entry,
    LedgerRow,
    TransferMove,
    TransferStart,
    Wallet,
    WalletState,
    decide,
    entry_order,
)
from worker.sql import EPOCHS, READ_WALLETS, RECORD_BATCH

RESEND_DELAY_MAX = 300.0  # seconds: the longest a transfer's step waits to be sent again


class LedgerConflict(RuntimeError):
    """PostgreSQL disagrees with what the writer decided: another writer touched the wallet."""


class Fenced(RuntimeError):
    """The batch was refused: another worker has taken over these shards since."""

    def __init__(self, shards: list[int], message: str) -> None:
        super().__init__(message)
        self.shards = shards


class Applied(NamedTuple):
    outcomes: list[Outcome]  # one per entry, in the entries' order
    states: dict[str, WalletState]  # each existing wallet of the batch after COMMIT


@dataclass(frozen=True, slots=True)
class Resending:
    """How a batch schedules the resending of the transfers it starts or moves on: the
    shard whose owner resends (the source's), and after how long a step unsettled is sent
    again, doubling for each time it was, up to `most` seconds."""

    shard_of: Callable[[str], int]
    after: float
    most: float = RESEND_DELAY_MAX


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
    wallets = {w: Wallet(state) for w, state in cached.items()}
    recorded: dict[tuple[str, str], Mapping[str, Any]] = {}
    if unread:
        reading = set(unread)
        op_ids = [e.request.op_id for e in entries if e.request.wallet_id in reading]
        for r in await conn.fetch(READ_WALLETS, unread, op_ids):
            wallets[r["wallet_id"]] = Wallet(
                WalletState(r["wallet_balance"], r["op_seq"]), entry_order(r["applied_entry"])
            )
            if r["op_id"] is not None:
                recorded[(r["wallet_id"], r["op_id"])] = {
                    **r,
                    "created_at": format_time(r["created_at"]),
                }
    decided = decide(entries, wallets, recorded)
    if not wallets:
        return _applied(entries, decided, wallets, "")
    try:
        now = await _record(conn, decided, wallets, epochs, resending)
    except asyncpg.UniqueViolationError:
        if not cached:
            raise
        return None  # a cached wallet's operation was recorded before
    if now is None:
        return None
    return _applied(entries, decided, wallets, now)


def _columns(rows: list[Any], width: int) -> list[Any]:
    """Rows as the columns unnest() takes."""
    return list(zip(*rows, strict=True)) if rows else [()] * width


async def _record(
    conn: Any,
    decided: Decided,
    wallets: dict[str, Wallet],
    epochs: dict[int, int],
    resending: Resending,
) -> str | None:
    """Writes the batch (RECORD_BATCH); returns the time it was written, or None if a wallet
    was not as the decision found it. Raises Fenced if a shard has a new owner."""
    ids = list(wallets)
    moves = _columns(decided.moves, len(TransferMove._fields))
    written = await conn.fetch(
        RECORD_BATCH,
        *_columns(decided.rows, len(LedgerRow._fields)),
        ids,
        [wallets[i].start.balance for i in ids],
        [wallets[i].start.op_seq for i in ids],
        [wallets[i].balance for i in ids],
        [wallets[i].op_seq for i in ids],
        [wallets[i].entry or None for i in ids],
        list(epochs),
        list(epochs.values()),
        *_columns(decided.started, len(TransferStart._fields)),
        *moves[:5],
        [resending.shard_of(t.source_id) for t in decided.started],
        moves[5],
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
    entries: list[Entry], decided: Decided, wallets: dict[str, Wallet], now: str
) -> Applied:
    outcomes = []
    for e, decision in zip(entries, decided.decisions, strict=True):
        if isinstance(decision, Outcome):
            outcomes.append(decision)
            continue
        r = e.request
        outcomes.append(
            ledger_outcome(
                decision.row,
                op_id=r.op_id,
                wallet_id=r.wallet_id,
                created_at=decision.row.get("created_at", now),
                tag=r.tag,
                replayed=decision.replayed,
            )
        )
    states = {w: WalletState(wallet.balance, wallet.op_seq) for w, wallet in wallets.items()}
    return Applied(outcomes, states)
