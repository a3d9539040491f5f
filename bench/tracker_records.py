"""The process tracker's CPU per record: fork, exec and exit records of short-lived
processes replayed through ProcessTracker's record handler into a ProcessTable with the
configured bounds (the exited entries reach processes.exited_keep and are trimmed, as in
an exec storm). No kernel needed: the records are packed as tracker.h lays them out.

    .venv/bin/python bench/tracker_records.py [--processes 20000] [--rounds 5]

Prints the thread CPU per record (best and median of the rounds). The kernel-side and
wake-up costs are bench/exec_storm.py's (configurations ``agent ringbuf-serve`` and
``agent ringbuf-serve-notracker``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import DEFAULT_CONFIG, load_settings  # noqa: E402
from agent.kernel.cgroups import CgroupError, Cgroups, default_resolver  # noqa: E402
from agent.kernel.identity import local_identity  # noqa: E402
from agent.monitors.registry import discover_monitors  # noqa: E402
from agent.processes import tracker as tracker_module  # noqa: E402
from agent.processes.procscan import cgroup_v2_path  # noqa: E402
from agent.processes.records import FILENAME_SIZE, PROC_EXEC, PROC_EXIT, PROC_FORK  # noqa: E402
from agent.processes.table import ProcessTable  # noqa: E402

PROGRAM = b"/usr/local/bin/noop"
ARGS = b"/usr/local/bin/noop\0exec-storm\0" + b"12345\0"


def records(n: int, cgroup_id: int) -> list[bytes]:
    """fork, exec and exit of n processes, children of one parent (pid 100)."""
    head = tracker_module.HEAD
    body = PROGRAM.ljust(FILENAME_SIZE, b"\0") + ARGS
    out = []
    for i in range(n):
        pid, start = 200_000 + i, 10**12 + i * 10**7
        for kind in (PROC_FORK, PROC_EXEC, PROC_EXIT):
            args = len(ARGS) if kind == PROC_EXEC else 0
            raw = head.pack(start + 1000, start, 5_000_000, cgroup_id, kind, pid, 100, 0, 0,
                            0, 0, args, b"noop")
            out.append(raw + body if kind == PROC_EXEC else raw)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    settings = load_settings(DEFAULT_CONFIG, {}, discover_monitors()).processes
    try:  # this process's own cgroup, as the tracker's seed reads a process's
        with open("/proc/self/cgroup", "rb") as f:
            path = cgroup_v2_path(f.read())
        cgroup_id = Cgroups().id_of(path) if path is not None else 1
    except (CgroupError, OSError):
        cgroup_id = 1
    recs = records(args.processes, cgroup_id)
    per_record = []
    for _ in range(args.rounds):
        table = ProcessTable(settings.capacity, settings.exited_keep, settings.exited_ttl_s)
        tracker = tracker_module.ProcessTracker(settings, table, {}, default_resolver(),
                                                local_identity())
        handle = tracker._on_record  # what the ring-buffer reader calls per record
        t0 = time.thread_time_ns()
        for raw in recs:
            handle(raw)
        per_record.append((time.thread_time_ns() - t0) / len(recs) / 1000)
        assert tracker.parse_errors == 0, "a record did not apply"
    print(f"python {sys.version.split()[0]}, {os.uname().release}; {args.processes} processes "
          f"= {len(recs)} records per round; table capacity {settings.capacity}, "
          f"exited_keep {settings.exited_keep}")
    print(f"CPU per record: best {min(per_record):.2f} us, median "
          f"{statistics.median(per_record):.2f} us over {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
