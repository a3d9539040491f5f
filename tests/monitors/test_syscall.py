"""SyscallMonitor against ground truth: a compiled program makes exactly N getppid(2) and
M failing open(2) calls per round, and the monitor must report exactly those, with latency
(sys_enter + sys_exit programs) and without (sys_exit only)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.kernel.btf import BTFError, pt_regs_nr_offset
from agent.kernel.maps import sum_columns
from agent.kernel.syscalls import category, syscall_names
from agent.model.events import COMMON_FIELDS, EventHeader
from agent.model.targets import TargetSet
from agent.monitors.contract import MonitorContext, TransportSettings
from agent.monitors.syscall.monitor import (
    SC_CFG_ARMED,
    SC_CFG_SLOW,
    SC_COMM_LEN,
    SC_COUNTERS,
    SC_GENERATIONS,
    SC_HIST_SLOTS,
    ScConfig,
    SyscallEvent,
    SyscallMonitor,
    SyscallOptions,
    merge_stat,
    sort_limit,
)
from tests.support.filters import filter_tests
from tests.support.kernel import CollectingSink, compile_c
from tests.support.layout import (
    assert_constants,
    assert_event_layout,
    assert_layout,
    c_values,
    struct_sizes,
)
from tests.support.monitors import drain, loaded_monitor

MONITOR_DIR = SyscallMonitor.source_dir()

N_GETPPID = 1000
M_OPEN = 7
COMM = "sc_workload"
NR = {name: nr for nr, name in syscall_names().items()}
EVENT_FIELDS = {*COMMON_FIELDS, "syscall", "nr", "category", "latency_ns", "ret"}
# Both builds of the monitor: latency (sys_enter + sys_exit) and counts only (sys_exit).
MODES = [pytest.param(True, id="latency"), pytest.param(False, id="counts-only")]

# Commands on stdin, one per line: "g" runs a round (N getppid, M opens of a missing
# file, then a nanosleep of SLEEP_MS ms when > 0) and answers "done"; EOF or "q" exits.
# syscall(SYS_...) and not the libc wrappers: glibc's nanosleep() is clock_nanosleep(2).
# With DENY_GETPPID = 1 a seccomp filter, installed before "ready", makes every getppid
# fail with EPERM before it reaches sys_enter (SECCOMP_RET_ERRNO). With SIGNALS = k > 0 a
# round also raises k SIGUSR1 whose handler returns (k rt_sigreturn calls) and calls the
# noinline sc_probe_point() k times (a test puts a uretprobe on it).
# Linked statically: libc is then code of this binary alone, so a uprobe another process
# put on the shared libc (other tests, other tools on the machine) cannot run in it and
# add calls (a uretprobe makes a syscall of its own at every return).
WORKLOAD_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static void deny_getppid(void)
{
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {sizeof(filter) / sizeof(filter[0]), filter};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog))
        exit(3);
}

static void on_signal(int sig)
{
    (void)sig;
}

__attribute__((noinline)) long sc_probe_point(long x)
{
    __asm__ volatile("" : "+r"(x));
    return x + 1;
}

int main(int argc, char **argv)
{
    long n = atol(argv[1]), m = atol(argv[2]), sleep_ms = atol(argv[3]);
    long signals = argc > 5 ? atol(argv[5]) : 0, probed = 0;
    char line[64];
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    if (sigaction(SIGUSR1, &sa, NULL))
        exit(4);
    if (argc > 4 && atol(argv[4]))
        deny_getppid();
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof(line), stdin) && line[0] == 'g') {
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid);
        for (long i = 0; i < m; i++)
            open("/nonexistent-ebpf-agent-test/x", O_RDONLY);
        if (sleep_ms > 0) {
            struct timespec ts = {sleep_ms / 1000, (sleep_ms % 1000) * 1000000L};
            syscall(SYS_nanosleep, &ts, NULL);
        }
        for (long i = 0; i < signals; i++) {
            raise(SIGUSR1);
            probed = sc_probe_point(probed);
        }
        printf("done\n");
    }
    return 0;
}
"""


# -- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workload_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("syscall"), COMM, WORKLOAD_C, "-O0", "-static")


class Workload:
    """The ground-truth program, started and waiting for its first command."""

    def __init__(self, binary: Path, n: int = N_GETPPID, m: int = M_OPEN, sleep_ms: int = 0,
                 deny_getppid: int = 0, signals: int = 0):
        self.proc = subprocess.Popen(
            [str(binary), str(n), str(m), str(sleep_ms), str(deny_getppid), str(signals)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._line() == "ready"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def round(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("g\n")
        self.proc.stdin.flush()
        assert self._line() == "done"

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def workload(binary: Path, **kw: int) -> Iterator[Workload]:
    w = Workload(binary, **kw)
    try:
        yield w
    finally:
        w.kill()


def monitor(sink: CollectingSink, targets: TargetSet | None = None, transport: str = "auto",
            **options: object) -> ContextManager[SyscallMonitor]:
    return loaded_monitor("syscall", sink, targets=targets,
                          transport=TransportSettings(kind=transport), **options)


def by_name(stats: dict) -> dict[str, dict]:
    return {row["name"]: row for row in stats["syscalls"]}


def pid_targets(pid: int) -> TargetSet:
    return TargetSet(pids=frozenset({pid}))


def attached_programs(pid: int) -> set[tuple[str, str]]:
    """(attachment type, tracepoint) of the programs ``pid`` attached (bpftool perf show)."""
    out = subprocess.run(["bpftool", "perf", "show", "-j"], capture_output=True, text=True,
                         check=True).stdout
    return {(a["fd_type"], a["tracepoint"]) for a in json.loads(out or "[]")
            if a.get("pid") == pid and "tracepoint" in a}


# -- without a kernel ---------------------------------------------------------------------

HEADER = MONITOR_DIR / "syscall.h"


def test_header_and_python_mirrors_agree() -> None:
    assert_event_layout(SyscallMonitor.EVENT, MONITOR_DIR)
    assert_layout(HEADER, "sc_config", ScConfig)
    # Built by BCC from the header: per-CPU values must be multiples of 8 bytes.
    sizes = struct_sizes(HEADER, ["sc_stat", "sc_proc_stat", "sc_errno_key", "sc_proc_key"])
    assert sizes["sc_stat"] % 8 == 0 and sizes["sc_proc_stat"] % 8 == 0
    assert_constants(HEADER, {
        "SC_COMM_LEN": SC_COMM_LEN, "SC_HIST_SLOTS": SC_HIST_SLOTS,
        "SC_GENERATIONS": SC_GENERATIONS, "SC_CFG_ARMED": SC_CFG_ARMED,
        "SC_CFG_SLOW": SC_CFG_SLOW,
        **dict(zip(["SC_CNT_PROC_FULL", "SC_CNT_ERRNO_FULL", "SC_CNT_NR_RANGE",
                    "SC_CNT_NR_CLEARED"],
                   range(len(SC_COUNTERS)), strict=True)),
    })
    assert c_values(HEADER, {"n": "SC_NR_COUNTERS"})["n"] >= len(SC_COUNTERS)


def test_options_validate() -> None:
    assert SyscallOptions().slow_threshold_us is None
    assert SyscallOptions().latency is True
    assert SyscallOptions(slow_threshold_us=0).slow_threshold_us == 0
    with pytest.raises(ValidationError):
        SyscallOptions(slow_threshold_us=-1)
    with pytest.raises(ValidationError):
        SyscallOptions(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="needs latency"):
        SyscallOptions(latency=False, slow_threshold_us=10)


def test_counts_only_mode_reads_the_syscall_number_offset_from_btf() -> None:
    assert SyscallMonitor.option_errors(SyscallOptions(), None) is None
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        pytest.skip("no BTF")
    if os.uname().machine == "x86_64":
        assert SyscallMonitor.option_errors(SyscallOptions(latency=False), None) is None
        assert pt_regs_nr_offset() == 15 * 8  # orig_ax: the x86_64 syscall ABI's pt_regs
    with pytest.raises(BTFError):
        pt_regs_nr_offset("vax")


def test_parse_event_and_console_line() -> None:
    hdr = EventHeader(ts_ns=time.monotonic_ns(), pid=10, tid=11, ppid=9, uid=1000, gid=100,
                      comm=b"cat")
    e = SyscallEvent(hdr=hdr, latency_ns=52_000_000, ret=-2, nr=NR["openat"])
    m = SyscallMonitor(SyscallOptions(), MonitorContext(targets=TargetSet(),
                                                        sink=CollectingSink()))
    event = m.parse_event(bytes(e))
    assert set(event) == EVENT_FIELDS
    assert event["syscall"] == "openat" and event["category"] == category("openat")
    assert (event["pid"], event["tid"], event["ret"], event["comm"]) == (10, 11, -2, "cat")
    assert (event["ppid"], event["uid"], event["gid"]) == (9, 1000, 100)
    line = m.console_line(event)
    assert line == (
        f"{event['timestamp']} syscall pid=10 tid=11 comm=cat openat = -2 ENOENT 52000.0us")
    assert [event.get(f) for f in m.CSV_FIELDS] == m.csv_row(event)


def test_merge_sort_and_column_helpers() -> None:
    class S:
        def __init__(self, count: int, mn: int, mx: int) -> None:
            self.count, self.errors, self.total_ns = count, 0, count * mx
            self.min_ns, self.max_ns = mn, mx

    merged = merge_stat([S(2, 5, 9), S(0, 0, 0), S(1, 3, 4)])
    assert merged == {"count": 3, "errors": 0, "total_ns": 22, "min_ns": 3, "max_ns": 9}
    assert merge_stat([S(1, 0, 0)])["min_ns"] is None  # exit_group: no latency
    from array import array
    # 3 entries x 2 CPUs, entry-major as the kernel lays per-CPU values out
    assert sum_columns(array("Q", [1, 10, 2, 20, 3, 30]), 3) == [11, 22, 33]
    rows = [{"nr": 1, "count": 5, "total_ns": 1}, {"nr": 2, "count": 9, "total_ns": 0}]
    assert [r["nr"] for r in sort_limit(list(rows), "count", None)] == [2, 1]
    assert [r["nr"] for r in sort_limit(list(rows), "time", 1)] == [1]


# -- on the kernel ------------------------------------------------------------------------


@pytest.mark.parametrize("latency", MODES)
def test_exact_counts_for_a_target_pid(kernel: None, sink: CollectingSink,
                                       workload_bin: Path, latency: bool) -> None:
    with workload(workload_bin) as w, monitor(sink, pid_targets(w.pid), latency=latency) as m:
        w.round()
        w.round()
        w.finish()  # exit_group is counted at syscall entry
        stats = m.stats()
        counters = m.kernel_counters()
    rows = by_name(stats)
    getppid, openat = rows["getppid"], rows["openat"]
    assert (getppid["count"], getppid["errors"], getppid["errnos"]) == (2 * N_GETPPID, 0, {})
    assert (openat["count"], openat["errors"]) == (2 * M_OPEN, 2 * M_OPEN)
    assert openat["errnos"] == {"ENOENT": 2 * M_OPEN}
    assert getppid["nr"] == NR["getppid"] and getppid["category"] == category("getppid")
    if latency:
        assert 0 < getppid["min_ns"] <= getppid["max_ns"] <= getppid["total_ns"]
        assert getppid["total_ns"] >= 2 * N_GETPPID * getppid["min_ns"]
        assert len(getppid["histogram"]) == SC_HIST_SLOTS
        assert sum(getppid["histogram"]) == 2 * N_GETPPID
        assert stats["histogram_buckets"]
    else:
        for row in stats["syscalls"]:
            assert (row["total_ns"], row["min_ns"], row["max_ns"], row["histogram"]) == (
                None, None, None, None), row["name"]
        assert stats["histogram_buckets"] is None
    if latency:  # counted at sys_enter
        exit_group = rows["exit_group"]
        assert exit_group["count"] == 1 and exit_group["min_ns"] is None
    else:  # no sys_enter program: never seen (documented)
        assert "exit_group" not in rows
    assert "exit" not in rows
    assert counters["nr_out_of_range"] == 0 and counters["pending_full"] == 0
    assert counters["nr_cleared"] == 0  # no signal handler ran, no uretprobe (static binary)


K_CLEARED = 5  # handled signals and probed returns per round


@pytest.mark.parametrize("latency", MODES)
def test_signal_returns_and_uretprobes_are_counted_exactly(
        kernel: None, sink: CollectingSink, workload_bin: Path, latency: bool) -> None:
    """rt_sigreturn(2) and the uretprobe trampoline's syscall leave -1 as the syscall
    number at sys_exit (the kernel clears orig_ax): the counts-only build counts them in
    nr_cleared, never as an out-of-range number, and the latency build under their names
    (it reads the number at sys_enter). Every other count stays exact."""
    from bcc import BPF  # the test's own uretprobe, on the workload's own function

    probe = BPF(text="int on_return(void *ctx) { return 0; }")
    try:
        probe.attach_uretprobe(name=str(workload_bin), sym="sc_probe_point",
                               fn_name="on_return")
        with workload(workload_bin, signals=K_CLEARED) as w, monitor(
            sink, pid_targets(w.pid), latency=latency
        ) as m:
            w.round()
            w.round()
            rows = by_name(m.stats())
            counters = m.kernel_counters()
            w.finish()
    finally:
        probe.cleanup()
    assert rows["getppid"]["count"] == 2 * N_GETPPID
    assert rows["openat"]["errnos"] == {"ENOENT": 2 * M_OPEN}
    assert counters["nr_out_of_range"] == 0
    if latency:
        assert rows["rt_sigreturn"]["count"] == 2 * K_CLEARED
        assert rows["uretprobe"]["count"] == 2 * K_CLEARED
        assert counters["nr_cleared"] == 0
    else:
        assert "rt_sigreturn" not in rows and "uretprobe" not in rows
        assert counters["nr_cleared"] == 2 * 2 * K_CLEARED


@pytest.mark.parametrize("latency", MODES)
def test_programs_are_raw_tracepoints(kernel: None, sink: CollectingSink,
                                      latency: bool) -> None:
    if not shutil.which("bpftool"):
        pytest.skip("bpftool missing")
    with monitor(sink, latency=latency):
        attached = attached_programs(os.getpid())
    syscall_progs = {a for a in attached if a[1].startswith("sys_")}
    if latency:
        assert syscall_progs == {("raw_tracepoint", "sys_enter"), ("raw_tracepoint", "sys_exit")}
    else:  # nothing at sys_enter
        assert syscall_progs == {("raw_tracepoint", "sys_exit")}


@pytest.mark.parametrize("latency", MODES)
def test_seccomp_denied_calls(kernel: None, sink: CollectingSink, workload_bin: Path,
                              latency: bool) -> None:
    """A call a seccomp filter denies returns before sys_enter but passes sys_exit: the
    latency mode does not count it (nothing stamped it), the counts-only mode counts it
    with the errno the filter returned. The other calls stay exact in both."""
    with workload(workload_bin, deny_getppid=1) as w, monitor(
        sink, pid_targets(w.pid), latency=latency
    ) as m:
        w.round()
        rows = by_name(m.stats())
        w.finish()
    assert rows["openat"]["errnos"] == {"ENOENT": M_OPEN}
    if latency:
        assert "getppid" not in rows
    else:
        getppid = rows["getppid"]
        assert (getppid["count"], getppid["errors"]) == (N_GETPPID, N_GETPPID)
        assert getppid["errnos"] == {"EPERM": N_GETPPID}


def test_no_targets_counts_at_least_the_workload(kernel: None, sink: CollectingSink,
                                                 workload_bin: Path) -> None:
    with workload(workload_bin) as w, monitor(sink) as m:
        w.round()
        rows = by_name(m.stats())
        w.finish()
    assert rows["getppid"]["count"] >= N_GETPPID
    assert rows["openat"]["errnos"].get("ENOENT", 0) >= M_OPEN


@pytest.mark.parametrize("latency", MODES)
def test_comm_target_gives_exact_counts(kernel: None, sink: CollectingSink,
                                        workload_bin: Path, latency: bool) -> None:
    with workload(workload_bin) as w, monitor(
        sink, TargetSet(comms=frozenset({COMM})), latency=latency
    ) as m:
        w.round()
        rows = by_name(m.stats())
        w.finish()
    assert rows["getppid"]["count"] == N_GETPPID
    assert rows["openat"]["errnos"] == {"ENOENT": M_OPEN}


@pytest.mark.parametrize("latency", MODES)
def test_filtered_process_counts_nothing(kernel: None, sink: CollectingSink,
                                         workload_bin: Path, latency: bool) -> None:
    idle = subprocess.Popen(["sleep", "60"])
    try:
        with workload(workload_bin) as w, monitor(
            sink, pid_targets(idle.pid), latency=latency
        ) as m:
            w.round()
            w.finish()
            stats = m.stats()
    finally:
        idle.kill()
        idle.wait()
    # Nothing of the workload, exit_group included (the idle target sleeps throughout).
    assert not {"getppid", "openat", "exit_group"} & set(by_name(stats))


def test_slow_calls_become_events(kernel: None, sink: CollectingSink,
                                  workload_bin: Path) -> None:
    with workload(workload_bin, sleep_ms=50) as w, monitor(
        sink, pid_targets(w.pid), slow_threshold_us=20_000
    ) as m:
        w.round()
        drain(m)
        w.finish()
    mine = [e for e in sink.events if e["pid"] == w.pid]
    sleeps = [e for e in mine if e["syscall"] == "nanosleep"]
    assert len(sleeps) == 1
    e = sleeps[0]
    assert set(e) == EVENT_FIELDS
    assert e["latency_ns"] >= 50_000_000 and e["ret"] == 0 and e["nr"] == NR["nanosleep"]
    assert (e["monitor"], e["comm"], e["tid"]) == ("syscall", COMM, w.pid)
    assert (e["ppid"], e["uid"], e["gid"]) == (os.getpid(), os.getuid(), os.getgid())
    assert e["category"] == category("nanosleep")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", e["timestamp"])
    wall = datetime.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - wall).total_seconds()) < 60
    assert all(e["latency_ns"] > 20_000_000 for e in mine)
    assert not [e for e in mine if e["syscall"] in ("getppid", "openat")]


@pytest.mark.parametrize("transport", ["ringbuf", "perf"])
def test_threshold_changes_at_run_time_and_zero_streams_every_call(
    kernel: None, sink: CollectingSink, workload_bin: Path, transport: str
) -> None:
    with workload(workload_bin) as w, monitor(sink, pid_targets(w.pid), transport) as m:
        w.round()
        drain(m)
        assert not sink.events  # threshold off: no event at all
        m.set_slow_threshold_us(0)
        w.round()
        drain(m)
        counters = m.kernel_counters()
        w.finish()
    getppid = [e for e in sink.events if e["syscall"] == "getppid"]
    assert len(getppid) == N_GETPPID
    assert counters["dropped"] == 0


@pytest.mark.parametrize("latency", MODES)
def test_per_process_counts_are_exact(kernel: None, sink: CollectingSink,
                                      workload_bin: Path, latency: bool) -> None:
    with workload(workload_bin) as w, monitor(sink, per_process=True, latency=latency) as m:
        w.round()
        stats = m.stats()
        counters = m.kernel_counters()
        w.finish()
    proc = next(p for p in stats["processes"] if p["pid"] == w.pid)
    assert proc["comm"] == COMM
    calls = {s["name"]: s for s in proc["syscalls"]}
    assert calls["getppid"]["count"] == N_GETPPID
    assert (calls["openat"]["count"], calls["openat"]["errors"]) == (M_OPEN, M_OPEN)
    assert proc["count"] == sum(s["count"] for s in proc["syscalls"])
    assert counters["process_overflow"] == 0
    if not latency:
        assert proc["total_ns"] is None
        assert all(s["total_ns"] is None and s["max_ns"] is None for s in proc["syscalls"])


@pytest.mark.parametrize("latency", MODES)
def test_reset_starts_a_new_window(kernel: None, sink: CollectingSink,
                                   workload_bin: Path, latency: bool) -> None:
    with workload(workload_bin) as w, monitor(
        sink, pid_targets(w.pid), per_process=True, latency=latency
    ) as m:
        w.round()
        first = m.stats(reset=True)
        w.round()
        w.round()
        time.sleep(0.3)  # a lower bound for this window's length (no upper bound asserted)
        second = m.stats()
        closed = m.stats(reset=True)
        empty = m.stats()
        w.finish()
    assert by_name(first)["getppid"]["count"] == N_GETPPID
    assert by_name(second)["getppid"]["count"] == 2 * N_GETPPID
    assert by_name(second)["openat"]["errnos"] == {"ENOENT": 2 * M_OPEN}
    assert by_name(closed)["getppid"]["count"] == 2 * N_GETPPID
    assert "getppid" not in by_name(empty)
    proc = next(p for p in closed["processes"] if p["pid"] == w.pid)
    assert {s["name"]: s["count"] for s in proc["syscalls"]}["getppid"] == 2 * N_GETPPID
    assert not empty["processes"] or all(p["pid"] == w.pid for p in empty["processes"])
    assert closed["interval_s"] >= 0.3 and empty["interval_s"] >= 0


def test_sort_limit_and_snapshot_rows(kernel: None, sink: CollectingSink,
                                      workload_bin: Path) -> None:
    with workload(workload_bin) as w, monitor(sink, pid_targets(w.pid)) as m:
        w.round()
        by_count = m.stats()["syscalls"]
        by_time = m.stats(sort="time", limit=2)["syscalls"]
        rows = m.snapshot_rows()
        with pytest.raises(ValueError):
            m.stats(sort="bogus")
        w.finish()
    assert by_count[0]["name"] == "getppid"
    assert [r["count"] for r in by_count] == sorted((r["count"] for r in by_count), reverse=True)
    assert len(by_time) == 2 and by_time[0]["total_ns"] >= by_time[1]["total_ns"]
    assert all(tuple(r) == SyscallMonitor.SNAPSHOT_FIELDS for r in rows)
    assert {r["name"]: r["count"] for r in rows}["getppid"] == N_GETPPID


def test_counts_only_refuses_time_sort(kernel: None, sink: CollectingSink,
                                       workload_bin: Path) -> None:
    with workload(workload_bin) as w, monitor(sink, pid_targets(w.pid), latency=False) as m:
        w.round()
        with pytest.raises(ValueError, match="latency"):
            m.stats(sort="time")
        with pytest.raises(ValidationError):
            m.set_slow_threshold_us(100)
        rows = {r["name"]: r for r in m.snapshot_rows()}
        w.finish()
    assert rows["getppid"]["count"] == N_GETPPID and rows["getppid"]["total_ns"] is None


# -- the common header and stream filters (tests/support/filters.py) ----------------------
filter_events, test_common_fields_of_a_known_process, test_stream_filter = filter_tests(
    "syscall", lambda e, _: e["syscall"] in ("nanosleep", "clock_nanosleep"),
    lambda _: {"slow_threshold_us": 30_000})
