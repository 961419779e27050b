"""The wake listener: which wake-ups a worker acts on when it takes a shard, and what it
does when its connection to Redis is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from devtools.servers import kill_client, redis_clients
from shared.keys import KeySpace
from shared.queue import queue_for
from shared.scripts import ENQUEUE
from shared.settings import Settings
from tests.helpers import eventually, wallet_in
from worker.streams import WalletStreams
from worker.wakes import WakeListener

SHARD, EPOCH = 3, 7


async def enqueue(redis: Redis, keys: KeySpace, wallet: str) -> None:
    await redis.eval(ENQUEUE, 4, *keys.enqueue_keys(wallet), wallet, b"an operation", 10, 10)


class Listening:
    def __init__(self, redis: Redis, keys: KeySpace) -> None:
        self.owned = {SHARD: EPOCH}
        self.lost = asyncio.Event()
        queue = queue_for(keys, redis)
        self.listener = WakeListener(
            redis, queue, "a-worker", self.owned, lambda: None, self.lost.set
        )
        self.streams = WalletStreams(redis, queue, batch_max=100)

    async def rescan(self) -> list[str]:
        """What the worker does on taking the shard: its dirty wallets, and where the
        listener starts."""
        [(dirty, last_wake)] = await self.streams.dirty_wallets([SHARD])
        self.listener.start_after(SHARD, EPOCH, last_wake)
        return dirty


@pytest.fixture
async def listening(settings: Settings, redis: Redis) -> AsyncIterator[tuple[Listening, KeySpace]]:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    listening = Listening(redis, keys)
    task = asyncio.create_task(listening.listener.run())
    yield listening, keys
    listening.listener.stop()
    await asyncio.wait_for(task, 5)
    await listening.streams.close()


async def test_a_taken_shard_is_woken_only_by_wallets_dirty_since_its_rescan(
    listening: tuple[Listening, KeySpace], redis: Redis
) -> None:
    """A wake-up from before the rescan is of a wallet the rescan found (or one done since):
    acting on it again would apply a committed operation again, in a batch of its own."""
    it, keys = listening
    before, after = wallet_in(keys, SHARD), wallet_in(keys, SHARD)
    await enqueue(redis, keys, before)
    assert await it.rescan() == [before]
    await enqueue(redis, keys, after)

    async def woken_by_the_later() -> bool:
        return it.listener.has_wake_for(after)

    await eventually(woken_by_the_later, what="the later wallet's wake-up")
    assert [wallet for wallet, _, _ in it.listener.take()] == [after]


async def test_a_lost_connection_drops_the_positions_until_the_next_rescan(
    listening: tuple[Listening, KeySpace], redis: Redis
) -> None:
    it, keys = listening
    # Other runs' listeners on a shared Redis block in XREAD too: leave them be.
    others = {c["id"] for _, c in await redis_clients(redis) if c["cmd"] == "xread"}
    await it.rescan()
    clients: Any = []

    async def reading() -> bool:
        nonlocal clients
        clients = [
            (node, c)
            for node, c in await redis_clients(redis)
            if c["cmd"] == "xread" and c["id"] not in others
        ]
        return bool(clients)

    await eventually(reading, what="the listener's blocking read")
    for node, client in clients:
        await kill_client(redis, node, client)
    async with asyncio.timeout(10):
        await it.lost.wait()
    wallet = wallet_in(keys, SHARD)
    await enqueue(redis, keys, wallet)
    assert await it.rescan() == [wallet]  # the worker rescans: the wallet is its to find
    later = wallet_in(keys, SHARD)
    await enqueue(redis, keys, later)

    async def woken() -> bool:
        return it.listener.has_wake_for(later)

    await eventually(woken, what="a wake-up read after the new rescan")
    assert [w for w, _, _ in it.listener.take()] == [later]


async def test_after_a_busy_batch_the_round_waits_for_what_came_during_its_commit(
    listening: tuple[Listening, KeySpace], redis: Redis
) -> None:
    """The round took several wake-ups, so they come faster than its batches: once it has
    committed, the listener reads at once what came meanwhile, and the next batch starts
    only when that read is done, with those wake-ups in hand. After a batch of one, the
    listener goes back to its blocking read, and the round does not wait for it."""
    it, keys = listening
    await it.rescan()
    first, second = wallet_in(keys, SHARD), wallet_in(keys, SHARD)
    await enqueue(redis, keys, first)
    await enqueue(redis, keys, second)

    async def both_read() -> bool:
        return it.listener.has_wake_for(first) and it.listener.has_wake_for(second)

    await eventually(both_read, what="both wake-ups")
    assert {w for w, _, _ in it.listener.take()} == {first, second}
    during_the_commit = wallet_in(keys, SHARD)
    await enqueue(redis, keys, during_the_commit)
    it.listener.read_again(at_once=True)
    await asyncio.wait_for(it.listener.caught_up(), 5)
    assert [w for w, _, _ in it.listener.take()] == [during_the_commit]

    it.listener.read_again(at_once=False)
    await asyncio.wait_for(it.listener.caught_up(), 5)
    later = wallet_in(keys, SHARD)
    await enqueue(redis, keys, later)

    async def woken_by_the_blocking_read() -> bool:
        return it.listener.has_wake_for(later)

    await eventually(woken_by_the_blocking_read, what="the later wake-up")
