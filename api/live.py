"""What the live view (GET /api/live, api/observe.py) remembers in an API process: its
operation answers per second with their latencies, the shards' queue lengths sampled
when the view was computed, each for the last WINDOW_SECONDS, and the view itself, computed
at most once a second however many ask (it reads a Redis key per second of the window and
one per shard)."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from api.bodies import Live

T = TypeVar("T")

WINDOW_SECONDS = 180
LATENCY_SAMPLES_PER_SECOND = 2000  # beyond it a second's percentiles come from a sample


@dataclass
class _Second:
    at: int
    count: int = 0
    latencies: list[float] = field(default_factory=list)


class Recent(Generic[T]):
    """One computation at a time, shared by every caller that comes while it runs, and its
    result reused for `fresh_for` seconds after that computation started. A failure is not
    kept: the next caller tries again."""

    def __init__(self, fresh_for: float) -> None:
        self.fresh_for = fresh_for
        self._last: tuple[float, T] | None = None
        self._running: asyncio.Task[T] | None = None

    async def get(self, compute: Callable[[], Coroutine[Any, Any, T]]) -> T:
        if self._last is not None and time.monotonic() - self._last[0] < self.fresh_for:
            return self._last[1]
        if self._running is None:
            self._running = asyncio.create_task(self._run(compute))
            # Read, so that a failure nobody waits for any more is not reported as lost.
            self._running.add_done_callback(lambda t: t.cancelled() or t.exception())
        # A caller that goes away does not cancel the others' computation.
        return await asyncio.shield(self._running)

    async def _run(self, compute: Callable[[], Coroutine[Any, Any, T]]) -> T:
        started = time.monotonic()
        try:
            result = await compute()
        finally:
            self._running = None
        self._last = (started, result)
        return result


@dataclass
class LiveStats:
    """This process's operation answers, per second, for the last WINDOW_SECONDS."""

    seconds: deque[_Second] = field(default_factory=lambda: deque(maxlen=WINDOW_SECONDS))
    queued: deque[tuple[int, dict[str, int]]] = field(
        default_factory=lambda: deque(maxlen=WINDOW_SECONDS)
    )
    view: Recent[Live] = field(default_factory=lambda: Recent(1.0))

    def record(self, seconds_taken: float, now: float | None = None) -> None:
        at = int(now if now is not None else time.time())
        if not self.seconds or self.seconds[-1].at != at:
            self.seconds.append(_Second(at))
        second = self.seconds[-1]
        second.count += 1
        if len(second.latencies) < LATENCY_SAMPLES_PER_SECOND:
            second.latencies.append(seconds_taken)


def percentile_ms(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)] * 1000, 2)
