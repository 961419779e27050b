"""The API's enqueuer: many requests to one Redis round trip, and supervised, so that a
failure of its own never leaves a request waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.app import create_app
from api.enqueue import Enqueuer
from shared import connections
from shared.codec import OperationRequest
from shared.errors import DependencyUnavailable
from shared.keys import KeySpace
from shared.queue import Queue
from shared.settings import Settings
from tests.conftest import AiohttpClient
from tests.helpers import eventually, operate


def call_for(settings: Settings) -> dict[str, Any]:
    wallet = str(uuid.uuid4())
    queue = Queue(KeySpace(settings.redis_key_prefix, settings.shard_count), cluster=False)
    deposit = OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", 1, "", 0)
    return {"enqueue": queue.enqueue(deposit, 10, 10)}


async def test_a_failing_enqueuer_fails_its_calls_with_503_and_starts_again(
    settings: Settings, redis: Redis
) -> None:
    breaks = 1

    class BreakingOnce(connections.Direct):
        async def round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
            nonlocal breaks
            if breaks:
                breaks -= 1
                raise RuntimeError("a bug in the enqueuer")
            return await super().round_trip(commands)

    enqueue = Enqueuer(redis, BreakingOnce(redis))
    running = asyncio.create_task(enqueue.run())
    try:
        async with asyncio.timeout(5):
            with pytest.raises(DependencyUnavailable):
                await enqueue(**call_for(settings))
            entry = await enqueue(**call_for(settings))
        assert isinstance(entry, bytes)  # queued: the stream entry's id
        assert enqueue.restarts == 1
        assert not running.done()
    finally:
        enqueue.close()
        await asyncio.wait_for(running, 5)


async def test_calls_waiting_behind_a_failed_round_trip_are_sent_after_the_restart(
    settings: Settings, redis: Redis
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    breaks = 1

    class StalledThenBroken(connections.Direct):
        async def round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
            nonlocal breaks
            if breaks:
                breaks -= 1
                started.set()
                await release.wait()
                raise RuntimeError("a bug in the enqueuer")
            return await super().round_trip(commands)

    enqueue = Enqueuer(redis, StalledThenBroken(redis))
    running = asyncio.create_task(enqueue.run())
    try:
        first = asyncio.create_task(enqueue(**call_for(settings)))
        async with asyncio.timeout(5):
            await started.wait()  # the first round trip is under way
            second = asyncio.create_task(enqueue(**call_for(settings)))
            release.set()
            with pytest.raises(DependencyUnavailable):
                await first
            assert isinstance(await second, bytes)
    finally:
        enqueue.close()
        await asyncio.wait_for(running, 5)


async def test_a_request_waits_no_longer_than_its_bound_when_redis_does_not_answer(
    aiohttp_client: AiohttpClient, settings: Settings, redis: Redis, worker: Any
) -> None:
    """Redis holds every write for 10 s: the request is answered 202 with its URL when its
    bound (REPLY_TIMEOUT) runs out while it is still being queued, not when Redis answers."""
    api = await aiohttp_client(create_app(dataclasses.replace(settings, reply_timeout=0.5)))
    r = await api.post("/api/v1/wallets")
    wallet = (await r.json())["id"]
    await redis.client_pause(10_000, all=False)  # writes only
    try:
        status, body, headers = await operate(api, wallet, "DEPOSIT", 1)
    finally:
        await redis.client_unpause()
    assert status == 202
    assert headers["Location"] == body["href"]

    async def applied() -> bool:
        r = await api.get(body["href"])
        return r.status == 200 and (await r.json())["status"] == "applied"

    # Queued after all, once Redis went on: the URL tells its outcome.
    await eventually(applied, what="the operation queued during the pause to be applied")


async def test_a_round_trip_redis_does_not_answer_fails_within_its_bound(
    settings: Settings, redis: Redis
) -> None:
    """Redis holds every write: a round trip ends at REDIS_SOCKET_TIMEOUT with Redis's own
    timeout error (what every caller takes for Redis unreachable), its connection closed;
    the next one, once Redis goes on, is sent on a new connection."""
    line = connections.direct(redis)
    key = f"{settings.redis_key_prefix}:bound"
    try:
        assert await line.round_trip([("SET", key, "a")]) == [b"OK"]
        await redis.client_pause(10_000, all=False)  # writes only
        started = asyncio.get_running_loop().time()
        try:
            with pytest.raises(RedisTimeoutError):
                await line.round_trip([("SET", key, "b")])
            taken = asyncio.get_running_loop().time() - started
        finally:
            await redis.client_unpause()
        assert connections.REDIS_SOCKET_TIMEOUT <= taken < connections.REDIS_SOCKET_TIMEOUT + 2
        assert await line.round_trip([("SET", key, "c"), ("GET", key)]) == [b"OK", b"c"]
    finally:
        await line.close()


def test_commands_go_out_in_the_redis_protocol() -> None:
    """What a round trip writes: text as UTF-8, bytes as they are (a message may hold CRLF),
    numbers in decimal; a value Redis has no form for is refused before anything is sent."""
    packed = connections.pack([("SET", "é", b"a\r\nb"), ["INCRBY", "n", -5]])
    assert packed == (
        b"*3\r\n$3\r\nSET\r\n$2\r\n\xc3\xa9\r\n$4\r\na\r\nb\r\n"
        b"*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$2\r\n-5\r\n"
    )
    for value in (None, True, ["a"], {"a": 1}):
        with pytest.raises(TypeError):
            connections.pack([("SET", "k", value)])
