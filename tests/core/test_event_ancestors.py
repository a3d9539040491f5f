"""processes.event_ancestors: the ancestors stage of the event path (agent/core/pipeline.py),
with fakes, and on this kernel with the exec monitor and the real tracker."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from agent.config import Settings
from agent.core.agent import Agent
from agent.core.pipeline import MonitorSink
from agent.kernel.identity import local_identity
from agent.processes.lineage import AncestorStage
from agent.processes.process import Process
from agent.processes.table import ProcessTable
from tests.support.monitors import CollectingSink
from tests.support.processes import proc_ppid, program, wait_for

BOOT = "cd" * 8


def entry(pid: int, ppid: int, comm: str) -> Process:
    return Process(f"{BOOT}-1-{pid}", pid, 1, ppid=ppid, comm=comm,
                   parent_process_id=f"{BOOT}-1-{ppid}" if ppid else None)


@pytest.mark.parametrize(("limit", "event", "want"), [
    (3, {"parent_process_id": f"{BOOT}-1-30", "ppid": 30}, [30, 20, 1]),
    (2, {"parent_process_id": f"{BOOT}-1-30", "ppid": 30}, [30, 20]),
    (5, {"parent_process_id": None, "ppid": 20}, [20, 1]),  # no parent id: the live ppid
    (5, {"parent_process_id": f"{BOOT}-1-99", "ppid": 99}, []),  # unknown parent
])
def test_the_stage_adds_ancestors_before_encoding(limit: int, event: dict,
                                                  want: list[int]) -> None:
    table = ProcessTable(100, 10, 60)
    table.seed(iter([entry(1, 0, "init"), entry(20, 1, "sshd"), entry(30, 20, "bash")]))
    consumer = CollectingSink()
    encoded: list[bytes] = []
    sink = MonitorSink(stages=[AncestorStage(table, limit)])
    sink.connect([consumer, type("Raw", (), {"offer": lambda s, e, d: encoded.append(d)})()],
                 None)
    sink.publish({"monitor": "x", **event})
    assert [a["pid"] for a in consumer.events[0]["ancestors"]] == want
    assert json.loads(encoded[0])["ancestors"] == consumer.events[0]["ancestors"]
    if want:
        assert consumer.events[0]["ancestors"][0] == {
            "process_id": f"{BOOT}-1-{want[0]}", "pid": want[0],
            "comm": {30: "bash", 20: "sshd"}[want[0]]}


@pytest.mark.parametrize(("known", "calls", "want"), [
    ([entry(1, 0, "init"), entry(20, 1, "sshd")], 0, [20, 1]),  # whole: no wait
    ([entry(1, 0, "init")], 1, [20, 1]),  # 20 unknown: the tracker applies its fork
])
def test_a_cut_chain_waits_for_the_tracker_then_looks_again(
        known: list[Process], calls: int, want: list[int]) -> None:
    table = ProcessTable(100, 10, 60)
    table.seed(iter(known))
    waited: list[int] = []

    def catch_up() -> bool:  # what ProcessTracker.catch_up does: the late record applied
        waited.append(1)
        table.forked(entry(20, 1, "sshd"))
        return True

    stage = AncestorStage(table, 5, catch_up)
    event: dict = {"parent_process_id": f"{BOOT}-1-20", "ppid": 20}
    stage(event)
    assert [a["pid"] for a in event["ancestors"]] == want
    assert len(waited) == calls


def test_a_tracker_that_cannot_catch_up_leaves_the_chain_as_it_is() -> None:
    table = ProcessTable(100, 10, 60)
    stage = AncestorStage(table, 5, lambda: False)
    event: dict = {"parent_process_id": f"{BOOT}-1-20", "ppid": 20}
    stage(event)
    assert event["ancestors"] == []


def test_off_by_default_no_ancestors_key() -> None:
    sink = MonitorSink()
    consumer = CollectingSink()
    sink.connect([consumer], None)
    sink.publish({"monitor": "x", "ppid": 1})
    assert "ancestors" not in consumer.events[0]
    assert Settings().processes.event_ancestors == 0


def test_exec_events_carry_the_ancestors_proc_shows(kernel: None) -> None:
    from agent.kernel.capabilities import build_report
    from agent.monitors.registry import discover_monitors

    registry = discover_monitors()
    settings = Settings(processes={"event_ancestors": 2}, output={"formats": []})
    agent = Agent(settings, registry, build_report(registry), streams=False)
    events = CollectingSink()
    agent.register(events)
    agent.start()
    top = None
    leaf = 0
    try:
        assert agent.tracker is not None and agent.tracker.ready.wait(120)
        agent.manager.start_monitor("exec", {})
        top = subprocess.Popen([str(program()), "chain", "3"])
        leaf_exec = wait_for(lambda: next((e for e in list(events.events)
                                           if e["monitor"] == "exec" and e["argv"][1:] ==
                                           ["chain", "1"]), None), "the leaf's exec event")
        leaf, middle = leaf_exec["pid"], leaf_exec["ppid"]
        assert proc_ppid(middle) == top.pid
        ident = local_identity()
        assert leaf_exec["ancestors"] == [
            {"process_id": ident.of_pid(middle), "pid": middle, "comm": "ptprog"},
            {"process_id": ident.of_pid(top.pid), "pid": top.pid, "comm": "ptprog"}]
    finally:
        if leaf:
            os.kill(leaf, signal.SIGKILL)
        if top is not None:
            top.kill()
            top.wait()
        agent.shutdown()
