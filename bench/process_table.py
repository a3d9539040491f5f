"""The process table's memory: bytes per 10,000 processes, as the table holds them.

    .venv/bin/python bench/process_table.py [--processes 10000] [--argv-bytes 1024]

Fills a ProcessTable (agent/processes/table.py) with N processes shaped like real ones:
the processes running on this machine now, read from /proc as the tracker's seed reads
them (comm, exe, argv up to processes.argv_bytes, cgroup and its workload), repeated
with new pids and start times until there are N; then N more exits so that half the
entries carry exit fields. Memory is what tracemalloc sees allocated by the table's
entries and indexes (the seed's /proc reads are made before the measurement starts).
No kernel needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.kernel.cgroups import default_resolver  # noqa: E402
from agent.kernel.identity import local_identity  # noqa: E402
from agent.model.workload import workload_of  # noqa: E402
from agent.processes import procscan  # noqa: E402
from agent.processes.process import Process, StartClock  # noqa: E402
from agent.processes.table import ProcessTable  # noqa: E402


def templates(argv_bytes: int) -> list[Process]:
    ident, clock = local_identity(), StartClock.local()
    resolver = default_resolver()

    def cgroup_of(path: str) -> tuple[int | None, object]:
        w = workload_of(path)
        return (resolver.cgroups.id_of(path) if resolver.cgroups else None), w

    return list(procscan.scan(ident, clock, argv_bytes, cgroup_of))  # type: ignore[arg-type]


def measure(n: int, argv_bytes: int, exited: bool) -> tuple[int, float, int]:
    """(bytes allocated, seconds to fill, mean argv bytes) for ``n`` processes."""
    shapes = templates(argv_bytes)
    clock = StartClock.local()
    boot = local_identity().boot
    # Strings and lists copied per entry, as records decode them (nothing shared).
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    table = ProcessTable(n, n, 3600.0)
    for i in range(n):
        s = shapes[i % len(shapes)]
        pid, ticks = 1_000_000 + i, 5_000_000 + i
        p = dataclasses.replace(
            s, process_id=f"{boot}-{ticks}-{pid}", pid=pid, start_ticks=ticks,
            parent_process_id=f"{boot}-{ticks - 1}-{pid - 1}",
            comm="".join(s.comm or ""), exe="".join(s.exe) if s.exe else None,
            argv=["".join(a) for a in s.argv or []], start_time=clock.iso(ticks))
        table.forked(p)
        if exited and i % 2:
            table.exited(p, "2026-12-03T00:00:00.000000000Z", 0, None, None)
    elapsed = time.perf_counter() - t0
    gc.collect()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(table) == n
    mean_argv = sum(len("\0".join(s.argv or [])) for s in shapes) // max(len(shapes), 1)
    return size, elapsed, mean_argv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=10_000)
    ap.add_argument("--argv-bytes", type=int, default=1024)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, {os.uname().release}, "
          f"{len(templates(args.argv_bytes))} /proc shapes")
    for exited in (False, True):
        size, elapsed, mean_argv = measure(args.processes, args.argv_bytes, exited)
        label = "half exited" if exited else "all live"
        print(f"{args.processes} processes ({label}, mean argv {mean_argv} B): "
              f"{size / 1024 / 1024:.2f} MiB = {size / args.processes:.0f} B/process, "
              f"{size * 10_000 / args.processes / 1024 / 1024:.2f} MiB per 10,000; "
              f"filled in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
