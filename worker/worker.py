"""The shard worker: the one writer of every wallet in the shards it owns.

Ownership. Workers divide the shards among themselves through leases in Redis: a worker
renews the leases it holds every fifth of WORKER_LEASE_TTL, counts the live workers by
their heartbeats, and takes free shards up to its fair share or hands back what is over
it. A lease alone does not stop a worker that was paused past it from committing; the
shard's epoch in PostgreSQL does: taking a shard bumps it, and every batch commits only if
its shards' epochs are still the ones its worker got (worker/apply.py).

Work. For each owned shard a listener waits on the shard's notification list and marks
wallets active. The main loop reads the active wallets' streams (each from where it last
read), applies everything read in one transaction, publishes the outcomes to the API
processes that wait for them, and only then acknowledges: the committed entries are trimmed
from the streams, and a wallet whose stream is left empty is no longer dirty. A crash
anywhere before that leaves the entries in place; whoever owns the shard next reads them
again from the start of the stream and the operation ids, unique in PostgreSQL, keep them
from being applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import socket
import time
import uuid
import zlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from shared.codec import MessageError, Outcome, decode_request, encode_outcomes
from shared.connections import (
    REDIS_SOCKET_TIMEOUT,
    open_pg_pool,
    open_redis,
    worker_pg_settings,
)
from shared.keys import KeySpace
from shared.metrics import WorkerMetrics
from shared.scripts import (
    ACKNOWLEDGE,
    ACKNOWLEDGE_SHA,
    RELEASE_LEASE,
    RENEW_LEASE,
    next_entry_id,
)
from shared.settings import Settings
from worker.apply import (
    Entry,
    Fenced,
    LedgerConflict,
    WalletState,
    apply_batch,
    take_shard,
)

log = logging.getLogger("worker")

START = "0-0"
NOTIFY_WAIT = 1  # seconds one BLPOP waits
RETRY_DELAY_MAX = 2.0
PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)
# A batch that fails with these fails for what is in it (a wallet whose rows someone changed
# by hand, say), not for a dependency: retrying the same batch would fail for ever.
BAD_BATCH_ERRORS = (
    LedgerConflict,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
)
PARKED_DELAY_MAX = 60.0
# How many wallets' states a worker keeps between batches (the most recently written).
KNOWN_WALLETS_MAX = 100_000
RENEWALS_PER_LEASE = 5
COMMITTED_KEPT_SECONDS = 600


@dataclass(frozen=True, slots=True)
class DeadLetter:
    wallet_id: str
    entry_id: str
    message: bytes
    error: str


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def connect(settings: Settings, worker_id: str) -> tuple[Redis, Any]:
    """A worker's Redis client and PostgreSQL pool."""
    # One blocking connection per owned shard waits for work, plus the loops' own.
    redis = open_redis(
        settings,
        max_connections=settings.shard_count + 8,
        name=f"{settings.redis_key_prefix}:worker:{worker_id}",
    )
    # One connection for the batches, one for taking shards over.
    pool = await open_pg_pool(
        settings, max_size=2, server_settings=worker_pg_settings(settings, worker_id)
    )
    return redis, pool


def fair_share(live_workers: Iterable[str], worker_id: str, shard_count: int) -> int:
    """How many shards `worker_id` should own: the shards split as evenly as they go, the
    larger shares to the first workers in id order, so that the shares add up."""
    workers = sorted({*live_workers, worker_id})
    share, rest = divmod(shard_count, len(workers))
    return share + (workers.index(worker_id) < rest)


class Worker:
    def __init__(
        self, settings: Settings, redis: Redis, pool: Any, *, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self._conn: Any = None
        self.keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        self.worker_id = worker_id or new_worker_id()
        # shard -> the epoch this worker got when it took the shard
        self.owned: dict[int, int] = {}
        # owned shards over the fair share, handed back between two rounds
        self.releasing: set[int] = set()
        self._shards_dropped = False
        self._listeners: dict[int, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # wallet id -> the id of the last entry read from its stream
        self.active: dict[str, str] = {}
        # wallets marked active while a round was under way
        self.notified: set[str] = set()
        # After a bad batch its wallets go one at a time, so the one to blame is found and
        # parked (wallet id -> when to try it again, failures so far) while the others go on.
        self.isolating: set[str] = set()
        self.parked: dict[str, tuple[float, int]] = {}
        # wallet id -> (the shard's epoch, the wallet as this worker's last batch of it left
        # it): lets a batch skip reading its wallets while nobody else can have written them
        self.known: dict[str, tuple[int, WalletState]] = {}
        self._round: list[str] = []
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.batches = 0
        self.operations = 0
        self.metrics = WorkerMetrics()

    def stop(self) -> None:
        """Finish the batch in hand, reply, acknowledge, hand the shards back, then return
        from run()."""
        self.stopping.set()
        self.wakeup.set()

    async def run(self) -> None:
        """Owns shards and works on them until stop()."""
        self._tasks.append(asyncio.create_task(self._tend_shards(), name="tend-shards"))
        last_rescan = -math.inf
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    await self._settle_ownership()
                    if time.monotonic() - last_rescan > self.settings.worker_rescan_interval:
                        await self._rescan(list(self.owned))
                        last_rescan = time.monotonic()
                    started = time.monotonic()
                    done = await self.process_round()
                    failures = 0
                    if not self._round:  # nothing active, or only parked wallets
                        await self._wait_for_work()
                        continue
                except BAD_BATCH_ERRORS as e:
                    self._blame(e)
                    continue
                except Fenced as e:
                    self.metrics.fenced.inc()
                    log.warning("batch refused, these shards have a new owner: %s", e)
                    await self._release(e.shards)
                    continue
                except NoScriptError:  # Redis restarted and forgot it; if it is down, the
                    with contextlib.suppress(RedisError, OSError):  # next round backs off
                        await self.redis.script_load(ACKNOWLEDGE)
                    continue
                except (RedisError, OSError, TimeoutError, *PG_ERRORS) as e:
                    failures += 1
                    delay = min(RETRY_DELAY_MAX, 0.05 * 2**failures)
                    log.warning(
                        "round failed (%s: %s); retrying in %.2fs", type(e).__name__, e, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                # Group commit: after a batch of several operations more are surely coming,
                # so the next batch waits for them. After a batch of one there is nobody to
                # wait for; after a full one there is more already queued.
                if 1 < done < self.settings.batch_max:
                    pause = started + self.settings.batch_interval - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
        finally:
            await self.close()

    async def process_round(self) -> int:
        """Reads, commits, replies to and acknowledges one batch; returns its size."""
        epochs: dict[int, int] = {}
        wallets = []
        for w in self._pick():
            shard = self.keys.shard_of(w)
            if shard in self.owned:  # else lost since the last settling; dropped at the next
                epochs[shard] = self.owned[shard]
                wallets.append(w)
        self._round = wallets
        if not wallets:
            return 0
        for w in wallets:  # the next round starts with the wallets this one did not reach
            self.active[w] = self.active.pop(w)
        # A wallet notified from here on may have had its stream deleted by this round's
        # acknowledgement and then started anew: it must stay active, read from the start.
        self.notified.difference_update(wallets)
        try:
            entries, cursors, dead = await self._read(wallets)
            left = await self._commit_reply_acknowledge(entries, cursors, dead, epochs)
        except BaseException:
            # How far the round got is unknown: read these wallets again from the start;
            # operation ids keep what was committed from being applied twice.
            for w in wallets:
                self.active[w] = START
                self.known.pop(w, None)
            raise
        self.isolating.difference_update(wallets)
        for wallet in wallets:
            if self.parked.pop(wallet, None) is not None:
                log.info("wallet %s works again", wallet)
        for wallet, remaining in zip(wallets, left, strict=True):
            if remaining:
                self.active[wallet] = cursors[wallet]
            elif wallet in self.notified:
                self.active[wallet] = START
            else:
                del self.active[wallet]
        return len(entries)

    async def _wait_for_work(self) -> None:
        """Until a wake-up, the next parked wallet's retry, or the next rescan."""
        now = time.monotonic()
        due = min((d for d, _ in self.parked.values()), default=math.inf)
        self.wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self.wakeup.wait(), max(0.0, min(due - now, self.settings.worker_rescan_interval))
            )

    def _pick(self) -> list[str]:
        """The wallets of the next round: one alone while a bad batch is being taken apart
        or a parked wallet is due for another try, else the active ones not parked."""
        now = time.monotonic()
        self.isolating.update(w for w, (due, _) in self.parked.items() if due <= now)
        for w in list(self.isolating):
            if w in self.active:
                return [w]
            self.isolating.discard(w)
        ready = (w for w in self.active if w not in self.parked)
        return list(itertools.islice(ready, self.settings.batch_wallets_max))

    def _blame(self, error: Exception) -> None:
        """After a bad batch: take it apart, or, if it held one wallet, park that wallet
        (its operations wait in its stream) and try it again later, less and less often."""
        if len(self._round) > 1:
            log.warning(
                "a batch of %d wallets failed (%s: %s); trying them one at a time",
                len(self._round),
                type(error).__name__,
                error,
            )
            self.isolating.update(self._round)
            return
        for wallet in self._round:
            self.isolating.discard(wallet)
            failures = self.parked.get(wallet, (0.0, 0))[1] + 1
            delay = min(PARKED_DELAY_MAX, 2.0**failures)
            self.parked[wallet] = (time.monotonic() + delay, failures)
            log.error(
                "wallet %s cannot be applied (%s: %s); its operations wait in its stream, "
                "next try in %.0fs",
                wallet,
                type(error).__name__,
                error,
                delay,
            )

    async def _read(
        self, wallets: list[str]
    ) -> tuple[list[Entry], dict[str, str], list[DeadLetter]]:
        """The wallets' next entries; each wallet's id of the last entry read; and the
        entries that cannot be applied, for the shard's dead-letter stream."""
        count = max(1, self.settings.batch_max // len(wallets))
        wallet_of: dict[str, str] = {}
        by_shard: dict[int, dict[str, str]] = defaultdict(dict)
        for w in wallets:
            shard = self.keys.shard_of(w)
            stream = self.keys.wallet_stream(w, shard)
            wallet_of[stream] = w
            by_shard[shard][stream] = self.active[w]
        # One XREAD per shard: the streams of one XREAD must share a Redis Cluster slot.
        async with self.redis.pipeline(transaction=False) as pipe:
            for streams in by_shard.values():
                pipe.xread(streams, count=count)  # type: ignore[arg-type]
            replies: Any = await pipe.execute()
        cursors = {w: self.active[w] for w in wallets}
        entries: list[Entry] = []
        dead: list[DeadLetter] = []
        for reply in replies:
            for stream, items in reply or []:
                wallet = wallet_of[stream.decode()]
                for raw_id, fields in items:
                    entry_id = cursors[wallet] = raw_id.decode()
                    try:
                        request = decode_request(fields[b"m"])
                        if request.wallet_id != wallet:
                            raise MessageError(f"it names wallet {request.wallet_id}")
                    except (MessageError, KeyError) as e:
                        log.error(
                            "entry %s of wallet %s goes to the dead letters: %s",
                            entry_id,
                            wallet,
                            e,
                        )
                        dead.append(DeadLetter(wallet, entry_id, fields.get(b"m", b""), str(e)))
                        continue
                    entries.append(Entry(entry_id, request))
        return entries, cursors, dead

    async def _commit_reply_acknowledge(
        self,
        entries: list[Entry],
        cursors: dict[str, str],
        dead: list[DeadLetter],
        epochs: dict[int, int],
    ) -> list[int]:
        """Commits the entries if `epochs` are still the shards' epochs, publishes their
        outcomes, keeps the dead letters, then trims what was read; returns how many entries
        each wallet's stream has left, in the order of `cursors`."""
        outcomes: list[Outcome] = []
        if entries:
            if self._conn is None:
                # Held across batches: releasing to the pool costs a reset round trip.
                self._conn = await self.pool.acquire()
            started = time.perf_counter()
            try:
                outcomes, states = await apply_batch(
                    self._conn, entries, epochs, self._known_states(cursors, epochs)
                )
            except BaseException:
                await self._release_connection()
                raise
            self._remember(states, epochs)
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(entries))
            self.batches += 1
            self.operations += len(entries)
        by_channel: dict[str, list[Outcome]] = defaultdict(list)
        for entry, outcome in zip(entries, outcomes, strict=True):
            if entry.request.reply_to:
                by_channel[entry.request.reply_to].append(outcome)
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, replies in by_channel.items():
                pipe.publish(channel, encode_outcomes(replies))
            if entries:  # for the live view; after the replies, as it matters less
                second = self.keys.committed(int(time.time()))
                pipe.hincrby(second, "batches", 1)
                pipe.hincrby(second, "operations", len(entries))
                pipe.expire(second, COMMITTED_KEPT_SECONDS)
            for letter in dead:
                pipe.xadd(
                    self.keys.dead_letters(self.keys.shard_of(letter.wallet_id)),
                    {
                        "wallet": letter.wallet_id,
                        "entry": letter.entry_id,
                        "m": letter.message,
                        "error": letter.error,
                    },
                )
            for wallet, cursor in cursors.items():
                shard = self.keys.shard_of(wallet)
                # EVALSHA itself: redis-py's Script object would add a SCRIPT EXISTS round
                # trip to every pipeline. run() loads the script when Redis lacks it.
                pipe.evalsha(
                    ACKNOWLEDGE_SHA,
                    3,
                    self.keys.wallet_stream(wallet, shard),
                    self.keys.dirty_set(shard),
                    self.keys.queued(shard),
                    wallet,
                    next_entry_id(cursor),
                )
            results = await pipe.execute()
        return [int(n) for n in results[-len(cursors) :]] if cursors else []

    def _known_states(
        self, wallets: Iterable[str], epochs: dict[int, int]
    ) -> dict[str, WalletState]:
        known = {}
        for w in wallets:
            cached = self.known.get(w)
            if cached is not None and cached[0] == epochs.get(self.keys.shard_of(w)):
                known[w] = cached[1]
        return known

    def _remember(self, states: dict[str, WalletState], epochs: dict[int, int]) -> None:
        for w, state in states.items():
            self.known.pop(w, None)  # to the end: the least recently written go first
            self.known[w] = (epochs[self.keys.shard_of(w)], state)
        while len(self.known) > KNOWN_WALLETS_MAX:
            del self.known[next(iter(self.known))]

    async def close(self) -> None:
        """Stops the worker's tasks and gives back what it holds: its PostgreSQL connection,
        its shards, its place among the live workers. run() ends with it."""
        self.stop()
        # They see `stopping` within a BLPOP's wait or a lease renewal; cancelling one inside
        # a Redis call can leave redis-py's connection hanging, so that is the last resort.
        tasks = [*self._tasks, *self._listeners.values()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=NOTIFY_WAIT + REDIS_SOCKET_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._release_connection()
        with contextlib.suppress(RedisError, OSError):
            await self._release(list(self.owned))
            await self.redis.zrem(self.keys.workers(), self.worker_id)

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*PG_ERRORS, OSError):
                await self.pool.release(conn)

    def _mark_active(self, wallet_ids: Iterable[bytes | str]) -> None:
        for raw in wallet_ids:
            w = raw.decode() if isinstance(raw, bytes) else raw
            self.active.setdefault(w, START)
            self.notified.add(w)
        self.wakeup.set()

    async def _rescan(self, shards: list[int]) -> None:
        """Marks the shards' dirty wallets active: on taking a shard, and now and then in
        case a wake-up was lost."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.smembers(self.keys.dirty_set(shard))
            found = await pipe.execute()
        for shard, members in zip(shards, found, strict=True):
            if shard in self.owned:
                self._mark_active(members)

    async def _listen(self, shard: int) -> None:
        key = self.keys.notify_list(shard)
        failures = 0
        while shard in self.owned and not self.stopping.is_set():
            try:
                popped = await self.redis.blpop([key], timeout=NOTIFY_WAIT)
                if popped:
                    woken = [popped[1], *(await self.redis.lpop(key, 1000) or [])]
                    if shard in self.owned:
                        self._mark_active(woken)
                    else:  # handed back meanwhile: the wake-ups are the next owner's
                        await self.redis.rpush(key, *woken)
                failures = 0
            except (RedisError, OSError) as e:
                failures += 1
                log.warning("shard %d: waiting for work failed (%s)", shard, e)
                await asyncio.sleep(min(RETRY_DELAY_MAX, 0.05 * 2**failures))

    async def _tend_shards(self) -> None:
        interval = self.settings.worker_lease_ttl / RENEWALS_PER_LEASE
        while not self.stopping.is_set():
            try:
                await self.tend_shards()
            except (RedisError, OSError, TimeoutError, *PG_ERRORS) as e:
                log.warning("tending the shards failed (%s: %s)", type(e).__name__, e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    async def tend_shards(self) -> None:
        """Once: the heartbeat, the renewal of the leases held, and a step towards the fair
        share (taking free shards, or marking some to hand back after the round)."""
        ttl_ms = int(self.settings.worker_lease_ttl * 1000)
        now_ms = int(time.time() * 1000)
        held = list(self.owned)
        workers = self.keys.workers()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(workers, {self.worker_id: now_ms + ttl_ms})
            pipe.zremrangebyscore(workers, "-inf", now_ms)
            pipe.zrange(workers, 0, -1)
            for shard in held:
                pipe.eval(RENEW_LEASE, 1, self.keys.lease(shard), self.worker_id, ttl_ms)
            for shard in range(self.settings.shard_count):
                pipe.exists(self.keys.lease(shard))
            results = await pipe.execute()
        live = [w.decode() for w in results[2]]
        renewed = results[3 : 3 + len(held)]
        taken = results[3 + len(held) :]
        for shard, still_held in zip(held, renewed, strict=True):
            if not still_held and self.owned.pop(shard, None) is not None:
                self._shards_dropped = True
                self.metrics.lease_changes.labels("lost").inc()
                log.warning("lost the lease of shard %d", shard)
        if self.stopping.is_set():
            return
        share = fair_share(live, self.worker_id, self.settings.shard_count)
        keeping = sorted(set(self.owned) - self.releasing)
        if len(keeping) > share:
            self.releasing.update(keeping[share:])
            self.wakeup.set()
            return
        free = [shard for shard, exists in enumerate(taken) if not exists]
        # Workers starting together try the free shards in different orders.
        offset = zlib.crc32(self.worker_id.encode())
        free.sort(key=lambda shard: (shard - offset) % self.settings.shard_count)
        wanted = share - len(keeping)
        for shard in free:
            if wanted <= 0 or self.stopping.is_set():
                break
            wanted -= await self.take(shard)

    async def take(self, shard: int) -> bool:
        """Takes the shard if its lease is free: leases it, bumps its epoch, and starts
        working on it. Returns whether it did."""
        ttl_ms = int(self.settings.worker_lease_ttl * 1000)
        lease = self.keys.lease(shard)
        if not await self.redis.set(lease, self.worker_id, nx=True, px=ttl_ms):
            return False
        try:
            async with asyncio.timeout(self.settings.worker_lease_ttl), self.pool.acquire() as conn:
                epoch = await take_shard(conn, shard, self.worker_id)
            # Taking the epoch can wait for a former owner's last batch; the lease must
            # still be this worker's after it, or another worker's epoch follows this one.
            if not await self.redis.eval(RENEW_LEASE, 1, lease, self.worker_id, ttl_ms):
                log.warning("shard %d: the lease ran out while taking it", shard)
                return False
        except BaseException:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.eval(RELEASE_LEASE, 1, lease, self.worker_id)
            raise
        self.owned[shard] = epoch
        self.releasing.discard(shard)
        listener = self._listeners.get(shard)
        if listener is None or listener.done():
            self._listeners[shard] = asyncio.create_task(
                self._listen(shard), name=f"listen-{shard}"
            )
        self.metrics.lease_changes.labels("taken").inc()
        log.info("took shard %d at epoch %d", shard, epoch)
        await self._rescan([shard])
        return True

    async def _settle_ownership(self) -> None:
        """Between two rounds: hands back the shards marked for it, and forgets the wallets
        of shards no longer owned."""
        if self.releasing:
            await self._release(sorted(self.releasing))
        if self._shards_dropped:
            self._shards_dropped = False
            self.active = {
                w: cursor
                for w, cursor in self.active.items()
                if self.keys.shard_of(w) in self.owned
            }
            self.notified.intersection_update(self.active)
            self.isolating.intersection_update(self.active)
            self.parked = {w: v for w, v in self.parked.items() if w in self.active}

    async def _release(self, shards: list[int]) -> None:
        """Stops working on the shards and gives their leases up, so that another worker
        can take them at once."""
        for shard in shards:
            self.owned.pop(shard, None)
            self.releasing.discard(shard)
        self._shards_dropped = True
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.eval(RELEASE_LEASE, 1, self.keys.lease(shard), self.worker_id)
            await pipe.execute()
        if shards:
            self.metrics.lease_changes.labels("handed_back").inc(len(shards))
            log.info("handed back shards %s", shards)

    async def refresh_gauges(self) -> None:
        """Reads the figures that live in Redis into the metrics, before they are exposed."""
        owned = sorted(self.owned)
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in owned:
                pipe.get(self.keys.queued(shard))
            counts = await pipe.execute()
        self.metrics.shards_owned.set(len(owned))
        self.metrics.parked_wallets.set(len(self.parked))
        self.metrics.queued.clear()
        for shard, count in zip(owned, counts, strict=True):
            self.metrics.queued.labels(str(shard)).set(int(count or 0))
