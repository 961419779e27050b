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

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from shared.codec import HOLD_ENDINGS, Outcome, format_time, ledger_outcome
from worker.decide import (
    Decided,
    Entry,
    Found,
    LedgerRow,
    TransferMove,
    TransferStart,
    Wallet,
    WalletState,
    decide,
    entry_order,
)
from worker.holds import HoldRow, HoldState
from worker.sql import EPOCHS, READ_HOLDS, READ_WALLETS, RECORD_BATCH, RECORD_WALLET

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
    holds: dict[str, HoldState]  # each hold the batch named, after COMMIT
    changed: list[HoldRow]  # the holds it placed or ended


class Known(NamedTuple):
    """How the worker's last batches left wallets and their holds (worker/commit.py)."""

    wallets: Mapping[str, WalletState]
    holds: Mapping[str, HoldState]


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
    known: Known | None = None,
    *,
    resending: Resending,
    now_ms: int | None = None,
) -> Applied:
    """Decides, records and commits `entries` (each wallet's in stream order) if every shard
    in `epochs` still has the epoch given there, else raises Fenced. Nothing is written
    unless all of it is. `known`: how the caller's last batches left the wallets and their
    holds; those are not read, so a batch of known wallets takes one round trip. `now_ms`:
    the time holds expire by (now)."""
    wallet_ids = list({e.request.wallet_id: None for e in entries})
    cached = {w: known.wallets[w] for w in wallet_ids if w in known.wallets} if known else {}
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    write = _Writing(conn, entries, epochs, resending, now_ms)
    if cached:
        unknown = [w for w in wallet_ids if w not in cached]
        assert known is not None
        applied = await write.read_decide_record(cached, unknown, known.holds)
        if applied is not None:
            return applied
    # The long way: a remembered wallet was not as remembered, or an operation of the batch
    # was recorded before (a redelivered entry, a client's retry).
    applied = await write.read_decide_record({}, wallet_ids, {})
    if applied is None:
        raise LedgerConflict(f"wallets {wallet_ids} changed between reading and writing")
    return applied


@dataclass(frozen=True, slots=True)
class _Writing:
    """One batch to write, tried the short way and, if need be, the long way."""

    conn: Any
    entries: list[Entry]
    epochs: dict[int, int]
    resending: Resending
    now_ms: int

    async def read_decide_record(
        self,
        cached: Mapping[str, WalletState],
        unread: list[str],
        cached_holds: Mapping[str, HoldState],
    ) -> Applied | None:
        """Reads the `unread` wallets with their earlier operations among the batch's, and
        the holds named that are not in `cached_holds`, takes the `cached` wallets as they
        are, decides and records. None if a wallet was not as found or, with cached
        wallets, an operation of theirs was recorded before (or may have been)."""
        conn, entries = self.conn, self.entries
        found = Found({w: Wallet(state, read=False) for w, state in cached.items()})
        found.now_ms = self.now_ms
        if unread:
            reading = set(unread)
            op_ids = [e.request.op_id for e in entries if e.request.wallet_id in reading]
            for r in await conn.fetch(READ_WALLETS, unread, op_ids):
                state = WalletState(r["wallet_balance"], r["op_seq"], r["wallet_held"])
                found.wallets[r["wallet_id"]] = Wallet(state, entry_order(r["applied_entry"]))
                if r["op_id"] is not None:
                    found.recorded[(r["wallet_id"], r["op_id"])] = {
                        **r,
                        "created_at": format_time(r["created_at"]),
                    }
        named = {e.request.hold_id for e in entries if e.request.kind in HOLD_ENDINGS}
        # A remembered hold only with its remembered wallet: they were left together.
        found.holds = {
            h: cached_holds[h]
            for h in named
            if h in cached_holds and cached_holds[h].wallet_id in cached
        }
        if named - found.holds.keys():
            for r in await conn.fetch(READ_HOLDS, list(named - found.holds.keys())):
                found.holds[r["id"]] = HoldState(
                    r["wallet_id"], r["amount"], r["status"], r["expires_at"]
                )
        decided = decide(entries, found)
        if decided.unsure and cached:
            return None
        if not found.wallets:
            return _applied(entries, decided, found, "")
        try:
            now = await _record(conn, decided, found.wallets, self.epochs, self.resending)
        except asyncpg.UniqueViolationError:
            if not cached:
                raise
            return None  # a cached wallet's operation was recorded before
        if now is None:
            return None
        return _applied(entries, decided, found, now)


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
    """Writes the batch (RECORD_WALLET when it is one wallet's ledger rows alone, else
    RECORD_BATCH); returns the time it was written, or None if a wallet was not as the
    decision found it. Raises Fenced if a shard has a new owner."""
    if (
        len(wallets) == 1
        and len(epochs) == 1
        and not (decided.started or decided.moves or decided.holds)
    ):
        [(wallet_id, wallet)] = wallets.items()
        [(shard, epoch)] = epochs.items()
        start = wallet.start
        written = await conn.fetch(
            RECORD_WALLET,
            wallet_id,
            *(start.balance, start.op_seq, start.held, shard, epoch),
            *(wallet.balance, wallet.op_seq, wallet.held, wallet.entry or None),
            *_columns(decided.rows, len(LedgerRow._fields))[1:],
        )
    else:
        written = await conn.fetch(
            RECORD_BATCH, *_batch_arguments(decided, wallets, epochs, resending)
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


def _batch_arguments(
    decided: Decided, wallets: dict[str, Wallet], epochs: dict[int, int], resending: Resending
) -> list[Any]:
    """RECORD_BATCH's parameters, $1 to $53."""
    ids = list(wallets)
    ledger = _columns(decided.rows, len(LedgerRow._fields))
    moves = _columns(decided.moves, len(TransferMove._fields))
    placed = [h for h in decided.holds if h.placed]
    ended = [h for h in decided.holds if not h.placed]
    placed_columns = _columns([h[:8] for h in placed], 8)
    return [
        *ledger[:10],
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
        *ledger[10:],
        [wallets[i].start.held for i in ids],
        [wallets[i].held for i in ids],
        *placed_columns[:6],
        [resending.shard_of(h.wallet_id) for h in placed],
        *placed_columns[6:],
        *_hold_endings(ended),
    ]


def _hold_endings(ended: list[HoldRow]) -> list[Any]:
    """The ended holds' columns RECORD_BATCH takes: wallet, id, status, captured, transfer,
    destination."""
    rows = [
        (h.wallet_id, h.id, h.status, h.captured, h.transfer_id, h.destination_id) for h in ended
    ]
    return _columns(rows, 6)


def _applied(entries: list[Entry], decided: Decided, found: Found, now: str) -> Applied:
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
    states = {
        w: WalletState(wallet.balance, wallet.op_seq, wallet.held)
        for w, wallet in found.wallets.items()
    }
    return Applied(outcomes, states, found.holds, decided.holds)
