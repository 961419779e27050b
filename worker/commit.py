"""Committing a batch: one PostgreSQL connection held across batches, and how the last batch
left each wallet, so that the next one can skip reading the wallets nobody else can have
written since (worker/apply.py checks that they are as remembered)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg

from shared.codec import Outcome
from shared.metrics import WorkerMetrics
from worker.apply import Entry, WalletState, apply_batch

PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)
# How many wallets' states a worker keeps between batches (the most recently written).
KNOWN_WALLETS_MAX = 100_000


class Committer:
    """Commits the rounds' batches: one at a time, over a connection held across them."""

    def __init__(self, pool: Any, shard_of: Callable[[str], int], metrics: WorkerMetrics) -> None:
        self._pool = pool
        self._shard_of = shard_of
        self._metrics = metrics
        self._conn: Any = None
        # wallet id -> (the shard's epoch, the wallet as this worker's last batch of it left
        # it): valid while the shard is still at that epoch
        self._known: dict[str, tuple[int, WalletState]] = {}
        self._batches = 0

    @property
    def batches(self) -> int:
        """How many batches this worker has committed."""
        return self._batches

    async def commit(self, entries: list[Entry], epochs: dict[int, int]) -> list[Outcome]:
        """Commits the entries if `epochs` are still the shards' epochs; their outcomes."""
        if self._conn is None:
            # Held across batches: releasing to the pool costs a reset round trip.
            self._conn = await self._pool.acquire()
        started = time.perf_counter()
        try:
            outcomes, states = await apply_batch(
                self._conn, entries, epochs, self._known_states(entries, epochs)
            )
        except BaseException:
            await self.close()
            raise
        self._remember(states, epochs)
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_size.observe(len(entries))
        self._batches += 1
        return outcomes

    def forget(self, wallets: Iterable[str]) -> None:
        """How the wallets were left is no longer known (their round failed part way)."""
        for w in wallets:
            self._known.pop(w, None)

    def _known_states(
        self, entries: Iterable[Entry], epochs: dict[int, int]
    ) -> dict[str, WalletState]:
        known = {}
        for e in entries:
            w = e.request.wallet_id
            cached = self._known.get(w)
            if cached is not None and cached[0] == epochs.get(self._shard_of(w)):
                known[w] = cached[1]
        return known

    def _remember(self, states: dict[str, WalletState], epochs: dict[int, int]) -> None:
        for w, state in states.items():
            self._known.pop(w, None)  # to the end: the least recently written go first
            self._known[w] = (epochs[self._shard_of(w)], state)
        while len(self._known) > KNOWN_WALLETS_MAX:
            del self._known[next(iter(self._known))]

    async def close(self) -> None:
        """Gives the connection back to the pool (the next commit takes one again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*PG_ERRORS, OSError):
                await self._pool.release(conn)
