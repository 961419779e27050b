"""The requests' shared bound (api/deadlines.py): cut off as asyncio.timeout would cut them,
and nothing cut off once its bound is left."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from api.deadlines import TICK, Deadlines

SECONDS = 0.2


@contextlib.asynccontextmanager
async def kept() -> AsyncIterator[Deadlines]:
    deadlines = Deadlines(SECONDS)
    keeping = asyncio.create_task(deadlines.run())
    try:
        yield deadlines
    finally:
        deadlines.close()
        await keeping


async def test_a_wait_past_its_bound_is_cut_off_as_a_timeout() -> None:
    async with kept() as deadlines:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with deadlines.bound():
                await asyncio.Event().wait()
        assert SECONDS <= loop.time() - started < SECONDS + 10 * TICK


async def test_a_task_that_left_its_bound_is_not_cut_off_later() -> None:
    """The connection's task serves the next request after this one: a bound already left
    must never cancel it."""
    async with kept() as deadlines:
        async with deadlines.bound():
            pass
        async with deadlines.bound():
            await asyncio.sleep(SECONDS / 2)
        # Past both deadlines, with the keeper's ticks in between.
        await asyncio.sleep(SECONDS + 4 * TICK)
        assert not deadlines.queue


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async with kept() as deadlines:

        async def waits() -> None:
            async with deadlines.bound():
                await asyncio.Event().wait()

        waiting = asyncio.create_task(waits())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
