"""How long to wait before the next try, after failures in a row: one rule for every retry
loop of the service."""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff(
    failures: int, first: float, most: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait after `failures` failures in a row (none: 0): the ceiling doubles
    from `first` after the first failure up to `most`, and the wait is drawn between half
    the ceiling and the ceiling ("equal jitter"). The half kept keeps a failing dependency
    from being retried at once; the half drawn keeps the processes that lost it together
    from coming back in step. `rand` draws from [0, 1)."""
    if failures < 1:
        return 0.0
    # 2.0 ** 1023 is the largest power of two a float holds; far past `most` anyway.
    ceiling = min(most, first * 2.0 ** min(failures - 1, 1023))
    return ceiling / 2 * (1 + rand())
