"""What the net monitor costs per TCP connection, side by side with a minimal program on
the same tracepoint, on a connection storm over loopback (one process connects, accepts,
writes a byte each way and closes, COUNT times). Workload CPU time (user + system:
on loopback the whole handshake, and so every sock:inet_sock_set_state program, runs in
the workload's syscalls and their softirqs), medians of alternating runs. A fifth
configuration isolates what a syscall tracepoint alone costs (the monitor's accept(2)
hook is one): the minimal program plus an empty sys_exit_accept4 program. Then each
configuration once more with the kernel's BPF run-time accounting on
(tests/support/bpfstats.py): ns per connection inside the programs. No assertion: it
prints tables.

    .venv/bin/python bench/net_cost.py [--reps 5] [--connections 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STORM_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int n = atoi(argv[1]);
    struct sockaddr_in a = {0};
    socklen_t len = sizeof(a);
    char b = 'x';
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 128)
        || getsockname(l, (struct sockaddr *)&a, &len))
        return 1;
    for (int i = 0; i < n; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, sizeof(a)))
            return 2;
        int s = accept(l, 0, 0);
        if (s < 0 || write(c, &b, 1) != 1 || read(s, &b, 1) != 1 || write(s, &b, 1) != 1
            || read(c, &b, 1) != 1)
            return 3;
        close(s);   /* the accepting side first: its TIME_WAIT holds no ephemeral port */
        close(c);
    }
    return 0;
}
"""

# The floor: the same tracepoint, a program that only counts (one per-CPU array update).
MINIMAL = r"""
BPF_PERCPU_ARRAY(hits, u64, 1);
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    u32 zero = 0;
    u64 *v = hits.lookup(&zero);
    if (v)
        *v += 1;
    return 0;
}
"""


def cpu_of(binary: Path, connections: int) -> float:
    proc = subprocess.Popen([str(binary), str(connections)])
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"storm failed: status {status}")
    return usage.ru_utime + usage.ru_stime


@contextmanager
def nothing() -> Iterator[None]:
    yield


# Any syscalls: tracepoint sets the syscall-tracing flag on every task, so every
# syscall of the machine takes the slow entry/exit path, whether or not its own
# tracepoint has a program.
EMPTY_ACCEPT_EXIT = r"""
TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return 0;
}
"""


def bcc_program(text: str) -> Callable[[], Iterator[None]]:
    @contextmanager
    def run() -> Iterator[None]:
        from bcc import BPF

        b = BPF(text=text)
        try:
            yield
        finally:
            b.cleanup()
    return run


minimal = bcc_program(MINIMAL)


def net_monitor(**options: object) -> Callable[[], Iterator[None]]:
    @contextmanager
    def run() -> Iterator[None]:
        from tests.support.monitors import NullSink, loaded_monitor, polled

        with loaded_monitor("net", NullSink(), **options) as m:
            try:
                with polled(m):  # the agent's poller: events are read, then dropped
                    yield
            finally:
                counters = m.kernel_counters()
                if counters.get("dropped"):
                    print(f"  (net {options}: {counters['dropped']} events dropped)",
                          file=sys.stderr)
    return run


VARIANTS: list[tuple[str, Callable[[], object]]] = [
    ("no program", nothing),
    ("minimal: one counting program on sock:inet_sock_set_state", minimal),
    ("minimal + an empty sys_exit_accept4 program", bcc_program(MINIMAL + EMPTY_ACCEPT_EXIT)),
    ("net monitor, all events", net_monitor()),
    ("net monitor, events: [close]", net_monitor(events=["close"])),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--connections", type=int, default=20_000)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 1
    from tests.support.bpfstats import bpf_stats_enabled, prog_times, runs_between

    samples: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    in_programs: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    stats_conns = max(1, args.connections // 4)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "net_storm.c"
        src.write_text(STORM_C)
        binary = Path(tmp) / "net_storm"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(src)], check=True)
        for rep in range(args.reps):
            k = rep % len(VARIANTS)
            for name, variant in VARIANTS[k:] + VARIANTS[:k]:
                with variant():  # type: ignore[attr-defined]
                    time.sleep(0.2)
                    samples[name].append(cpu_of(binary, args.connections))
                    with bpf_stats_enabled():
                        before = prog_times()
                        cpu_of(binary, stats_conns)
                        ran = runs_between(before, prog_times())
                    in_programs[name].append(sum(t for _r, t in ran.values()) / stats_conns)
            print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
    none = statistics.median(samples[VARIANTS[0][0]])
    floor = statistics.median(samples[VARIANTS[1][0]])
    n = args.connections
    print(f"{n} loopback connections per run (connect, accept, 1 byte each way, close), "
          f"workload CPU, medians of {args.reps} runs\n")
    print("| configuration | CPU s | us/connection | x minimal | +us/connection over minimal "
          "| spread (min-max s) | ns/connection in the programs (bpf_stats) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, _ in VARIANTS:
        v = samples[name]
        med = statistics.median(v)
        print(f"| {name} | {med:.3f} | {med / n * 1e6:.1f} | {med / floor:.2f} | "
              f"{(med - floor) / n * 1e6:+.2f} | {min(v):.3f}-{max(v):.3f} | "
              f"{statistics.median(in_programs[name]):.0f} |")
    print(f"\nno program: {none / n * 1e6:.1f} us/connection")
    return 0


if __name__ == "__main__":
    sys.exit(main())
