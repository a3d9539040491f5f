"""FuncMonitor's probe scope: with pid targets the uprobes are placed in the targeted
processes (and followed children) only. Checked on the real kernel with programs the
test runs: exact counts for a target, nothing for an untargeted process, and the truth
of where breakpoints are, read from each process's own memory (/proc/PID/mem): a probed
function's first bytes differ from the file's (x86: int3), an unprobed one's do not."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from agent.kernel.procfs import process_start
from agent.model.targets import TargetSet
from agent.monitors.func.monitor import FuncOptions
from tests.support.func_scope import PROGRAM, K, marker_pattern, probed, running
from tests.support.kernel import CollectingSink, compile_c
from tests.support.monitors import drain, loaded_monitor


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("scope"), "scopecaller", PROGRAM)


def getpid_count(m: Any) -> int:
    counts = {f["name"]: f["count"] for f in m.stats()["functions"]}
    return int(counts.get("getpid", 0))


def marked(options: dict[str, Any], program: Path) -> dict[str, Any]:
    """``options`` with the program's marker function probed too (``probed``)."""
    return {**options, "patterns": [*options["patterns"], marker_pattern(program)]}


def closed(m: Any) -> None:
    """Wait until the links of processes left behind are closed (the closer thread)."""
    deadline = time.monotonic() + 120
    while m.stats()["closing"]:
        assert time.monotonic() < deadline, "links still closing"
        time.sleep(0.05)


def pids(*values: int, follow: bool = False) -> TargetSet:
    return TargetSet(pids=frozenset(values), follow_children=follow)


ALL_LIBC = {"patterns": ["c:*"], "max_probes": 20_000, "latency": True}
GETPID = {"patterns": ["c:getpid"], "latency": False}


# -- pid scope ------------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("options", "uprobe_multi"), [
    (ALL_LIBC, True),  # one program, attach cookies, a link per binary and process
    (GETPID, True),
    (GETPID, False),  # BCC's perf-event uprobes with pid=
], ids=["c:*", "getpid", "getpid-bcc-perf"])
def test_a_pid_target_is_probed_and_counted_exactly_and_no_other_process_is(
        program: Path, options: dict[str, Any], uprobe_multi: bool) -> None:
    with running(program) as target, running(program) as other:
        with loaded_monitor(
                "func", CollectingSink(), targets=pids(target.pid),
                **marked(options, program),
                before_load=lambda m: setattr(m, "prefer_uprobe_multi", uprobe_multi)) as m:
            assert probed(target.pid, program) and not probed(other.pid, program)
            other.go()
            target.go()
            other.go()
            assert getpid_count(m) == K
            status = m.stats()
            assert (status["probe_scope"], status["probed_pids"]) == ("pids", [target.pid])
            assert status["unprobed_pids"] == {}
        assert not probed(target.pid, program)  # closing removed the breakpoints


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_an_untargeted_process_yields_no_event(program: Path) -> None:
    sink = CollectingSink()
    with running(program) as target, running(program) as other, loaded_monitor(
            "func", sink, targets=pids(target.pid), events=True, **marked(GETPID, program)) as m:
        other.go()
        target.go()
        other.go()
        drain(m)
        counters = m.kernel_counters()
    assert {e["pid"] for e in sink.events} == {target.pid}
    assert len(sink.events) == K
    assert counters["seen"] == K  # the other's calls never reached the program


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_targets_changed_live_move_the_probes(program: Path) -> None:
    with running(program) as a, running(program) as b, loaded_monitor(
            "func", CollectingSink(), targets=pids(a.pid), **marked(GETPID, program)) as m:
        m.set_targets(pids(a.pid, b.pid))  # b added
        assert probed(a.pid, program) and probed(b.pid, program)
        a.go()
        b.go()
        assert getpid_count(m) == 2 * K
        m.set_targets(pids(b.pid))  # a removed
        closed(m)
        assert not probed(a.pid, program) and probed(b.pid, program)
        a.go()
        b.go()
        assert getpid_count(m) == 3 * K
        assert m.stats()["probed_pids"] == [b.pid]
        # no pids (a comm only these programs have): every process probed, both counted
        m.set_targets(TargetSet(comms=frozenset({"scopecaller"})))
        assert m.stats()["probe_scope"] == "host"
        assert probed(a.pid, program) and probed(b.pid, program)
        a.go()
        b.go()
        assert getpid_count(m) == 5 * K
        # back to one pid (the comm kept: BccMonitor.set_targets lifts a filter being
        # removed before it turns on one being added, so comms -> pids alone would let
        # any process's calls count for a moment): b's breakpoint leaves
        m.set_targets(TargetSet(pids=frozenset({a.pid}), comms=frozenset({"scopecaller"}),
                                follow_children=False))
        assert not probed(b.pid, program) and probed(a.pid, program)
        b.go()
        assert getpid_count(m) == 5 * K


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("options", [GETPID, ALL_LIBC], ids=["getpid", "c:*"])
def test_a_followed_child_is_probed_from_the_next_tick_and_counted_exactly(
        program: Path, options: dict[str, Any]) -> None:
    """The window, as documented: a child's calls before the control thread's tick gave
    it links of its own are not counted (here the test plays the tick: m.periodic());
    every call after it is."""
    with running(program) as parent, loaded_monitor(
            "func", CollectingSink(), targets=pids(parent.pid, follow=True),
            **marked(options, program)) as m:
        child = parent.fork()
        child.go()  # before the tick: inside the window
        assert getpid_count(m) == 0
        m.periodic()
        status = m.stats()
        assert status["probed_pids"] == sorted([parent.pid, child.pid])
        assert status["children_attached"] == 1
        assert probed(child.pid, program)
        child.go()
        assert getpid_count(m) == K
        child.end_child()
        parent.go()
        assert getpid_count(m) == 2 * K
        m.periodic()  # the child exited: its links are closed
        assert m.stats()["probed_pids"] == [parent.pid]


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_probes_survive_exec_of_a_target_and_of_a_followed_child(program: Path) -> None:
    """A link belongs to the process, not to its address space: after exec(2) the kernel
    places the breakpoints in the new one as the program maps libc."""
    with running(program) as target, loaded_monitor(
            "func", CollectingSink(), targets=pids(target.pid, follow=True),
            **marked(GETPID, program)) as m:
        target.exec()
        assert probed(target.pid, program)
        target.go()
        assert getpid_count(m) == K
        child = target.fork()
        m.periodic()
        child.exec()
        child.go()
        assert getpid_count(m) == 2 * K
        child.end_child()


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_children_beyond_the_tick_budget_wait_for_the_next_tick(program: Path) -> None:
    with running(program) as parent, loaded_monitor(
            "func", CollectingSink(), targets=pids(parent.pid, follow=True),
            **marked(GETPID, program)) as m:
        child = parent.fork()
        m.sync_probe_scope(budget_s=-1)  # a tick whose budget is already spent
        status = m.stats()
        assert (status["probed_pids"], status["pending"]) == ([parent.pid], 1)
        m.periodic()
        status = m.stats()
        assert (status["probed_pids"], status["pending"]) == (
            sorted([parent.pid, child.pid]), 0)
        child.go()
        assert getpid_count(m) == K
        child.end_child()


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_a_child_is_not_probed_without_follow_children(program: Path) -> None:
    with running(program) as parent, loaded_monitor(
            "func", CollectingSink(), targets=pids(parent.pid, follow=False),
            **marked(GETPID, program)) as m:
        child = parent.fork()
        m.periodic()
        assert m.stats()["probed_pids"] == [parent.pid]
        child.go()
        assert getpid_count(m) == 0
        child.end_child()
        parent.go()
        assert getpid_count(m) == K


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_a_target_pid_without_a_process_is_named_and_probes_nothing(program: Path) -> None:
    with running(program) as gone:
        pass
    assert process_start(gone.pid) is None
    with running(program) as other, loaded_monitor(
            "func", CollectingSink(), targets=pids(gone.pid), **marked(GETPID, program)) as m:
        other.go()
        status = m.stats()
        assert not probed(other.pid, program)
    assert status["probe_scope"] == "pids"
    assert status["probed_pids"] == []
    assert "no such process" in status["unprobed_pids"][str(gone.pid)]


# -- host scope ---------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("targets", "exact"), [
    # uids only: every process probed; other processes of this uid may call getpid
    # meanwhile, so the count is at least both programs' calls
    (TargetSet(uids=frozenset({os.getuid()})), False),
    (TargetSet(comms=frozenset({"scopecaller"})), True),  # only these programs match
    (pids(), False),  # no targets: every process counted
], ids=["uids", "comms", "none"])
def test_without_pid_targets_the_probes_are_host_wide(
        program: Path, targets: TargetSet, exact: bool) -> None:
    with running(program) as a, running(program) as b, loaded_monitor(
            "func", CollectingSink(), targets=targets, **marked(GETPID, program)) as m:
        assert probed(a.pid, program) and probed(b.pid, program)
        before = getpid_count(m)
        a.go()
        b.go()
        counted = getpid_count(m) - before
        status = m.stats()
    if exact:
        assert (before, counted) == (0, 2 * K)
    else:
        assert counted >= 2 * K
    assert status["probe_scope"] == "host"
    assert "every process" in status["probe_scope_detail"]
    assert "probed_pids" not in status


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_probe_scope_host_places_probes_everywhere_and_still_filters(program: Path) -> None:
    with running(program) as target, running(program) as other, loaded_monitor(
            "func", CollectingSink(), targets=pids(target.pid, follow=True),
            probe_scope="host", **marked(GETPID, program)) as m:
        assert probed(target.pid, program) and probed(other.pid, program)
        child = target.fork()
        child.go()  # no window: the host-wide probes and the kernel's follow count it
        other.go()
        target.end_child()
        target.go()
        assert getpid_count(m) == 2 * K
        assert m.stats()["probe_scope"] == "host"


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_processes_over_max_scope_probes_are_named_and_not_probed(program: Path) -> None:
    """c:getpid and the marker without latency are two attach points per process: a
    bound of two lets the first target in (the lower pid) and names the other."""
    with running(program) as a, running(program) as b, loaded_monitor(
            "func", CollectingSink(), targets=pids(a.pid, b.pid), max_scope_probes=2,
            **marked(GETPID, program)) as m:
        first, second = sorted([a, b], key=lambda p: p.pid)
        a.go()
        b.go()
        status = m.stats()
        assert getpid_count(m) == K
        assert probed(first.pid, program) and not probed(second.pid, program)
    assert status["probed_pids"] == [first.pid]
    assert "max_scope_probes=2" in status["unprobed_pids"][str(second.pid)]


@pytest.mark.parametrize("value", [0, -1, 10_000_001, "5", 1.5])
def test_max_scope_probes_refuses_values_out_of_range(value: object) -> None:
    with pytest.raises(ValueError, match="max_scope_probes"):
        FuncOptions(patterns=["c:getpid"], max_scope_probes=value)


@pytest.mark.parametrize("value", ["pids", "", "HOST", 1, None])
def test_probe_scope_option_refuses_other_values(value: object) -> None:
    with pytest.raises(ValueError, match="probe_scope"):
        FuncOptions(patterns=["c:getpid"], probe_scope=value)


def test_probe_scope_option_defaults_to_auto() -> None:
    assert FuncOptions(patterns=["c:getpid"]).probe_scope == "auto"
