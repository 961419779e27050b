"""Opening the PostgreSQL pool and the Redis client, the same way for API, worker and tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from hiredis import pack_command
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    OutOfMemoryError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.settings import Settings

# What a query on a pooled connection fails with when the connection was lost under it (the
# server ended the session or shut down, the network broke), depending on when asyncpg
# noticed: the server's own error (57P01, 57P02), a connection error (class 08, e.g.
# "closed in the middle of operation"), an InterfaceError (its proxy detached once asyncpg
# noticed), or an InternalClientError ("another operation is in progress", when the goodbye
# reached an idle connection just before the next query). A fresh connection may do.
PG_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
PG_ERRORS = (asyncpg.PostgresError, *PG_CONNECTION_LOST)


@contextlib.asynccontextmanager
async def connection_from(pool: Any) -> AsyncIterator[Any]:
    """A connection of the pool, closed instead of given back if its use was cut short (a
    cancelled task, a timeout) or the connection lost. A query cut short leaves the
    connection busy until PostgreSQL confirms the cancel: given back, the pool would wait
    for that confirmation, which over a network that drops packets does not come, and the
    next user of it would fail with 'another operation is in progress'. Any other error
    (PostgreSQL refusing a statement, a 404 raised inside) leaves it fit to be given back."""
    conn = await pool.acquire()
    try:
        yield conn
    except BaseException as e:
        if not isinstance(e, Exception) or isinstance(e, (TimeoutError, *PG_CONNECTION_LOST)):
            with contextlib.suppress(*PG_ERRORS):
                conn.terminate()
        raise
    finally:
        with contextlib.suppress(*PG_ERRORS, OSError):
            await pool.release(conn)


# What a Redis call fails with when Redis, or a node of a cluster, cannot serve it: the
# cluster client's own errors (no node reachable, a slot not served) are not RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError)


def out_of_memory(error: BaseException) -> bool:
    """Whether Redis refused a write because it is full (maxmemory reached under noeviction):
    its OOM reply, which Redis 6 hands back from a script wrapped in a script error."""
    return isinstance(error, OutOfMemoryError) or (
        isinstance(error, ResponseError) and "OOM command not allowed" in str(error)
    )


REDIS_SOCKET_TIMEOUT = 5.0  # longer than any blocking command we send (XREAD waits 0.25 s)


# A client of one Redis or of a Redis Cluster (REDIS_CLUSTER): the commands the service
# sends through a client take one key each, or keys of one slot, so both run them alike.
RedisClient = Redis | RedisCluster


def open_redis(
    settings: Settings, *, max_connections: int | None = None, name: str | None = None
) -> RedisClient:
    """`name` (CLIENT SETNAME) tells an operator's CLIENT LIST whose connection is whose."""
    if settings.redis_cluster:
        return cluster_client(
            settings.redis_url,
            max_connections=max_connections or settings.redis_pool_max,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=2.0,
            socket_keepalive=True,
            health_check_interval=30,
            client_name=name,
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_pool_max,
        timeout=REDIS_SOCKET_TIMEOUT,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=2.0,
        # TCP keepalive notices a peer that vanished without closing (unix sockets have none).
        **({} if settings.redis_url.startswith("unix:") else {"socket_keepalive": True}),
        health_check_interval=30,
        client_name=name,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def cluster_client(urls: str, **options: Any) -> RedisCluster:
    """A client of the Redis Cluster whose nodes `urls` names (comma-separated; the first
    gives the credentials and options): it finds the rest from whichever answers. Naming
    several lets a process start while one of them is down."""
    first, *more = urls.split(",")
    seeds = [urlsplit(url.strip()) for url in more]
    nodes = [ClusterNode(seed.hostname or "localhost", seed.port or 6379) for seed in seeds]
    return RedisCluster.from_url(first.strip(), startup_nodes=nodes or None, **options)


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """The commands in Redis' protocol, by hiredis' packer: in C, it packs the worker's read
    of 64 wake streams in 15 us, against 41 in Python and 77 by redis-py's own packer.
    Arguments are bytes, str and numbers; anything else is a TypeError."""
    return b"".join(pack_command(c if isinstance(c, tuple) else tuple(c)) for c in commands)


async def round_trip(
    connection: AbstractConnection, commands: Sequence[Sequence[Any]]
) -> list[Any]:
    """Sends the commands in one write over a connection of the caller's own (`raw_connection`)
    and reads their answers, an error reply as its exception: no pool checkout and no
    pipeline object on the hot paths. REDIS_SOCKET_TIMEOUT bounds the whole round trip with
    one timer, where redis-py would arm one for each read and run each write in a task of
    its own with another: Redis's TimeoutError when it runs out. Connects if need be; after
    any failure the connection is closed (the next call opens it again) and the error
    raised."""
    try:
        async with asyncio.timeout(REDIS_SOCKET_TIMEOUT):
            await connection.send_packed_command(pack(commands))
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await connection.read_response())
                except ResponseError as e:  # this command's answer; the next ones follow
                    results.append(e)
    except TimeoutError as e:
        await connection.disconnect(nowait=True)
        raise RedisTimeoutError(f"no answer from Redis within {REDIS_SOCKET_TIMEOUT}s") from e
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    return results


def raw_connection(connection_class: Any, options: Mapping[str, Any]) -> AbstractConnection:
    """A connection for `round_trip`, with a client's options: without their socket timeout,
    which round_trip keeps for the whole round trip instead (nor the one a maintenance
    notice would put back at its end)."""
    unbounded = {"socket_timeout": None, "orig_socket_timeout": None}
    return connection_class(**{**options, **unbounded})  # type: ignore[no-any-return]


MAX_REDIRECTS = 5  # MOVED, ASK or TRYAGAIN answers one command may get within one call


def key_of(command: Sequence[Any]) -> Any:
    """The key that decides which node of a cluster a command goes to: the first key of a
    script, the first stream of an XREAD, else the first argument (a key or a channel)."""
    name = str(command[0]).upper()
    if name in ("EVAL", "EVALSHA"):
        return command[3]
    if name == "XREAD":
        return command[[str(a).upper() for a in command].index("STREAMS") + 1]
    return command[1]


class Direct:
    """Round trips of raw commands (`round_trip`) over one connection of the holder's own,
    for a single Redis."""

    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        self._connection = raw_connection(pool.connection_class, pool.connection_kwargs)

    async def round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        return await round_trip(self._connection, commands)

    async def close(self) -> None:
        await self._connection.disconnect()


class ClusterDirect:
    """Round trips of raw commands on a Redis Cluster: each node gets its commands, in order,
    in one write over a connection of the holder's own, all nodes at once. Commands are
    ordered within a node only: a caller that needs one command done before another on
    another node makes two calls. MOVED and ASK are followed (the slot map corrected on
    MOVED). A node that cannot be reached fails the call, as a lost connection does on a
    single Redis, once the slot map is read again, so that the caller's retry goes to the
    node that took its slots over."""

    def __init__(self, cluster: RedisCluster) -> None:
        self._cluster = cluster
        self._connections: dict[str, AbstractConnection] = {}

    async def round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        manager = self._cluster.nodes_manager
        if not manager.slots_cache:
            await self._cluster.initialize()
        results: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking: dict[int, ClusterNode] = {}
        for _ in range(MAX_REDIRECTS):
            by_node: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in todo:
                node = asking.get(i) or manager.get_node_from_slot(
                    key_slot(_encoded(key_of(commands[i])))
                )
                by_node.setdefault(node.name, (node, []))[1].append(i)
            sent = [
                self._send(node, [commands[i] for i in indexes], any(i in asking for i in indexes))
                for node, indexes in by_node.values()
            ]
            answers = await asyncio.gather(*sent, return_exceptions=True)
            failed = next((a for a in answers if isinstance(a, BaseException)), None)
            if failed is not None:
                if isinstance(failed, REDIS_ERRORS):
                    with contextlib.suppress(*REDIS_ERRORS):
                        await manager.initialize()
                raise failed
            todo, asking, retry_later = [], {}, False
            for (_, indexes), answer in zip(by_node.values(), answers, strict=True):
                assert isinstance(answer, list)
                for i, result in zip(indexes, answer, strict=True):
                    if isinstance(result, MovedError):
                        await manager.move_slot(result)
                        todo.append(i)
                    elif isinstance(result, AskError):
                        asking[i] = self._node(result.host, result.port)
                        todo.append(i)
                    elif isinstance(result, (TryAgainError, ClusterDownError)):
                        retry_later = True
                        todo.append(i)
                    else:
                        results[i] = result
            if not todo:
                return results
            if retry_later:
                await asyncio.sleep(0.05)
        for i in todo:
            results[i] = ClusterDownError(f"{commands[i][0]}: redirected too often")
        return results

    async def _send(
        self, node: ClusterNode, commands: list[Sequence[Any]], asking: bool
    ) -> list[Any]:
        connection = self._connections.get(node.name)
        if connection is None:
            connection = raw_connection(node.connection_class, node.connection_kwargs)
            self._connections[node.name] = connection
        if not asking:
            return await round_trip(connection, commands)
        # ASKING holds for the next command only: before each one, its answer dropped.
        asked = [c for command in commands for c in (("ASKING",), command)]
        return (await round_trip(connection, asked))[1::2]

    def _node(self, host: str, port: int) -> ClusterNode:
        manager = self._cluster.nodes_manager
        node = manager.get_node(host=host, port=port)
        if node is None:
            node = ClusterNode(host, port, **manager.connection_kwargs)
        return node

    async def close(self) -> None:
        connections, self._connections = self._connections, {}
        for connection in connections.values():
            await connection.disconnect()


DirectLine = Direct | ClusterDirect


def direct(redis: RedisClient) -> DirectLine:
    """Raw round trips of the caller's own on the client's Redis or Redis Cluster."""
    return ClusterDirect(redis) if isinstance(redis, RedisCluster) else Direct(redis)


def _encoded(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()


async def open_pg_pool(
    settings: Settings,
    *,
    max_size: int | None = None,
    server_settings: dict[str, str] | None = None,
    wait_at_most: float = 30,
) -> Any:
    """`wait_at_most` (seconds) bounds each statement and each new connection."""
    max_size = max_size or settings.pg_pool_max
    return await asyncpg.create_pool(
        settings.database_url,
        min_size=min(settings.pg_pool_min, max_size),
        max_size=max_size,
        command_timeout=wait_at_most,
        timeout=wait_at_most,
        server_settings=server_settings,
    )


def worker_pg_settings(settings: Settings, worker_id: str) -> dict[str, str]:
    """The session settings of a worker's PostgreSQL connections."""
    return {
        "application_name": worker_id,
        # The writer's connections live long and asyncpg prepares each statement once on
        # them; each is planned once, too (a generic plan): planning a batch's statement
        # anew takes longer than running it. A plan made while the tables are young and
        # tiny could read a whole table, and would go on doing so as the ledger grew.
        # Sequential scans are off, and every statement names its keys with `= any(...)`
        # (worker/sql.py), so that the plans are lookups by key whatever the statistics.
        "plan_cache_mode": "force_generic_plan",
        "enable_seqscan": "off",
        # A batch is one statement, but should a worker ever pause inside a transaction (a
        # stopped process, a frozen VM), it would hold rows the next owner needs after the
        # lease: PostgreSQL ends such a session.
        "idle_in_transaction_session_timeout": str(int(settings.worker_lease_ttl * 1000)),
    }
