"""An entry is trimmed only once what it hands on is queued: a transfer's next step on the
other wallet's stream, or a dead letter. Here the hand-on fails (the key it writes holds a
string, as a failing Redis would refuse the write), then succeeds."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from api.app import create_app
from shared.keys import KeySpace
from shared.scripts import ENQUEUE
from shared.settings import Settings
from tests.conftest import AiohttpClient, running_worker
from tests.helpers import eventually, ledger, wallet_in
from tests.test_transfers import funded_wallet, settled, transfer, transfer_state
from worker.worker import Worker


def held_back(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("wallet_held_back_wallets_total") or 0.0


async def stream_length(redis: Redis, key: str) -> int:
    return int(await redis.xlen(key))


async def test_a_debit_whose_credit_cannot_be_queued_keeps_its_entry_until_it_is(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, pg: Any
) -> None:
    """Two writers, so that the credit goes through the destination's stream."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    api: TestClient[Any, Any] = await aiohttp_client(
        create_app(dataclasses.replace(settings, reply_timeout=0.3))
    )
    async with running_worker(settings) as a, running_worker(settings) as b:
        half = settings.shard_count // 2

        async def split() -> bool:
            return len(a.ownership.owned) == len(b.ownership.owned) == half

        await eventually(split, what="the workers to share the shards")
        source = wallet_in(keys, min(a.ownership.owned))
        destination = wallet_in(keys, min(b.ownership.owned))
        for wallet, minor in ((source, 1000), (destination, 0)):
            await pg.execute("INSERT INTO wallets (id, balance) VALUES ($1, $2)", wallet, minor)
        blocked = keys.wallet_stream(destination)
        await redis.set(blocked, "not a stream")  # the credit's XADD fails
        status, body, _ = await transfer(api, source, destination, "2.50")
        assert status == 202, body

        async def tried_twice() -> bool:
            return held_back(a) >= 2

        await eventually(tried_twice, what="the debit's wallet to be held back twice")
        await _settles_once_unblocked(redis, pg, keys, blocked, body["id"], source, destination)


async def _settles_once_unblocked(
    redis: Redis,
    pg: Any,
    keys: KeySpace,
    blocked: str,
    transfer_id: str,
    source: str,
    destination: str,
) -> None:
    body = {"id": transfer_id}
    assert await transfer_state(pg, body["id"]) == "in_flight"
    # Committed, but not trimmed: the entry stays until its credit is queued.
    assert await stream_length(redis, keys.wallet_stream(source)) == 1
    assert [r["kind"] for r in await ledger(pg, source)] == ["TRANSFER_OUT"]

    await redis.delete(blocked)
    await eventually(lambda: settled(pg, body["id"]), what="the credit once it can be queued")
    assert await transfer_state(pg, body["id"]) == "completed"
    assert [(r["kind"], r["amount"]) for r in await ledger(pg, destination)] == [
        ("TRANSFER_IN", 250)
    ]
    assert [r["kind"] for r in await ledger(pg, source)] == ["TRANSFER_OUT"]
    await eventually(
        lambda: _empty(redis, keys.wallet_stream(source)), what="the debit to be trimmed"
    )


async def _empty(redis: Redis, key: str) -> bool:
    return await stream_length(redis, key) == 0


async def test_an_undecodable_entry_stays_until_its_dead_letter_is_kept(
    settings: Settings, worker: Worker, redis: Redis, pg: Any
) -> None:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallet = await funded_wallet(pg, 0)
    shard = keys.shard_of(wallet)
    blocked = keys.dead_letters(shard)
    await redis.set(blocked, "not a stream")  # the dead letter's XADD fails
    enqueue = redis.register_script(ENQUEUE)
    await enqueue(keys=keys.enqueue_keys(wallet), args=[wallet, b"\x00not a message", 10, 10])

    async def tried_twice() -> bool:
        return held_back(worker) >= 2

    await eventually(tried_twice, what="the wallet to be held back twice")
    assert await stream_length(redis, keys.wallet_stream(wallet)) == 1

    await redis.delete(blocked)
    await eventually(
        lambda: _empty(redis, keys.wallet_stream(wallet)), what="the entry to be set aside"
    )
    letters: Any = await redis.xrange(blocked)
    [(_, letter)] = letters
    assert (letter[b"wallet"].decode(), letter[b"m"]) == (wallet, b"\x00not a message")
