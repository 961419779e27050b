"""The API process's one reply channel: workers publish outcomes there after COMMIT, and the
listener hands each to the request waiting for it.

Pub/sub keeps nothing for a subscriber that is away: a reply published while the channel
is being subscribed again is gone. Its operation was committed before the reply went, so
once the subscription is back (confirmed by Redis), each request still waiting is told
that its reply may have been missed (RepliesMissed), and looks in the ledger.

On a Redis Cluster the channel is a shard channel (SSUBSCRIBE; workers SPUBLISH), served
by the one node that owns its slot rather than copied to every node. When the slot moves
(a failover, a reshard) the subscription follows it, and the waiting requests are told as
after a lost connection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import Any

from redis.asyncio import RedisCluster

from shared.backoff import backoff
from shared.codec import MessageError, Outcome, decode_outcomes
from shared.connections import REDIS_ERRORS, RedisClient

log = logging.getLogger("api.replies")

RETRY_DELAY_MAX = 2.0
LISTEN_WAIT = 0.2  # seconds one read waits, and so how soon close() is seen


class RepliesMissed(Exception):
    """The reply channel was lost while this reply was awaited: it may have come and gone.
    What the ledger holds now answers; if it holds nothing, the reply is still to come."""


class ReplyListener:
    def __init__(self, redis: RedisClient, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self.subscribed = asyncio.Event()
        self.first_attempt_done = asyncio.Event()
        self.closing = asyncio.Event()
        self._waiting: dict[int, asyncio.Future[Outcome]] = {}
        self._tags = itertools.count(1)

    def expect(self) -> tuple[int, asyncio.Future[Outcome]]:
        """A tag to send with the operation, and the future its outcome will resolve."""
        tag = next(self._tags)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[tag] = future
        return tag, future

    def expect_again(self, tag: int) -> asyncio.Future[Outcome]:
        """A new future for a tag whose reply may have been missed."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[tag] = future
        return future

    def forget(self, tag: int) -> None:
        self._waiting.pop(tag, None)

    def dispatch(self, data: bytes) -> None:
        try:
            outcomes = decode_outcomes(data)
        except MessageError as e:
            log.error("ignoring a reply: %s", e)
            return
        for outcome in outcomes:
            future = self._waiting.pop(outcome.tag, None)
            if future is not None and not future.done():
                future.set_result(outcome)

    async def run(self) -> None:
        """Listens until close(), subscribing again after a lost connection."""
        failures = 0
        moved = False
        while not self.closing.is_set():
            pubsub: Any = self.redis.pubsub()
            try:
                if isinstance(self.redis, RedisCluster):
                    # The client's slot map, read anew after a failure or a move (a pubsub
                    # needs one to exist: redis-py issue 4296).
                    if failures or moved:
                        await self.redis.nodes_manager.initialize()
                    await self.redis.initialize()
                    moved = False
                    await pubsub.ssubscribe(self.channel)
                    read = pubsub.get_sharded_message
                else:
                    await pubsub.subscribe(self.channel)
                    read = pubsub.get_message
                while not self.closing.is_set():
                    message = await read(timeout=LISTEN_WAIT)
                    if message is None:
                        continue
                    kind = message["type"]
                    if kind in ("message", "smessage"):
                        self.dispatch(message["data"])
                    elif kind in ("subscribe", "ssubscribe"):  # from here on none is missed
                        self._missed_while_away()
                        self.subscribed.set()
                        self.first_attempt_done.set()
                        failures = 0
                    elif kind == "sunsubscribe":  # its slot moved: subscribe where it went
                        moved = True
                        break
            except REDIS_ERRORS as e:
                failures += 1
                log.warning("reply channel lost (%s); subscribing again", e)
            finally:
                self.subscribed.clear()
                self.first_attempt_done.set()
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()
            if failures:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.closing.wait(), backoff(failures, 0.1, RETRY_DELAY_MAX)
                    )

    def _missed_while_away(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(RepliesMissed())

    def close(self) -> None:
        self.closing.set()
