"""How long stopping a monitor takes while an event flood runs, per transport.

A getppid(2) loop (bench/getppid_loop.c) is the target of the syscall monitor with
slow_threshold_us=0: one event per call, more than the agent can consume. Each
repetition starts the monitor through the MonitorManager, lets the flood run, and times
stop_monitor(); it also prints the delivery rate the manager reports (computed on its
control thread). Needs root. Prints a markdown table; no assertion.

    .venv/bin/python bench/flood_stop.py [--reps 5] [--flood-s 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from agent.core.manager import MonitorManager
    from agent.kernel.capabilities import build_report
    from agent.model.targets import TargetSet
    from agent.monitors.contract import TransportSettings
    from agent.monitors.registry import discover_monitors
    from tests.support.kernel import compile_c

    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--flood-s", type=float, default=3.0)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp())
    source = (REPO / "bench" / "getppid_loop.c").read_text()
    binary = compile_c(tmp, "getppid_loop", source, "-O2")
    loop = subprocess.Popen([str(binary), str(10**12)])
    reg = discover_monitors()
    report = build_report(reg)
    print("| transport | stop (median, max) | events/s while flooded | kernel drops/s |")
    print("|---|---|---|---|")
    try:
        for kind in ("ringbuf", "perf"):
            mgr = MonitorManager(reg, report, targets=TargetSet(pids=frozenset({loop.pid})),
                                 transport=TransportSettings(kind=kind))
            stops, rates, drops = [], [], []
            try:
                for _ in range(args.reps):
                    mgr.start_monitor("syscall", {"slow_threshold_us": 0})
                    time.sleep(args.flood_s)
                    stats = mgr.monitor_stats("syscall")
                    rates.append(stats["events_per_second"])
                    drops.append(stats["events_dropped_kernel"] / stats["uptime_s"])
                    t0 = time.monotonic()
                    mgr.stop_monitor("syscall")
                    stops.append(time.monotonic() - t0)
            finally:
                mgr.shutdown()
            print(f"| {kind} | {statistics.median(stops) * 1000:.0f} ms, "
                  f"{max(stops) * 1000:.0f} ms | {statistics.median(rates):,.0f} | "
                  f"{statistics.median(drops):,.0f} |")
    finally:
        loop.kill()
        loop.wait()


if __name__ == "__main__":
    main()
