"""What the file monitor costs a file-heavy workload (`find /usr` plus a tar extraction
and removal of /usr/share/doc), side by side in one run: no program, a minimal
sys_enter_openat program (the floor), the file monitor reporting every call (events
drained to a null sink), and the file monitor with a prefix filter that matches
nothing. Workload CPU time (user + system of its processes), medians of alternating
runs after one unmeasured run (the dentry and page caches warm). Then the per-call view:
an openat loop timed the same way, and once more with the kernel's BPF run-time
accounting on (tests/support/bpfstats.py): ns per openat inside the programs, the least noisy
figure on a shared machine. No assertion: it prints tables (bench/RESULTS.md has the
recorded figures).

    .venv/bin/python bench/file_cost.py [--reps 5]

Goals (issue 18): full monitor <= 1.15x the minimal program; prefix matching nothing
<= 1.05x of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MINIMAL = r"""
BPF_PERCPU_ARRAY(calls, u64, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    u32 zero = 0;
    u64 *c = calls.lookup(&zero);
    if (c)
        *c += 1;
    return 0;
}
"""

# The per-call view: one process opening (and closing) one file relative to an open
# directory, as find and tar do; CPU ns per call over the minimal program.
OPEN_LOOP_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    int dir = open(argv[1], O_RDONLY | O_DIRECTORY);
    long n = atol(argv[3]);
    for (long i = 0; i < n; i++) {
        int fd = openat(dir, argv[2], O_RDONLY);
        if (fd >= 0)
            close(fd);
    }
    return dir < 0;
}
"""
LOOP_DIR, LOOP_FILE = "/usr/share/doc/bash", "copyright"

WORKLOAD = (
    "find /usr -xdev > /dev/null; mkdir x && tar xf {archive} -C x && rm -rf x"
)


def loop_cpu(binary: Path, calls: int) -> float:
    proc = subprocess.Popen([str(binary), LOOP_DIR, LOOP_FILE, str(calls)])
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"open loop failed: status {status}")
    return usage.ru_utime + usage.ru_stime


def workload_cpu(work: Path, archive: Path) -> float:
    """CPU seconds of one workload run (its whole process tree)."""
    proc = subprocess.Popen(["/bin/sh", "-c", WORKLOAD.format(archive=archive)], cwd=work)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"workload failed: status {status}")
    # the shell's own usage includes its waited-for children (find, tar, rm)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=300_000, help="openat calls of the loop")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    from bcc import BPF

    from agent.monitors.file.monitor import FileOptions
    from tests.support.bpfstats import bpf_stats_enabled, prog_times, runs_between
    from tests.support.kernel import compile_c
    from tests.support.monitors import NullSink, loaded_monitor, polled

    names = ("no program", "minimal sys_enter_openat program",
             "file monitor, every call reported", "file monitor, prefix matching nothing")
    samples: dict[str, list[float]] = {n: [] for n in names}
    per_call: dict[str, list[float]] = {n: [] for n in names}
    in_programs: dict[str, list[float]] = {n: [] for n in names}  # ns per openat
    counters: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        archive = work / "doc.tar"
        subprocess.run(["tar", "cf", str(archive), "-C", "/usr/share", "doc"], check=True)

        loop = compile_c(work, "open_loop", OPEN_LOOP_C, "-O2")

        workload_cpu(work, archive)  # unmeasured: warms the caches

        def run(name: str) -> None:
            samples[name].append(workload_cpu(work, archive))
            per_call[name].append(loop_cpu(loop, args.calls))
            stats_calls = max(1, args.calls // 3)
            with bpf_stats_enabled():
                before = prog_times()
                loop_cpu(loop, stats_calls)
                ran = runs_between(before, prog_times())
            # the sys_enter/sys_exit_openat programs (and nothing else the loop ran)
            ns = sum(t for prog, (_n, t) in ran.items() if "openat" in prog)
            in_programs[name].append(ns / stats_calls)

        for rep in range(args.reps):
            steps: list[Callable[[], None]] = []

            def bare() -> None:
                run(names[0])

            def minimal() -> None:
                b = BPF(text=MINIMAL)
                try:
                    run(names[1])
                finally:
                    b.cleanup()

            def monitor() -> None:
                with loaded_monitor("file", NullSink()) as m, polled(m):
                    for opts, name in (({}, names[2]),
                                       ({"include_prefixes": ["/no-such-prefix/"]}, names[3])):
                        m.apply_options(FileOptions(**opts))
                        run(name)
                    counters.update(m.kernel_counters())

            steps = [bare, minimal, monitor]
            k = rep % len(steps)
            for step in steps[k:] + steps[:k]:
                step()
            print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
    floor = statistics.median(samples[names[1]])
    print(f"workload: {WORKLOAD.format(archive='<tar of /usr/share/doc>')}")
    print(f"medians of {args.reps} runs; last monitor run's counters: {counters}\n")
    print("| configuration | workload CPU s | x minimal program | spread (min-max s) |")
    print("|---|---:|---:|---|")
    for name in names:
        v = samples[name]
        med = statistics.median(v)
        print(f"| {name} | {med:.3f} | {med / floor:.3f} | {min(v):.3f}-{max(v):.3f} |")
    loop_floor = statistics.median(per_call[names[1]])
    print(f"\nopenat(dirfd, \"{LOOP_FILE}\") + close in {LOOP_DIR}, x{args.calls}:\n")
    print("| configuration | loop CPU s | x minimal program | ns per openat over it | "
          "ns per openat in the programs (bpf_stats) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        med = statistics.median(per_call[name])
        print(f"| {name} | {med:.3f} | {med / loop_floor:.3f} | "
              f"{(med - loop_floor) / args.calls * 1e9:.0f} | "
              f"{statistics.median(in_programs[name]):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
