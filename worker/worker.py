"""The shard worker: the one writer of every wallet in the shards it owns.

Ownership (worker/ownership.py): which shards this worker owns, at which epoch; leases,
the fair share, taking and handing back, in a task of its own.

Work. One listener reads the owned shards' wake streams in one blocking read: a wallet
goes there, with the operation, when it gets one while it had none queued. The batch loop
takes those operations as they are and reads the streams of the wallets it is already
working on; commits everything in hand in one transaction; then, in one Redis round trip,
publishes the outcomes to the API processes that wait for them, acknowledges (trims the
committed entries; a wallet whose stream is left empty is no longer dirty) and reads each
wallet's next entries for the next batch. There is no timer: the next batch is whatever
arrived while this one committed, so batches are one operation when a wallet is quiet and
grow with the load. A crash anywhere before the acknowledgement leaves the entries in
place; whoever owns the shard next reads them again from the start of the stream, and the
operation ids, unique in PostgreSQL, keep them from being applied twice.
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
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from shared.backoff import backoff
from shared.codec import MessageError, Outcome, encode_outcomes
from shared.connections import (
    REDIS_SOCKET_TIMEOUT,
    open_pg_pool,
    open_redis,
    round_trip,
    worker_pg_settings,
)
from shared.keys import KeySpace
from shared.metrics import WorkerMetrics
from shared.scripts import (
    ACKNOWLEDGE_READ,
    ACKNOWLEDGE_READ_SHA,
    TRIM_WAKES,
    next_entry_id,
)
from shared.settings import Settings
from worker.apply import (
    Entry,
    Fenced,
    LedgerConflict,
    WalletState,
    apply_batch,
)
from worker.backlog import START, Backlog, DeadLetter, Reading, Wake, decode_entry
from worker.ownership import PG_ERRORS, Ownership

log = logging.getLogger("worker")

WAKE_WAIT = 0.25  # seconds one read of the wake streams waits; a shard taken meanwhile
# has its backlog found by the rescan at once, and its new wake-ups read after it
WAKE_COUNT = 1000  # wake entries one read takes of each shard
WAKE_TRIM_AFTER = 100  # wake entries read of a shard before the listener trims them
RETRY_DELAY_FIRST = 0.1  # the wait after one failure; it doubles up to the most
RETRY_DELAY_MAX = 2.0
# A batch that fails with these fails for what is in it (a wallet whose rows someone changed
# by hand, say), not for a dependency: retrying the same batch would fail for ever.
BAD_BATCH_ERRORS = (
    LedgerConflict,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.DataError,
)
# How many wallets' states a worker keeps between batches (the most recently written).
KNOWN_WALLETS_MAX = 100_000
COMMITTED_KEPT_SECONDS = 600


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def connect(settings: Settings, worker_id: str) -> tuple[Redis, Any]:
    """A worker's Redis client and PostgreSQL pool."""
    # The wake listener's blocking read, the ownership task's, the batch loop's own.
    redis = open_redis(
        settings,
        max_connections=8,
        name=f"{settings.redis_key_prefix}:worker:{worker_id}",
    )
    # One connection for the batches, one for taking shards over.
    pool = await open_pg_pool(
        settings, max_size=2, server_settings=worker_pg_settings(settings, worker_id)
    )
    return redis, pool


def entry_fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as Redis sends them ([name, value, name, value, ...])."""
    return dict(zip(flat[::2], flat[1::2], strict=False))


def reading_of(wallet: str, found: Any) -> Reading | None:
    """What ACKNOWLEDGE_READ answered for the wallet: its next entries, those that are no
    operation set aside as dead letters; None if its stream is left empty."""
    if not found:
        return None
    entries: list[Entry] = []
    dead: list[DeadLetter] = []
    for raw_id, fields in found:
        entry_id = raw_id.decode()
        message = entry_fields(fields).get(b"m", b"")
        try:
            entries.append(decode_entry(wallet, entry_id, message))
        except MessageError as e:
            log.error("entry %s of wallet %s goes to the dead letters: %s", entry_id, wallet, e)
            dead.append(DeadLetter(wallet, entry_id, message, str(e)))
    return Reading(entries, dead, found[-1][0].decode())


class Worker:
    def __init__(
        self, settings: Settings, redis: Redis, pool: Any, *, worker_id: str | None = None
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self._conn: Any = None
        # The batch loop's own Redis connection: one round trip per batch, nobody else's.
        self._batch_redis = redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        self.keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        self.worker_id = worker_id or new_worker_id()
        self.metrics = WorkerMetrics()
        self.ownership = Ownership(
            settings,
            redis,
            pool,
            self.worker_id,
            self.metrics,
            changed=self._shards_changed,
            taken=self._shard_taken,
        )
        self.owned_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # the wallets with work (pure bookkeeping, worker/backlog.py)
        self.backlog = Backlog(
            self.keys.shard_of,
            batch_max=settings.batch_max,
            batch_wallets_max=settings.batch_wallets_max,
            use_wake_entries=not settings.batch_interval,
        )
        # (wallet id, first entry id, message) of wallets that have just become dirty, as
        # the wake listener found them; taken up by the batch loop
        self.wakes: list[Wake] = []
        # shard -> the id of the last wake entry read
        self.wake_cursors: dict[int, str] = {}
        # wallet id -> (the shard's epoch, the wallet as this worker's last batch of it left
        # it): lets a batch skip reading its wallets while nobody else can have written them
        self.known: dict[str, tuple[int, WalletState]] = {}
        self.wakeup = asyncio.Event()
        self.wakes_taken = asyncio.Event()
        self.stopping = asyncio.Event()
        self.batches = 0

    def stop(self) -> None:
        """Finish the batch in hand, reply, acknowledge, hand the shards back, then return
        from run()."""
        self.stopping.set()
        self.wakeup.set()
        self.ownership.stop()
        self.wakes_taken.set()
        self.owned_changed.set()

    def has_work_for(self, wallet_id: str) -> bool:
        """Whether the worker knows the wallet has operations waiting."""
        return self.backlog.has_work(wallet_id) or any(w == wallet_id for w, _, _ in self.wakes)

    async def run(self) -> None:
        """Owns shards and works on them until stop()."""
        self._tasks.append(asyncio.create_task(self.ownership.run(), name="tend-shards"))
        self._tasks.append(asyncio.create_task(self._listen(), name="wake-listener"))
        with contextlib.suppress(RedisError, OSError):  # else loaded on meeting NOSCRIPT
            await self.redis.script_load(ACKNOWLEDGE_READ)
        last_rescan = -math.inf
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    await self._settle()
                    if time.monotonic() - last_rescan > self.settings.worker_rescan_interval:
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
                except NoScriptError:  # Redis restarted and forgot it; if it is down, the
                    with contextlib.suppress(RedisError, OSError):  # next round backs off
                        await self.redis.script_load(ACKNOWLEDGE_READ)
                    continue
                except (RedisError, OSError, TimeoutError, *PG_ERRORS) as e:
                    failures += 1
                    delay = backoff(failures, RETRY_DELAY_FIRST, RETRY_DELAY_MAX)
                    log.warning(
                        "round failed (%s: %s); retrying in %.2fs", type(e).__name__, e, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                # Group commit needs no timer: whatever arrived while this batch committed
                # is the next batch, started at once. BATCH_INTERVAL, off by default, makes
                # a busy worker start the next batch no sooner than that long after this one
                # started, once a batch holds several operations (not a full one): fewer,
                # fuller commits, longer waits. After a batch of one nobody else is waiting.
                if self.settings.batch_interval and 1 < done < self.settings.batch_max:
                    pause = started + self.settings.batch_interval - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
        finally:
            await self.close()

    async def process_round(self) -> int | None:
        """Commits, answers and acknowledges one batch; returns how many operations it held,
        or None if no wallet had work."""
        self.wakeup.clear()  # what comes from here on is seen by this round or wakes the next
        backlog, owned = self.backlog, self.ownership.owned
        wakes, self.wakes = self.wakes, []
        self.wakes_taken.set()
        backlog.take_wakes(wakes, owned)
        wallets = backlog.pick(owned, time.monotonic())
        if not wallets:
            return None
        epochs = self.ownership.epochs_of(wallets)
        try:
            unread = backlog.unread(wallets)
            if unread:
                count = max(1, backlog.room(wallets) // len(unread))
                backlog.took_readings(unread, await self._acknowledge_read([], unread, count))
            batch = backlog.take_ready(wallets)
            entries = [e for reading in batch.values() for e in reading.entries]
            outcomes = await self._commit(entries, epochs) if entries else []
            read = await self._answer_acknowledge_read(entries, outcomes, batch)
            backlog.took_readings(batch, read)
        except BaseException:
            # How far the round got is unknown: read these wallets again from the start;
            # operation ids keep what was committed from being applied twice.
            backlog.read_again(wallets)
            for w in wallets:
                self.known.pop(w, None)
            raise
        backlog.went_through(wallets)
        return len(entries)

    async def _wait_for_work(self) -> None:
        """Until a wake-up, the next parked wallet's retry, or the next rescan."""
        if self.stopping.is_set():
            return
        wait = min(
            self.backlog.next_retry() - time.monotonic(), self.settings.worker_rescan_interval
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.wait(), max(0.0, wait))

    def _acknowledge_read_command(self, wallet: str, count: int) -> tuple[Any, ...]:
        shard = self.keys.shard_of(wallet)
        return (
            "EVALSHA",
            ACKNOWLEDGE_READ_SHA,
            3,
            self.keys.wallet_stream(wallet, shard),
            self.keys.dirty_set(shard),
            self.keys.queued(shard),
            wallet,
            next_entry_id(self.backlog.cursors[wallet]),
            count,
        )

    async def _acknowledge_read(
        self, before: list[tuple[Any, ...]], wallets: list[str], count: int
    ) -> list[Reading | None]:
        """One round trip: the commands `before`, then ACKNOWLEDGE_READ for each wallet;
        what was read of each. Raises the first error any of them answered."""
        commands = [*before, *(self._acknowledge_read_command(w, count) for w in wallets)]
        if not commands:
            return []
        answers = await round_trip(self._batch_redis, commands)
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return [
            reading_of(wallet, found)
            for wallet, found in zip(wallets, answers[len(before) :], strict=True)
        ]

    async def _commit(self, entries: list[Entry], epochs: dict[int, int]) -> list[Outcome]:
        """Commits the entries if `epochs` are still the shards' epochs; their outcomes."""
        if self._conn is None:
            # Held across batches: releasing to the pool costs a reset round trip.
            self._conn = await self.pool.acquire()
        started = time.perf_counter()
        try:
            outcomes, states = await apply_batch(
                self._conn, entries, epochs, self._known_states(entries, epochs)
            )
        except BaseException:
            await self._release_connection()
            raise
        self._remember(states, epochs)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(entries))
        self.batches += 1
        return outcomes

    async def _answer_acknowledge_read(
        self, entries: list[Entry], outcomes: list[Outcome], batch: dict[str, Reading]
    ) -> list[Reading | None]:
        """One round trip after COMMIT: the outcomes to the API processes that wait for
        them, the dead letters kept, then each wallet of the batch acknowledged (its
        committed entries trimmed) and its next entries read for the next batch
        (in the order of `batch`)."""
        by_channel: dict[str, list[Outcome]] = defaultdict(list)
        for entry, outcome in zip(entries, outcomes, strict=True):
            if entry.request.reply_to:
                by_channel[entry.request.reply_to].append(outcome)
        commands: list[tuple[Any, ...]] = [
            ("PUBLISH", channel, encode_outcomes(replies))
            for channel, replies in by_channel.items()
        ]
        if entries:  # for the live view; after the replies, as it matters less
            second = self.keys.committed(int(time.time()))
            commands += [
                ("HINCRBY", second, "batches", 1),
                ("HINCRBY", second, "operations", len(entries)),
                ("EXPIRE", second, COMMITTED_KEPT_SECONDS),
            ]
        for reading in batch.values():
            for letter in reading.dead:
                commands.append(
                    (
                        "XADD",
                        self.keys.dead_letters(self.keys.shard_of(letter.wallet_id)),
                        "*",
                        "wallet",
                        letter.wallet_id,
                        "entry",
                        letter.entry_id,
                        "m",
                        letter.message,
                        "error",
                        letter.error,
                    )
                )
        wallets = list(batch)
        count = max(1, self.settings.batch_max // max(1, len(wallets)))
        return await self._acknowledge_read(commands, wallets, count)

    def _known_states(
        self, entries: Iterable[Entry], epochs: dict[int, int]
    ) -> dict[str, WalletState]:
        known = {}
        for e in entries:
            w = e.request.wallet_id
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
        """Stops the worker's tasks and gives back what it holds: its connections, its
        shards, its place among the live workers. run() ends with it."""
        self.stop()
        # They see `stopping` within a wake read's wait or a lease renewal; cancelling one
        # inside a Redis call can leave redis-py's connection hanging, so that is the last
        # resort.
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=WAKE_WAIT + REDIS_SOCKET_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._release_connection()
        await self._batch_redis.disconnect()
        await self.ownership.close()

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(*PG_ERRORS, OSError):
                await self.pool.release(conn)

    async def _rescan(self, shards: list[int]) -> None:
        """Marks the shards' dirty wallets active: on taking a shard, and now and then in
        case a wake-up was lost."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.smembers(self.keys.dirty_set(shard))
            found = await pipe.execute()
        owned = self.ownership.owned
        for shard, members in zip(shards, found, strict=True):
            if shard in owned:
                self.backlog.mark_active(raw.decode() for raw in members)
        self.wakeup.set()

    async def _listen(self) -> None:
        """Reads the owned shards' wake streams, all in one blocking read, and hands the
        wallets found there to the batch loop. Trims what it has read, a shard's at a time
        once WAKE_TRIM_AFTER entries have piled up or when nothing came."""
        connection = self.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        untrimmed: dict[int, int] = {}
        quiet = False  # the last read found nothing: a good time to trim
        failures = 0
        try:
            while not self.stopping.is_set():
                shards = sorted(self.ownership.owned)
                if not shards:
                    self.owned_changed.clear()
                    await self.owned_changed.wait()
                    continue
                due = [
                    s
                    for s, n in untrimmed.items()
                    if s in self.ownership.owned and (quiet or n >= WAKE_TRIM_AFTER)
                ]
                read = (
                    "XREAD",
                    "COUNT",
                    WAKE_COUNT,
                    "BLOCK",
                    int(WAKE_WAIT * 1000),
                    "STREAMS",
                    *(self.keys.wake_stream(s) for s in shards),
                    *(self.wake_cursors.get(s, START) for s in shards),
                )
                try:
                    answers = await round_trip(
                        connection, [*(self._trim_wakes_command(s) for s in due), read]
                    )
                    if isinstance(answers[-1], Exception):
                        raise answers[-1]
                except (RedisError, OSError) as e:
                    failures += 1
                    log.warning("reading the wake-ups failed (%s)", e)
                    await asyncio.sleep(backoff(failures, RETRY_DELAY_FIRST, RETRY_DELAY_MAX))
                    continue
                failures = 0
                for shard in due:
                    del untrimmed[shard]
                quiet = answers[-1] is None
                self._take_wake_entries(shards, answers[-1] or [], untrimmed)
                if self.wakes:
                    # Reading again before the batch loop has taken these would mostly fetch
                    # one or two at a time while it commits: what comes meanwhile is read in
                    # one go when it starts its next batch.
                    self.wakes_taken.clear()
                    await self.wakes_taken.wait()
        finally:
            await connection.disconnect()

    def _trim_wakes_command(self, shard: int) -> tuple[Any, ...]:
        """Drops the shard's wake entries read so far, if the shard is still this worker's."""
        keys = (self.keys.lease(shard), self.keys.wake_stream(shard))
        return (
            "EVAL",
            TRIM_WAKES,
            2,
            *keys,
            self.worker_id,
            next_entry_id(self.wake_cursors[shard]),
        )

    def _take_wake_entries(self, shards: list[int], found: Any, untrimmed: dict[int, int]) -> None:
        """Notes an XREAD's answer (a map under RESP3, a list of pairs under RESP2)."""
        shard_of = {self.keys.wake_stream(s).encode(): s for s in shards}
        for stream, items in found.items() if isinstance(found, dict) else found:
            shard = shard_of[stream]
            if shard not in self.ownership.owned:  # handed back meanwhile: the next owner's
                continue
            for raw_id, fields in items:
                wake = entry_fields(fields)
                try:
                    self.wakes.append((wake[b"w"].decode(), wake[b"e"].decode(), wake[b"m"]))
                except (KeyError, UnicodeDecodeError):  # the rescan finds its wallet
                    log.error("wake entry %s of shard %d is not one", raw_id, shard)
            self.wake_cursors[shard] = items[-1][0].decode()
            untrimmed[shard] = untrimmed.get(shard, 0) + len(items)
        if self.wakes:
            self.wakeup.set()

    async def _settle(self) -> None:
        """Between two rounds: hands back the shards over the fair share, and forgets the
        wallets of shards no longer owned."""
        await self.ownership.hand_back_surplus()
        if self.ownership.take_dropped():
            self.backlog.keep_only(self.ownership.owned)

    def _shards_changed(self) -> None:
        self.owned_changed.set()  # a listener with no shard to read looks again
        self.wakeup.set()  # shards to hand back, or wallets to forget, at the next settling

    async def _shard_taken(self, shard: int) -> None:
        # The shard's wake stream from its start: the wallets there are dirty or were, and
        # the rescan finds the dirty ones whose wake-ups a former owner trimmed. (Set before
        # the first await: the listener sees the shard and its cursor together.)
        self.wake_cursors[shard] = START
        await self._rescan([shard])

    async def refresh_gauges(self) -> None:
        """Reads the figures that live in Redis into the metrics, before they are exposed."""
        owned = sorted(self.ownership.owned)
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in owned:
                pipe.get(self.keys.queued(shard))
            counts = await pipe.execute()
        self.metrics.shards_owned.set(len(owned))
        self.metrics.parked_wallets.set(self.backlog.parked_count)
        self.metrics.queued.clear()
        for shard, count in zip(owned, counts, strict=True):
            self.metrics.queued.labels(str(shard)).set(int(count or 0))
