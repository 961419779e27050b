"""The API process's one reply channel: workers publish outcomes there after COMMIT, and the
listener hands each to the request waiting for it.

Pub/sub keeps nothing for a subscriber that is away: a reply published while the channel
is being subscribed again is gone. Its operation was committed before the reply went, so
once the subscription is back (confirmed by Redis), each request still waiting is told
that its reply may have been missed (RepliesMissed), and looks in the ledger."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.backoff import backoff
from shared.codec import MessageError, Outcome, decode_outcomes

log = logging.getLogger("api.replies")

RETRY_DELAY_MAX = 2.0
LISTEN_WAIT = 0.2  # seconds one read waits, and so how soon close() is seen


class RepliesMissed(Exception):
    """The reply channel was lost while this reply was awaited: it may have come and gone.
    What the ledger holds now answers; if it holds nothing, the reply is still to come."""


class ReplyListener:
    def __init__(self, redis: Redis, channel: str) -> None:
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
        while not self.closing.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while not self.closing.is_set():
                    message = await pubsub.get_message(timeout=LISTEN_WAIT)
                    if message is None:
                        continue
                    if message["type"] == "message":
                        self.dispatch(message["data"])
                    elif message["type"] == "subscribe":  # from here on no reply is missed
                        self._missed_while_away()
                        self.subscribed.set()
                        self.first_attempt_done.set()
                        failures = 0
            except (RedisError, OSError) as e:
                failures += 1
                log.warning("reply channel lost (%s); subscribing again", e)
            finally:
                self.subscribed.clear()
                self.first_attempt_done.set()
                with contextlib.suppress(RedisError, OSError):
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
