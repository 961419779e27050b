"""Committing a batch: one PostgreSQL connection held across batches, and how the last batch
left each wallet and its holds, so that the next one can skip reading the wallets nobody
else can have written since (worker/apply.py checks that they are as remembered)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

from shared.codec import HoldStatus, Outcome
from shared.connections import PG_CONNECTION_LOST, PG_ERRORS
from shared.metrics import WorkerMetrics
from worker.apply import Applied, Known, Resending, apply_batch
from worker.decide import Entry, WalletState
from worker.holds import HoldRow, HoldState

# What a batch fails with when PostgreSQL cannot be written to, whatever the batch holds.
UNWRITABLE = (
    *PG_CONNECTION_LOST,
    asyncpg.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.ReadOnlySQLTransactionError,  # a standby
    OSError,
    TimeoutError,
)
# How many wallets' states, and holds still held, a worker keeps between batches (the most
# recently written).
KNOWN_WALLETS_MAX = 100_000
KNOWN_HOLDS_MAX = 100_000


class Committer:
    """Commits the rounds' batches: one at a time, over a connection held across them."""

    def __init__(
        self,
        pool: Any,
        shard_of: Callable[[str], int],
        metrics: WorkerMetrics,
        resend_after: float,
        holds_changed: Callable[[list[HoldRow]], None] = lambda holds: None,
    ) -> None:
        self._pool = pool
        self._resending = Resending(shard_of, resend_after)
        # since when the batches have failed to reach PostgreSQL, and since when the batch
        # in hand has been under way
        self._failing_since: float | None = None
        self._in_flight_since: float | None = None
        self._shard_of = shard_of
        self._metrics = metrics
        self._conn: Any = None
        # wallet id -> (the shard's epoch, the wallet as this worker's last batch of it left
        # it): valid while the shard is still at that epoch
        self._known: dict[str, tuple[int, WalletState]] = {}
        # hold id -> (its wallet's shard's epoch, the hold, still held)
        self._holds: dict[str, tuple[int, HoldState]] = {}
        self._holds_changed = holds_changed  # told of the holds each batch places or ends
        self._batches = 0

    @property
    def batches(self) -> int:
        """How many batches this worker has committed."""
        return self._batches

    def failing_for(self) -> float:
        """For how long no batch has gone through: since the first of the failures to reach
        PostgreSQL in a row, or since the batch under way started (a cut network shows as
        a batch that never ends, not as an error); 0 if the last one went through."""
        since = self._failing_since if self._failing_since is not None else self._in_flight_since
        return 0.0 if since is None else time.monotonic() - since

    async def commit(self, entries: list[Entry], epochs: dict[int, int]) -> list[Outcome]:
        """Commits the entries if `epochs` are still the shards' epochs; their outcomes."""
        started = time.perf_counter()
        self._in_flight_since = time.monotonic()
        try:
            if self._conn is None:
                # Held across batches: releasing to the pool costs a reset round trip.
                self._conn = await self._pool.acquire()
            applied = await apply_batch(
                self._conn,
                entries,
                epochs,
                self._known_states(entries, epochs),
                resending=self._resending,
                now_ms=int(time.time() * 1000),
            )
        except UNWRITABLE:
            if self._failing_since is None:
                self._failing_since = self._in_flight_since
            await self.close(broken=True)
            raise
        except BaseException as e:
            # A batch cut short (cancelled) leaves its connection busy: close it. One that
            # PostgreSQL refused (a fence, a bad batch) left it usable: give it back.
            await self.close(broken=not isinstance(e, Exception))
            raise
        finally:
            self._in_flight_since = None
        self._failing_since = None
        self._remember(applied, epochs)
        if applied.changed:
            self._holds_changed(applied.changed)
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(entries))
        self._batches += 1
        return applied.outcomes

    def forget(self, wallets: Iterable[str]) -> None:
        """How the wallets were left is no longer known (their round failed part way)."""
        for w in wallets:
            self._known.pop(w, None)

    def _known_states(self, entries: Iterable[Entry], epochs: dict[int, int]) -> Known:
        wallets, holds = {}, {}
        for e in entries:
            w = e.request.wallet_id
            epoch = epochs.get(self._shard_of(w))
            cached = self._known.get(w)
            if cached is not None and cached[0] == epoch:
                wallets[w] = cached[1]
            hold = self._holds.get(e.request.hold_id) if e.request.hold_id else None
            if hold is not None and hold[0] == epoch:
                holds[e.request.hold_id] = hold[1]
        return Known(wallets, holds)

    def _remember(self, applied: Applied, epochs: dict[int, int]) -> None:
        for w, state in applied.states.items():
            self._known.pop(w, None)  # to the end: the least recently written go first
            self._known[w] = (epochs[self._shard_of(w)], state)
        while len(self._known) > KNOWN_WALLETS_MAX:
            del self._known[next(iter(self._known))]
        for hold_id, hold in applied.holds.items():
            self._holds.pop(hold_id, None)
            if hold.status == HoldStatus.HELD and hold.wallet_id in applied.states:
                self._holds[hold_id] = (epochs[self._shard_of(hold.wallet_id)], hold)
        while len(self._holds) > KNOWN_HOLDS_MAX:
            del self._holds[next(iter(self._holds))]

    async def close(self, *, broken: bool = False) -> None:
        """Gives the connection back to the pool (the next commit takes one again); a
        `broken` one is closed first, as resetting it could wait on a dead network."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if broken:
                with contextlib.suppress(*PG_ERRORS):
                    conn.terminate()
            with contextlib.suppress(*PG_ERRORS, OSError):
                await self._pool.release(conn)
