"""Func overhead: what one uprobe hit costs a traced program, with the func monitor
counting, with it measuring latency too, and with a bpftrace one-liner as the peer.

    .venv/bin/python bench/func_overhead.py [--calls 100000] [--rounds 5]

A small C program (compiled with gcc -O2 into a temp dir at run time) calls libc's
getpid CALLS times through a volatile function pointer and times the loop itself with
CLOCK_MONOTONIC (so process start and tracer start-up are not in the figure). Each round
runs, one after another (alternating, so drift hits every configuration alike):

- ``baseline``: nothing attached;
- ``func count``: FuncMonitor ``c:getpid``, ``latency: false`` (one uprobe), no targets;
- ``func latency``: FuncMonitor ``c:getpid``, ``latency: true`` (uprobe + uretprobe);
- ``bpftrace``: ``uprobe:<libc>:getpid { @ = count(); }``.

The monitor is loaded in this process, as the agent would, before the loop starts; no
target filter (bpftrace has none either), so the figure is the probe's cost, not a
filter's. Counts are checked (each tracer must have seen at least CALLS calls).
Figures are medians over the rounds: ns per call, and the ns a hit adds over baseline.

A second table times loading, attaching and closing the monitor on about 220 libc
functions with latency (so about 440 probes), once through uprobe_multi links and once
through BCC's perf-event uprobes (``--skip-attach`` leaves it out: the latter's close
takes about a minute here). Prints the figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))  # tests.support: the helpers tests use too

from tests.support.kernel import compile_c  # noqa: E402
from tests.support.monitors import NullSink, loaded_monitor, monitor_context  # noqa: E402

CONFIGS = ("baseline", "func count", "func latency", "bpftrace")

LOOP_SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static pid_t (*volatile call)(void) = getpid;  /* never inlined nor elided */

int main(int argc, char **argv)
{
    long n = atol(argv[1]);
    char line[16];
    struct timespec a, b;
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin))
        return 1;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i++)
        call();
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%lld\n", (long long)(b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
    return 0;
}
"""


def compile_loop(workdir: Path) -> Path:
    return compile_c(workdir, "getpid_loop", LOOP_SOURCE, "-O2")


def run_loop(binary: Path, calls: int) -> int:
    """The loop's own wall time in ns."""
    proc = subprocess.Popen([str(binary), str(calls)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline() != "ready\n":
        raise RuntimeError("the loop program did not start")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    ns = int(proc.stdout.readline())
    proc.wait(10)
    return ns


# -- tracers ---------------------------------------------------------------------------
def with_func_monitor(latency: bool, measure: Callable[[], int], calls: int) -> int:
    # No targets (watch every process), as the manager would run it.
    with loaded_monitor("func", NullSink(), patterns=["c:getpid"], latency=latency) as monitor:
        ns = measure()
        [entry] = monitor.stats()["functions"]
    if entry["count"] < calls:
        raise RuntimeError(f"func monitor counted {entry['count']} < {calls} calls")
    return ns


def with_bpftrace(libc: str, measure: Callable[[], int], calls: int) -> int:
    program = f"uprobe:{libc}:getpid {{ @ = count(); }}"
    proc = subprocess.Popen(["bpftrace", "-e", program], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        # It may warn first (on our hosts: it cannot raise RLIMIT_MEMLOCK, harmless on 6.x).
        seen: list[str] = []
        while not (line := proc.stdout.readline()).startswith("Attaching"):
            if not line:
                raise RuntimeError(f"bpftrace did not attach: {''.join(seen).strip()}")
            seen.append(line)
        time.sleep(0.2)  # "Attaching" is printed just before the probes are in place
        ns = measure()
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    match = re.search(r"@: (\d+)", out)
    if not match or int(match.group(1)) < calls:
        raise RuntimeError(f"bpftrace counted too few calls: {out.strip()!r}")
    return ns


# -- attach and detach cost ---------------------------------------------------------------
ATTACH_PATTERNS = ["c:pthread_*", "c:mem*", "c:str*"]  # about 220 libc functions


def attach_cost(multi: bool) -> dict[str, float | int | str]:
    """Seconds to compile+load, attach and close a monitor on ~220 functions with latency
    (two probes each), through uprobe_multi links or BCC's perf-event uprobes."""
    from agent.monitors.func.monitor import FuncMonitor, FuncOptions

    options = FuncOptions(patterns=ATTACH_PATTERNS, max_probes=500, latency=True)
    monitor = FuncMonitor(options, monitor_context(NullSink()))
    monitor.prefer_uprobe_multi = multi
    t0 = time.monotonic()
    monitor.load()
    loaded = time.monotonic() - t0
    mode = monitor.attach_mode
    attached = len(monitor.probes) - len(monitor.unattached)
    t0 = time.monotonic()
    monitor.close()
    return {
        "mode": mode, "functions": attached, "load": loaded - monitor.attach_seconds,
        "attach": monitor.attach_seconds, "close": time.monotonic() - t0,
    }


def attach_table(rows: list[dict[str, float | int | str]]) -> str:
    lines = [
        "| attach mode | functions (x2 probes) | compile+load s | attach s | close s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['functions']} | {r['load']:.2f} | {r['attach']:.2f} "
                     f"| {r['close']:.2f} |")
    return "\n".join(lines)


# -- the rounds --------------------------------------------------------------------------
def libc_path() -> str:
    from bcc import BPF

    found = BPF.find_library("c")
    if not found:
        raise RuntimeError("libc not found in ld.so.cache")
    return os.fsdecode(found)


def one_round(binary: Path, calls: int, libc: str, configs: tuple[str, ...]) -> dict[str, int]:
    def measure() -> int:
        return run_loop(binary, calls)

    runners: dict[str, Callable[[], int]] = {
        "baseline": measure,
        "func count": lambda: with_func_monitor(False, measure, calls),
        "func latency": lambda: with_func_monitor(True, measure, calls),
        "bpftrace": lambda: with_bpftrace(libc, measure, calls),
    }
    return {name: runners[name]() for name in configs}


def table(results: dict[str, list[int]], calls: int) -> str:
    base = statistics.median(results["baseline"]) / calls
    lines = [
        "| configuration | ns per call (median) | added ns per hit | runs |",
        "|---|---:|---:|---:|",
    ]
    for name, runs in results.items():
        per_call = statistics.median(runs) / calls
        added = "-" if name == "baseline" else f"{per_call - base:,.0f}"
        lines.append(f"| {name} | {per_call:,.1f} | {added} | {len(runs)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="getpid calls per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-attach", action="store_true",
                        help="skip timing attach/close of ~220 functions (about a minute)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (BPF)", file=sys.stderr)
        return 1
    configs = CONFIGS if shutil.which("bpftrace") else CONFIGS[:-1]
    libc = libc_path()
    results: dict[str, list[int]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        binary = compile_loop(Path(tmp))
        for r in range(args.rounds):
            for name, ns in one_round(binary, args.calls, libc, configs).items():
                results[name].append(ns)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    print(f"kernel {platform.release()}, {os.cpu_count()} CPUs, libc {libc}, "
          f"{args.calls:,} getpid calls per run, {args.rounds} rounds\n")
    print(table(results, args.calls))
    if not args.skip_attach:
        rows = [attach_cost(multi=True), attach_cost(multi=False)]
        print(f"\nattaching and detaching {ATTACH_PATTERNS} with latency:\n")
        print(attach_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
