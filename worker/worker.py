"""The shard worker: the one writer of every wallet in the shards it owns.

For each owned shard a listener waits on the shard's notification list and marks wallets
active. The main loop reads the active wallets' streams (each from where it last read),
applies everything read in one transaction, publishes the outcomes to the API processes
that wait for them, and only then acknowledges: the committed entries are trimmed from the
streams, and a wallet whose stream is left empty is no longer dirty. A crash anywhere
before that leaves the entries in place; whoever owns the shard next reads them again from
the start of the stream and the operation ids, unique in PostgreSQL, keep them from being
applied twice.
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
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from shared.codec import MessageError, Outcome, decode_request, encode_outcomes
from shared.connections import REDIS_SOCKET_TIMEOUT
from shared.keys import KeySpace
from shared.scripts import ACKNOWLEDGE, ACKNOWLEDGE_SHA, next_entry_id
from shared.settings import Settings
from worker.apply import Entry, LedgerConflict, apply_batch

log = logging.getLogger("worker")

START = "0-0"
NOTIFY_WAIT = 1  # seconds one BLPOP waits
RETRY_DELAY_MAX = 2.0
PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    wallet_id: str
    entry_id: str
    message: bytes
    error: str


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        pool: Any,
        *,
        shards: Iterable[int] | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.pool = pool
        self._conn: Any = None
        self.keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        self.shards = list(range(settings.shard_count) if shards is None else shards)
        self.worker_id = worker_id or new_worker_id()
        # wallet id -> the id of the last entry read from its stream
        self.active: dict[str, str] = {}
        # wallets marked active while a round was under way
        self.notified: set[str] = set()
        self.wakeup = asyncio.Event()
        self.stopping = asyncio.Event()
        self.batches = 0
        self.operations = 0

    def stop(self) -> None:
        """Finish the batch in hand, reply, acknowledge, then return from run()."""
        self.stopping.set()
        self.wakeup.set()

    async def run(self, *, burst: bool = False) -> None:
        """Works until stop(); with burst=True, until nothing is queued, then returns."""
        tasks = [asyncio.create_task(self._heartbeat(), name="heartbeat")]
        if not burst:
            tasks += [
                asyncio.create_task(self._listen(shard), name=f"listen-{shard}")
                for shard in self.shards
            ]
        last_rescan = -math.inf
        failures = 0
        try:
            while not self.stopping.is_set():
                try:
                    if time.monotonic() - last_rescan > self.settings.worker_rescan_interval:
                        await self._rescan()
                        last_rescan = time.monotonic()
                    if not self.active:
                        if burst:
                            return
                        self.wakeup.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(
                                self.wakeup.wait(), self.settings.worker_rescan_interval
                            )
                        continue
                    done = await self.process_round()
                    failures = 0
                except NoScriptError:  # Redis restarted and forgot it; if it is down, the
                    with contextlib.suppress(RedisError, OSError):  # next round backs off
                        await self.redis.script_load(ACKNOWLEDGE)
                    continue
                except (RedisError, OSError, TimeoutError, *PG_ERRORS, LedgerConflict) as e:
                    failures += 1
                    delay = min(RETRY_DELAY_MAX, 0.05 * 2**failures)
                    log.warning(
                        "round failed (%s: %s); retrying in %.2fs", type(e).__name__, e, delay
                    )
                    await asyncio.sleep(delay)
                    continue
                if done < self.settings.batch_max and self.settings.batch_linger:
                    await asyncio.sleep(self.settings.batch_linger)
        finally:
            # They see `stopping` within a BLPOP's wait; cancelling one inside a Redis call
            # can leave redis-py's connection hanging, so that is only the last resort.
            self.stopping.set()
            _, late = await asyncio.wait(tasks, timeout=NOTIFY_WAIT + REDIS_SOCKET_TIMEOUT)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.zrem(self.keys.workers(), self.worker_id)

    async def process_round(self) -> int:
        """Reads, commits, replies to and acknowledges one batch; returns its size."""
        wallets = list(self.active)[: self.settings.batch_wallets_max]
        if not wallets:
            return 0
        for w in wallets:  # the next round starts with the wallets this one did not reach
            self.active[w] = self.active.pop(w)
        # A wallet notified from here on may have had its stream deleted by this round's
        # acknowledgement and then started anew: it must stay active, read from the start.
        self.notified.difference_update(wallets)
        try:
            entries, cursors, dead = await self._read(wallets)
            left = await self._commit_reply_acknowledge(entries, cursors, dead)
        except BaseException:
            # How far the round got is unknown: read these wallets again from the start;
            # operation ids keep what was committed from being applied twice.
            for w in wallets:
                self.active[w] = START
            raise
        for wallet, remaining in zip(wallets, left, strict=True):
            if remaining:
                self.active[wallet] = cursors[wallet]
            elif wallet in self.notified:
                self.active[wallet] = START
            else:
                del self.active[wallet]
        return len(entries)

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
        self, entries: list[Entry], cursors: dict[str, str], dead: list[DeadLetter]
    ) -> list[int]:
        """Commits the entries, publishes their outcomes, keeps the dead letters, then trims
        what was read; returns how many entries each wallet's stream has left, in the order
        of `cursors`."""
        outcomes: list[Outcome] = []
        if entries:
            if self._conn is None:
                # Held across batches: releasing to the pool costs a reset round trip.
                self._conn = await self.pool.acquire()
            try:
                outcomes = await apply_batch(self._conn, entries)
            except BaseException:
                await self._release_connection()
                raise
            self.batches += 1
            self.operations += len(entries)
        by_channel: dict[str, list[Outcome]] = defaultdict(list)
        for entry, outcome in zip(entries, outcomes, strict=True):
            if entry.request.reply_to:
                by_channel[entry.request.reply_to].append(outcome)
        async with self.redis.pipeline(transaction=False) as pipe:
            for channel, replies in by_channel.items():
                pipe.publish(channel, encode_outcomes(replies))
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
                    2,
                    self.keys.wallet_stream(wallet, shard),
                    self.keys.dirty_set(shard),
                    wallet,
                    next_entry_id(cursor),
                )
            results = await pipe.execute()
        return [int(n) for n in results[len(by_channel) + len(dead) :]]

    async def close(self) -> None:
        """Gives back what the worker holds (its PostgreSQL connection); run() ends with it."""
        await self._release_connection()

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

    async def _rescan(self) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in self.shards:
                pipe.smembers(self.keys.dirty_set(shard))
            for members in await pipe.execute():
                self._mark_active(members)

    async def _listen(self, shard: int) -> None:
        key = self.keys.notify_list(shard)
        failures = 0
        while not self.stopping.is_set():
            try:
                popped = await self.redis.blpop([key], timeout=NOTIFY_WAIT)
                if popped:
                    more = await self.redis.lpop(key, 1000) or []
                    self._mark_active([popped[1], *more])
                failures = 0
            except (RedisError, OSError) as e:
                failures += 1
                log.warning("shard %d: waiting for work failed (%s)", shard, e)
                await asyncio.sleep(min(RETRY_DELAY_MAX, 0.05 * 2**failures))

    async def _heartbeat(self) -> None:
        ttl_ms = int(self.settings.worker_heartbeat_ttl * 1000)
        while not self.stopping.is_set():
            now_ms = int(time.time() * 1000)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(self.keys.workers(), {self.worker_id: now_ms + ttl_ms})
                    pipe.zremrangebyscore(self.keys.workers(), "-inf", now_ms)
                    await pipe.execute()
            except (RedisError, OSError) as e:
                log.warning("heartbeat failed (%s)", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.settings.worker_heartbeat_ttl / 3)
