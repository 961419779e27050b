"""The dead letters: entries of the wallets' streams that a worker could not read as an
operation, which it set aside with the error in their shard's dead-letter stream
(worker/streams.py) and went on. `wallet-inspect dead-letters` lists them;
`wallet-admin requeue-dead-letters` puts chosen ones back on their wallet's stream once the
cause is gone (a worker that reads the message), and `drop-dead-letters` discards them.

A requeued entry goes through ENQUEUE, as the API's operations do, so the shard's owner
wakes for it, and its dead letter is deleted only once it is queued. An operation the
ledger already holds (an entry requeued twice, or a client's retry applied meanwhile) is
answered from the ledger by the worker (operation ids are unique per wallet), never
applied twice.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson

from shared.codec import MessageError, decode_request
from shared.connections import RedisClient
from shared.keys import KeySpace
from shared.money import format_minor
from shared.scripts import ENQUEUE


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter, as the worker wrote it."""

    shard: int
    id: str  # its id in the shard's dead-letter stream (when it was set aside)
    wallet: str
    entry: str  # its id in the wallet's stream (when it was queued)
    message: bytes
    error: str


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    return fields.get(name, b"").decode(errors="replace")


async def read(redis: RedisClient, keys: KeySpace) -> list[Letter]:
    """Every shard's dead letters, by shard, oldest first."""
    async with redis.pipeline(transaction=False) as pipe:
        for shard in range(keys.shard_count):
            pipe.xrange(keys.dead_letters(shard))
        found: list[Any] = await pipe.execute()
    return [
        Letter(
            shard,
            raw_id.decode(),
            _text(fields, b"wallet"),
            _text(fields, b"entry"),
            fields.get(b"m", b""),
            _text(fields, b"error"),
        )
        for shard, entries in enumerate(found)
        for raw_id, fields in entries
    ]


def chosen(
    letters: list[Letter], wallets: Collection[str] = (), entries: Collection[str] = ()
) -> list[Letter]:
    """The letters of `wallets` (any, if none is given) whose wallet-stream entry id is one of
    `entries` (any, if none is given)."""
    wanted = {w.lower() for w in wallets}
    return [
        letter
        for letter in letters
        if (not wanted or letter.wallet in wanted) and (not entries or letter.entry in entries)
    ]


def operation(message: bytes) -> dict[str, Any]:
    """What the message says of its operation (id, type, amount), as far as it can be read:
    a message this release refuses (a newer version, say) may still name them."""
    try:
        r = decode_request(message)
        return {"operation": r.op_id, "type": r.kind, "amount": format_minor(r.amount)}
    except MessageError:
        pass
    try:
        m = orjson.loads(message)
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(m, dict):
        return {}
    said: dict[str, Any] = {}
    for key, name in (("op", "operation"), ("k", "type")):
        if isinstance(m.get(key), str):
            said[name] = m[key]
    if type(m.get("a")) is int:
        said["amount"] = format_minor(m["a"])
    return said


def readable(message: bytes) -> str | None:
    """Why this release cannot read the message as an operation, or None if it can."""
    try:
        decode_request(message)
    except MessageError as e:
        return str(e)
    return None


async def requeue(
    redis: RedisClient, keys: KeySpace, letter: Letter, wallet_limit: int, shard_limit: int
) -> str | None:
    """Queues the letter's message on its wallet's stream again (ENQUEUE, within the queue
    limits), then deletes the letter. The new entry's id, or None if a queue was full (the
    letter stays)."""
    queued: Any = await redis.eval(
        ENQUEUE,
        4,
        *keys.enqueue_keys(letter.wallet),
        letter.wallet,
        letter.message,
        wallet_limit,
        shard_limit,
    )
    if queued is None:
        return None
    await redis.xdel(keys.dead_letters(letter.shard), letter.id)
    return str(queued.decode() if isinstance(queued, bytes) else queued)


async def drop(redis: RedisClient, keys: KeySpace, letter: Letter) -> None:
    await redis.xdel(keys.dead_letters(letter.shard), letter.id)
