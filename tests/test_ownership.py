"""Shard ownership: workers divide the shards evenly, take over from one that leaves, and a
worker that lost a shard cannot commit to it, whatever it still believes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections import Counter
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from devtools.blackhole import BlackHole
from shared.codec import OperationRequest, encode_request
from shared.keys import KeySpace
from shared.scripts import ENQUEUE, live_workers
from shared.settings import Settings
from tests.conftest import AiohttpClient, idle_workers, running_worker
from tests.helpers import eventually, ledger, operate, run_module, wallet_in
from worker.apply import Fenced
from worker.ownership import fair_share
from worker.worker import Worker, connect, new_worker_id


@pytest.mark.parametrize("workers", [1, 2, 3, 5, 7, 64, 100])
def test_fair_shares_add_up_to_every_shard_and_differ_by_at_most_one(workers: int) -> None:
    ids = [f"w{i}" for i in range(workers)]
    shares = [fair_share(ids, w, 64) for w in ids]
    assert sum(shares) == 64
    assert max(shares) - min(shares) <= 1


@pytest.fixture
def fast_leases(settings: Settings) -> Settings:
    return dataclasses.replace(settings, worker_lease_ttl=1.0)


async def ownership(settings: Settings, redis: Redis, pg: Any) -> dict[int, str | None]:
    """Each shard's owner, if Redis' lease and PostgreSQL's record agree on it; else None."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    leases: list[Any] = [await redis.get(keys.lease(s)) for s in range(settings.shard_count)]
    recorded = dict(await pg.fetch("SELECT shard, owner FROM shards"))
    return {
        s: lease.decode() if lease and recorded.get(s) == lease.decode() else None
        for s, lease in enumerate(leases)
    }


async def test_workers_divide_the_shards_evenly_and_rebalance_as_they_come_and_go(
    fast_leases: Settings, redis: Redis, pg: Any
) -> None:
    settings = fast_leases
    async with contextlib.AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(running_worker(settings)) for _ in range(3)]

        async def divided(expected: list[int], among: list[Worker]) -> bool:
            owners = await ownership(settings, redis, pg)
            counts = Counter(owners.values())
            held = [set(w.ownership.owned) for w in among]
            return (
                sorted(counts.values()) == expected
                and set(counts) == {w.worker_id for w in among}
                and all(held[i].isdisjoint(held[j]) for i in range(len(held)) for j in range(i))
                and all(
                    set(w.ownership.owned) == {s for s, o in owners.items() if o == w.worker_id}
                    for w in among
                )
            )

        await eventually(lambda: divided([2, 3, 3], workers), what="8 shards split 3/3/2")

        leaving = workers.pop()
        leaving.stop()
        await eventually(lambda: divided([4, 4], workers), what="the leaver's shards taken")

        workers.append(await stack.enter_async_context(running_worker(settings)))
        workers.append(await stack.enter_async_context(running_worker(settings)))
        await eventually(lambda: divided([2, 2, 2, 2], workers), what="newcomers get a share")


async def test_a_crashed_worker_s_shards_are_taken_once_its_leases_run_out(
    fast_leases: Settings, redis: Redis, pg: Any
) -> None:
    """A worker that vanishes without handing its shards back (its tasks simply stop)."""
    settings = fast_leases
    worker_id = new_worker_id()
    crashed_redis, crashed_pool = await connect(settings, worker_id)
    crashed = Worker(settings, crashed_redis, crashed_pool, worker_id=worker_id)
    await crashed.ownership.tend()
    assert len(crashed.ownership.owned) == settings.shard_count
    crashed.stop()  # it never ran: nothing renews its leases or hands them back
    await crashed_pool.close()
    await crashed_redis.aclose()

    async with running_worker(settings) as survivor:

        async def all_taken() -> bool:
            # The survivor records a shard as its own one round trip after PostgreSQL and
            # Redis show it as the owner: wait for both.
            owners = await ownership(settings, redis, pg)
            recorded_by_survivor = set(survivor.ownership.owned) == set(owners)
            return set(owners.values()) == {survivor.worker_id} and recorded_by_survivor

        await eventually(all_taken, within=15, what="the survivor to own every shard")
        assert survivor.ownership.owned == {
            shard: epoch + 1 for shard, epoch in crashed.ownership.owned.items()
        }


async def enqueue(redis: Redis, keys: KeySpace, wallet: str, minor: int) -> str:
    request = OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", minor, "", 0)
    message = encode_request(request)
    await redis.eval(ENQUEUE, 4, *keys.enqueue_keys(wallet), wallet, message, 100, 100)
    return request.op_id


async def test_two_workers_that_both_believe_they_own_a_shard_cannot_both_commit(
    settings: Settings, redis: Redis, pg: Any
) -> None:
    """A takes the shard; A is paused past its lease; B takes the shard. A still believes
    it owns it and has read an operation: its batch is refused, B's commits."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    shard = keys.shard_of(wallet)
    async with idle_workers(settings, 2) as (a, b):
        op_id = await enqueue(redis, keys, wallet, 500)
        assert await a.ownership.take(shard)
        assert a.has_work_for(wallet)

        await redis.delete(keys.lease(shard))  # A's lease ran out while A was paused
        assert await b.ownership.take(shard)
        assert b.ownership.owned[shard] == a.ownership.owned[shard] + 1

        with pytest.raises(Fenced) as refused:
            await a.process_round()
        assert refused.value.shards == [shard]
        assert await ledger(pg, wallet) == []
        assert await redis.xlen(keys.wallet_stream(wallet, shard)) == 1  # not acknowledged

        assert b.has_work_for(wallet)
        assert await b.process_round() == 1
        assert [r["id"] for r in await ledger(pg, wallet)] == [op_id]
        assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 500


async def test_a_new_owner_waits_for_the_former_owner_s_batch_in_flight(
    settings: Settings, redis: Redis, pg: Any
) -> None:
    """A batch share-locks its shards' rows until COMMIT, so a takeover's epoch bump comes
    after it: the former owner's last batch is either committed before the new owner reads
    anything, or refused."""
    worker_id = new_worker_id()
    r, pool = await connect(settings, worker_id)
    taker = Worker(settings, r, pool, worker_id=worker_id)
    former = await pg.fetchval(
        "INSERT INTO shards (shard, epoch, owner) VALUES (0, 1, 'former') ON CONFLICT (shard)"
        " DO UPDATE SET epoch = shards.epoch + 1, owner = 'former' RETURNING epoch"
    )
    batch = await pg.acquire()
    try:
        transaction = batch.transaction()
        await transaction.start()
        await batch.execute("SELECT 1 FROM shards WHERE shard = 0 FOR SHARE")
        taking = asyncio.create_task(taker.ownership.take(0))

        async def taker_waits_for_the_lock() -> bool:
            return bool(
                await pg.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    worker_id,
                )
            )

        await eventually(taker_waits_for_the_lock, what="the takeover to wait for the batch")
        assert not taking.done()
        await transaction.commit()
        assert await asyncio.wait_for(taking, 10)
        assert taker.ownership.owned == {0: former + 1}
    finally:
        await pg.release(batch)
        await taker.close()
        await pool.close()
        await r.aclose()


async def test_liveness_is_judged_by_redis_s_clock_not_the_hosts(
    settings: Settings, redis: Redis, pg: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This host's clock runs an hour ahead: the heartbeat a worker writes still runs out
    one lease after Redis's now; and with the clock an hour behind, a heartbeat that ran
    out by Redis's clock is not counted live."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
    worker_redis, worker_pool = await connect(settings, "skewed")
    try:
        worker = Worker(settings, worker_redis, worker_pool, worker_id="skewed")
        await worker.ownership.tend()
        seconds, micros = await redis.time()
        redis_now_ms = seconds * 1000 + micros // 1000
        expires_ms = await redis.zscore(keys.workers(), "skewed")
        assert expires_ms is not None
        assert abs(expires_ms - (redis_now_ms + settings.worker_lease_ttl * 1000)) < 1000
        await worker.close()
    finally:
        await worker_redis.aclose()
        await worker_pool.close()

    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)
    await redis.zadd(keys.workers(), {"gone": redis_now_ms - 1000})
    assert "gone" not in await live_workers(redis, keys)


async def test_a_worker_cut_off_from_postgresql_gives_its_shards_up_until_it_can_write(
    fast_leases: Settings, aiohttp_client: AiohttpClient, pg: Any, redis: Redis
) -> None:
    """One of two workers reaches PostgreSQL through a network that is then cut, while it
    keeps Redis: its wallets are served by the other within 2 x WORKER_LEASE_TTL, it says
    why it has no shards, and it takes shards again once the network is back."""
    settings = fast_leases
    network = await BlackHole(settings.database_url).start()
    cut_settings = dataclasses.replace(settings, database_url=network.url)
    api = await aiohttp_client(create_app(settings))
    try:
        async with running_worker(cut_settings) as cut, running_worker(settings) as other:

            async def shared() -> bool:
                return bool(cut.ownership.owned) and bool(other.ownership.owned)

            await eventually(shared, what="both workers to own shards")
            keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
            wallet = wallet_in(keys, next(iter(cut.ownership.owned)))
            await pg.execute("INSERT INTO wallets (id) VALUES ($1)", wallet)

            network.cut()
            started = time.monotonic()
            status, body, _ = await operate(api, wallet, "DEPOSIT", "1.00")
            served_after = time.monotonic() - started
            assert status == 200, body
            assert served_after < 2 * settings.worker_lease_ttl + 1.0, served_after
            assert cut.ownership.sidelined is not None
            assert "PostgreSQL" in cut.ownership.sidelined
            assert not cut.ownership.owned
            r = await api.get("/ready")
            checks = (await r.json())["checks"]
            assert checks[f"worker {cut.worker_id}"].startswith("gave its shards up")
            health = await run_module(settings, "worker", "--check")
            assert health.returncode == 1
            # Why: a batch that cannot commit, or a shard it was taking when the cut came.
            assert f"{cut.worker_id} gave its shards up: cannot " in health.stdout
            assert "PostgreSQL" in health.stdout

            network.restore()

            async def back() -> bool:
                return cut.ownership.sidelined is None and bool(cut.ownership.owned)

            await eventually(back, within=15, what="the worker to take shards again")
    finally:
        await network.close()


async def test_a_worker_cut_off_from_postgresql_while_taking_shards_leaves_them_to_others(
    fast_leases: Settings, aiohttp_client: AiohttpClient, pg: Any, redis: Redis
) -> None:
    """A worker joins and is cut off from PostgreSQL before it has taken a shard: its
    takes hang. It must not go on leasing the free shards it cannot take (their wallets
    would wait); it steps aside, and every shard is served by the other worker."""
    settings = fast_leases
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    network = await BlackHole(settings.database_url).start()
    cut_settings = dataclasses.replace(settings, database_url=network.url)
    api = await aiohttp_client(create_app(settings))
    async with running_worker(settings):
        worker_id = new_worker_id()
        cut_redis, cut_pool = await connect(cut_settings, worker_id)
        cut = Worker(cut_settings, cut_redis, cut_pool, worker_id=worker_id)
        network.cut()
        task = asyncio.create_task(cut.run())
        try:

            async def sidelined() -> bool:
                return cut.ownership.sidelined is not None

            await eventually(sidelined, within=5, what="the cut-off worker to step aside")
            assert "cannot take shard" in str(cut.ownership.sidelined)
            for shard in range(settings.shard_count):
                wallet = wallet_in(keys, shard)
                await pg.execute("INSERT INTO wallets (id) VALUES ($1)", wallet)
                status, body, _ = await operate(api, wallet, "DEPOSIT", "1.00")
                assert status == 200, (shard, body)
        finally:
            network.restore()
            cut.stop()
            await asyncio.wait_for(task, timeout=10)
            await cut_pool.close()
            await cut_redis.aclose()
            await network.close()
