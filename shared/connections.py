"""Opening the PostgreSQL pool and the Redis client, the same way for API, worker and tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

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


REDIS_SOCKET_TIMEOUT = 5.0  # longer than any blocking command we send (XREAD waits 0.25 s)


def open_redis(
    settings: Settings, *, max_connections: int | None = None, name: str | None = None
) -> Redis:
    """`name` (CLIENT SETNAME) tells an operator's CLIENT LIST whose connection is whose."""
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


def pack(commands: Sequence[Sequence[Any]]) -> bytes:
    """The commands in Redis' protocol. redis-py's packer took 77 us for the worker's read
    of 64 wake streams, this one 21 us; the hot paths send only bytes, str and int."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):
                arg = b"%d" % arg
            elif not isinstance(arg, bytes):
                raise TypeError(f"cannot send {type(arg).__name__} {arg!r} to Redis")
            out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


async def round_trip(
    connection: AbstractConnection, commands: Sequence[Sequence[Any]]
) -> list[Any]:
    """Sends the commands in one write over a connection of the caller's own and reads their
    answers, an error reply as its exception: no pool checkout and no pipeline object, whose
    cost showed in the profiles of the hot paths. Connects if need be; after any other
    failure the connection is closed (the next call opens it again) and the error raised."""
    try:
        await connection.send_packed_command(pack(commands))
        results: list[Any] = []
        for _ in commands:
            try:
                results.append(await connection.read_response())
            except ResponseError as e:  # this command's answer; the next ones follow
                results.append(e)
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    return results


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
        # them; each is planned once, too (a generic plan). Planning a batch's statement
        # anew took longer than running it: 20 operations on one wallet, 2.3-2.8 ms a round
        # trip planned every time, 1.5 ms with the plan kept. A plan made while the tables
        # are young and tiny could read a whole table, and would go on doing so as the
        # ledger grew (it did once: latency grew by the second). Sequential scans are off,
        # and every statement names its keys with `= any(...)` (worker/apply.py), so that
        # the plans are lookups by key whatever the statistics were.
        "plan_cache_mode": "force_generic_plan",
        "enable_seqscan": "off",
        # A batch is one statement, but should a worker ever pause inside a transaction (a
        # stopped process, a frozen VM), it would hold rows the next owner needs after the
        # lease: PostgreSQL ends such a session.
        "idle_in_transaction_session_timeout": str(int(settings.worker_lease_ttl * 1000)),
    }
