"""The shard worker: the one writer of every wallet in the shards it owns.

It ties its parts together, each with one job: ownership (worker/ownership.py: leases,
epochs, the fair share), the wake listener (worker/wakes.py: one blocking read of the
owned shards' wake streams), the backlog (worker/backlog.py: which wallets go in the next
round), and the round (here): it takes the wake-ups, reads the streams of the wallets it
is already working on, commits everything in hand in one transaction (worker/commit.py),
then answers, hands on and acknowledges (worker/streams.py).

There is no timer: the next batch is whatever arrived while this one committed. A crash
anywhere before the acknowledgement leaves the entries in place; whoever owns the shard
next reads them again, and the operation ids, unique in PostgreSQL, keep them from being
applied twice (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from redis.exceptions import NoScriptError

from shared.backoff import backoff
from shared.connections import (
    PG_ERRORS,
    REDIS_ERRORS,
    REDIS_SOCKET_TIMEOUT,
    RedisClient,
    open_pg_pool,
    open_redis,
    worker_pg_settings,
)
from shared.keys import KeySpace
from shared.metrics import WorkerMetrics
from shared.queue import queue_for
from shared.settings import Settings
from worker.apply import Fenced, LedgerConflict
from worker.backlog import Backlog
from worker.commit import Committer
from worker.decide import Entry
from worker.expiries import CHECK_EVERY, Expiries, Sent
from worker.ownership import Ownership
from worker.streams import WalletStreams
from worker.transfers import (
    credited,
    follow_ups,
    resend_due,
    settlements,
    with_local_credits,
)
from worker.wakes import RETRY_DELAY_FIRST, RETRY_DELAY_MAX, WAKE_WAIT, WakeListener

log = logging.getLogger("worker")

# A batch that fails with these fails for what is in it (a wallet whose rows someone changed
# by hand, say), not for a dependency: retrying the same batch would fail for ever.
BAD_BATCH_ERRORS = (
    LedgerConflict,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
)


# Seconds between additions to the live view's counts of what was committed (once more on
# the way out).
COUNT_COMMITTED_EVERY = 1.0


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def connect(settings: Settings, worker_id: str) -> tuple[RedisClient, Any]:
    """A worker's Redis client and PostgreSQL pool."""
    # The wake listener's blocking read, the ownership task's, the round's own.
    redis = open_redis(
        settings,
        max_connections=8,
        name=f"{settings.redis_key_prefix}:worker:{worker_id}",
    )
    # One connection for the batches, one for taking shards over, one for the resending.
    pool = await open_pg_pool(
        settings, max_size=3, server_settings=worker_pg_settings(settings, worker_id)
    )
    return redis, pool


class Worker:
    def __init__(
        self, settings: Settings, redis: RedisClient, pool: Any, *, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        self.worker_id = worker_id or new_worker_id()
        self.metrics = WorkerMetrics()
        self.pool = pool
        self._tasks: list[asyncio.Task[None]] = []
        self._wakeup = asyncio.Event()  # work may be waiting: the round loop looks
        self._stopping = asyncio.Event()
        self.ownership = Ownership(
            settings,
            redis,
            pool,
            self.worker_id,
            self.metrics,
            changed=self._shards_changed,
            taken=self._shard_taken,
            cannot_commit=self._cannot_commit,
        )
        self._rescan_due = True
        self._positions_lost = False
        self.queue = queue_for(self.keys, redis)
        self.listener = WakeListener(
            redis, self.queue, self.worker_id, self.ownership.owned, self._wakeup.set, self._lost
        )
        self.backlog = Backlog(
            self.keys.shard_of,
            batch_max=settings.batch_max,
            batch_wallets_max=settings.batch_wallets_max,
            use_wake_entries=not settings.batch_interval,
        )
        self.streams = WalletStreams(redis, self.queue, settings.batch_max)
        self.expiries = Expiries(self.keys.shard_of, self.metrics)
        self.committer = Committer(
            pool,
            self.keys.shard_of,
            self.metrics,
            settings.transfer_resend_after,
            holds_changed=self.expiries.update,
        )

    def stop(self) -> None:
        """Finish the batch in hand, reply, acknowledge, hand the shards back, then return
        from run()."""
        self._stopping.set()
        self._wakeup.set()
        self.ownership.stop()
        self.listener.stop()

    def has_work_for(self, wallet_id: str) -> bool:
        """Whether the worker knows the wallet has operations waiting."""
        return self.backlog.has_work(wallet_id) or self.listener.has_wake_for(wallet_id)

    async def run(self) -> None:
        """Owns shards and works on them until stop()."""
        self._start_tasks()
        await self.streams.load_scripts()  # else loaded on meeting NOSCRIPT
        last_rescan = -math.inf
        failures = 0
        try:
            while not self._stopping.is_set():
                try:
                    await self._settle()
                    if (
                        self._rescan_due
                        or time.monotonic() - last_rescan > self.settings.worker_rescan_interval
                    ):
                        self._rescan_due = False
                        await self._rescan(list(self.ownership.owned))
                        last_rescan = time.monotonic()
                    started = time.monotonic()
                    done = await self.process_round()
                    failures = 0
                    if done is None:  # nothing to do, or only parked wallets
                        await self._wait_for_work()
                        continue
                except BAD_BATCH_ERRORS as e:
                    self.backlog.blame(e, time.monotonic())
                    continue
                except Fenced as e:
                    self.metrics.fenced.inc()
                    log.warning("batch refused, these shards have a new owner: %s", e)
                    await self.ownership.release(e.shards)
                    continue
                except NoScriptError:  # Redis restarted and forgot it
                    await self.streams.load_scripts()
                    continue
                except (*REDIS_ERRORS, TimeoutError, *PG_ERRORS) as e:
                    failures += 1
                    delay = backoff(failures, RETRY_DELAY_FIRST, RETRY_DELAY_MAX)
                    log.warning(
                        "round failed (%s: %s); retrying in %.2fs", type(e).__name__, e, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                # Group commit needs no timer: what arrived while this batch committed is
                # the next batch, started at once. BATCH_INTERVAL (off by default) starts a
                # busy worker's next batch no sooner than that long after this one, once a
                # batch holds several operations but not a full one: fewer, fuller commits.
                if self.settings.batch_interval and 1 < done < self.settings.batch_max:
                    pause = started + self.settings.batch_interval - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
                elif self.backlog.idle:  # nothing left: no round to try before a wake-up
                    await self._wait_for_work()
        finally:
            await self.close()

    def _start_tasks(self) -> None:
        """The tasks beside the rounds: ownership, the wake listener, and the periodic ones."""
        settings = self.settings
        for name, task in {
            "tend-shards": self.ownership.run(),
            "wake-listener": self.listener.run(),
            "resend-transfers": self._every(
                settings.worker_rescan_interval, "resending transfers", self.resend_transfers
            ),
            "count-committed": self._every(
                COUNT_COMMITTED_EVERY, "counting", self.streams.flush_committed, once_more=True
            ),
            "expire-holds": self._every(CHECK_EVERY, "expiring holds", self.expire_holds),
        }.items():
            self._tasks.append(asyncio.create_task(task, name=name))

    async def process_round(self) -> int | None:
        """Commits, answers and acknowledges one batch; returns how many operations it held,
        or None if no wallet had work."""
        listener = self.listener
        await listener.caught_up()  # the wake-ups that came while the last batch committed
        self._wakeup.clear()  # what comes from here on is seen by this round or wakes the next
        backlog, streams, owned = self.backlog, self.streams, self.ownership.owned
        wakes = listener.take()
        # Several wake-ups in one batch: they come faster than the batches, and those of the
        # commit's time are read after it, for the next batch. Else the listener reads on
        # meanwhile, blocking till the next one.
        busy = len(wakes) > 1
        if not busy:
            listener.read_again()
        backlog.take_wakes(wakes, owned)
        wallets = backlog.pick(owned, time.monotonic())
        if not wallets:
            listener.read_again()
            return None
        held = dict(owned)  # the shards, and their epochs, this round commits under
        epochs = self.ownership.epochs_of(wallets)
        entries: list[Entry] = []
        try:
            unread = backlog.unread(wallets)
            if unread:
                count = max(1, backlog.room(wallets) // len(unread))
                backlog.took_readings(unread, await streams.read(unread, backlog.cursors, count))
            batch = backlog.take_ready(wallets)
            # A transfer between two wallets this worker writes is one transaction (unless
            # the destination is parked: its batches fail, and would take the source's).
            entries = with_local_credits(
                [e for reading in batch.values() for e in reading.entries],
                lambda w: self.keys.shard_of(w) in held and not backlog.is_parked(w),
            )
            epochs |= {s: held[s] for s in map(self.keys.shard_of, credited(entries))}
            outcomes = await self.committer.commit(entries, epochs) if entries else []
            if busy:
                listener.read_again(at_once=True)  # as the answers go out
            # Only after COMMIT: the replies and the transfers' next steps, then the trims
            # and the next entries.
            replies, steps = follow_ups(entries, outcomes)
            answered = await streams.answer(entries, replies, steps, batch, backlog.cursors)
            for outcome in settlements(entries, outcomes):
                self.metrics.transfers.labels(outcome).inc()
            backlog.took_readings(answered.acknowledged, answered.readings)
        except BaseException:
            listener.read_again()
            # How far the round got is unknown: read these wallets again from the start;
            # operation ids keep what was committed from being applied twice.
            backlog.read_again(wallets)
            self.committer.forget([*wallets, *credited(entries)])
            raise
        if answered.held:
            # Committed, but what they hand on was not queued: read again, later.
            backlog.hold_back(answered.held, time.monotonic())
            self.metrics.held_back.inc(len(answered.held))
        backlog.went_through([w for w in wallets if w not in answered.held])
        return len(entries)

    async def _settle(self) -> None:
        """Between two rounds: hands back the shards over the fair share, and forgets the
        wallets of shards no longer owned."""
        await self.ownership.hand_back_surplus()
        if self.ownership.take_dropped():
            self.backlog.keep_only(self.ownership.owned)
        if self._positions_lost:
            self._positions_lost = False
            self.backlog.read_again(list(self.backlog.cursors))
            self._rescan_due = True

    async def _wait_for_work(self) -> None:
        """Until a wake-up, the next parked wallet's retry, or the next rescan."""
        if self._stopping.is_set() or self._wakeup.is_set():  # set: no timer, no task
            return
        wait = min(
            self.backlog.next_retry() - time.monotonic(), self.settings.worker_rescan_interval
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, wait)):
                await self._wakeup.wait()

    async def _rescan(self, shards: list[int]) -> None:
        """Marks the shards' dirty wallets active, and tells the wake listener where to start
        reading a shard it has no position for: on taking a shard, after a lost connection,
        and now and then in case a wake-up was lost."""
        owned = self.ownership.owned
        epochs = {shard: owned.get(shard) for shard in shards}
        try:
            found = await self.streams.dirty_wallets(shards)
        except BaseException:
            self._rescan_due = True
            raise
        for shard, (wallets, last_wake) in zip(shards, found, strict=True):
            epoch = epochs[shard]
            if epoch is not None and owned.get(shard) == epoch:
                self.backlog.mark_active(wallets)
                self.listener.start_after(shard, epoch, last_wake)
        self._wakeup.set()

    async def _every(
        self,
        seconds: float,
        what: str,
        job: Callable[[], Awaitable[Any]],
        *,
        once_more: bool = False,
    ) -> None:
        """Runs `job` every `seconds` until stop() (`once_more`: and once after it), in a
        task of its own, each run bounded by a lease: a PostgreSQL that does not answer
        holds it up, not the rounds (whose batches must meet the rule that a worker unable
        to commit steps aside)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)
            if self._stopping.is_set() and not once_more:
                return
            try:
                async with asyncio.timeout(self.settings.worker_lease_ttl):
                    await job()
            except (*REDIS_ERRORS, TimeoutError, *PG_ERRORS) as e:
                log.warning("%s failed (%s: %s)", what, type(e).__name__, e)
            if self._stopping.is_set():
                return

    async def resend_transfers(self) -> tuple[int, int]:
        """One resending of the owned shards' transfers that are due (worker/transfers.py);
        how many steps were sent, and how many left alone as maybe still queued."""
        sent, queued = await resend_due(
            self.pool, self.streams, list(self.ownership.owned), self.settings.transfer_resend_after
        )
        self.metrics.steps_resent.labels("sent").inc(sent)
        self.metrics.steps_resent.labels("still_queued").inc(queued)
        return sent, queued

    async def expire_holds(self) -> Sent:
        """Queues the expiries of the owned holds that are due (worker/expiries.py)."""
        return await self.expiries.send_due(self.pool, self.streams, self.ownership.owned)

    def _lost(self) -> None:
        """Redis was lost, and may have come back empty, its entry ids starting lower: at
        the next settling, every position is dropped and the shards rescanned (operation
        ids keep what is read twice from being applied twice)."""
        self._positions_lost = True
        self._wakeup.set()

    def _cannot_commit(self) -> str | None:
        """Why this worker cannot commit, if no batch has gone through for a lease."""
        stuck = self.committer.failing_for()
        if stuck < self.settings.worker_lease_ttl:
            return None
        return f"cannot commit to PostgreSQL: no batch has gone through for {stuck:.1f}s"

    def _shards_changed(self) -> None:
        self.listener.shards_changed()
        self._wakeup.set()  # shards to hand back, or wallets to forget, at the next settling

    async def _shard_taken(self, shard: int) -> None:
        self.expiries.taken(shard)
        await self._rescan([shard])

    async def close(self) -> None:
        """Stops the worker's tasks and gives back what it holds: its connections, its
        shards, its place among the live workers. run() ends with it."""
        self.stop()
        # They see the stop within a wake read's wait or a lease renewal; cancelling one
        # inside a Redis call can leave redis-py's connection hanging, so that is the last
        # resort.
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=WAKE_WAIT + REDIS_SOCKET_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.committer.close()
        await self.streams.close()
        await self.ownership.close()
