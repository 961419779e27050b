"""The write path's queue protocol: every Redis command the API and the workers send about
the wallets' queues, by name, in one place. The API enqueues; the workers read the wake-ups
and the wallets' streams, acknowledge, answer, hand steps on and set dead letters aside.

Each operation here returns the command to send (a tuple, as a round trip takes it), so
that the callers keep sending many in one round trip; reading is done here too where the
caller has no round trip of its own to share. The keys are shared/keys.py's, the Lua
scripts shared/scripts.py's; on a Redis Cluster every script call touches one shard's slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster

from shared.codec import (
    MessageError,
    OperationRequest,
    Outcome,
    decode_request,
    encode_outcomes,
    encode_request,
)
from shared.connections import RedisClient
from shared.keys import KeySpace
from shared.scripts import (
    ACKNOWLEDGE_READ_SHA,
    DIRTY_SINCE,
    ENQUEUE_SHA,
    TRIM_WAKES,
    next_entry_id,
)

Command = tuple[Any, ...]
UNLIMITED = 2**62  # a queue limit that never refuses
SCAN_CHUNK = 500  # entries one read of a wallet's stream takes, looking for an operation


@dataclass(frozen=True, slots=True)
class Queue:
    keys: KeySpace
    cluster: bool  # a Redis Cluster: sharded pub/sub, one script call per shard

    # Queueing an operation.

    def enqueue(
        self,
        request: OperationRequest,
        wallet_limit: int,
        shard_limit: int,
        admitted_when_full: bool = False,
    ) -> Command:
        """Appends the operation to its wallet's stream (ENQUEUE), and, if the wallet had
        nothing queued, wakes the shard's owner with it; answers the entry id, or None when
        the wallet's or the shard's queue is full. A full Redis refuses it (503), unless
        `admitted_when_full`."""
        keys = self.keys.enqueue_keys(request.wallet_id)
        return (
            "EVALSHA",
            ENQUEUE_SHA,
            len(keys),
            *keys,
            request.wallet_id,
            encode_request(request),
            wallet_limit,
            shard_limit,
            "1" if admitted_when_full else "0",
        )

    def hand_on(self, step: OperationRequest) -> Command:
        """A transfer's next step (or a hold's expiry), queued on its wallet's stream whatever
        the queue limits, and by a full Redis: refused, it would wait for the resending, long
        after its client gave up, and its entry would hold its memory meanwhile."""
        return self.enqueue(step, UNLIMITED, UNLIMITED, admitted_when_full=True)

    def mark_pending_transfer(self, transfer_id: str, source: str, seconds: int) -> Command:
        """Where a queued transfer's URL finds it until its debit is committed."""
        return ("SET", self.keys.pending_transfer(transfer_id), source, "EX", seconds)

    def forget_pending_transfer(self, transfer_id: str) -> Command:
        return ("DEL", self.keys.pending_transfer(transfer_id))

    async def pending_transfer_source(self, redis: RedisClient, transfer_id: str) -> str | None:
        source: Any = await redis.get(self.keys.pending_transfer(transfer_id))
        return source.decode() if source else None

    async def find_queued(
        self, redis: RedisClient, wallet_id: str, op_id: str
    ) -> OperationRequest | None:
        """The operation, if the wallet's stream holds it. Reads the stream in chunks and
        decodes only the messages that hold the id's bytes."""
        stream, needle, start = self.keys.wallet_stream(wallet_id), op_id.encode(), "-"
        while True:
            chunk: Any = await redis.xrange(stream, min=start, count=SCAN_CHUNK)
            for _, fields in chunk:
                message = fields.get(b"m", b"")
                if needle in message:
                    with contextlib.suppress(MessageError):
                        queued = decode_request(message)
                        if queued.op_id == op_id:
                            return queued
            if len(chunk) < SCAN_CHUNK:
                return None
            start = "(" + chunk[-1][0].decode()

    # A worker's round.

    def read_wakes(self, positions: Iterable[tuple[int, str]], block_ms: int | None) -> Command:
        """The shards' wake-ups after each position (shard, last wake entry read): blocking
        up to `block_ms` for one, or answering at once (None)."""
        shards = list(positions)
        wake_stream = self.keys.wake_stream
        return (
            "XREAD",
            "COUNT",
            1000,
            *(("BLOCK", block_ms) if block_ms is not None else ()),
            "STREAMS",
            *[wake_stream(shard) for shard, _ in shards],
            *[position for _, position in shards],
        )

    def trim_wakes(self, shard: int, worker_id: str, last_read: str) -> Command:
        """Drops the shard's wake entries up to `last_read`, if the shard is still the
        worker's (TRIM_WAKES)."""
        keys = (self.keys.lease(shard), self.keys.wake_stream(shard))
        return ("EVAL", TRIM_WAKES, 2, *keys, worker_id, next_entry_id(last_read))

    def dirty_since(self, shard: int) -> Command:
        """The shard's dirty wallets and the id of its last wake entry, in one step."""
        return ("EVAL", DIRTY_SINCE, 2, self.keys.dirty_set(shard), self.keys.wake_stream(shard))

    def acknowledge_read(
        self, wallets: list[str], cursors: Mapping[str, str], count: int
    ) -> list[tuple[list[str], Command]]:
        """Trims each wallet's entries up to its cursor (committed and answered) and reads up
        to `count` of its next ones (ACKNOWLEDGE_READ): one call for all the wallets, one per
        shard on a Redis Cluster; each call with the wallets it answers for, in order."""
        groups: dict[int, list[str]] = {}
        for wallet in wallets:
            groups.setdefault(self.keys.shard_of(wallet) if self.cluster else 0, []).append(wallet)
        return [(group, self._acknowledge_read(group, cursors, count)) for group in groups.values()]

    def _acknowledge_read(
        self, wallets: list[str], cursors: Mapping[str, str], count: int
    ) -> Command:
        keys: list[str] = []
        args: list[Any] = [count]
        for wallet in wallets:
            shard = self.keys.shard_of(wallet)
            keys += (
                self.keys.wallet_stream(wallet, shard),
                self.keys.dirty_set(shard),
                self.keys.queued(shard),
            )
            args += (wallet, next_entry_id(cursors[wallet]))
        return ("EVALSHA", ACKNOWLEDGE_READ_SHA, len(keys), *keys, *args)

    def reply(self, channel: str, outcomes: list[Outcome]) -> Command:
        """The outcomes for one API process's reply channel, in one message."""
        return ("SPUBLISH" if self.cluster else "PUBLISH", channel, encode_outcomes(outcomes))

    def dead_letter(self, wallet_id: str, entry_id: str, message: bytes, error: str) -> Command:
        """Sets aside, with the error, an entry no worker can apply."""
        return (
            "XADD",
            self.keys.dead_letters(self.keys.shard_of(wallet_id)),
            "*",
            "wallet",
            wallet_id,
            "entry",
            entry_id,
            "m",
            message,
            "error",
            error,
        )

    def first_entry(self, wallet_id: str) -> Command:
        """The first entry of the wallet's stream: when its oldest operation was queued."""
        return ("XRANGE", self.keys.wallet_stream(wallet_id), "-", "+", "COUNT", 1)

    # Looking in (worker.inspect, the metrics).

    def entries(self, wallet_id: str) -> Command:
        return ("XRANGE", self.keys.wallet_stream(wallet_id), "-", "+")

    def length(self, wallet_id: str) -> Command:
        return ("XLEN", self.keys.wallet_stream(wallet_id))

    def dead_letter_count(self, shard: int) -> Command:
        return ("XLEN", self.keys.dead_letters(shard))


def entry_fields(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's fields as Redis sends them ([name, value, name, value, ...])."""
    return dict(zip(flat[::2], flat[1::2], strict=False))


def queue_for(keys: KeySpace, redis: RedisClient) -> Queue:
    """The protocol over `redis`, one Redis or a Redis Cluster."""
    return Queue(keys, isinstance(redis, RedisCluster))
