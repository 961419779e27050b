"""The one backoff rule every retry loop uses."""

from __future__ import annotations

import random

import pytest

from shared.backoff import backoff


def test_no_failure_means_no_wait() -> None:
    assert backoff(0, 0.1, 2.0) == 0.0


@pytest.mark.parametrize("failures", [1, 2, 3, 5, 8, 50, 10_000])
def test_a_wait_lies_between_half_its_ceiling_and_the_ceiling(failures: int) -> None:
    ceiling = min(2.0, 0.1 * 2 ** min(failures - 1, 10))
    assert backoff(failures, 0.1, 2.0, rand=lambda: 0.0) == pytest.approx(ceiling / 2)
    assert backoff(failures, 0.1, 2.0, rand=lambda: 1.0) == pytest.approx(ceiling)
    for _ in range(100):
        assert ceiling / 2 <= backoff(failures, 0.1, 2.0) <= ceiling


def test_the_ceiling_doubles_from_the_first_delay_up_to_the_most() -> None:
    ceilings = [backoff(n, 2.0, 60.0, rand=lambda: 1.0) for n in range(1, 9)]
    assert ceilings == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_waits_after_the_same_failures_are_spread() -> None:
    rng = random.Random(7)
    waits = [backoff(4, 0.1, 2.0, rand=rng.random) for _ in range(1000)]
    assert len(set(waits)) > 900
    # Spread over the whole upper half of the ceiling (0.8 s), not bunched at one end.
    assert min(waits) < 0.45
    assert max(waits) > 0.75
