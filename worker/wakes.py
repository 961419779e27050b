"""The wake listener: reads every owned shard's wake stream in one blocking read (on a Redis
Cluster, one per shard), and holds the wake-ups found there until the round takes them."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import RedisCluster

from shared import connections
from shared.backoff import backoff
from shared.connections import REDIS_ERRORS, RedisClient
from shared.queue import Queue, entry_fields
from worker.backlog import Wake
from worker.gate import ReadGate

log = logging.getLogger("worker")

WAKE_WAIT = 0.25  # seconds one read of the wake streams waits; a shard taken meanwhile
# has its backlog found by the rescan at once, and its new wake-ups read after it
WAKE_TRIM_AFTER = 100  # wake entries read of a shard before the listener trims them
RETRY_DELAY_FIRST = 0.1  # the wait after one failure; it doubles up to the most
RETRY_DELAY_MAX = 2.0


@dataclass(slots=True)
class _Untrimmed:
    """What one reader has read of each shard's wake stream and not trimmed yet."""

    read: dict[int, int] = field(default_factory=dict)  # shard -> wake entries
    quiet: bool = False  # the last read found nothing: a good time to trim


class WakeListener:
    """Reads the owned shards' wake streams, all in one blocking read, and holds the wake-ups
    found there until the round takes them. Trims what it has read, a shard's at a time
    once WAKE_TRIM_AFTER entries have piled up or when nothing came.

    A reader that found wake-ups waits (parks) until the round lets it read again
    (`read_again`). If the round's batch took several wake-ups, they come faster than the
    batches: the round lets it once it has committed, the reader reads at once, without
    blocking, what came meanwhile, and the next batch waits for that read (`caught_up`), so
    that what comes while a batch commits goes into the next one. Reading on while the
    round commits would fetch one or two at a time, each read of all the shards' streams
    costing Redis as much as a batch's acknowledgement. Else the round lets it as the batch
    starts, for a blocking read that the next wake-up ends.

    A shard's wake stream is read only once a rescan has said where to start (`start_after`),
    anew for each epoch of the shard: after the last wake entry there was when the rescan
    read the shard's dirty set, in the same transaction. The wallets dirty then are the
    rescan's; a wake-up before that point is one of theirs, or of a wallet done since, and
    reading it would apply a committed operation again. After a lost connection (Redis
    may have restarted empty, its entry ids starting again lower) every shard waits for a
    new rescan, which `lost` asks for."""

    def __init__(
        self,
        redis: RedisClient,
        queue: Queue,
        worker_id: str,
        owned: Mapping[int, int],
        woke: Callable[[], None],
        lost: Callable[[], None],
    ) -> None:
        """`owned`: shard -> epoch, the shards to read (read, never changed, here); `woke`
        is called when wake-ups are waiting to be taken, `lost` when the positions were
        dropped and the shards need a rescan."""
        self._redis = redis
        self._queue = queue
        self._keys = queue.keys
        self._worker_id = worker_id
        self._owned = owned
        self._woke = woke
        self._lost = lost
        self._wakes: list[Wake] = []
        # wake stream name, as XREAD answers it -> its shard
        self._shard_of_stream = {
            self._keys.wake_stream(s).encode(): s for s in range(self._keys.shard_count)
        }
        # shard -> (the epoch it was read under, the id of the last wake entry read)
        self._cursors: dict[int, tuple[int, str]] = {}
        # The owned shards with a read position, (shard, epoch), listed once for all the
        # reads until the shards or the positions change (None: to be listed again).
        self._readable_shards: list[tuple[int, int]] | None = None
        self._gate = ReadGate()
        self._shards_changed = asyncio.Event()
        self._stopping = asyncio.Event()

    def take(self) -> list[Wake]:
        """The wake-ups found since the last call, oldest first."""
        wakes, self._wakes = self._wakes, []
        return wakes

    def read_again(self, at_once: bool = False) -> None:
        """The readers that found wake-ups read again: `at_once` what has come (and
        caught_up() waits for that read), else in a blocking read."""
        self._gate.open(at_once)

    async def caught_up(self) -> None:
        """Until the reads read_again() asked for at once are done."""
        await self._gate.reads_done()

    def has_wake_for(self, wallet: str) -> bool:
        return any(w == wallet for w, _, _ in self._wakes)

    def shards_changed(self) -> None:
        """The owned shards changed: a listener that had none to read looks again."""
        self._readable_shards = None
        self._shards_changed.set()

    def stop(self) -> None:
        """run() returns within one read's wait."""
        self._stopping.set()
        self.read_again()
        self._shards_changed.set()

    def start_after(self, shard: int, epoch: int, entry_id: str) -> None:
        """Where the shard's wake stream is read from under `epoch`, unless it is already."""
        if self._cursor(shard, epoch) is None:
            self._cursors[shard] = (epoch, entry_id)
            self.shards_changed()

    def _cursor(self, shard: int, epoch: int) -> str | None:
        cursor = self._cursors.get(shard)
        return cursor[1] if cursor is not None and cursor[0] == epoch else None

    async def run(self) -> None:
        if isinstance(self._redis, RedisCluster):
            await self._read_each_shard()
        else:
            await self._read(self._readable)

    def _readable(self, only: int | None = None) -> list[tuple[int, int]]:
        """The owned shards (all, or `only`) whose read position is set: (shard, epoch)."""
        if self._readable_shards is None:
            self._readable_shards = [
                (s, epoch)
                for s, epoch in sorted(self._owned.items())
                if self._cursor(s, epoch) is not None
            ]
        if only is None:
            return self._readable_shards
        return [(s, epoch) for s, epoch in self._readable_shards if s == only]

    async def _read_each_shard(self) -> None:
        """On a Redis Cluster one command may touch one slot only: each owned shard's wake
        stream has a blocking read of its own, over a connection of its own."""
        readers: dict[int, asyncio.Task[None]] = {}
        try:
            while not self._stopping.is_set():
                for shard in self._owned:
                    if shard not in readers or readers[shard].done():
                        readable = functools.partial(self._readable, shard)
                        readers[shard] = asyncio.create_task(self._read(readable, shard))
                self._shards_changed.clear()
                await self._shards_changed.wait()
        finally:
            for reader in readers.values():
                reader.cancel()
            await asyncio.gather(*readers.values(), return_exceptions=True)

    async def _read(
        self, readable: Callable[[], list[tuple[int, int]]], alone: int | None = None
    ) -> None:
        """Reads the wake streams of the shards `readable` names until stop(), or, for the
        reader of shard `alone`, until the shard is no longer owned."""
        direct = connections.direct(self._redis)
        trims = _Untrimmed()
        owed = False  # the round waits for this read: no blocking
        failures = 0
        try:
            while not self._stopping.is_set():
                shards = readable()
                found = False
                try:
                    if not shards:
                        if alone is not None and alone not in self._owned:
                            return
                        self._shards_changed.clear()
                        await self._shards_changed.wait()
                        continue
                    found = await self._read_once(direct, shards, trims, block=not owed)
                    failures = 0
                except REDIS_ERRORS as e:
                    failures += 1
                    log.warning("reading the wake-ups failed (%s)", e)
                    self._cursors.clear()
                    self._readable_shards = None
                    trims.read.clear()
                    self._lost()
                    await direct.close()
                finally:
                    if owed:
                        self._gate.read_done()
                        owed = False
                if failures:
                    await asyncio.sleep(backoff(failures, RETRY_DELAY_FIRST, RETRY_DELAY_MAX))
                elif found and not self._stopping.is_set():  # else nobody would open the gate
                    owed = await self._gate.wait()
        finally:
            if owed:
                self._gate.read_done()
            await direct.close()

    async def _read_once(
        self,
        direct: connections.DirectLine,
        shards: list[tuple[int, int]],
        trims: _Untrimmed,
        block: bool,
    ) -> bool:
        """One read of the shards' wake streams, after trimming those whose entries have
        piled up (or every one read, after a read that found nothing); whether it found
        wake-ups."""
        read_now = dict(shards)
        due = [
            s
            for s, n in trims.read.items()
            if s in read_now and (trims.quiet or n >= WAKE_TRIM_AFTER)
        ]
        read = self._queue.read_wakes(
            ((s, self._cursors[s][1]) for s, _ in shards),
            int(WAKE_WAIT * 1000) if block else None,
        )
        trim = [self._queue.trim_wakes(s, self._worker_id, self._cursors[s][1]) for s in due]
        answers = await direct.round_trip([*trim, read])
        if isinstance(answers[-1], Exception):
            raise answers[-1]
        for shard in due:
            del trims.read[shard]
        trims.quiet = answers[-1] is None
        return self._note(shards, answers[-1] or [], trims.read)

    def _note(self, shards: list[tuple[int, int]], found: Any, untrimmed: dict[int, int]) -> bool:
        """Notes an XREAD's answer (a map under RESP3, a list of pairs under RESP2); whether
        it held wake-ups."""
        held = len(self._wakes)
        read_as = dict(shards)
        for stream, items in found.items() if isinstance(found, dict) else found:
            shard = self._shard_of_stream[stream]
            epoch = read_as[shard]
            if self._owned.get(shard) != epoch or self._cursor(shard, epoch) is None:
                # handed back meanwhile (the next owner's), or its position dropped (a
                # rescan is due): left alone, and the shards listed again
                self._readable_shards = None
                continue
            for raw_id, fields in items:
                wake = entry_fields(fields)
                try:
                    self._wakes.append((wake[b"w"].decode(), wake[b"e"].decode(), wake[b"m"]))
                except (KeyError, UnicodeDecodeError):  # the rescan finds its wallet
                    log.error("wake entry %s of shard %d is not one", raw_id, shard)
            self._cursors[shard] = (epoch, items[-1][0].decode())
            untrimmed[shard] = untrimmed.get(shard, 0) + len(items)
        if len(self._wakes) == held:
            return False
        self._woke()
        return True
