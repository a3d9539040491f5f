"""What the event delivery latency histogram costs per event on the poller thread.

Times MonitorSink.publish (the poller's per-event call) with a no-op hub, with and
without the histogram, on events shaped like exec events, and LatencyHistogram alone.

    .venv/bin/python bench/latency_histogram.py
"""

from __future__ import annotations

import time

from agent.core.latency import LatencyHistogram
from agent.core.manager import LATENCY_SAMPLE_ABOVE_RATE, LATENCY_SAMPLE_FAST, MonitorSink

N = 2_000_000


def per_call_ns(fn, arg, n: int = N) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn(arg)
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def main() -> None:
    event = {"monitor": "exec", "ts_ns": time.monotonic_ns(), "pid": 1, "comm": "sh"}
    hist = LatencyHistogram()
    observe = per_call_ns(hist.observe_since, event["ts_ns"])
    print(f"LatencyHistogram.observe_since: {observe:.0f} ns")

    def noop(_: object) -> None:
        pass

    with_hist = MonitorSink(noop)
    without = MonitorSink(noop)
    without.latency = None
    sampled = MonitorSink(noop)
    sampled.sample_mask = LATENCY_SAMPLE_FAST - 1
    a = per_call_ns(without.publish, event)
    b = per_call_ns(with_hist.publish, event)
    c = per_call_ns(sampled.publish, event)
    print(f"MonitorSink.publish without histogram:        {a:.0f} ns/event")
    print(f"MonitorSink.publish, every event observed:    {b:.0f} ns/event (+{b - a:.0f} ns)")
    print(f"MonitorSink.publish, 1 in {LATENCY_SAMPLE_FAST} observed "
          f"(> {LATENCY_SAMPLE_ABOVE_RATE}/s): {c:.0f} ns/event (+{c - a:.0f} ns)")


if __name__ == "__main__":
    main()
