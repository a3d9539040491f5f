"""FuncMonitor: pattern resolution, the option checks, the event struct, and exact call
counts, latency and rate-limited events on the real kernel for a program the test runs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from agent.kernel.probes import kprobes_available
from agent.kernel.symbols import Probe, dedup_by_address, glob_regex
from agent.model.events import COMMON_FIELDS, EventHeader
from agent.model.targets import TargetSet
from agent.monitors.contract import MonitorContext, MonitorError
from agent.monitors.func.monitor import (
    FUNC_COUNTERS,
    FUNC_F_LATENCY,
    FUNC_HIST_SLOTS,
    NR_FUNC_COUNTERS,
    FuncEvent,
    FuncMonitor,
    FuncOptions,
    FuncPatternError,
    FuncStats,
    parse_pattern,
    trim_zeros,
)
from tests.support.filters import filter_tests
from tests.support.kernel import (
    CollectingSink,
    compile_c,
    loaded_prog_ids,
    prog_ids_held_by,
)
from tests.support.layout import (
    assert_constants,
    assert_event_layout,
    assert_layout,
    indexed,
    struct_sizes,
)
from tests.support.monitors import drain, loaded_monitor

MONITOR_DIR = FuncMonitor.source_dir()

K = 37  # calls the test program makes: odd, so neither 0 nor a doubling passes

CALLER = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Through a volatile pointer: gcc can neither inline nor drop the calls, and each one
 * runs libc's getpid (a real function in glibc 2.36, no caching). */
static pid_t (*volatile call)(void) = getpid;

int main(int argc, char **argv)
{
    int k = atoi(argv[1]);
    char line[16];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    if (!fgets(line, sizeof line, stdin))   /* go */
        return 1;
    for (int i = 0; i < k; i++)
        call();
    printf("done\n");
    fgets(line, sizeof line, stdin);        /* exit */
    return 0;
}
"""


# -- helpers ---------------------------------------------------------------------------
@dataclass
class Caller:
    """The test program, stopped at "ready" until go()."""

    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        return self.proc.stdin, self.proc.stdout

    def wait_ready(self) -> None:
        assert self._pipes()[1].readline() == b"ready\n"

    def go(self) -> None:
        """Let it make its calls; returns when they are done."""
        stdin, stdout = self._pipes()
        stdin.write(b"go\n")
        stdin.flush()
        assert stdout.readline() == b"done\n"

    def finish(self) -> None:
        if self.proc.poll() is None:
            stdin = self._pipes()[0]
            stdin.write(b"exit\n")
            stdin.close()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def caller_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("func"), "caller", CALLER)


@contextmanager
def started(binary: Path, k: int = K) -> Iterator[Caller]:
    proc = subprocess.Popen([str(binary), str(k)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    caller = Caller(proc)
    try:
        caller.wait_ready()
        yield caller
    finally:
        caller.finish()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def func_monitor(sink: CollectingSink, targets: TargetSet, multi: bool = True,
                 **options: object) -> ContextManager[FuncMonitor]:
    def choose(m: FuncMonitor) -> None:
        m.prefer_uprobe_multi = multi

    return loaded_monitor("func", sink, targets=targets, before_load=choose, **options)


def only(pid: int) -> TargetSet:
    return TargetSet(pids=frozenset({pid}), follow_children=False)


def function_stats(monitor: FuncMonitor, name: str) -> dict:
    [entry] = [f for f in monitor.stats()["functions"] if f["name"] == name]
    return entry


# -- no kernel needed --------------------------------------------------------------------
HEADER = MONITOR_DIR / "func.h"


def test_ctypes_mirror_matches_c() -> None:
    assert_event_layout(FuncMonitor.EVENT, MONITOR_DIR)
    assert_layout(HEADER, "func_event", FuncEvent)
    assert_layout(HEADER, "func_stats", FuncStats)


@pytest.mark.parametrize(("flags", "latency", "console_tail"), [
    (FUNC_F_LATENCY, {"latency_ns": 1234}, " 1234 ns"),
    (0, {}, ""),  # latency_ns unset without the flag: no key at all
])
def test_parse_event_csv_and_console(flags: int, latency: dict, console_tail: str) -> None:
    m = FuncMonitor(FuncOptions(patterns=["c:getpid"]), MonitorContext(
        targets=TargetSet(), sink=CollectingSink()))
    m.probes = [Probe("uprobe", "/lib/a.so", "f0", 16, "c:f0"),
                Probe("uprobe", "/lib/b.so", "f1", 32, "c:f1")]
    hdr = EventHeader(ts_ns=time.monotonic_ns(), pid=10, tid=11, ppid=9, uid=1000, gid=100,
                      comm=b"cat")
    event = m.parse_event(bytes(FuncEvent(hdr=hdr, latency_ns=1234, probe_id=1, flags=flags)))
    assert {k: v for k, v in event.items() if k not in COMMON_FIELDS} == {
        "function": "f1", "target": "/lib/b.so", **latency}
    assert (event["monitor"], event["pid"], event["comm"]) == ("func", 10, "cat")
    assert m.console_line(event) == (
        f"{event['timestamp']} func pid=10 tid=11 comm=cat /lib/b.so:f1{console_tail}")
    assert m.csv_row(event)[-3:] == ["f1", "/lib/b.so", latency.get("latency_ns")]
    m.EventModel.model_validate(event)


def test_header_constants_match_python() -> None:
    assert_constants(HEADER, {
        "FUNC_HIST_SLOTS": FUNC_HIST_SLOTS, "FUNC_F_LATENCY": FUNC_F_LATENCY,
        "NR_FUNC_COUNTERS": NR_FUNC_COUNTERS, **indexed(FUNC_COUNTERS, "FCNT_{}"),
    })
    assert len(FUNC_COUNTERS) <= NR_FUNC_COUNTERS
    # Map keys and the shared (not per-CPU) rate window BCC builds from the header.
    assert struct_sizes(HEADER, ["func_entry_key", "func_rate"]) == {
        "func_entry_key": 8, "func_rate": 16}


def test_pattern_forms() -> None:
    assert (parse_pattern("c:malloc").target, parse_pattern("c:malloc").glob) == ("c", "malloc")
    p = parse_pattern("/usr/bin/python3.11:PyObject_*")
    assert (p.target, p.glob) == ("/usr/bin/python3.11", "PyObject_*")
    assert parse_pattern("vfs_*").target is None
    for bad in ("", "c:", ":x", " c:getpid", "a b"):
        with pytest.raises(FuncPatternError):
            parse_pattern(bad)
    import re

    rx = re.compile(glob_regex("str*"))
    assert rx.match("strlen") and not rx.match("xstrlen")
    assert not re.compile(glob_regex("getpid")).match("getpid2")  # anchored at the end


def test_invalid_pattern_is_an_options_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FuncMonitor.Options(patterns=["c:"])
    with pytest.raises(ValidationError):
        FuncMonitor.Options(patterns=[])
    with pytest.raises(ValidationError):
        FuncMonitor.Options(patterns=["c:getpid"], max_probes=100_000)


def test_aliases_at_one_address_are_one_probe() -> None:
    probes = [
        Probe("uprobe", "/lib/c.so", "__getpid", 0x10),
        Probe("uprobe", "/lib/c.so", "getpid", 0x10),
        Probe("uprobe", "/lib/c.so", "getppid", 0x20),
    ]
    assert [p.name for p in dedup_by_address(probes)] == ["getpid", "getppid"]
    assert trim_zeros([0, 3, 0, 1, 0, 0]) == [0, 3, 0, 1]


def test_resolve_libc_getpid() -> None:
    pytest.importorskip("bcc")
    [probe] = FuncMonitor.resolve(FuncMonitor.Options(patterns=["c:getpid"]))
    assert probe.kind == "uprobe" and probe.name == "getpid" and probe.address > 0
    assert os.path.basename(probe.target).startswith("libc.so")
    # getpid and __getpid share an address: one probe each address, never two.
    probes = FuncMonitor.resolve(FuncMonitor.Options(patterns=["c:*getpid", "c:getpid"]))
    addresses = [p.address for p in probes]
    assert len(addresses) == len(set(addresses))
    assert "getpid" in [p.name for p in probes]


def test_pattern_matching_nothing_is_refused() -> None:
    pytest.importorskip("bcc")
    with pytest.raises(FuncPatternError, match="no_such_function_xyz"):
        FuncMonitor.resolve(FuncMonitor.Options(patterns=["c:no_such_function_xyz*"]))
    with pytest.raises(FuncPatternError, match="no such library"):
        FuncMonitor.resolve(FuncMonitor.Options(patterns=["nosuchlibxyz:f"]))


def test_too_many_matches_names_the_count() -> None:
    pytest.importorskip("bcc")
    options = FuncMonitor.Options(patterns=["c:str*"], max_probes=1)
    count = len(FuncMonitor.resolve(FuncMonitor.Options(patterns=["c:str*"], max_probes=500)))
    assert count > 1
    with pytest.raises(FuncPatternError, match=rf"match {count} functions.*max_probes=1"):
        FuncMonitor.resolve(options)


class FakeFeature:
    def __init__(self, available: bool) -> None:
        self.available = available


class FakeReport:
    def __init__(self, kprobes: bool) -> None:
        self.features = {"kprobes": FakeFeature(kprobes)}


def test_kernel_patterns_need_kprobes() -> None:
    options = FuncMonitor.Options(patterns=["vfs_read", "c:getpid"])
    reason = FuncMonitor.option_errors(options, FakeReport(False))
    assert reason is not None and "kprobes" in reason and "vfs_read" in reason
    assert FuncMonitor.option_errors(options, FakeReport(True)) is None
    user_only = FuncMonitor.Options(patterns=["c:getpid"])
    assert FuncMonitor.option_errors(user_only, FakeReport(False)) is None


def test_kernel_pattern_refused_on_this_kernel() -> None:
    """These machines have CONFIG_KPROBES off (docs/kernel.md): detection must say so, both
    our own and through the capability report the manager passes."""
    if kprobes_available():
        pytest.skip("this kernel has kprobes")
    from agent.kernel.capabilities import build_report

    options = FuncMonitor.Options(patterns=["vfs_read"])
    for report in (object(), build_report()):
        reason = FuncMonitor.option_errors(options, report)
        assert reason is not None and "kprobes" in reason and "vfs_read" in reason


# -- the real kernel ---------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("multi", [True, False], ids=["uprobe_multi", "bcc_perf"])
@pytest.mark.parametrize("latency", [True, False], ids=["latency", "count"])
def test_counts_exactly_the_target_calls(caller_binary: Path, sink: CollectingSink,
                                         multi: bool, latency: bool) -> None:
    with (
        started(caller_binary) as target,
        started(caller_binary, 5) as other,
        func_monitor(sink, only(target.pid), multi=multi, patterns=["c:getpid"],
                     latency=latency) as m,
    ):
            if not multi:
                assert m.attach_mode == "perf events (BCC)"
            other.go()  # same binary, not a target: filtered in the kernel
            target.go()
            f = function_stats(m, "getpid")
            counters = m.kernel_counters()
    assert f["count"] == K
    assert os.path.realpath(f["target"]) == f["target"]
    if latency:
        assert sum(f["histogram"]) == K and f["total_ns"] > 0
        assert counters["no_entry"] == 0
    else:
        assert "histogram" not in f and f["total_ns"] == 0


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_retargeting_live(caller_binary: Path, sink: CollectingSink) -> None:
    with (
        started(caller_binary) as first,
        started(caller_binary, 3) as second,
        func_monitor(sink, only(first.pid), patterns=["c:getpid"], latency=False) as m,
    ):
            m.set_targets(only(second.pid))
            first.go()
            second.go()
            assert function_stats(m, "getpid")["count"] == 3


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("latency", [True, False], ids=["latency", "count"])
def test_events_are_rate_limited_in_the_kernel(caller_binary: Path, sink: CollectingSink,
                                               latency: bool) -> None:
    rate = 10
    with (
        started(caller_binary) as target,
        func_monitor(sink, only(target.pid), patterns=["c:getpid"], latency=latency,
                     events=True, events_per_second=rate) as m,
    ):
            t0 = time.monotonic()
            target.go()  # K calls in a few ms: all in one one-second window
            assert time.monotonic() - t0 < 0.9
            drain(m)
            counters = m.kernel_counters()
            assert function_stats(m, "getpid")["count"] == K
    events = [e for e in sink.events if e["pid"] == target.pid]
    assert len(events) == len(sink.events) == rate
    assert counters["suppressed"] == K - rate
    assert counters["seen"] == K and counters["submitted"] == rate
    for e in events:
        assert e["monitor"] == "func" and e["function"] == "getpid"
        assert e["tid"] == target.pid and e["comm"] == "caller"
        assert (e["ppid"], e["uid"], e["gid"]) == (os.getpid(), os.getuid(), os.getgid())
        assert set(e) == {*COMMON_FIELDS, "function", "target", *(["latency_ns"] * latency)}
        assert os.path.basename(e["target"]).startswith("libc.so")
        assert e["timestamp"].endswith("Z") and e["ts_ns"] > 0
        assert ("latency_ns" in e) == latency
        if latency:
            assert e["latency_ns"] > 0


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 instruction detail")
@pytest.mark.parametrize("multi", [True, False], ids=["uprobe_multi", "bcc_perf"])
def test_unprobeable_function_is_skipped_and_reported(caller_binary: Path,
                                                      sink: CollectingSink,
                                                      multi: bool) -> None:
    """glibc's pthread_spin_lock starts with a lock-prefixed instruction, which x86
    uprobes refuse: the monitor leaves it out before attaching, runs without it and
    says why."""
    with (
        started(caller_binary) as target,
        func_monitor(sink, only(target.pid), multi=multi,
                     patterns=["c:getpid", "c:pthread_spin_lock"]) as m,
    ):
            stats = m.stats()
            target.go()
            assert function_stats(m, "getpid")["count"] == K
    assert [u["name"] for u in stats["unattached"]] == ["pthread_spin_lock"]
    assert "lock prefix" in stats["unattached"][0]["error"]
    assert stats["unattached"][0]["excluded"] is True
    assert stats["counts"] == {"matched": 2, "attached": 1, "excluded": 1, "refused": 0}
    assert "pthread_spin_lock" not in [f["name"] for f in stats["functions"]]
    events = Path("/sys/kernel/tracing/uprobe_events")
    if events.exists():  # the legacy fallback's leftover event was removed
        assert f"_bcc_{os.getpid()}" not in events.read_text()


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_nothing_attachable_is_an_error(sink: CollectingSink) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("x86 instruction detail")
    with (
        pytest.raises(MonitorError, match="no function could be attached"),
        func_monitor(sink, TargetSet(), patterns=["c:pthread_spin_lock"]),
    ):
        pass


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_one_program_for_many_functions_counts_exactly_and_skips_refused_ones(
        caller_binary: Path, sink: CollectingSink) -> None:
    """Every pthread_* function plus getpid in one link per direction: the kernel refuses
    pthread_spin_lock (ENOTSUPP), which must cost only that function, not the link."""
    with (
        started(caller_binary) as target,
        func_monitor(sink, only(target.pid), patterns=["c:pthread_*", "c:getpid"]) as m,
    ):
        assert m.cookie_mode and "cookies" in m.attach_mode
        target.go()
        f = function_stats(m, "getpid")
        stats = m.stats()
        counters = m.kernel_counters()
    assert f["count"] == K and sum(f["histogram"]) == K
    assert counters["no_entry"] == 0
    refused = {u["name"] for u in stats["unattached"]}
    assert "pthread_spin_lock" in refused
    attached = {x["name"] for x in stats["functions"]}
    assert len(attached) > 50 and not (attached & refused)


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_close_releases_every_program_quickly(sink: CollectingSink) -> None:
    before = loaded_prog_ids()
    with func_monitor(sink, TargetSet(), patterns=["c:pthread_mutex_*", "c:getpid"]) as m:
        n = len(m.probes) - len(m.unattached)
        assert n > 5
        ours = prog_ids_held_by(os.getpid()) - before
        # One entry and one return program for all functions (attach cookies), or a
        # pair per function without uprobe_multi links.
        assert len(ours) >= (2 if m.cookie_mode else 2 * n)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 10
    assert not (prog_ids_held_by(os.getpid()) & ours)
    assert not (loaded_prog_ids() & ours)


# -- the common header and stream filters (tests/support/filters.py) ----------------------
filter_events, test_common_fields_of_a_known_process, test_stream_filter = filter_tests(
    "func", lambda e, _: e["function"] == "flt_target",
    lambda binary: {"patterns": [f"{binary}:flt_target"], "events": True, "latency": False})
