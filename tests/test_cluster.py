"""The service on a Redis Cluster (TEST_REDIS_CLUSTER=1; `make test` runs these on a cluster
of its own): commands go to the nodes that own their keys, and slots that move under load,
by a reshard or a failover, lose nothing acknowledged and apply nothing twice."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from redis.asyncio import RedisCluster
from redis.crc import key_slot

from devtools.servers import RedisClusterNodes
from shared import connections
from shared.keys import KeySpace
from shared.settings import Settings
from tests.conftest import REDIS_CLUSTER
from tests.helpers import Client, eventually, ledger, operate

pytestmark = pytest.mark.skipif(
    not REDIS_CLUSTER, reason="runs on a Redis Cluster: TEST_REDIS_CLUSTER=1 (make test does)"
)


def slot_of_wallet(settings: Settings, wallet: str) -> int:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    return key_slot(keys.wallet_stream(wallet).encode())


async def test_one_round_trip_reaches_every_node_that_owns_one_of_its_keys(
    settings: Settings, redis: RedisCluster, cluster_nodes: RedisClusterNodes
) -> None:
    keys = [f"{settings.redis_key_prefix}:probe:{i}" for i in range(30)]
    owners = {cluster_nodes.owner_of(key_slot(k.encode())) for k in keys}
    assert len(owners) == 3  # the keys are spread over every primary
    direct = connections.direct(redis)
    try:
        answers = await direct.round_trip([("SET", k, i) for i, k in enumerate(keys)])
        assert answers == [b"OK"] * len(keys)
        assert await direct.round_trip([("GET", k) for k in keys]) == [
            str(i).encode() for i in range(len(keys))
        ]
    finally:
        await direct.close()


async def depositing(client: Client, wallet: str, stop: asyncio.Event) -> list[str]:
    """Deposits of 1, each with a key, one after another until `stop`; returns the keys of
    those answered 200 (the unknowns are retried with their key until answered)."""
    acknowledged = []
    while not stop.is_set():
        key = str(uuid.uuid4())
        for _ in range(100):
            status, _, _ = await operate(client, wallet, "DEPOSIT", 1, key=key)
            if status == 200:
                acknowledged.append(key)
                break
            assert status in (202, 503), status
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"deposit {key} never answered 200")
    return acknowledged


async def settled(pg: Any, client: Client, wallet: str, acknowledged: list[str]) -> None:
    """Every acknowledged deposit is in the ledger once, and the balance is their sum."""
    rows = await ledger(pg, wallet)
    applied = [r for r in rows if r["status"] == "applied"]
    assert len(applied) == len(acknowledged)
    response = await client.get(f"/api/v1/wallets/{wallet}")
    assert (await response.json())["balance"] == f"{len(acknowledged)}.00"


async def test_a_slot_moved_under_load_loses_and_repeats_nothing(
    client: Client,
    wallet: str,
    settings: Settings,
    pg: Any,
    cluster_nodes: RedisClusterNodes,
) -> None:
    slot = slot_of_wallet(settings, wallet)
    before = cluster_nodes.owner_of(slot)
    target = next(p for p in cluster_nodes.primary_ports() if p != before)
    stop = asyncio.Event()
    load = asyncio.create_task(depositing(client, wallet, stop))
    await eventually(lambda: _some_answered(pg, wallet, 20), what="deposits before the move")
    await asyncio.to_thread(cluster_nodes.move_slot, slot, target)
    assert cluster_nodes.owner_of(slot) == target
    done_after = len(await ledger(pg, wallet)) + 20
    await eventually(lambda: _some_answered(pg, wallet, done_after), what="deposits after the move")
    stop.set()
    acknowledged = await asyncio.wait_for(load, 30)
    await settled(pg, client, wallet, acknowledged)


async def test_a_primary_killed_under_load_fails_over_and_loses_nothing_acknowledged(
    client: Client,
    wallet: str,
    settings: Settings,
    pg: Any,
    cluster_nodes: RedisClusterNodes,
) -> None:
    """Writes the killed primary took and had not passed to its replica are gone with it:
    their requests were not answered 200 (the reply follows the commit, which follows the
    read from the stream), so their clients retry them with their keys."""
    slot = slot_of_wallet(settings, wallet)
    primary = cluster_nodes.owner_of(slot)
    stop = asyncio.Event()
    load = asyncio.create_task(depositing(client, wallet, stop))
    try:
        await eventually(lambda: _some_answered(pg, wallet, 20), what="deposits before the kill")
        cluster_nodes.kill(primary)
        await asyncio.to_thread(cluster_nodes.wait_failed_over, primary)
        assert cluster_nodes.owner_of(slot) != primary
        done_after = len(await ledger(pg, wallet)) + 20
        await eventually(
            lambda: _some_answered(pg, wallet, done_after),
            within=30,
            what="deposits after the failover",
        )
        stop.set()
        acknowledged = await asyncio.wait_for(load, 60)
        await settled(pg, client, wallet, acknowledged)
    finally:
        stop.set()
        await asyncio.gather(load, return_exceptions=True)
        await asyncio.to_thread(cluster_nodes.start, primary)  # back, as a replica
        await asyncio.to_thread(cluster_nodes.wait_ok)


async def _some_answered(pg: Any, wallet: str, count: int) -> bool:
    return len(await ledger(pg, wallet)) >= count
