"""How long each monitor takes to start: load() = compile (BCC/clang) + load + attach, and
close(); medians of a few runs. No assertion: it prints a table.

    .venv/bin/python bench/startup.py [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("exec (defaults)", "exec", {}),
    ("syscall (defaults: latency + histogram)", "syscall", {}),
    ("syscall, latency off", "syscall", {"latency": False}),
    ("func c:getpid", "func", {"patterns": ["c:getpid"]}),
    ("func c:pthread_*, c:mem*, c:str* (~220 functions)", "func",
     {"patterns": ["c:pthread_*", "c:mem*", "c:str*"]}),
]


class NullSink:
    def publish(self, event: dict) -> None:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    import logging

    logging.disable(logging.WARNING)  # func's "skipping pthread_spin_lock" lines
    from agent.kernel.btf import kernel_offsets
    from agent.model.targets import TargetSet
    from agent.monitors.contract import MonitorContext
    from agent.monitors.registry import discover_monitors

    registry = discover_monitors()
    offsets = kernel_offsets()
    rows = []
    for label, name, options in CASES:
        starts, closes, functions = [], [], 0
        for _ in range(args.reps):
            cls = registry.get(name)
            ctx = MonitorContext(targets=TargetSet(pids=frozenset({os.getpid()})),
                                 sink=NullSink(), kernel_offsets=offsets)
            m = cls(cls.Options(**options), ctx)
            t0 = time.monotonic()
            m.load()
            starts.append(time.monotonic() - t0)
            functions = len(getattr(m, "probes", ()))
            t0 = time.monotonic()
            m.close()
            closes.append(time.monotonic() - t0)
        rows.append((label, functions, starts, closes))
    print(f"medians of {args.reps} starts (min-max)\n")
    print("| monitor | functions | start s (compile+load+attach) | close s |")
    print("|---|---:|---:|---:|")
    for label, functions, starts, closes in rows:
        print(f"| {label} | {functions or '-'} | {statistics.median(starts):.2f} "
              f"({min(starts):.2f}-{max(starts):.2f}) | {statistics.median(closes):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
