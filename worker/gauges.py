"""The worker's gauges: the figures that live in Redis and PostgreSQL, read into its metrics
when /metrics is asked for, never on a batch's path."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from shared.connections import REDIS_SOCKET_TIMEOUT, connection_from
from worker.transfers import unsettled

if TYPE_CHECKING:
    from worker.worker import Worker


async def refresh_gauges(worker: Worker) -> None:
    """Reads the figures that live in Redis and PostgreSQL into the worker's metrics, after
    those it holds itself: they are current even when the others cannot be read (the holds
    overdue above all, which such an outage makes)."""
    owned = sorted(worker.ownership.owned)
    worker.metrics.shard_count.set(worker.settings.shard_count)
    worker.metrics.shards_owned.set(len(owned))
    worker.metrics.holds_pending_expiry.set(len(worker.expiries))
    worker.metrics.holds_overdue.set(worker.expiries.overdue_seconds(int(time.time() * 1000)))
    worker.metrics.parked_wallets.set(worker.backlog.parked_count)
    async with worker.redis.pipeline(transaction=False) as pipe:
        for shard in owned:
            pipe.get(worker.keys.queued(shard))
        for shard in owned:
            pipe.execute_command(*worker.queue.dead_letter_count(shard))
        answers = await pipe.execute()
    counts, dead = answers[: len(owned)], answers[len(owned) :]
    async with asyncio.timeout(REDIS_SOCKET_TIMEOUT), connection_from(worker.pool) as conn:
        found = await unsettled(conn, owned)
    worker.metrics.transfers_unsettled.set(found.transfers)
    worker.metrics.returns_waiting.set(found.returns_waiting)
    worker.metrics.transfers_unsettled_oldest.set(found.oldest_seconds)
    worker.metrics.dead_letters.set(sum(dead))
    worker.metrics.queued.clear()
    for shard, count in zip(owned, counts, strict=True):
        worker.metrics.queued.labels(str(shard)).set(int(count or 0))
