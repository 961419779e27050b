"""Holds expire by themselves: the owner of a wallet's shard keeps the shard's holds still
held by when they expire, and when one is due queues its expiry on the wallet's stream,
where the wallet's writer decides it like any operation (worker/holds.py): once, and never
after the hold has ended. An expiry lost on the way (Redis wiped) is sent again until the
hold has ended, but not while it may still wait behind the wallet's older entries (a slow
or stuck wallet, PostgreSQL down): copies would pile up in its stream every few seconds.
A new owner of the shard reads the shard's held holds when it takes it over.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any, NamedTuple

from shared.codec import HoldStatus, Kind, OperationRequest
from shared.connections import REDIS_ERRORS, connection_from
from shared.ids import expiry_op_id
from shared.metrics import WorkerMetrics
from worker.holds import HoldRow, HoldState
from worker.sql import HELD_IN_SHARDS
from worker.streams import WalletStreams, may_be_queued

log = logging.getLogger("worker")

CHECK_EVERY = 0.2  # seconds between looks for holds due
RESEND_AFTER_MS = 5_000  # an expiry sent whose hold is still held then may be sent again


class Sent(NamedTuple):
    """What one send_due did: expiries queued, left alone as maybe still queued, and among
    those sent, those that could not be queued (sent again later)."""

    sent: int
    still_queued: int
    failed: int


class DueExpiry(NamedTuple):
    """An expiry to queue, and when (ms, this worker's clock) it was last sent, if ever."""

    request: OperationRequest
    sent_at_ms: int | None


class Expiries:
    """The held holds of the owned shards, soonest to expire first."""

    def __init__(self, shard_of: Callable[[str], int], metrics: WorkerMetrics) -> None:
        self._shard_of = shard_of
        self._metrics = metrics
        self._held: dict[str, HoldState] = {}
        self._due: list[tuple[int, str]] = []  # (when to send its expiry, hold id)
        self._sent: dict[str, int] = {}  # hold id -> when its expiry was last sent (ms)
        self._unread: set[int] = set()  # shards taken over whose holds are not read yet

    def __len__(self) -> int:
        return len(self._held)

    def overdue_seconds(self, now_ms: int) -> float:
        """How long the hold longest past its expiry, of those still held, has been due (0
        when none is): the expiries' lag, which stays under a second while they go through."""
        earliest = min((hold.expires_at for hold in self._held.values()), default=now_ms)
        return max(0, now_ms - earliest) / 1000

    def taken(self, shard: int) -> None:
        """The shard was taken over: its holds are read at the next send_due."""
        self._unread.add(shard)

    def update(self, holds: Iterable[HoldRow], *, counted: bool = True) -> None:
        """Holds a batch placed or ended (worker/commit.py), or read at a take-over."""
        for row in holds:
            if counted and row.placed:
                self._metrics.holds.labels("placed").inc()
            if counted and row.status != HoldStatus.HELD:
                self._metrics.holds.labels(row.status).inc()
            if row.status != HoldStatus.HELD:
                self._held.pop(row.id, None)
                self._sent.pop(row.id, None)
            elif row.id not in self._held:
                self._held[row.id] = HoldState(
                    row.wallet_id, row.amount, row.status, row.expires_at
                )
                heapq.heappush(self._due, (row.expires_at, row.id))

    async def send_due(
        self,
        pool: Any,
        streams: WalletStreams,
        owned: Collection[int],
        now_ms: int | None = None,
    ) -> Sent:
        """Reads the held holds of the shards taken over since the last call, then queues
        the expiries due now, but not those sent before that may still be queued."""
        if self._unread:
            shards, self._unread = self._unread, set()
            try:
                async with connection_from(pool) as conn:
                    rows = await conn.fetch(HELD_IN_SHARDS, list(shards))
            except BaseException:
                self._unread |= shards
                raise
            held = HoldStatus.HELD
            self.update(
                (
                    HoldRow(
                        r["wallet_id"],
                        r["id"],
                        r["amount"],
                        held,
                        0,
                        r["expires_at"],
                        None,
                        None,
                        False,
                    )
                    for r in rows
                ),
                counted=False,
            )
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        due = self.take_due(now_ms, owned)
        again = [d.request.wallet_id for d in due if d.sent_at_ms is not None]
        try:
            oldest = await streams.oldest_entries(again) if again else {}
        except REDIS_ERRORS as e:  # the first sends still go; the resends wait for the next look
            log.warning("looking for expiries still queued failed (%s)", e)
            oldest = {}
        sending = [d.request for d in due if _send_now(d, oldest)]
        for request in sending:
            self._sent[request.hold_id] = now_ms
        failed = await streams.send(sending) if sending else 0
        return Sent(len(sending), len(due) - len(sending), failed)

    def take_due(self, now_ms: int, owned: Collection[int]) -> list[DueExpiry]:
        """The expiries due now, each also due again RESEND_AFTER_MS later should its hold
        still be held by then; holds of shards no longer owned are forgotten."""
        due: list[DueExpiry] = []
        again: list[tuple[int, str]] = []
        while self._due and self._due[0][0] <= now_ms:
            _, hold_id = heapq.heappop(self._due)
            hold = self._held.get(hold_id)
            if hold is None:
                continue  # ended
            if self._shard_of(hold.wallet_id) not in owned:
                del self._held[hold_id]
                self._sent.pop(hold_id, None)
                continue
            due.append(DueExpiry(expiry(hold_id, hold), self._sent.get(hold_id)))
            again.append((now_ms + RESEND_AFTER_MS, hold_id))
        for item in again:
            heapq.heappush(self._due, item)
        return due


def _send_now(due: DueExpiry, oldest: dict[str, int | None]) -> bool:
    """A first send, or a resend whose earlier send its wallet's stream may no longer hold
    (`oldest`: the streams' first entries; one missing, as after a failed look, waits)."""
    if due.sent_at_ms is None:
        return True
    wallet = due.request.wallet_id
    return wallet in oldest and not may_be_queued(due.sent_at_ms, oldest[wallet])


def expiry(hold_id: str, hold: HoldState) -> OperationRequest:
    """The operation that expires the hold; answered to nobody."""
    return OperationRequest(
        expiry_op_id(hold_id),
        hold.wallet_id,
        Kind.HOLD_EXPIRE,
        hold.amount,
        "",
        0,
        hold_id=hold_id,
        expires_at=hold.expires_at,
    )
