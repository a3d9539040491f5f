"""What the SyscallMonitor costs a syscall-heavy program, next to a floor and to peers.

Workloads: ``dd if=/dev/zero of=/dev/null bs=1 count=C`` (a read(2) and a write(2) per
byte) and a compiled loop of N getppid(2) calls (bench/getppid_loop.c). Configurations:
no agent; floors: empty BPF programs on raw_syscalls:sys_enter and sys_exit attached
through perf events (TRACEPOINT_PROBE, as syscount and bpftrace attach), the same empty
programs as raw tracepoints (BPF_PROG_TYPE_RAW_TRACEPOINT, no perf-event record built;
the monitor attaches this way), and an empty raw tracepoint at sys_exit alone (the floor
of the counts-only mode); the SyscallMonitor: full (counts, errors, latency, histogram
on) watching everything, with per-process tables, with a cgroup target that matches
the workload (the bench's own cgroup, inherited) and one that excludes it (an empty
cgroup), with a pid filter that matches the
workload (pid 1 with follow_children: every descendant of pid 1 is followed), with a
pid filter that excludes it (pid 1 alone, follow_children off), and with latency off
(counts, errors and errnos at sys_exit only), also with the workload excluded;
``syscount-bpfcc`` (counts at sys_exit), ``syscount-bpfcc -L`` (adds latency) and a
bpftrace one-liner counting at sys_enter.

Everything runs in one process run: each repetition starts every configuration in turn
(rotating the order), runs each workload once under it, and stops it; the table shows
medians. Other BPF programs on syscall tracepoints (another user's tracer) slow every
syscall on the machine: the bench waits for them to go before each sample and counts
the samples it could not keep clean. Needs root. Prints a markdown table; no assertion.

    .venv/bin/python bench/overhead.py [--reps 3] [--dd-count 2000000] [--getppid 2000000]
        [--only TEXT ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FLOOR_TP = """
TRACEPOINT_PROBE(raw_syscalls, sys_enter) { return 0; }
TRACEPOINT_PROBE(raw_syscalls, sys_exit) { return 0; }
"""
FLOOR_RAW_TP = """
RAW_TRACEPOINT_PROBE(sys_enter) { return 0; }
RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
"""
FLOOR_RAW_EXIT = """
RAW_TRACEPOINT_PROBE(sys_exit) { return 0; }
"""
BPFTRACE_ONE_LINER = "tracepoint:raw_syscalls:sys_enter { @[args->id] = count(); }"
FLOOR = "floor: empty tracepoint progs"
FLOOR_RAW = "floor: empty raw_tracepoint progs"
ATTACH_TIMEOUT_S = 90.0
QUIET_TIMEOUT_S = 20.0


# -- the machine's attached programs ---------------------------------------------------


def perf_attachments() -> list[dict[str, Any]]:
    """Programs attached through perf events and raw tracepoints (``bpftool perf show``)."""
    out = subprocess.run(["bpftool", "perf", "show", "-j"], capture_output=True, text=True)
    return json.loads(out.stdout or "[]") if out.returncode == 0 else []


def syscall_probes(exclude_pids: set[int]) -> list[str]:
    """Syscall-tracepoint programs of other processes: ``pid:tracepoint``."""
    return [
        f"{a.get('pid')}:{a.get('tracepoint')}"
        for a in perf_attachments()
        if a.get("pid") not in exclude_pids and str(a.get("tracepoint", "")).startswith("sys_")
    ]


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return predicate()


# -- configurations ----------------------------------------------------------------------


class Config:
    name = ""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pids(self) -> set[int]:
        """Processes whose syscall probes belong to this configuration."""
        return set()


class NoAgent(Config):
    name = "no agent"


class InProcess(Config):
    """Programs this process loads: what open() returns lives from start() to stop()."""

    stack: contextlib.ExitStack | None = None

    def open(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def start(self) -> None:
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(self.open())

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.close()
            self.stack = None

    def pids(self) -> set[int]:
        return {os.getpid()}


class EmptyPrograms(InProcess):
    def __init__(self, name: str, text: str) -> None:
        self.name, self.text = name, text

    @contextlib.contextmanager
    def open(self) -> Iterator[Any]:
        from bcc import BPF

        bpf = BPF(text=self.text)
        try:
            yield bpf
        finally:
            bpf.cleanup()


class Monitor(InProcess):
    def __init__(self, name: str, targets: Any = None, **options: Any) -> None:
        self.name, self.targets, self.options = name, targets, options

    def open(self) -> contextlib.AbstractContextManager[Any]:
        from tests.support.monitors import NullSink, loaded_monitor

        return loaded_monitor("syscall", NullSink(), targets=self.targets, **self.options)


class CgroupMonitor(Monitor):
    """The syscall monitor with a cgroup target: ``target`` is "own" (the bench's own
    cgroup, which the workload inherits: matched) or "other" (an empty cgroup the bench
    makes: the workload is excluded)."""

    def __init__(self, name: str, target: str, **options: Any) -> None:
        super().__init__(name, None, **options)
        self.target = target

    @contextlib.contextmanager
    def open(self) -> Iterator[Any]:
        from agent.kernel.cgroups import Cgroups, with_cgroup_ids
        from agent.model.targets import TargetSet
        from tests.support.cgroups import cgroup_dir, own_cgroup
        from tests.support.monitors import NullSink, loaded_monitor

        with contextlib.ExitStack() as stack:
            path = own_cgroup()
            if self.target == "other":
                stack.enter_context(cgroup_dir("/ebpf-agent-bench-empty"))
                path = "/ebpf-agent-bench-empty"
            targets = with_cgroup_ids(TargetSet(cgroups=frozenset({path})), {path}, Cgroups())
            yield stack.enter_context(
                loaded_monitor("syscall", NullSink(), targets=targets, **self.options))


class Peer(Config):
    """An external tracer: started, waited for until its programs are attached, stopped."""

    def __init__(self, name: str, argv: list[str], programs: int) -> None:
        self.name, self.argv, self.programs = name, argv, programs
        self.proc: subprocess.Popen[bytes] | None = None

    def _attached(self) -> int:
        assert self.proc is not None
        return sum(1 for a in perf_attachments() if a.get("pid") == self.proc.pid)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        if not wait_until(lambda: self._attached() >= self.programs, ATTACH_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"{self.name}: programs not attached after {ATTACH_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # both print their maps and detach on SIGINT
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def pids(self) -> set[int]:
        return {self.proc.pid} if self.proc else set()


CGROUP_MATCHING = "syscall monitor, cgroup target matching the workload (its own)"
CGROUP_GOAL = 1.10  # issue 17: the per-call cost with a cgroup target, x no target


def cgroup_ratios(results: Results, wls: list[Workload], configs: list[Config]) -> str:
    """Issue 17's cost goal side by side with its reference: the monitor with a cgroup
    target matching the workload against the same monitor without a target."""
    names = {c.name for c in configs}
    if CGROUP_MATCHING not in names or "syscall monitor" not in names:
        return ""
    ratios = []
    for w in wls:
        ratio = results.median(CGROUP_MATCHING, w.name) / results.median("syscall monitor", w.name)
        ratios.append(f"{w.name} {ratio:.2f}x")
    return (f"cgroup target matching / no target (CPU s medians; goal <= {CGROUP_GOAL:.2f}x): "
            + ", ".join(ratios))


def configurations() -> list[Config]:
    from agent.model.targets import TargetSet

    configs: list[Config] = [
        NoAgent(),
        EmptyPrograms(FLOOR, FLOOR_TP),
        EmptyPrograms(FLOOR_RAW, FLOOR_RAW_TP),
        EmptyPrograms("floor: empty raw_tracepoint prog, sys_exit only", FLOOR_RAW_EXIT),
        Monitor("syscall monitor"),
        Monitor("syscall monitor, per_process", per_process=True),
        # Target pid 1 with follow_children on seeds every living descendant of pid 1
        # as followed: the workload is counted, through the pid filter (this
        # configuration was once mislabelled "workload filtered out").
        Monitor("syscall monitor, pid filter matching the workload (pid 1 + descendants)",
                TargetSet(pids=frozenset({1}))),
        # Target pid 1 alone: the workload is a process the filter excludes.
        Monitor("syscall monitor, workload excluded (target pid 1, follow_children off)",
                TargetSet(pids=frozenset({1}), follow_children=False)),
        CgroupMonitor(CGROUP_MATCHING, "own"),
        CgroupMonitor("syscall monitor, cgroup target excluding the workload", "other"),
        Monitor("syscall monitor, latency off (counts+errors)", latency=False),
        Monitor("syscall monitor, latency off, workload excluded (target pid 1, no follow)",
                TargetSet(pids=frozenset({1}), follow_children=False), latency=False),
    ]
    if shutil.which("syscount-bpfcc"):
        configs.append(Peer("syscount-bpfcc (counts)", ["syscount-bpfcc"], 1))
        configs.append(Peer("syscount-bpfcc -L (counts+latency)", ["syscount-bpfcc", "-L"], 2))
    if shutil.which("bpftrace"):
        configs.append(Peer("bpftrace one-liner (counts)", ["bpftrace", "-e", BPFTRACE_ONE_LINER],
                            1))
    return configs


# -- workloads -----------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    argv: list[str]
    calls: int  # syscalls it makes, about: for the ns-per-call column


def workloads(tmp: Path, dd_count: int, getppid: int) -> list[Workload]:
    from tests.support.kernel import compile_c

    source = (REPO / "bench" / "getppid_loop.c").read_text()
    binary = compile_c(tmp, "getppid_loop", source, "-O2")
    return [
        Workload(f"dd bs=1 count={dd_count}",
                 ["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={dd_count}"],
                 2 * dd_count),
        Workload(f"getppid x{getppid}", [str(binary), str(getppid)], getppid),
    ]


@dataclass(frozen=True)
class Sample:
    cpu: float  # user + system CPU seconds of the workload (getrusage via wait4(2))
    wall: float


def run_once(w: Workload) -> Sample:
    """One run. CPU time is the figure compared: the BPF programs run in the workload's
    own syscalls, so they are charged to it as system time, while other load on the
    machine delays the workload (wall time) more than it adds to its CPU time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(w.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{w.argv[0]} exited with {proc.returncode}")
    return Sample(usage.ru_utime + usage.ru_stime, wall)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)
    unclean: int = 0
    foreign: set[str] = field(default_factory=set)

    def add(self, config: str, workload: str, sample: Sample) -> None:
        self.samples.setdefault((config, workload), []).append(sample)

    def median(self, config: str, workload: str, wall: bool = False) -> float:
        return statistics.median(
            s.wall if wall else s.cpu for s in self.samples[(config, workload)]
        )


def measure(config: Config, wls: list[Workload], results: Results) -> None:
    config.start()
    try:
        own = config.pids()

        def quiet() -> bool:
            return not syscall_probes(own)

        for w in wls:
            if not wait_until(quiet, QUIET_TIMEOUT_S, 0.5):
                results.unclean += 1
                results.foreign.update(syscall_probes(own))
            results.add(config.name, w.name, run_once(w))
    finally:
        config.stop()


def run(reps: int, wls: list[Workload], configs: list[Config]) -> Results:
    results = Results()
    for w in wls:  # warm the page cache and the binaries
        run_once(w)
    for rep in range(reps):
        order = configs[rep % len(configs):] + configs[: rep % len(configs)]
        for config in order:
            print(f"rep {rep + 1}/{reps}: {config.name}", file=sys.stderr, flush=True)
            measure(config, wls, results)
    return results


def table(results: Results, wls: list[Workload], configs: list[Config]) -> str:
    lines = [
        "| workload | configuration | CPU s | x no agent | x tp floor | x raw floor "
        "| +ns/syscall | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in wls:
        base = results.median("no agent", w.name)
        floor = results.median(FLOOR, w.name)
        raw_floor = results.median(FLOOR_RAW, w.name)
        for c in configs:
            t = results.median(c.name, w.name)
            wall = results.median(c.name, w.name, wall=True)
            extra = (t - base) / w.calls * 1e9
            lines.append(
                f"| {w.name} | {c.name} | {t:.3f} | {t / base:.2f} | {t / floor:.2f} | "
                f"{t / raw_floor:.2f} | {extra:.0f} | {wall:.3f} |"
            )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="repetitions (medians are shown)")
    ap.add_argument("--dd-count", type=int, default=2_000_000, help="bytes dd copies, 1 at a time")
    ap.add_argument("--getppid", type=int, default=2_000_000, help="getppid calls in the loop")
    ap.add_argument("--only", action="append", default=[], metavar="TEXT",
                    help="run only the configurations whose name contains TEXT (repeatable; "
                    "the no-agent, floor and plain syscall monitor rows always run)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (loads BPF programs)", file=sys.stderr)
        return 1
    configs = [c for c in configurations()
               if not args.only or c.name in ("no agent", FLOOR, FLOOR_RAW, "syscall monitor")
               or any(text in c.name for text in args.only)]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        wls = workloads(Path(tmp), args.dd_count, args.getppid)
        t0 = time.monotonic()
        results = run(args.reps, wls, configs)
        elapsed = time.monotonic() - t0
    load_after = os.getloadavg()
    print(f"Kernel {platform.release()}, {os.cpu_count()} CPUs; medians of {args.reps} "
          f"alternating runs; bench took {elapsed:.0f} s; load average (1 min) before/after "
          f"{load_before[0]:.2f}/{load_after[0]:.2f}.\n")
    print(table(results, wls, configs))
    ratios = cgroup_ratios(results, wls, configs)
    if ratios:
        print(f"\n{ratios}")
    print("\nCPU s: median user+system time of the workload process; x columns divide it by "
          "the no-agent, empty-perf-tracepoint and empty-raw-tracepoint floor medians "
          "(both hooks); +ns/syscall: (median - no-agent median) / syscalls "
          "made (dd: 2 per byte; startup calls ignored); wall s: median elapsed time.")
    if results.unclean:
        print(f"\n{results.unclean} sample(s) ran while other processes had syscall probes "
              f"attached ({', '.join(sorted(results.foreign))}): those are slowed too.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
