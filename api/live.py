"""What the live view (GET /api/live, api/observe.py) remembers in an API process: its
operation answers per second with their latencies, and the shards' queue lengths sampled
when the view was asked for, each for the last WINDOW_SECONDS."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_SECONDS = 180
LATENCY_SAMPLES_PER_SECOND = 2000  # beyond it a second's percentiles come from a sample


@dataclass
class _Second:
    at: int
    count: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class LiveStats:
    """This process's operation answers, per second, for the last WINDOW_SECONDS."""

    seconds: deque[_Second] = field(default_factory=lambda: deque(maxlen=WINDOW_SECONDS))
    queued: deque[tuple[int, dict[str, int]]] = field(
        default_factory=lambda: deque(maxlen=WINDOW_SECONDS)
    )

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
