"""LatencyHistogram: power-of-two buckets with Prometheus `le` semantics."""

from __future__ import annotations

import time

import pytest

from agent.core import latency
from agent.core.latency import LatencyHistogram


def observe(hist: LatencyHistogram, d_ns: int, monkeypatch: pytest.MonkeyPatch) -> None:
    now = 10**12
    monkeypatch.setattr(latency.time, "monotonic_ns", lambda: now)
    hist.observe_since(now - d_ns)


def test_bounds_are_inclusive_upper_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    hist = LatencyHistogram()
    first = 2**latency.FIRST_SHIFT
    for d in (1, first, first + 1, 2 * first, 2 * first + 1, 10**12):
        observe(hist, d, monkeypatch)
    buckets, sum_s = hist.snapshot()
    counts = dict(buckets)
    assert counts[repr(first / 1e9)] == 2            # 1 ns and exactly 65,536 ns
    assert counts[repr(2 * first / 1e9)] == 4        # + 65,537 and 131,072
    assert counts[repr(4 * first / 1e9)] == 5        # + 131,073
    assert counts[repr(LatencyHistogram.bounds_s()[-1])] == 5
    assert counts["+Inf"] == 6                       # 1,000 s beyond the last bound
    assert sum_s == pytest.approx((1 + first + first + 1 + 2 * first + 2 * first + 1
                                   + 10**12) / 1e9)
    assert [b for b, _ in buckets][-1] == "+Inf"
    assert all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:], strict=False))


def test_a_timestamp_from_the_future_counts_in_the_first_bucket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hist = LatencyHistogram()
    observe(hist, -5, monkeypatch)
    buckets, _ = hist.snapshot()
    assert buckets[0][1] == 1


def test_real_clock_is_monotonic_ns() -> None:
    hist = LatencyHistogram()
    hist.observe_since(time.monotonic_ns() - 3_000_000)  # 3 ms ago
    counts = dict(hist.snapshot()[0])
    assert counts[repr(2**21 / 1e9)] == 0 and counts[repr(2**22 / 1e9)] == 1
