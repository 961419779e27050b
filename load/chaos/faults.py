"""The faults, a registry of small classes: each its name, its bound (how soon after it every
wallet must answer 200 again, in seconds), where it can strike, and how it strikes and
heals. A worker killed, stopped or cut off holds its shards until its lease runs out, or
until it has failed to commit for a lease (cut off); then the others take them."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import signal
import time
import uuid
from typing import Any, ClassVar

from redis.crc import key_slot

from devtools.servers import RedisClusterNodes, RedisProcess, kill_client, redis_clients
from devtools.waiting import until
from load.chaos.report import Report
from load.chaos.stage import CHAOS_APPLICATION, LEASE_TTL, Stage, owner_pid
from shared.codec import DEPOSIT, OperationRequest, encode_request
from shared.scripts import ENQUEUE

REFUSED = "batch refused"  # what a worker logs when the fence refuses its batch
DOWN = 2.0  # how long a crashed PostgreSQL stays down, and a paused API process
API_START = 3.0  # time enough for a new API process to start serving


class Where(enum.Enum):
    ANYWHERE = enum.auto()
    ONE_REDIS = enum.auto()  # on one Redis only
    CLUSTER = enum.auto()  # on a Redis Cluster only


class Fault:
    """One fault of a run, struck once, on the run's stage and its hot wallet."""

    name: ClassVar[str]
    bound: ClassVar[float]
    where: ClassVar[Where] = Where.ANYWHERE
    # Every wallet must be served while the fault still holds (by other workers); it heals
    # after. Otherwise it heals first.
    served_while_struck: ClassVar[bool] = False

    def __init__(self, stage: Stage, hot: str, report: Report) -> None:
        self.stage, self.hot, self.report = stage, hot, report

    async def strike(self, pick: int) -> float:
        """Strikes (`pick` chooses a worker, where the fault picks one); returns the moment
        of the fault, by `time.monotonic()`."""
        raise NotImplementedError

    async def heal(self) -> None:
        """Undoes what the run did; nothing where the service must get over it alone."""


class Kill(Fault):
    """A worker killed with SIGKILL."""

    name, bound = "kill", 2 * LEASE_TTL + 2

    async def strike(self, pick: int) -> float:
        live = self.stage.processes.live_workers()
        victim = live[pick % len(live)]
        victim.kill()
        self.stage.killed.add(victim.pid)
        since = time.monotonic()
        self.report.event(f"killed worker pid {victim.pid} with SIGKILL")
        return since


class Pause(Fault):
    """The hot wallet's writer stopped (SIGSTOP) inside a batch until another worker has
    taken its shard, then continued: its late batch must be refused by the fence. The
    batch is caught in flight by holding the hot wallet's row, which it waits for."""

    name, bound = "pause", 2 * LEASE_TTL + 2

    async def strike(self, pick: int) -> float:
        stage, pg = self.stage, self.stage.pg
        self.shard = stage.keys.shard_of(self.hot)
        self.owner = await stage.live_owner(self.shard)
        victim = stage.processes.worker_named(self.owner)
        assert victim is not None
        async with contextlib.AsyncExitStack() as held:
            blocker = await held.enter_async_context(pg.acquire())
            await held.enter_async_context(blocker.transaction())
            await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", self.hot)
            blocker_pid = await blocker.fetchval("SELECT pg_backend_pid()")

            async def victim_waits() -> bool:
                return bool(
                    await pg.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                        " AND $2 = any(pg_blocking_pids(pid))",
                        self.owner,
                        blocker_pid,
                    )
                )

            await until(victim_waits, 10, "the hot wallet's writer to wait in a batch")
            victim.send_signal(signal.SIGSTOP)
            since = time.monotonic()
            stage.paused = victim
            self.held = held.pop_all()  # the row stays held until another worker took over
        return since

    async def heal(self) -> None:
        stage, shard, victim = self.stage, self.shard, self.stage.paused
        assert victim is not None

        async def taken_over() -> bool:
            now: Any = await stage.redis.get(stage.keys.lease(shard))
            recorded = await stage.pg.fetchval("SELECT owner FROM shards WHERE shard = $1", shard)
            return bool(now and now.decode() != self.owner and recorded == now.decode())

        async with self.held:
            await until(taken_over, LEASE_TTL * 10, f"another worker to take shard {shard}")
            victim.send_signal(signal.SIGCONT)

        async def refused() -> bool:
            return REFUSED in stage.processes.log_of(victim)

        # Before anything else can strike it: the victim's batch meets the fence.
        await until(refused, 10, "the continued worker's late batch to be refused")
        self.report.event(
            f"stopped worker pid {victim.pid} inside a batch past its lease; continued it after "
            f"shard {shard} changed hands"
        )


class Start(Fault):
    """One more worker started."""

    name, bound = "start", 3.0

    async def strike(self, pick: int) -> float:
        since = time.monotonic()
        self.report.event(f"started worker pid {self.stage.processes.start('worker').pid}")
        return since


class TerminatePostgresSessions(Fault):
    """PostgreSQL terminates every session of the service."""

    name, bound = "terminate_postgres_sessions", 3.0

    async def strike(self, pick: int) -> float:
        ended = await self.stage.pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name <> $1",
            CHAOS_APPLICATION,
        )
        since = time.monotonic()
        self.report.event(f"PostgreSQL terminated {ended} sessions")
        return since


class DropRedisConnections(Fault):
    """Redis drops every connection of the service."""

    name, bound = "drop_redis_connections", 3.0

    async def strike(self, pick: int) -> float:
        redis = self.stage.redis
        ours = [
            (node, c)
            for node, c in await redis_clients(redis)
            if (c.get("name") or "").startswith(f"{self.stage.prefix}:")
        ]
        for node, client in ours:
            await kill_client(redis, node, client)
        since = time.monotonic()
        self.report.event(f"Redis dropped {len(ours)} connections of the service")
        return since


class RestartPostgres(Fault):
    """PostgreSQL crashes (an immediate stop), stays down DOWN seconds, and starts,
    recovering from its WAL."""

    name, bound = "restart_postgres", DOWN + 3

    async def strike(self, pick: int) -> float:
        await asyncio.to_thread(self.stage.postgres.crash)
        return time.monotonic()

    async def heal(self) -> None:
        await asyncio.sleep(DOWN)
        started = time.monotonic()
        await asyncio.to_thread(self.stage.postgres.start)
        await self.stage.pg.expire_connections()
        self.report.event(
            f"PostgreSQL crashed, stayed down {DOWN} s and started again (its start took"
            f" {time.monotonic() - started:.2f} s)"
        )


class RestartRedisEmpty(Fault):
    """Redis killed and started again with nothing (no persistence): streams, leases and
    heartbeats are gone."""

    name, bound, where = "restart_redis_empty", 3.0, Where.ONE_REDIS

    async def strike(self, pick: int) -> float:
        assert isinstance(self.stage.redis_server, RedisProcess)
        await asyncio.to_thread(self.stage.redis_server.kill)
        return time.monotonic()

    async def heal(self) -> None:
        assert isinstance(self.stage.redis_server, RedisProcess)
        await asyncio.to_thread(self.stage.redis_server.start)
        self.report.event("Redis was killed and started again empty")


class CutWorkerFromPostgres(Fault):
    """A worker reaching PostgreSQL through a network that is cut (packets dropped,
    connections kept) while it keeps Redis: its shards must be served by others; once the
    network is back it takes some again."""

    name, bound, served_while_struck = "cut_worker_from_postgres", 2 * LEASE_TTL + 1, True

    async def strike(self, pick: int) -> float:
        self.worker = self.stage.processes.start("worker", DATABASE_URL=self.stage.network.url)
        await until(self.owns_shards, LEASE_TTL * 10, "the worker behind the proxy to own shards")
        self.stage.network.cut()
        since = time.monotonic()
        self.report.event(f"cut worker pid {self.worker.pid} off from PostgreSQL")
        return since

    async def heal(self) -> None:
        self.stage.network.restore()
        back = time.monotonic()
        await until(self.owns_shards, LEASE_TTL * 10, "the worker to take shards again")
        self.report.event(
            f"it took shards again {time.monotonic() - back:.2f} s after the cut ended"
        )

    async def owns_shards(self) -> bool:
        owners = await self.stage.lease_owners()
        return str(self.worker.pid) in {owner_pid(owner) for owner in owners if owner}


class PoisonEntry(Fault):
    """An entry no batch could apply (an amount past BIGINT) put on the hot wallet's stream,
    as a broken writer would: it must go to the dead letters."""

    name, bound = "poison_entry", 3.0

    async def strike(self, pick: int) -> float:
        keys, redis = self.stage.keys, self.stage.redis
        shard = keys.shard_of(self.hot)
        op = OperationRequest(str(uuid.uuid4()), self.hot, DEPOSIT, 2**63, "", 0)
        poison = encode_request(op)
        enqueue = redis.register_script(ENQUEUE)
        await enqueue(keys=keys.enqueue_keys(self.hot), args=[self.hot, poison, 10**6, 10**6])
        since = time.monotonic()

        async def dead_lettered() -> bool:
            letters: Any = await redis.xrange(keys.dead_letters(shard))
            return any(fields[b"m"] == poison for _, fields in letters)

        await until(dead_lettered, 10, "the poison entry to go to the dead letters")
        self.report.event("a poison entry on the hot wallet went to the dead letters")
        return since


class KillApi(Fault):
    """The API process killed with SIGKILL, and a new one started. Its requests in flight
    are lost to their clients (unknowns, resolved by their keys); what it had queued is
    applied by the workers all the same."""

    name, bound = "kill_api", API_START + 2

    async def strike(self, pick: int) -> float:
        api = self.stage.api
        api.kill()
        await asyncio.to_thread(api.wait)
        since = time.monotonic()
        self.report.event(f"killed the API process pid {api.pid} with SIGKILL; started another")
        return since

    async def heal(self) -> None:
        self.stage.processes.start("api")


class PauseApi(Fault):
    """The API process stopped (SIGSTOP) for DOWN seconds, then continued."""

    name, bound = "pause_api", DOWN + 3

    async def strike(self, pick: int) -> float:
        self.stage.api.send_signal(signal.SIGSTOP)
        return time.monotonic()

    async def heal(self) -> None:
        await asyncio.sleep(DOWN)
        self.stage.api.send_signal(signal.SIGCONT)
        self.report.event(f"stopped the API process for {DOWN} s, then continued it")


class ClusterFault(Fault):
    """A fault of a Redis Cluster's, on the hot wallet's slot."""

    where = Where.CLUSTER

    @property
    def nodes(self) -> RedisClusterNodes:
        assert isinstance(self.stage.redis_server, RedisClusterNodes)
        return self.stage.redis_server

    def hot_slot(self) -> int:
        return key_slot(self.stage.keys.wallet_stream(self.hot).encode())


class KillRedisPrimary(ClusterFault):
    """The primary of the hot wallet's slot killed with SIGKILL; its replica takes over, and
    what the primary had not passed on is gone. A failover waits for the node timeout
    (2 s), the failure's news and an election, then for the service's retries, backing off
    up to 2 s, to reach the new primary."""

    name, bound = "kill_redis_primary", 2.0 + 6

    async def strike(self, pick: int) -> float:
        nodes = self.nodes
        primary = await asyncio.to_thread(nodes.owner_of, self.hot_slot())
        nodes.kill(primary)
        since = time.monotonic()
        self.stage.killed_node = primary
        await asyncio.to_thread(nodes.wait_failed_over, primary)
        self.report.event(
            f"killed the Redis primary on port {primary} with SIGKILL; its replica took over"
            f" {time.monotonic() - since:.2f} s later"
        )
        return since


class MoveSlot(ClusterFault):
    """The hot wallet's slot moved to another primary under load, keys and all."""

    name, bound = "move_slot", 3.0

    async def strike(self, pick: int) -> float:
        nodes, slot = self.nodes, self.hot_slot()
        owner = await asyncio.to_thread(nodes.owner_of, slot)
        others = [p for p in await asyncio.to_thread(nodes.primary_ports) if p != owner]
        target = others[pick % len(others)]
        since = time.monotonic()
        await asyncio.to_thread(nodes.move_slot, slot, target)
        self.report.event(
            f"moved slot {slot} from the primary on port {owner} to the one on {target}"
        )
        return since


class RedisPrimaryBack(ClusterFault):
    """The killed primary started again; it joins as a replica (the schedule puts it after
    the kill)."""

    name, bound = "redis_primary_back", 3.0

    async def strike(self, pick: int) -> float:
        killed = self.stage.killed_node
        assert killed is not None
        since = time.monotonic()
        await asyncio.to_thread(self.nodes.start, killed)
        await asyncio.to_thread(self.nodes.wait_ok)
        self.report.event(f"started the killed Redis primary on port {killed} again")
        return since


# By name. A seed's schedule draws from this order: another order, or another fault, draws
# another schedule from every seed.
REGISTRY: dict[str, type[Fault]] = {
    fault.name: fault
    for fault in (
        Kill,
        Pause,
        Start,
        TerminatePostgresSessions,
        DropRedisConnections,
        RestartPostgres,
        RestartRedisEmpty,
        CutWorkerFromPostgres,
        PoisonEntry,
        KillApi,
        PauseApi,
        KillRedisPrimary,
        MoveSlot,
        RedisPrimaryBack,
    )
}


def faults(cluster: bool) -> list[type[Fault]]:
    """The faults of a run on one Redis or on a Redis Cluster, in the registry's order."""
    here = Where.CLUSTER if cluster else Where.ONE_REDIS
    return [fault for fault in REGISTRY.values() if fault.where in (Where.ANYWHERE, here)]
