"""What the event delivery latency histogram costs per event on the poller thread.

Times MonitorSink.publish (the poller's per-event call: count, latency, encode once,
offer) with one consumer that does nothing: without the
histogram, observing every event, and observing one in LATENCY_SAMPLE_FAST (what the
poller switches to above LATENCY_SAMPLE_ABOVE_RATE events/s); and LatencyHistogram
alone. The variants run interleaved, round after round, and each keeps its best round,
so a noisy shared machine disturbs them alike.

    .venv/bin/python bench/latency_histogram.py
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.core.latency import LatencyHistogram
from agent.core.manager import LATENCY_SAMPLE_ABOVE_RATE, LATENCY_SAMPLE_FAST
from agent.core.pipeline import MonitorSink
from agent.model.events import Event

N = 1_000_000
ROUNDS = 9


class NoopConsumer:
    def offer(self, event: Event, data: bytes) -> None:
        pass


def one_round(fn: Callable[[Any], None], arg: Any) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(N):
        fn(arg)
    return (time.perf_counter_ns() - t0) / N


def main() -> None:
    event = {"monitor": "exec", "ts_ns": time.monotonic_ns(), "pid": 1, "comm": "sh"}

    noop = [NoopConsumer()]
    without = MonitorSink(consumers=noop)
    without.sample_mask = (1 << 62) - 1  # never observes
    every = MonitorSink(consumers=noop)
    sampled = MonitorSink(consumers=noop)
    sampled.sample_mask = LATENCY_SAMPLE_FAST - 1
    hist = LatencyHistogram()
    variants: dict[str, tuple[Callable[[Any], None], Any]] = {
        "observe_since": (hist.observe_since, event["ts_ns"]),
        "without": (without.publish, event),
        "every": (every.publish, event),
        "sampled": (sampled.publish, event),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for name, (fn, arg) in variants.items():
            best[name] = min(best[name], one_round(fn, arg))
    a, b, c = best["without"], best["every"], best["sampled"]
    print(f"{N:,} calls x {ROUNDS} interleaved rounds, best round each")
    print(f"LatencyHistogram.observe_since:               {best['observe_since']:.0f} ns")
    print(f"MonitorSink.publish without histogram:        {a:.0f} ns/event")
    print(f"MonitorSink.publish, every event observed:    {b:.0f} ns/event (+{b - a:.0f} ns)")
    print(f"MonitorSink.publish, 1 in {LATENCY_SAMPLE_FAST} observed "
          f"(> {LATENCY_SAMPLE_ABOVE_RATE}/s): {c:.0f} ns/event (+{c - a:.0f} ns)")


if __name__ == "__main__":
    main()
