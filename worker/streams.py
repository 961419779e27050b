"""The wallets' streams, as a worker's round reads, answers and acknowledges them
(ACKNOWLEDGE_READ, one call for all the round's wallets), over a connection of the round's
own, one round trip at a time; and the resending's reads and sends."""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, NamedTuple

from shared import connections
from shared.codec import (
    TRANSFER_OUT,
    MessageError,
    OperationRequest,
    Outcome,
)
from shared.connections import REDIS_ERRORS, RedisClient
from shared.queue import Queue, entry_fields
from shared.scripts import (
    ACKNOWLEDGE_READ,
    ENQUEUE,
)
from worker.backlog import START, DeadLetter, Reading, decode_entry
from worker.decide import Entry

log = logging.getLogger("worker")

COMMITTED_KEPT_SECONDS = 600
# How far Redis's clock may run ahead of the sender's before something sent to a wallet and
# still queued behind a slow one is taken for lost and sent again (a replay, so only a cost).
CLOCK_MARGIN_MS = 1000


def may_be_queued(sent_at_ms: int, oldest_entry_ms: int | None) -> bool:
    """Whether what was sent to a wallet's stream at `sent_at_ms` may still wait there: the
    stream holds an entry from before then (everything older than a stream's first entry is
    committed). `oldest_entry_ms` as oldest_entries() finds it."""
    return oldest_entry_ms is not None and oldest_entry_ms <= sent_at_ms + CLOCK_MARGIN_MS


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


class Answered(NamedTuple):
    """What answering a batch did: the wallets acknowledged and their next entries (None:
    none left), and the wallets held back, whose entries stay to be handed on again."""

    acknowledged: list[str]
    readings: list[Reading | None]
    held: list[str]


def _raise_first(answers: list[Any]) -> None:
    for answer in answers:
        if isinstance(answer, Exception):
            raise answer


class WalletStreams:
    """The wallets' streams, read and acknowledged by the round over a Redis connection of
    its own: one round trip per call, nobody else's commands in between."""

    def __init__(self, redis: RedisClient, queue: Queue, batch_max: int) -> None:
        self._redis = redis
        self._queue = queue
        self._keys = queue.keys
        self._batch_max = batch_max
        self._direct = connections.direct(redis)
        # second -> [batches, operations] committed and not yet counted in Redis
        self._committed: dict[int, list[int]] = {}

    async def load_scripts(self) -> None:
        """Loads ACKNOWLEDGE_READ and ENQUEUE, which the rounds call by their hashes. If
        Redis is down, the next round backs off and Redis answers NOSCRIPT until this is
        called again."""
        with contextlib.suppress(*REDIS_ERRORS):
            await self._redis.script_load(ACKNOWLEDGE_READ)
            await self._redis.script_load(ENQUEUE)

    async def dirty_wallets(self, shards: list[int]) -> list[tuple[list[str], str]]:
        """Each shard's wallets with something queued, as its dirty set has them, and the id
        of the last entry of its wake stream at that moment (one transaction): the wake-ups
        after it are of wallets that became dirty since."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                pipe.execute_command(*self._queue.dirty_since(shard))
            found = await pipe.execute()
        return [
            ([raw.decode() for raw in members], last[0][0].decode() if last else START)
            for members, last in found
        ]

    async def read(
        self, wallets: list[str], cursors: Mapping[str, str], count: int
    ) -> list[Reading | None]:
        """Up to `count` entries of each wallet's stream after its cursor (those up to it
        are committed: trimmed on the way)."""
        return await self._acknowledge_read([], wallets, cursors, count)

    async def answer(
        self,
        entries: list[Entry],
        replies: list[tuple[str, Outcome]],
        steps: list[tuple[str, OperationRequest]],
        batch: dict[str, Reading],
        cursors: Mapping[str, str],
    ) -> Answered:
        """After COMMIT: the answers to the API processes that wait for them (channel,
        outcome), then each wallet of the batch acknowledged (its committed entries trimmed)
        and its next entries read for the next batch, in one round trip. What an entry hands
        on (a transfer's next step, queued on its wallet's stream: (the entry's wallet,
        step); a dead letter) must be queued before the entry is trimmed: then that goes
        first, with the answers, in a round trip of its own, and a wallet whose hand-on
        failed (Redis full, a slot moving) is not acknowledged: it is held back, its entries
        kept, to be read and handed on again."""
        by_channel: dict[str, list[Outcome]] = defaultdict(list)
        for channel, outcome in replies:
            by_channel[channel].append(outcome)
        queue = self._queue
        commands = [queue.reply(channel, outcomes) for channel, outcomes in by_channel.items()]
        commands += [
            queue.forget_pending_transfer(e.request.transfer_id)
            for e in entries
            if e.request.kind == TRANSFER_OUT
        ]
        if entries:  # for the live view, counted apart from the batches (flush_committed)
            counted = self._committed.setdefault(int(time.time()), [0, 0])
            counted[0] += 1
            counted[1] += len(entries)
        hand_ons = [(wallet, queue.hand_on(step)) for wallet, step in steps]
        hand_ons += [
            (w.wallet_id, queue.dead_letter(w.wallet_id, w.entry_id, w.message, w.error))
            for reading in batch.values()
            for w in reading.dead
        ]
        wallets = list(batch)
        count = max(1, self._batch_max // max(1, len(wallets)))
        if not hand_ons:
            readings = await self._acknowledge_read(commands, wallets, cursors, count)
            return Answered(wallets, readings, [])
        handed = [command for _, command in hand_ons]
        answers = await self._direct.round_trip([*handed, *commands])
        _raise_first(answers[len(handed) : len(handed) + len(commands)])
        held: dict[str, Exception] = {}
        for (wallet, _), answer in zip(hand_ons, answers, strict=False):
            if isinstance(answer, Exception):
                held.setdefault(wallet, answer)
        for wallet, error in held.items():
            log.warning(
                "wallet %s is held back: what it hands on was not queued (%s)", wallet, error
            )
        acknowledged = [w for w in wallets if w not in held]
        readings = await self._acknowledge_read([], acknowledged, cursors, count)
        return Answered(acknowledged, readings, list(held))

    async def flush_committed(self) -> None:
        """Adds the batches and operations committed since the last call to the live view's
        per-second counts (KeySpace.committed), over the shared client, never the round's
        connection: a count lost with a failure is a count, not money."""
        counted, self._committed = self._committed, {}
        if not counted:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for second, (batches, operations) in counted.items():
                key = self._keys.committed(second)
                pipe.hincrby(key, "batches", batches)
                pipe.hincrby(key, "operations", operations)
                pipe.expire(key, COMMITTED_KEPT_SECONDS)
            await pipe.execute(raise_on_error=False)

    async def _acknowledge_read(
        self,
        before: list[tuple[Any, ...]],
        wallets: list[str],
        cursors: Mapping[str, str],
        count: int,
    ) -> list[Reading | None]:
        """One round trip: the commands `before`, then ACKNOWLEDGE_READ for the wallets, one
        call for all (on a Redis Cluster, one per shard). Raises the first error any of them
        answered."""
        groups = self._queue.acknowledge_read(wallets, cursors, count)
        calls = [call for _, call in groups]
        if not before and not calls:
            return []
        if self._queue.cluster and before:
            # Ordered within a node only: what goes before has its own round trip, so that
            # the entries are trimmed only after their answers are out.
            answers = await self._direct.round_trip(before)
            answers += await self._direct.round_trip(calls) if calls else []
        else:
            answers = await self._direct.round_trip([*before, *calls])
        _raise_first(answers)
        readings: dict[str, Reading | None] = {}
        for (group, _), found in zip(groups, answers[len(before) :], strict=True):
            for wallet, entries in zip(group, found, strict=True):
                readings[wallet] = reading_of(wallet, entries)
        return [readings[wallet] for wallet in wallets]

    async def send(self, steps: list[OperationRequest]) -> int:
        """Queues transfers' steps (found by the resending) in one round trip, over a
        connection of its own: the round's connection is the round's alone. Returns how
        many could not be queued (each refused on its own)."""
        direct = connections.direct(self._redis)
        try:
            answers = await direct.round_trip([self._queue.hand_on(s) for s in steps])
        finally:
            await direct.close()
        return sum(isinstance(answer, Exception) for answer in answers)

    async def oldest_entries(self, wallets: list[str]) -> dict[str, int | None]:
        """When (ms, Redis's clock) the first entry of each wallet's stream was queued;
        None for an empty stream, or one that cannot be read."""
        unique = list(dict.fromkeys(wallets))
        async with self._redis.pipeline(transaction=False) as pipe:
            for wallet in unique:
                pipe.execute_command(*self._queue.first_entry(wallet))
            found = await pipe.execute(raise_on_error=False)
        return {
            wallet: int(first[0][0].split(b"-")[0]) if first and isinstance(first, list) else None
            for wallet, first in zip(unique, found, strict=True)
        }

    async def close(self) -> None:
        await self._direct.close()
