"""What a run stands on: its PostgreSQL and Redis (the run's own, which the faults crash and
restart), the service's processes on them, the run's connections to both, and what the
faults have done to them so far."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis, RedisCluster

from devtools.blackhole import BlackHole
from devtools.processes import Cluster, free_port
from devtools.servers import EmbeddedPostgres, RedisClusterNodes, RedisProcess
from devtools.waiting import until
from shared.connections import RedisClient, cluster_client
from shared.keys import KeySpace

SHARDS = 16
LEASE_TTL = 2.0
REPLY_TIMEOUT = 5.0
RESCAN_INTERVAL = 2.0  # so that a transfer's step lost with Redis is sent again in the run
RESEND_AFTER = 1.0
CHAOS_APPLICATION = "chaos-runner"  # spared when the sessions are terminated
WORKERS = 3  # started with the API; the faults kill, stop and add more


class Stage:
    def __init__(
        self,
        postgres: EmbeddedPostgres,
        redis_server: RedisProcess | RedisClusterNodes,
        database_url: str,
        logs: Path,
        redis: RedisClient,
        pg: Any,  # a pool, as the run's own application (CHAOS_APPLICATION)
        network: BlackHole,  # a proxy to PostgreSQL that can be cut
    ) -> None:
        self.postgres, self.redis_server = postgres, redis_server
        self.on_cluster = isinstance(redis_server, RedisClusterNodes)
        self.redis, self.pg, self.network = redis, pg, network
        self.prefix = f"chaos-{uuid.uuid4().hex[:10]}"
        self.keys = KeySpace(self.prefix, SHARDS)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.processes = Cluster(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_server.url,
                "REDIS_CLUSTER": str(self.on_cluster).lower(),
                "REDIS_KEY_PREFIX": self.prefix,
                "SHARD_COUNT": str(SHARDS),
                "WORKER_LEASE_TTL": str(LEASE_TTL),
                "WORKER_METRICS_PORT": "0",
                "REPLY_TIMEOUT": str(REPLY_TIMEOUT),
                "WORKER_RESCAN_INTERVAL": str(RESCAN_INTERVAL),
                "TRANSFER_RESEND_AFTER": str(RESEND_AFTER),
                "HOST": "127.0.0.1",
                "PORT": str(port),
            },
            logs,
        )
        self.killed: set[int] = set()  # pids of the workers killed
        self.paused: subprocess.Popen[bytes] | None = None  # the worker stopped in a batch
        self.killed_node: int | None = None  # the port of the Redis primary killed

    @property
    def api(self) -> subprocess.Popen[bytes]:
        assert self.processes.api is not None
        return self.processes.api

    def start_service(self) -> None:
        self.processes.start("api")
        for _ in range(WORKERS):
            self.processes.start("worker")

    async def lease_owners(self) -> list[str]:
        """Each shard's owner as its lease names it ("" where none does)."""
        leases: list[Any] = [await self.redis.get(self.keys.lease(s)) for s in range(SHARDS)]
        return [lease.decode() if lease else "" for lease in leases]

    async def live_owner(self, shard: int) -> str:
        """The worker that owns the shard, once it is one alive: a worker killed a moment
        ago still holds its leases until they run out."""
        owner = ""

        async def live() -> bool:
            nonlocal owner
            lease: Any = await self.redis.get(self.keys.lease(shard))
            owner = lease.decode() if lease else ""
            process = self.processes.worker_named(owner) if owner else None
            return process is not None and process.poll() is None

        await until(live, LEASE_TTL * 10, f"a live worker to own shard {shard}")
        return owner


def owner_pid(owner: str) -> str:
    """The pid of the worker a lease names."""
    return owner.rsplit("-", 2)[-2]


@contextlib.asynccontextmanager
async def staged(
    postgres: EmbeddedPostgres,
    redis_server: RedisProcess | RedisClusterNodes,
    database_url: str,
    logs: Path,
) -> AsyncIterator[Stage]:
    """The stage, its connections open; at the end the service's processes are stopped and
    the connections closed."""
    redis: RedisClient = (
        cluster_client(redis_server.url)
        if isinstance(redis_server, RedisClusterNodes)
        else Redis.from_url(redis_server.url)
    )
    try:
        pg = await asyncpg.create_pool(
            database_url,
            min_size=0,  # no floor to restore, and to log about, while PostgreSQL is down
            max_size=4,
            server_settings={"application_name": CHAOS_APPLICATION},
        )
        network = await BlackHole(database_url).start()
        if isinstance(redis, RedisCluster):
            await redis.initialize()  # it knows every node then, not only the seed
        stage = Stage(postgres, redis_server, database_url, logs, redis, pg, network)
        try:
            yield stage
        finally:
            network.restore()  # a worker still behind it can then stop as asked
            stage.processes.stop()
            await network.close()
            await pg.close()
    finally:
        await redis.aclose()
