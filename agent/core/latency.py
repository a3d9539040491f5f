"""Event delivery latency: kernel timestamp (``ts_ns``, CLOCK_MONOTONIC, the clock of
bpf_ktime_get_ns) to the moment the poller hands the event to the stream hub and outputs.

Observed on the poller thread for every event, so it must cost almost nothing: buckets
are powers of two of nanoseconds, and the bucket index is an ``int.bit_length()`` instead
of a search (bench/latency_histogram.py measures the cost per event). One poller thread
writes a histogram; a scrape reads it without a lock: a scrape may see an observation in
``counts`` but not yet in ``sum_ns``, never a non-cumulative or inconsistent bucket set,
because the cumulative buckets and the count are both derived from the same ``counts``.
"""

from __future__ import annotations

import time

# Bucket k holds latencies <= 2**(FIRST_SHIFT + k) ns: 65.5 us, 131 us, ... 34.4 s, then +Inf.
FIRST_SHIFT = 16
BUCKETS = 20


class LatencyHistogram:
    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (BUCKETS + 1)  # the last one is +Inf
        self.sum_ns = 0

    def observe_since(self, ts_ns: int) -> None:
        """Record now - ``ts_ns`` (both CLOCK_MONOTONIC nanoseconds)."""
        d = time.monotonic_ns() - ts_ns
        if d < 1:
            d = 1
        # (d - 1) >> FIRST_SHIFT has bit_length k exactly when d <= 2**(FIRST_SHIFT + k).
        k = ((d - 1) >> FIRST_SHIFT).bit_length()
        self.counts[k if k < BUCKETS else BUCKETS] += 1
        self.sum_ns += d

    @staticmethod
    def bounds_s() -> list[float]:
        return [2 ** (FIRST_SHIFT + k) / 1e9 for k in range(BUCKETS)]

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf`` (the total), and the sum
        in seconds: what prometheus_client's HistogramMetricFamily takes."""
        counts = list(self.counts)  # one copy: the buckets below agree with each other
        buckets, total = [], 0
        for bound, n in zip([*map(repr, self.bounds_s()), "+Inf"], counts, strict=True):
            total += n
            buckets.append((bound, total))
        return buckets, self.sum_ns / 1e9
