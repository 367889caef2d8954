"""The service's pace toward Toss stays under a per-minute limit counted over any sliding minute,
as Toss (and the sandbox) count it."""

from __future__ import annotations

import pytest

from service.workers import paced_limiter


@pytest.mark.parametrize(
    ("per_minute", "concurrency"), [(100, 16), (15_000, 32), (6_000, 8), (20, 64), (1, 1)]
)
def test_no_sliding_minute_can_hold_more_than_the_limit(per_minute: int, concurrency: int) -> None:
    limiter = paced_limiter(per_minute, concurrency)
    burst = limiter.max_rate
    steady_per_minute = burst / limiter.time_period * 60
    # A full bucket at the start of a minute, then the leak for the rest of it.
    assert burst + steady_per_minute <= max(per_minute, 2)
    assert burst <= concurrency


def test_the_steady_pace_is_close_to_the_limit() -> None:
    limiter = paced_limiter(15_000, 32)
    assert limiter.max_rate / limiter.time_period * 60 >= 0.99 * 15_000
