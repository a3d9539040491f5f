"""What ``c:*`` (every libc function probed) costs: start and close time, and how much
slower an UNTARGETED process runs while it is attached. Uprobes are attached for every
process (the target filter runs in the BPF program, after the trap), so every libc call
on the host pays a uprobe hit while the monitor runs. Keep runs short on shared machines.

    .venv/bin/python bench/func_all_libc.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# A Python loop that calls libc (malloc, memcpy, ...) constantly: 2,000 json.dumps.
WORKLOAD = [sys.executable, "-c",
            "import json, time; t = time.monotonic(); "
            "[json.dumps(list(range(100))) for _ in range(2000)]; "
            "print(time.monotonic() - t)"]


def workload_seconds() -> float:
    out = subprocess.run(WORKLOAD, capture_output=True, text=True, check=True).stdout
    return float(out)


def main() -> int:
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    import logging

    logging.disable(logging.WARNING)
    from agent.model.targets import TargetSet
    from tests.support.monitors import NullSink, loaded_monitor

    bare = workload_seconds()
    for latency in (False, True):
        t0 = time.monotonic()
        with loaded_monitor("func", NullSink(),
                            targets=TargetSet(pids=frozenset({1}), follow_children=False),
                            patterns=["c:*"], max_probes=20_000, latency=latency) as m:
            started = time.monotonic() - t0
            probed = workload_seconds()
            c = m.stats()["counts"]
            t1 = time.monotonic()
        closed = time.monotonic() - t1
        print(f"c:* latency={latency}: {c['matched']} functions, {c['attached']} attached, "
              f"{c['excluded']} left out, {c['refused']} refused; start {started:.2f} s, "
              f"close {closed:.2f} s; untargeted workload {probed:.3f} s vs {bare:.3f} s "
              f"bare ({probed / bare:,.0f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
