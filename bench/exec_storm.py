"""Exec storm: how completely, and at what cost, the exec monitor keeps up with a burst
of short processes, compared with no tracer and with a bpftrace one-liner.

    .venv/bin/python bench/exec_storm.py [--count 20000] [--rounds 3] [--concurrency 2]

A small C generator (bench/storm.c, compiled with gcc into a temp dir at run time)
fork()s and execve()s a static no-op binary COUNT times, at most CONCURRENCY children at
a time. Each round runs, one after another, these configurations:

- ``baseline``: the storm with no tracer of ours attached;
- ``agent ringbuf`` / ``agent perf``: the agent in a separate process (this script run
  with ``--agent-child``), which does what ``ebpf-agent run exec --format jsonl`` does
  (config/agent.yaml + overrides, ``Agent(streams=False, formats=["jsonl"])``,
  ``start_monitor("exec")``) with ``transport.kind`` ringbuf or perf, and additionally
  answers ``stats`` on stdin with ``manager.stats()`` as one JSON line, so the kernel
  counters are read from the running monitor;
- ``agent ringbuf-serve``: what ``ebpf-agent serve`` runs for the same monitor: the event
  hub (its replay ring stores every event, no subscriber) and the process tracker
  (``processes.enabled``; ``run`` keeps no process table unless events carry ancestors);
- ``agent ringbuf-serve-notracker``: the same with ``processes.enabled: false``: the
  tracker's cost is the difference;
- ``bpftrace``: a one-liner on ``syscalls:sys_enter_execve`` that prints pid, ppid,
  uid, filename and argv (``join``) to a file.

Each tracer is attached before the storm starts (the agent: ``start_monitor`` has
returned; bpftrace: "Attaching N probes..." is in its output) and idle. Its CPU time is
utime+stime from /proc/PID/stat between the storm's start and the moment the tracer is
idle again after it (so it includes draining the backlog), divided by the events it
handled (the agent: events delivered; bpftrace: lines printed), which include the few
execs the rest of the machine did meanwhile. Completeness counts only execs whose ppid
is the generator and whose filename is the no-op binary, so other activity on the
machine is left out. Figures are medians over the rounds; the slowdown is each round's
storm wall time over the same round's baseline, and "storm CPU ×" the same for the user+
system time of the generator and its children (which includes the time spent in BPF
programs on their syscalls, and is less sensitive to other load than wall time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
STORM_SOURCE = BENCH_DIR / "storm.c"
NOOP_SOURCE = "int main(void) { return 0; }\n"
STORM_ARG = "exec-storm"
# One line per exec with the fields a comparison needs, then argv (join prints its own
# line). curtask->real_parent->tgid is resolved through the kernel's BTF by bpftrace.
BPFTRACE_PROGRAM = (
    "tracepoint:syscalls:sys_enter_execve { "
    'printf("E %d %d %d %s\\n", pid, curtask->real_parent->tgid, uid, str(args->filename)); '
    "join(args->argv); }"
)
CONFIGS = ("baseline", "agent ringbuf", "agent ringbuf-serve", "agent ringbuf-serve-notracker",
           "agent perf", "bpftrace")
AGENT_CHILDREN = ("ringbuf", "perf", "auto", "ringbuf-serve", "ringbuf-serve-notracker")
SERVE = "-serve"  # the hub and the process tracker, as `ebpf-agent serve` has them
NO_TRACKER = "-notracker"  # processes.enabled: false (issue 17's cost)
CLK_TCK = os.sysconf("SC_CLK_TCK")
STORM_LINE = re.compile(
    r"pid=(\d+) launched=(\d+) failed=(\d+) wall_s=([0-9.]+) cpu_s=([0-9.]+)")
LOST_LINE = re.compile(r"Lost (\d+) events")


# -- the agent, as a child process ------------------------------------------------------
def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def agent_child(transport: str, output_dir: Path) -> int:
    """Run the exec monitor as ``ebpf-agent run exec --format jsonl`` does; stdin
    commands: ``stats`` (print manager.stats() as JSON), ``stop``."""
    sys.path.insert(0, str(REPO))
    from agent.config import DEFAULT_CONFIG, load_settings
    from agent.core.agent import Agent
    from agent.kernel.capabilities import build_report
    from agent.monitors.registry import discover_monitors

    registry = discover_monitors()
    tracker = not transport.endswith(NO_TRACKER)
    transport = transport.removesuffix(NO_TRACKER)
    serve = transport.endswith(SERVE)
    transport = transport.removesuffix(SERVE)
    overrides = {"output": {"directory": str(output_dir)}, "transport": {"kind": transport},
                 "processes": {"enabled": tracker}}
    config = DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None
    settings = load_settings(config, overrides, registry)
    logging.basicConfig(level=settings.logging.level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(settings.monitors["exec"].options) if "exec" in settings.monitors else {}
    agent = Agent(settings, registry, build_report(registry), streams=serve, formats=["jsonl"])
    manager = agent.manager
    agent.start()
    try:
        try:
            if agent.tracker is not None:  # compiled and seeded before the storm
                agent.tracker.ready.wait(120)
            manager.start_monitor("exec", options)
        except Exception as e:
            _emit({"error": f"{type(e).__name__}: {e}"})
            return 1
        threads = {t.name: t.native_id for t in threading.enumerate()}
        _emit({"ready": True, "pid": os.getpid(), "transport": transport, "threads": threads})
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                _emit(manager.stats())
            elif command == "stop":
                break
    finally:
        agent.shutdown()
    _emit({"stopped": True})
    return 0


# -- measurements -----------------------------------------------------------------------
@dataclass
class Storm:
    pid: int
    launched: int
    failed: int
    wall_s: float
    cpu_s: float


@dataclass
class RunResult:
    config: str
    round: int
    storm: Storm | None = None
    received: int | None = None
    unique: int | None = None
    kernel_drops: int | None = None
    user_drops: int | None = None
    cpu_s: float | None = None
    handled: int | None = None  # every event the tracer processed, the storm's and others'
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def completeness(self) -> float | None:
        if self.storm is None or self.received is None or not self.storm.launched:
            return None
        return 100.0 * self.received / self.storm.launched

    @property
    def cpu_per_1k(self) -> float | None:
        """Per event handled: the machine's other execs cost the tracer as much."""
        events = self.handled or self.received
        if self.cpu_s is None or not events:
            return None
        return 1000.0 * self.cpu_s / events


def proc_cpu_s(pid: int, tid: int | None = None) -> float:
    """utime + stime of every thread of ``pid`` (or of its thread ``tid``), in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_idle(pid: int, timeout: float = 60.0, interval: float = 0.25) -> float:
    """Wait until ``pid`` uses at most one clock tick per interval, twice in a row;
    returns its CPU seconds then."""
    deadline = time.monotonic() + timeout
    last = proc_cpu_s(pid)
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        time.sleep(interval)
        now = proc_cpu_s(pid)
        quiet = quiet + 1 if now - last <= 1.0 / CLK_TCK else 0
        last = now
    return last


def run_storm(storm: Path, noop: Path, count: int, concurrency: int, timeout: float,
              literal_argv: bool = False) -> Storm:
    cmd = [str(storm), str(noop), str(count), str(concurrency)]
    if literal_argv:
        cmd.append("literal")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    match = STORM_LINE.search(out.stdout)
    if match is None:
        raise RuntimeError(f"storm printed no result: {out.stdout!r} {out.stderr!r}")
    return Storm(int(match[1]), int(match[2]), int(match[3]), float(match[4]), float(match[5]))


def count_agent_events(path: Path, storm_pid: int, noop: Path) -> tuple[int, int]:
    """(events, distinct argv indices) in exec.jsonl that the storm's children caused;
    the second counts the events whose argv came through whole."""
    needle = str(noop)
    total, indices = 0, set()
    if not path.exists():
        return 0, 0
    with open(path, "rb") as f:
        for line in f:
            if needle.encode() not in line:
                continue
            event = json.loads(line)
            if event.get("ppid") != storm_pid or event.get("filename") != needle:
                continue
            total += 1
            argv = event.get("argv") or []
            if len(argv) == 3 and argv[1] == STORM_ARG:
                indices.add(argv[2])
    return total, len(indices)


@dataclass
class BpftraceCounts:
    storm_events: int = 0  # "E" lines of the storm's children
    full_argv: int = 0  # distinct argv lines of the storm's children (join)
    all_events: int = 0  # every "E" line: everything bpftrace handled
    lost: int = 0  # "Lost N events": its perf buffer was full


def count_bpftrace_events(path: Path, storm_pid: int, noop: Path) -> BpftraceCounts:
    """What bpftrace printed. join() output is a separate record, which may arrive
    after another CPU's "E" line, so argv lines are matched by content, not position."""
    needle = str(noop)
    counts = BpftraceCounts()
    indices: set[str] = set()
    prefix = f"{needle} {STORM_ARG} "
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("E "):
                counts.all_events += 1
                parts = line.split(" ", 4)
                if len(parts) == 5 and parts[2] == str(storm_pid) and parts[4] == needle:
                    counts.storm_events += 1
            elif line.startswith(prefix):
                indices.add(line[len(prefix):])
            elif lost_match := LOST_LINE.search(line):
                counts.lost += int(lost_match[1])
    counts.full_argv = len(indices)
    return counts


class LineReader:
    """Lines from a child's stdout on a thread, so reads can time out."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def json(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from the agent child")
            line = self._lines.get(timeout=remaining)
            if line is None:
                raise RuntimeError("the agent child closed its stdout")
            line = line.strip()
            if line.startswith("{"):
                obj: dict[str, Any] = json.loads(line)
                return obj


def _stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Bench:
    storm: Path
    noop: Path
    workdir: Path
    count: int
    concurrency: int
    storm_timeout: float
    start_timeout: float
    literal_argv: bool = False

    def storm_once(self) -> Storm:
        return run_storm(self.storm, self.noop, self.count, self.concurrency, self.storm_timeout,
                         self.literal_argv)

    def baseline(self, rnd: int) -> RunResult:
        return RunResult("baseline", rnd, storm=self.storm_once())

    def agent(self, rnd: int, transport: str) -> RunResult:
        result = RunResult(f"agent {transport}", rnd)
        outdir = self.workdir / f"agent-{transport}-{rnd}"
        outdir.mkdir()
        launched_at = time.monotonic()
        with open(outdir / "agent.stderr", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--agent-child", transport,
                 "--agent-output", str(outdir)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            )
        stdin = proc.stdin
        if stdin is None or proc.stdout is None:
            raise RuntimeError("no pipes to the agent child")
        reader = LineReader(proc.stdout)
        try:
            ready = reader.json(self.start_timeout)
            if not ready.get("ready"):
                result.error = str(ready.get("error", ready))
                return result
            attach_s = time.monotonic() - launched_at
            threads: dict[str, int] = ready.get("threads", {})
            cpu0 = wait_idle(proc.pid)
            per_thread0 = {name: proc_cpu_s(proc.pid, tid) for name, tid in threads.items()}
            result.storm = self.storm_once()
            cpu1 = wait_idle(proc.pid)
            result.cpu_s = cpu1 - cpu0
            thread_cpu = {name: round(proc_cpu_s(proc.pid, tid) - per_thread0[name], 2)
                          for name, tid in threads.items()}
            stdin.write("stats\n")
            stdin.flush()
            stats = reader.json(30)
            stdin.write("stop\n")
            stdin.flush()
            reader.json(60)
            proc.wait(timeout=30)
        except Exception as e:
            result.error = f"{type(e).__name__}: {e}"
            return result
        finally:
            _stop_process(proc)
        mon = stats["monitors"]["exec"]
        result.kernel_drops = int(mon["events_dropped_kernel"])
        result.handled = int(mon["events_delivered"])
        result.user_drops = int(mon["events_dropped_userspace"])
        result.extra = {
            "kernel": mon["kernel"],
            "delivered": mon["events_delivered"],
            "agent_rss_mb": round(stats["agent"]["rss_bytes"] / 2**20, 1),
            "thread_cpu_s": thread_cpu,
            "attach_s": round(attach_s, 1),
        }
        result.received, result.unique = count_agent_events(
            outdir / "exec.jsonl", result.storm.pid, self.noop)
        return result

    def bpftrace(self, rnd: int) -> RunResult:
        result = RunResult("bpftrace", rnd)
        out = self.workdir / f"bpftrace-{rnd}.txt"
        launched_at = time.monotonic()
        with open(self.workdir / f"bpftrace-{rnd}.stderr", "w") as err:
            proc = subprocess.Popen(
                ["bpftrace", "-B", "full", "-o", str(out), "-e", BPFTRACE_PROGRAM],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        try:
            deadline = time.monotonic() + self.start_timeout
            while not (out.exists() and "Attaching" in out.read_text(errors="replace")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    errors = (self.workdir / f"bpftrace-{rnd}.stderr").read_text()
                    result.error = f"bpftrace did not attach: {errors.strip()[-300:]}"
                    return result
                time.sleep(0.1)
            result.extra["attach_s"] = round(time.monotonic() - launched_at, 1)
            cpu0 = wait_idle(proc.pid)
            result.storm = self.storm_once()
            cpu1 = wait_idle(proc.pid)
            result.cpu_s = cpu1 - cpu0
        except Exception as e:
            result.error = f"{type(e).__name__}: {e}"
            return result
        finally:
            _stop_process(proc, signal.SIGINT)
        counts = count_bpftrace_events(out, result.storm.pid, self.noop)
        result.received, result.unique = counts.storm_events, counts.full_argv
        result.handled, result.kernel_drops = counts.all_events, counts.lost
        stderr_text = (self.workdir / f"bpftrace-{rnd}.stderr").read_text(errors="replace")
        result.kernel_drops += sum(int(m) for m in LOST_LINE.findall(stderr_text))
        return result

    def run(self, config: str, rnd: int) -> RunResult:
        try:
            if config == "baseline":
                return self.baseline(rnd)
            if config.startswith("agent "):
                return self.agent(rnd, config.split()[1])
            return self.bpftrace(rnd)
        except Exception as e:
            return RunResult(config, rnd, error=f"{type(e).__name__}: {e}")


# -- set-up and report ------------------------------------------------------------------
def compile_binaries(workdir: Path) -> tuple[Path, Path, str]:
    """gcc the generator and the no-op (static when libc.a is there)."""
    storm = workdir / "storm"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(storm), str(STORM_SOURCE)], check=True)
    noop_src = workdir / "noop.c"
    noop_src.write_text(NOOP_SOURCE)
    noop = workdir / "noop"
    static = subprocess.run(["gcc", "-O2", "-static", "-o", str(noop), str(noop_src)],
                            capture_output=True)
    if static.returncode == 0:
        return storm, noop, "static"
    subprocess.run(["gcc", "-O2", "-o", str(noop), str(noop_src)], check=True)
    return storm, noop, "dynamic"


def other_bpf_programs() -> int | None:
    """Tracepoint/raw-tracepoint BPF programs loaded on the machine (others' tracers)."""
    try:
        out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True,
                             timeout=30, check=True)
        progs = json.loads(out.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sum(1 for p in progs if p.get("type") in ("tracepoint", "raw_tracepoint"))


def agent_revision() -> str:
    """The commit the agent code is at, and whether agent/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "agent"],
                               capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = len(dirty.stdout.splitlines())
    return head.stdout.strip() + (f" + {changed} uncommitted files in agent/" if changed else "")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _fmt_int(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def summarize(results: list[RunResult], configs: list[str]) -> str:
    baseline = {r.round: r.storm for r in results
                if r.config == "baseline" and r.storm is not None}
    lines = [
        "| configuration | storm wall s | slowdown × | events/launched % | kernel drops "
        "| userspace drops | tracer CPU s per 1k events | storm CPU × |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        runs = [r for r in results if r.config == config and r.error is None and r.storm]
        failed = [r for r in results if r.config == config and r.error is not None]
        if not runs:
            reason = failed[0].error if failed else "not run"
            lines.append(f"| {config} | failed: {reason} | | | | | | |")
            continue
        walls = [r.storm.wall_s for r in runs if r.storm]
        slow = [r.storm.wall_s / baseline[r.round].wall_s for r in runs
                if r.storm and r.round in baseline]
        cpu_x = [r.storm.cpu_s / baseline[r.round].cpu_s for r in runs
                 if r.storm and r.round in baseline and baseline[r.round].cpu_s]
        comp = [c for r in runs if (c := r.completeness) is not None]
        kdrops = [float(r.kernel_drops) for r in runs if r.kernel_drops is not None]
        udrops = [float(r.user_drops) for r in runs if r.user_drops is not None]
        cpu = [c for r in runs if (c := r.cpu_per_1k) is not None]
        tracer = config != "baseline"
        note = f" ({len(failed)} failed)" if failed else ""
        lines.append(
            f"| {config}{note} | {_fmt(_median(walls))} | "
            f"{_fmt(_median(slow), 2) if tracer else '1.00'} | "
            f"{_fmt(_median(comp), 2) if tracer else '–'} | {_fmt_int(_median(kdrops))} | "
            f"{_fmt_int(_median(udrops))} | {_fmt(_median(cpu), 3) if tracer else '–'} | "
            f"{_fmt(_median(cpu_x), 2) if tracer else '1.00'} |"
        )
    return "\n".join(lines)


def per_run_table(results: list[RunResult]) -> str:
    lines = [
        "| round | configuration | launched | storm wall s | storm CPU s | received | full argv "
        "| kernel drops | userspace drops | tracer CPU s | events handled | notes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s = r.storm
        notes = r.error or ""
        if "attach_s" in r.extra:
            notes = f"attached in {r.extra['attach_s']}s"
        if "kernel" in r.extra:
            k = r.extra["kernel"]
            notes += (f"; seen={k.get('seen')} submitted={k.get('submitted')} "
                     f"delivered={r.extra.get('delivered')} "
                     f"pending_full={k.get('pending_full')} rss={r.extra.get('agent_rss_mb')}MB")
            threads = r.extra.get("thread_cpu_s") or {}
            if threads:
                notes += "; thread CPU s: " + ", ".join(
                    f"{name}={cpu}" for name, cpu in sorted(threads.items()))
        if s is not None and s.failed:
            notes += f" children failed={s.failed}"
        lines.append(
            f"| {r.round} | {r.config} | {s.launched if s else '–'} | "
            f"{_fmt(s.wall_s if s else None, 3)} | {_fmt(s.cpu_s if s else None, 2)} | "
            f"{_fmt_int(r.received)} | "
            f"{_fmt_int(r.unique)} | {_fmt_int(r.kernel_drops)} | {_fmt_int(r.user_drops)} | "
            f"{_fmt(r.cpu_s, 2)} | {_fmt_int(r.handled)} | {notes} |"
        )
    return "\n".join(lines)


def progress(r: RunResult) -> str:
    if r.error is not None:
        return f"error: {r.error}"
    parts = []
    if r.storm is not None:
        parts.append(f"wall {r.storm.wall_s:.2f}s")
        if r.received is not None:
            parts.append(f"received {r.received}/{r.storm.launched}")
    if r.cpu_s is not None:
        parts.append(f"tracer cpu {r.cpu_s:.2f}s")
    if r.kernel_drops is not None:
        parts.append(f"kernel drops {r.kernel_drops}")
    return ", ".join(parts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=20_000, help="processes per storm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=2, help="children alive at once")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    p.add_argument("--storm-timeout", type=float, default=600.0)
    p.add_argument("--start-timeout", type=float, default=180.0,
                   help="seconds a tracer may take to attach")
    p.add_argument("--literal-argv", action="store_true",
                   help="pass argv[1] as a string literal (.rodata), which fork() leaves "
                   "unmapped in the child: shows how tracers handle unreadable arguments")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (outputs, logs)")
    p.add_argument("--json", type=Path, help="also write every run's figures here")
    p.add_argument("--agent-child", choices=AGENT_CHILDREN,
                   help=argparse.SUPPRESS)
    p.add_argument("--agent-output", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.agent_child:
        return agent_child(args.agent_child, args.agent_output)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or args.count < 1 or args.rounds < 1 or args.concurrency < 1:
        print(f"exec_storm: bad arguments (unknown configs: {unknown})", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("exec_storm: needs root (BPF)", file=sys.stderr)
        return 3
    if "bpftrace" in configs and shutil.which("bpftrace") is None:
        print("exec_storm: bpftrace not found; skipping it", file=sys.stderr)
        configs.remove("bpftrace")

    workdir = Path(tempfile.mkdtemp(prefix="exec_storm."))
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__),
                          *(argv if argv is not None else sys.argv[1:])])
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    others_before = other_bpf_programs()
    results: list[RunResult] = []
    try:
        storm, noop, linkage = compile_binaries(workdir)
        bench = Bench(storm, noop, workdir, args.count, args.concurrency, args.storm_timeout,
                      args.start_timeout, args.literal_argv)
        # Warm-up, not measured: page cache, the binaries' first faults.
        run_storm(storm, noop, min(args.count, 1000), args.concurrency, args.storm_timeout)
        for rnd in range(1, args.rounds + 1):
            for config in configs:
                result = bench.run(config, rnd)
                results.append(result)
                print(f"round {rnd} {config}: {progress(result)}", file=sys.stderr,
                      flush=True)
    finally:
        if args.keep:
            print(f"exec_storm: outputs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    load_after = os.getloadavg()
    others_after = other_bpf_programs()
    print(f"command: `{command}`")
    print(f"date: {started.isoformat(timespec='seconds')}; kernel {platform.release()}; "
          f"{os.cpu_count()} CPUs; {args.count} processes per storm, concurrency "
          f"{args.concurrency}, {args.rounds} rounds; no-op binary {linkage}")
    print(f"agent code: {agent_revision()}")
    print(f"load average before/after: {load_before[0]:.2f}/{load_after[0]:.2f}; "
          f"tracepoint BPF programs loaded on the machine before/after (ours excluded): "
          f"{others_before}/{others_after}")
    print()
    print(summarize(results, configs))
    print()
    print("Per run:")
    print()
    print(per_run_table(results))
    if args.json:
        args.json.write_text(json.dumps([
            {"config": r.config, "round": r.round, "storm": r.storm.__dict__ if r.storm else None,
             "received": r.received, "distinct": r.unique, "kernel_drops": r.kernel_drops,
             "userspace_drops": r.user_drops, "cpu_s": r.cpu_s, "handled": r.handled,
             "error": r.error,
             "extra": r.extra} for r in results], indent=2))
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
