"""The limits on accounts: counters of attempts per window in Redis, shared by every API
process, and the bound on password hashing in each process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

from shared import errors
from shared.connections import REDIS_ERRORS, RedisClient

# KEYS: the counter. ARGV: the window in ms, the limit. Counts one attempt, unless that
# would pass the limit; returns {1 if counted, ms left in the window}. (Counted before the
# attempt is judged, so concurrent attempts cannot all slip under the limit.)
COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local left = redis.call('PTTL', KEYS[1])
if n > tonumber(ARGV[2]) then
  redis.call('DECR', KEYS[1])
  return {0, left}
end
return {1, left}
"""
# KEYS: a counter. Takes back one attempt; a window that has ended is left alone.
UNCOUNT = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('DECR', KEYS[1]) end
return 0
"""


async def count(
    redis: RedisClient, limits: Sequence[tuple[str, int]], window: float, refusal: str
) -> list[str]:
    """Counts one attempt on each (key, limit), or on none: past any limit, TooManyAttempts
    with the seconds until that window ends. Returns the keys counted, for uncount()."""
    window_ms = int(window * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for key, limit in limits:
            pipe.eval(COUNT, 1, key, window_ms, limit)
        answers = await pipe.execute()
    counted = [key for (key, _), (ok, _) in zip(limits, answers, strict=True) if ok]
    refused = [int(left) for ok, left in answers if not ok]
    if refused:
        await uncount(redis, counted)
        raise errors.TooManyAttempts(refusal, retry_after=max(1, -(-max(refused) // 1000)))
    return counted


async def uncount(redis: RedisClient, keys: Sequence[str]) -> None:
    """Takes back an attempt that does not count (it succeeded, or was never judged). If
    Redis fails here, the attempt stays counted until its window ends."""
    with contextlib.suppress(*REDIS_ERRORS):
        async with redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.eval(UNCOUNT, 1, key)
            await pipe.execute()


class Slots:
    """At most `size` holders at once, and at most `waiting` more in line for a slot; one
    more is refused at once with Busy (a 503), instead of waiting behind a queue that only
    grows."""

    def __init__(self, size: int, waiting: int) -> None:
        self._free = asyncio.Semaphore(size)
        self._room = size + waiting
        self.held_or_waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.held_or_waiting >= self._room:
            raise errors.Busy("Too many passwords are being checked; try again in a moment")
        self.held_or_waiting += 1
        try:
            async with self._free:
                yield
        finally:
            self.held_or_waiting -= 1
