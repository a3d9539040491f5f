"""Time spent in this process's BPF programs, by the kernel's own accounting: with the
sysctl kernel.bpf_stats_enabled on, every program run adds its duration to the
program's run_time_ns and 1 to its run_cnt (`bpftool prog show`). Each run then also
pays the two clock reads of that accounting, so these figures are for comparing
programs with each other (a minimal program shows the floor), not for adding up.
Benchmarks (bench/) enable it only around a run of their own, under the bench lock."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.kernel import prog_ids_held_by

SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@contextmanager
def bpf_stats_enabled() -> Iterator[None]:
    old = SYSCTL.read_text().strip()
    SYSCTL.write_text("1")
    try:
        yield
    finally:
        SYSCTL.write_text(old)


def prog_times() -> dict[int, tuple[str, int, int]]:
    """id -> (name, run_time_ns, run_cnt) of the programs this process holds."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    mine = prog_ids_held_by(os.getpid())
    return {p["id"]: (p.get("name", "?"), int(p.get("run_time_ns", 0)), int(p.get("run_cnt", 0)))
            for p in json.loads(out) if p["id"] in mine}


def runs_between(before: dict[int, tuple[str, int, int]],
                 after: dict[int, tuple[str, int, int]]) -> dict[str, tuple[int, int]]:
    """name -> (runs, ns) of the programs that ran between two prog_times()."""
    out: dict[str, tuple[int, int]] = {}
    for pid, (name, ns, cnt) in after.items():
        _, ns0, cnt0 = before.get(pid, (name, 0, 0))
        if cnt > cnt0:
            runs, total = out.get(name, (0, 0))
            out[name] = (runs + cnt - cnt0, total + ns - ns0)
    return out
