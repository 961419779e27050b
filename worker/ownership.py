"""Shard ownership: which shards this worker owns, and at which epoch.

Workers divide the shards among themselves through leases in Redis: a worker renews the
leases it holds every fifth of WORKER_LEASE_TTL, counts the live workers by their
heartbeats, and takes free shards up to its fair share or hands back what is over it. A
lease alone does not stop a worker that was paused past it from committing; the shard's
epoch in PostgreSQL does: taking a shard bumps it, and every batch commits only if its
shards' epochs are still the ones its worker got (worker/apply.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from shared.connections import PG_ERRORS, REDIS_ERRORS, RedisClient, connection_from
from shared.keys import KeySpace
from shared.metrics import WorkerMetrics
from shared.scripts import HEARTBEAT, RELEASE_LEASE, RENEW_LEASE, SIDELINE, TAKE_LEASE
from shared.settings import Settings
from worker.commit import UNWRITABLE
from worker.sql import TAKE_SHARD

log = logging.getLogger("worker")

RENEWALS_PER_LEASE = 5


async def take_shard(conn: Any, shard: int, owner: str) -> int:
    """Makes `owner` the shard's writer in PostgreSQL; returns its epoch: the fencing
    token of every batch the new owner commits (worker/sql.py TAKE_SHARD)."""
    return int(await conn.fetchval(TAKE_SHARD, shard, owner))


def fair_share(live_workers: Iterable[str], worker_id: str, shard_count: int) -> int:
    """How many shards `worker_id` should own: the shards split as evenly as they go, the
    larger shares to the first workers in id order, so that the shares add up."""
    workers = sorted({*live_workers, worker_id})
    share, rest = divmod(shard_count, len(workers))
    return share + (workers.index(worker_id) < rest)


async def _nothing(shard: int) -> None:
    return None


def _can_commit() -> str | None:
    return None


class Ownership:
    """The shards this worker owns (shard -> the epoch it got when it took the shard).

    It tells the rest of the worker what changes through two callbacks: `changed()`
    whenever the owned shards or those to hand back change, and `taken(shard)`, awaited
    once a shard is taken, before take() returns; it asks `cannot_commit()` at each
    renewal why the batches do not go through, if they do not. The shards it lost or
    handed back are collected until the round asks for them (take_dropped()).
    """

    def __init__(
        self,
        settings: Settings,
        redis: RedisClient,
        pool: Any,
        worker_id: str,
        metrics: WorkerMetrics,
        *,
        changed: Callable[[], None] = lambda: None,
        taken: Callable[[int], Awaitable[None]] = _nothing,
        cannot_commit: Callable[[], str | None] = _can_commit,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._pool = pool
        self._keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        self._worker_id = worker_id
        self._metrics = metrics
        self._changed = changed
        self._taken = taken
        self._cannot_commit = cannot_commit
        self._owned: dict[int, int] = {}
        # owned shards over the fair share, handed back between two rounds
        self._surplus: set[int] = set()
        # shards lost or handed back since the round last asked
        self._dropped: set[int] = set()
        self._stopping = asyncio.Event()
        self._sidelined: str | None = None

    @property
    def owned(self) -> Mapping[int, int]:
        """Shard -> the epoch this worker got when it took the shard (a live view)."""
        return self._owned

    def epochs_of(self, wallets: Iterable[str]) -> dict[int, int]:
        """The epochs of the wallets' shards: what a batch of them commits under."""
        shard_of, owned = self._keys.shard_of, self._owned
        return {s: owned[s] for s in {shard_of(w) for w in wallets}}

    @property
    def sidelined(self) -> str | None:
        """Why this worker gave its shards up and takes none (it cannot commit), or None."""
        return self._sidelined

    async def step_aside(self, why: str) -> None:
        """Gives every shard up and leaves the live workers, so that the others take its
        shards at once; takes none until PostgreSQL can be written to again (tend())."""
        log.error("giving every shard up: %s", why)
        self._sidelined = why
        await self.release(list(self._owned))
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zrem(self._keys.workers(), self._worker_id)
            self._note_sidelined(pipe)
            await pipe.execute()

    def _note_sidelined(self, pipe: Any) -> None:
        ttl_ms = int(self._settings.worker_lease_ttl * 1000)
        pipe.eval(SIDELINE, 1, self._keys.sidelined(), self._worker_id, ttl_ms, self._sidelined)

    async def _can_write(self) -> bool:
        """Whether PostgreSQL takes writes from here: it answers, and not as a standby."""
        try:
            async with (
                asyncio.timeout(self._settings.worker_lease_ttl / RENEWALS_PER_LEASE),
                connection_from(self._pool) as conn,
            ):
                return bool(await conn.fetchval("SELECT NOT pg_is_in_recovery()"))
        except (*UNWRITABLE, *PG_ERRORS):
            return False

    def take_dropped(self) -> set[int]:
        """The shards lost or handed back since the last call."""
        dropped, self._dropped = self._dropped, set()
        return dropped

    def stop(self) -> None:
        """run() returns within a renewal's wait; tend() takes no more shards."""
        self._stopping.set()

    async def run(self) -> None:
        """Tends the shards (tend()) every fifth of the lease time, until stop()."""
        interval = self._settings.worker_lease_ttl / RENEWALS_PER_LEASE
        while not self._stopping.is_set():
            try:
                await self.tend()
            except (*REDIS_ERRORS, TimeoutError, *PG_ERRORS) as e:
                log.warning("tending the shards failed (%s: %s)", type(e).__name__, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def tend(self) -> None:
        """Once: the heartbeat, the renewal of the leases held, and a step towards the fair
        share (taking free shards, or marking some to hand back after the round). A
        sidelined worker only says why, until it can write again. A worker whose batches
        do not go through, and that cannot reach PostgreSQL either, gives its shards up."""
        # Batches stuck while PostgreSQL answers (it is slow, or this process was paused)
        # are no reason: every worker would step aside.
        why = self._cannot_commit() if self._sidelined is None else None
        if why and not await self._can_write():
            await self.step_aside(why)
            return
        if self._sidelined is not None:
            if not await self._can_write():
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._note_sidelined(pipe)
                    await pipe.execute()
                return
            log.info("PostgreSQL takes writes again: taking shards")
            self._sidelined = None
            await self._redis.hdel(self._keys.sidelined(), self._worker_id)
        ttl_ms = int(self._settings.worker_lease_ttl * 1000)
        held = list(self._owned)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.eval(HEARTBEAT, 1, self._keys.workers(), self._worker_id, ttl_ms)
            for shard in held:
                pipe.eval(RENEW_LEASE, 1, self._keys.lease(shard), self._worker_id, ttl_ms)
            for shard in range(self._settings.shard_count):
                pipe.exists(self._keys.lease(shard))
            results = await pipe.execute()
        live = [w.decode() for w in results[0]]
        renewed = results[1 : 1 + len(held)]
        taken = results[1 + len(held) :]
        for shard, still_held in zip(held, renewed, strict=True):
            if not still_held and self._owned.pop(shard, None) is not None:
                self._dropped.add(shard)
                self._changed()
                self._metrics.lease_changes.labels("lost").inc()
                log.warning("lost the lease of shard %d", shard)
        if self._stopping.is_set():
            return
        share = fair_share(live, self._worker_id, self._settings.shard_count)
        keeping = sorted(set(self._owned) - self._surplus)
        if len(keeping) > share:
            self._surplus.update(keeping[share:])
            self._changed()
            return
        free = [shard for shard, exists in enumerate(taken) if not exists]
        # Workers starting together try the free shards in different orders.
        offset = zlib.crc32(self._worker_id.encode())
        free.sort(key=lambda shard: (shard - offset) % self._settings.shard_count)
        wanted = share - len(keeping)
        for shard in free:
            if wanted <= 0 or self._stopping.is_set():
                break
            wanted -= await self.take(shard)

    async def take(self, shard: int) -> bool:
        """Takes the shard if its lease is free: leases it, bumps its epoch, and starts
        working on it. Returns whether it did."""
        ttl_ms = int(self._settings.worker_lease_ttl * 1000)
        lease = self._keys.lease(shard)
        if self._sidelined is not None:
            return False
        if not await self._redis.eval(TAKE_LEASE, 1, lease, self._worker_id, ttl_ms):
            return False
        try:
            # At most half a lease, so that the next renewal of the shards held comes in
            # time even after a take that hangs.
            async with (
                asyncio.timeout(self._settings.worker_lease_ttl / 2),
                connection_from(self._pool) as conn,
            ):
                epoch = await take_shard(conn, shard, self._worker_id)
            # Taking the epoch can wait for a former owner's last batch; the lease must
            # still be this worker's after it, or another worker's epoch follows this one.
            if not await self._redis.eval(RENEW_LEASE, 1, lease, self._worker_id, ttl_ms):
                log.warning("shard %d: the lease ran out while taking it", shard)
                return False
        except BaseException as e:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._redis.eval(RELEASE_LEASE, 1, lease, self._worker_id)
            # Cut off from PostgreSQL, it would lease a free shard again at every renewal
            # and hold it for the take's timeout: the shard's wallets would wait.
            if isinstance(e, UNWRITABLE) and not await self._can_write():
                await self.step_aside(f"cannot take shard {shard}: PostgreSQL does not answer")
                return False
            raise
        self._owned[shard] = epoch
        self._surplus.discard(shard)
        self._changed()
        self._metrics.lease_changes.labels("taken").inc()
        log.info("took shard %d at epoch %d", shard, epoch)
        await self._taken(shard)
        return True

    async def hand_back_surplus(self) -> None:
        """Hands back the shards over the fair share (between two rounds)."""
        if self._surplus:
            await self.release(sorted(self._surplus))

    async def release(self, shards: list[int]) -> None:
        """Stops working on the shards and gives their leases up, so that another worker
        can take them at once."""
        for shard in shards:
            self._owned.pop(shard, None)
            self._surplus.discard(shard)
        self._dropped.update(shards)
        self._changed()
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.eval(RELEASE_LEASE, 1, self._keys.lease(shard), self._worker_id)
            await pipe.execute()
        if shards:
            self._metrics.lease_changes.labels("handed_back").inc(len(shards))
            log.info("handed back shards %s", shards)

    async def close(self) -> None:
        """Hands every shard back and leaves the live workers (best effort: an owner that
        cannot reach Redis leaves its leases to run out)."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self.release(list(self._owned))
            await self._redis.zrem(self._keys.workers(), self._worker_id)
            await self._redis.hdel(self._keys.sidelined(), self._worker_id)
