"""The designs under load, started and ended: the service (as this tree has it, as another git
ref has it, on a Redis Cluster, with one API process) and the row-lock reference
(`python -m load.rowlock`), each service on a database and Redis key prefix of its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
from redis.asyncio import Redis, RedisCluster

from devtools.processes import ROOT, free_port, spawn
from devtools.servers import RedisClusterNodes, migrate, with_database
from load.bench.phases import SERVICE, Design, Kind
from shared.connections import cluster_client
from shared.keys import KeySpace
from shared.settings import Settings

QUIET: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}


@dataclasses.dataclass
class Running:
    """A design under load: its URL and its processes by name."""

    design: Design
    base: str
    processes: dict[str, subprocess.Popen[bytes]]
    pg: Any  # a pool on the design's database: wallets, balances, the ledger
    # how many operations it holds queued, if it queues them
    queued: Callable[[], Awaitable[int]] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # its processes' settings
    # processes it uses but the bench did not start for it (a Redis Cluster's nodes), by name:
    # their CPU is measured, summed per name
    observed: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    transfers: bool = True  # it serves transfers (a --baseline from before them does not)
    holds: bool = True  # and holds

    def pids(self) -> dict[str, list[int]]:
        """Its process ids by name, api, api2... together as api."""
        pids: dict[str, list[int]] = {}
        for name, process in self.processes.items():
            pids.setdefault(name.rstrip("0123456789"), []).append(process.pid)
        return pids | self.observed


def serving(
    name: str, module: str, env: dict[str, str], root: Path, count: int
) -> dict[str, subprocess.Popen[bytes]]:
    """`count` processes of `module` sharing env's PORT (REUSE_PORT): `name`, then `name`2,
    `name`3... (the CPU column sums them under `name`)."""
    shared_port = {**env, "REUSE_PORT": str(count > 1)}
    return {
        name if n == 0 else f"{name}{n + 1}": spawn(module, shared_port, root, **QUIET)
        for n in range(count)
    }


class Designs:
    """Starts designs and, at close, ends every process and drops every database it made."""

    def __init__(self, admin: Any, redis: Redis, pg_server: str, redis_url: str) -> None:
        self.admin, self.redis = admin, redis
        self.pg_server, self.redis_url = pg_server, redis_url
        self.running: list[Running] = []
        self.databases: list[str] = []
        self.clients: list[RedisCluster] = []

    async def service(
        self,
        design: Design,
        api_processes: int,
        root: Path = ROOT,
        cluster: RedisClusterNodes | None = None,
    ) -> Running:
        """The service as the checkout at `root` has it, on a database and Redis key prefix
        of its own (two sets of workers on one database would fence each other's shards);
        on the Redis Cluster `cluster` if given."""
        name = f"wallet_bench_{uuid.uuid4().hex[:8]}"
        await self.admin.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        env = {
            "DATABASE_URL": with_database(self.pg_server, name),
            "REDIS_URL": cluster.url if cluster else self.redis_url,
            "REDIS_CLUSTER": str(cluster is not None).lower(),
            "REDIS_KEY_PREFIX": f"bench-{name}",
            "WORKER_METRICS_PORT": "0",
            "HOST": "127.0.0.1",
        }
        await asyncio.to_thread(migrate, env["DATABASE_URL"], root)
        port = free_port()
        processes = serving("api", "api", {**env, "PORT": str(port)}, root, api_processes)
        processes["worker"] = spawn("worker", env, root, **QUIET)
        pg = await asyncpg.create_pool(env["DATABASE_URL"], min_size=1, max_size=2)
        running = Running(design, f"http://127.0.0.1:{port}", processes, pg, env=env)
        running.queued = self.queued_on(env["REDIS_KEY_PREFIX"], cluster)
        if cluster is not None:
            running.observed["redis cluster"] = cluster.pids()
        self.running.append(running)
        return running

    def queued_on(
        self, prefix: str, cluster: RedisClusterNodes | None
    ) -> Callable[[], Awaitable[int]]:
        """How many operations a service under `prefix` holds queued, over all its shards."""
        keys = KeySpace(prefix, Settings.shard_count)
        names = [keys.queued(s) for s in range(keys.shard_count)]
        on_cluster = None
        if cluster is not None:
            on_cluster = cluster_client(cluster.url)
            self.clients.append(on_cluster)

        async def queued() -> int:
            if on_cluster is not None:
                counts = await on_cluster.mget_nonatomic(names)
            else:
                counts = await self.redis.mget(names)
            return sum(int(n or 0) for n in counts)

        return queued

    def row_lock(self, processes: int, beside: Running) -> Running:
        """The row-lock reference with `processes` API processes, on the tables of `beside`."""
        port = free_port()
        env = {**beside.env, "PORT": str(port)}
        running = Running(
            Design(Kind.ROW_LOCK, processes),
            f"http://127.0.0.1:{port}",
            serving("rowlock", "load.rowlock", env, ROOT, processes),
            beside.pg,
        )
        self.running.append(running)
        return running

    async def close(self) -> None:
        processes = [p for running in self.running for p in running.processes.values()]
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
        for running in self.running:
            if running.queued is not None:
                await running.pg.close()
        for name in self.databases:
            await self.admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            async for key in self.redis.scan_iter(match=f"bench-{name}:*", count=1000):
                await self.redis.unlink(key)
        for client in self.clients:
            await client.aclose()


def restart_worker(running: Running, env: dict[str, str]) -> None:
    """The service's worker ended (SIGTERM hands its shards over) and started again with
    `env` added to its settings."""
    worker = running.processes["worker"]
    worker.terminate()
    worker.wait(timeout=30)
    running.processes["worker"] = spawn("worker", {**running.env, **env}, **QUIET)


@contextlib.asynccontextmanager
async def started(
    args: argparse.Namespace,
    pg_server: str,
    redis_url: str,
    baseline: Path | None,
    cluster: RedisClusterNodes | None,
) -> AsyncIterator[list[Running]]:
    """The designs the options ask for, in the order the phases take them: the service, its
    variants, the row lock with as many API processes as the service and with one (on one
    wallet a second process only adds waiters for the row's lock; each phase compares the
    service with the better of the two)."""
    admin = await asyncpg.connect(pg_server)
    redis = Redis.from_url(redis_url)
    designs = Designs(admin, redis, pg_server, redis_url)
    try:
        service = await designs.service(SERVICE, args.api_processes)
        counts = sorted({args.api_processes, 1}, reverse=True)
        compared = [service, *(designs.row_lock(count, service) for count in counts)]
        if baseline is not None:
            design = Design(Kind.BASELINE, ref=args.baseline)
            compared.insert(1, await designs.service(design, args.api_processes, baseline))
            compared[1].transfers = (baseline / "api" / "transfers.py").exists()
            compared[1].holds = (baseline / "api" / "holds.py").exists()
        if cluster is not None:
            design = Design(Kind.ON_CLUSTER)
            compared.insert(1, await designs.service(design, args.api_processes, cluster=cluster))
        if args.one_process_too and args.api_processes > 1:
            compared.insert(1, await designs.service(Design(Kind.ONE_PROCESS), 1))
        yield compared
    finally:
        await designs.close()
        await admin.close()
        await redis.aclose()


@contextlib.contextmanager
def checkout(ref: str, directory: Path) -> Iterator[Path]:
    """The project at `ref`, in a git worktree of its own for the length of the run."""
    subprocess.run(
        ["git", "worktree", "add", "--quiet", "--detach", str(directory), ref],
        cwd=ROOT,
        check=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(directory)], cwd=ROOT, check=False
        )
