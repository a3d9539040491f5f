"""Where the syscall monitor's per-call cost goes: the raw-tracepoint floor plus one piece
of the latency build's hot path at a time, on a getppid(2) loop (workload CPU time,
medians of alternating runs). No assertion: it prints a table.

    .venv/bin/python bench/syscall_cost.py [--reps 5] [--calls 2000000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

HEAD = r"""
struct st { u64 start_ns; u32 nr; u32 pad; };
BPF_TASK_STORAGE(starts, struct st);
BPF_HASH(start_hash, u32, struct st, 32768);
BPF_PERCPU_ARRAY(stats, u64, 1024);
BPF_ARRAY(flags, u32, 1);
"""

# (name, sys_enter body, sys_exit body)
VARIANTS = [
    ("floor: two empty raw tracepoint programs", "", ""),
    ("+ filter flags (array lookup) on enter", """
        u32 z = 0; u32 *f = flags.lookup(&z); if (!f || *f) return 0;""", ""),
    ("+ bpf_ktime_get_ns() in both", """
        u64 t = bpf_ktime_get_ns(); if (t == 1) return 1;""", """
        u64 t = bpf_ktime_get_ns(); if (t == 1) return 1;"""),
    ("+ start time in task storage (create at enter, read at exit)", """
        struct st *s = starts.task_storage_get(bpf_get_current_task_btf(), 0,
                                               BPF_LOCAL_STORAGE_GET_F_CREATE);
        if (s) { s->start_ns = bpf_ktime_get_ns(); s->nr = (u32)ctx->args[1]; }""", """
        struct st *s = starts.task_storage_get(bpf_get_current_task_btf(), 0, 0);
        if (s && s->start_ns) { u64 lat = bpf_ktime_get_ns() - s->start_ns;
            s->start_ns = 0; if (lat == 1) return 1; }"""),
    ("+ start time in a tid hash (the previous design)", """
        u32 tid = (u32)bpf_get_current_pid_tgid();
        struct st *s = start_hash.lookup(&tid);
        if (s) { s->start_ns = bpf_ktime_get_ns(); s->nr = (u32)ctx->args[1]; }
        else { struct st i = {.start_ns = bpf_ktime_get_ns()}; start_hash.update(&tid, &i); }""",
     """
        u32 tid = (u32)bpf_get_current_pid_tgid();
        struct st *s = start_hash.lookup(&tid);
        if (s && s->start_ns) { u64 lat = bpf_ktime_get_ns() - s->start_ns;
            s->start_ns = 0; if (lat == 1) return 1; }"""),
    ("+ task storage + one per-CPU array count at exit", """
        struct st *s = starts.task_storage_get(bpf_get_current_task_btf(), 0,
                                               BPF_LOCAL_STORAGE_GET_F_CREATE);
        if (s) { s->start_ns = bpf_ktime_get_ns(); s->nr = (u32)ctx->args[1]; }""", """
        struct st *s = starts.task_storage_get(bpf_get_current_task_btf(), 0, 0);
        if (s && s->start_ns) { u64 lat = bpf_ktime_get_ns() - s->start_ns;
            s->start_ns = 0; u32 k = s->nr & 1023; u64 *c = stats.lookup(&k);
            if (c) *c += lat; }"""),
]


def program(enter: str, exit_: str) -> str:
    return (HEAD + "RAW_TRACEPOINT_PROBE(sys_enter) {" + enter + "\n    return 0;\n}\n"
            + "RAW_TRACEPOINT_PROBE(sys_exit) {" + exit_ + "\n    return 0;\n}\n")


def cpu_of(binary: Path, calls: int) -> float:
    """The loop's CPU time, once no other process has a syscall probe attached (those
    slow every syscall: bench/overhead.py waits the same way)."""
    sys.path.insert(0, str(REPO / "bench"))
    from overhead import syscall_probes, wait_until

    wait_until(lambda: not syscall_probes({os.getpid()}), 20.0, 0.5)
    proc = subprocess.Popen([str(binary), str(calls)])
    _, _, usage = os.wait4(proc.pid, 0)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--calls", type=int, default=2_000_000)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    from bcc import BPF

    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "getppid_loop"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(REPO / "bench" / "getppid_loop.c")],
                       check=True)
        base: list[float] = []
        samples: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
        for rep in range(args.reps):
            base.append(cpu_of(binary, args.calls))
            k = rep % len(VARIANTS)
            for name, enter, exit_ in VARIANTS[k:] + VARIANTS[:k]:
                b = BPF(text=program(enter, exit_))
                time.sleep(0.2)
                samples[name].append(cpu_of(binary, args.calls))
                b.cleanup()
            print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
    no_agent = statistics.median(base)
    floor = statistics.median(samples[VARIANTS[0][0]])
    print(f"getppid x{args.calls}, medians of {args.reps} runs; no agent {no_agent:.3f} s\n")
    print("| program pair | CPU s | x raw floor | +ns/syscall over the floor "
          "| spread (min-max s) |")
    print("|---|---:|---:|---:|---|")
    for name, _, _ in VARIANTS:
        v = samples[name]
        med = statistics.median(v)
        print(f"| {name} | {med:.3f} | {med / floor:.2f} | "
              f"{(med - floor) / args.calls * 1e9:.0f} | {min(v):.3f}-{max(v):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
