"""Test fixtures: real PostgreSQL and Redis, a fresh database and Redis namespace per run.

TEST_DATABASE_URL (any database on the server; the run creates its own beside it) and
TEST_REDIS_URL point the tests at running servers; without them the run starts embedded ones.
TEST_REDIS_CLUSTER=1 runs the tests against a Redis Cluster of the run's own (3 primaries,
each with a replica) of the redis-server 7 found on PATH; without one they are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from api.app import create_app
from devtools.servers import (
    RedisClusterNodes,
    migrate,
    redis_cluster,
    redis_server_7,
    servers_or_embedded,
    with_database,
)
from shared.connections import RedisClient, open_pg_pool, open_redis
from shared.settings import Settings
from tests.helpers import eventually
from worker.worker import Worker, connect, new_worker_id

RUN_ID = uuid.uuid4().hex[:10]
REDIS_CLUSTER = os.environ.get("TEST_REDIS_CLUSTER") == "1"
_namespaces = itertools.count(1)


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """Where the run's own servers keep their data: not under pytest's basetemp, as any
    pytest session that starts on the machine meanwhile closes the basetemp's parent to its
    owner again (0700), which cuts an embedded PostgreSQL running as a user of its own (when
    the tests run as root) off from its data, and it stops."""
    with tempfile.TemporaryDirectory(
        prefix="wallet-test-servers-", ignore_cleanup_errors=True
    ) as directory:
        yield Path(directory)


@pytest.fixture(scope="session")
def cluster_nodes(workdir: Path) -> Iterator[RedisClusterNodes | None]:
    """With TEST_REDIS_CLUSTER=1, the run's Redis Cluster (the tests that need it skip
    without); else None."""
    if not REDIS_CLUSTER:
        yield None
        return
    executable = redis_server_7()
    if executable is None:
        pytest.skip("TEST_REDIS_CLUSTER=1, but no redis-server 7 or newer on PATH")
    with redis_cluster(workdir / "cluster", executable) as nodes:
        yield nodes


@pytest.fixture(scope="session")
def servers(workdir: Path, cluster_nodes: RedisClusterNodes | None) -> Iterator[tuple[str, str]]:
    """(PostgreSQL server URL, Redis URL)."""
    redis = cluster_nodes.url if cluster_nodes else os.environ.get("TEST_REDIS_URL")
    with servers_or_embedded(workdir, os.environ.get("TEST_DATABASE_URL"), redis) as urls:
        yield urls


@pytest.fixture(scope="session")
async def database_url(servers: tuple[str, str]) -> AsyncIterator[str]:
    """A database of this run's own, migrated with Alembic, dropped at the end."""
    name = f"wallet_test_{RUN_ID}"
    admin = await asyncpg.connect(servers[0])
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = with_database(servers[0], name)
        await asyncio.to_thread(migrate, url)
        yield url
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def redis_url(servers: tuple[str, str]) -> AsyncIterator[str]:
    """Every key this run writes starts with its prefix; they are deleted at the end."""
    yield servers[1]
    redis = open_redis(
        Settings(database_url="-", redis_url=servers[1], redis_cluster=REDIS_CLUSTER)
    )
    async for key in redis.scan_iter(match=f"t{RUN_ID}-*", count=1000):
        await redis.unlink(key)
    await redis.aclose()


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    """Each test gets its own Redis namespace, so its workers see only its own queues."""
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        redis_cluster=REDIS_CLUSTER,
        redis_key_prefix=f"t{RUN_ID}-{next(_namespaces)}",
        shard_count=8,
        reply_timeout=30.0,
        pg_pool_max=5,
        worker_metrics_port=0,  # tests start several workers on this host
        api_metrics_port=0,
    )


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[RedisClient]:
    client = open_redis(settings)
    yield client
    await client.aclose()


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[Any]:
    """A pool of the test's own, apart from the ones the API and the worker use."""
    pool = await open_pg_pool(settings)
    yield pool
    await pool.close()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker, running, once it owns its fair share of the shards."""
    worker_id = new_worker_id()
    redis, pool = await connect(settings, worker_id)
    worker = Worker(settings, redis, pool, worker_id=worker_id)
    task = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: _owns_some(worker, task), what="the worker to own shards")
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=10)
        await pool.close()
        await redis.aclose()


@contextlib.asynccontextmanager
async def idle_workers(settings: Settings, count: int) -> AsyncIterator[list[Worker]]:
    """Workers that do not run: a test takes shards and processes rounds by hand."""
    made: list[tuple[Worker, Any, Any]] = []
    try:
        for _ in range(count):
            worker_id = new_worker_id()
            redis, pool = await connect(settings, worker_id)
            made.append((Worker(settings, redis, pool, worker_id=worker_id), redis, pool))
        yield [worker for worker, _, _ in made]
    finally:
        for worker, redis, pool in made:
            await worker.close()
            await pool.close()
            await redis.aclose()


async def _owns_some(worker: Worker, task: asyncio.Task[None]) -> bool:
    if task.done():
        task.result()  # raises what stopped it
    return bool(worker.ownership.owned)


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    async with running_worker(settings) as w:
        yield w


AiohttpClient = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, settings: Settings) -> TestClient[Any, Any]:
    """The API alone: operations wait in the queue until a worker runs."""
    return await aiohttp_client(create_app(settings))


@pytest.fixture
async def client(api: TestClient[Any, Any], worker: Worker) -> TestClient[Any, Any]:
    """The API with a worker behind it."""
    return api


@pytest.fixture
async def wallet(client: TestClient[Any, Any]) -> str:
    response = await client.post("/api/v1/wallets")
    assert response.status == 201
    return str((await response.json())["id"])
