"""What ``c:*`` (every libc function probed) costs a process it does NOT target, side by
side in one run: the same libc-heavy loop bare, with ``c:*`` attached for a pid target
(probe_scope "pids": the uprobes are placed in the target's address space only), and
with ``c:*`` placed in every process (probe_scope="host": every libc call on the host
takes the uprobe trap before the in-kernel filter drops it). Goal: pids <= 1.05x bare.
Also start and close times. Keep runs short on shared machines.

    .venv/bin/python bench/func_all_libc.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL = 1.05
ROUNDS = 7  # bare and pid-scoped runs alternate; the medians are compared
FAST_CALLS = 20_000  # json.dumps per run, bare and pid-scoped (~0.15 s bare)
SLOW_CALLS = 200  # host-wide: ~1000x slower per call, so far fewer calls


def workload(calls: int) -> list[str]:
    """A Python loop that calls libc (malloc, memcpy, ...) constantly; prints seconds
    per json.dumps."""
    return [sys.executable, "-c",
            "import json, time; t = time.monotonic(); "
            f"[json.dumps(list(range(100))) for _ in range({calls})]; "
            f"print((time.monotonic() - t) / {calls})"]


def per_call(calls: int) -> float:
    out = subprocess.run(workload(calls), capture_output=True, text=True, check=True).stdout
    return float(out)


def main() -> int:
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    import logging

    logging.disable(logging.WARNING)
    from agent.model.targets import TargetSet
    from tests.support.monitors import NullSink, loaded_monitor

    # The target: an idle process of our own (its calls are not what is measured).
    target = subprocess.Popen(["sleep", "600"])
    targets = TargetSet(pids=frozenset({target.pid}), follow_children=False)
    try:
        for latency in (False, True):
            bare: list[float] = []
            scoped: list[float] = []
            starts: list[float] = []
            for _ in range(ROUNDS):  # alternating: load changes on the machine hit both
                bare.append(per_call(FAST_CALLS))
                t0 = time.monotonic()
                with loaded_monitor("func", NullSink(), targets=targets, patterns=["c:*"],
                                    max_probes=20_000, latency=latency) as m:
                    starts.append(time.monotonic() - t0)
                    assert m.probe_scope == "pids", m.probe_scope
                    scoped.append(per_call(FAST_CALLS))
                    c = m.stats()["counts"]
            started = statistics.median(starts)
            # Attaching and detaching per process: 5 more pid targets, then back to one.
            extra = [subprocess.Popen(["sleep", "600"]) for _ in range(5)]
            with loaded_monitor("func", NullSink(), targets=targets, patterns=["c:*"],
                                max_probes=20_000, latency=latency) as m:
                t0 = time.monotonic()
                m.set_targets(TargetSet(pids=frozenset({target.pid, *(p.pid for p in extra)}),
                                        follow_children=False))
                attach5 = time.monotonic() - t0
                t0 = time.monotonic()
                m.set_targets(targets)
                while m.stats()["closing"]:  # closed on the monitor's closer thread
                    time.sleep(0.01)
                detach5 = time.monotonic() - t0
            for p in extra:
                p.kill()
                p.wait()
            t0 = time.monotonic()
            with loaded_monitor("func", NullSink(), targets=targets, patterns=["c:*"],
                                max_probes=20_000, latency=latency, probe_scope="host") as m:
                host_started = time.monotonic() - t0
                host = per_call(SLOW_CALLS)
                t1 = time.monotonic()
            host_closed = time.monotonic() - t1
            b, s = statistics.median(bare), statistics.median(scoped)
            print(f"c:* latency={str(latency).lower()}: {c['matched']} functions, "
                  f"{c['attached']} attached, {c['excluded']} left out, {c['refused']} refused")
            print(f"  untargeted loop, us per json.dumps: bare {b * 1e6:.2f} "
                  f"(min {min(bare) * 1e6:.2f}, max {max(bare) * 1e6:.2f}); "
                  f"pid target {s * 1e6:.2f} (min {min(scoped) * 1e6:.2f}, "
                  f"max {max(scoped) * 1e6:.2f}) = {s / b:.3f}x bare "
                  f"[goal <= {GOAL}x: {'met' if s / b <= GOAL else 'NOT met'}]; "
                  f"host-wide {host * 1e6:,.0f} = {host / b:,.0f}x bare")
            print(f"  start: pid target {started:.2f} s, host-wide {host_started:.2f} s; "
                  f"close host-wide {host_closed:.2f} s; 5 more target pids attached in "
                  f"{attach5 * 1e3:.0f} ms ({attach5 / 5 * 1e3:.0f} ms each), detached "
                  f"in {detach5 * 1e3:.0f} ms")
    finally:
        target.kill()
        target.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
