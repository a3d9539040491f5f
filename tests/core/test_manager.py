"""The monitor manager: states, options, targets, stats; fakes and the real kernel."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from pydantic import Field

from agent.core.failures import MonitorUnsupported, OptionsInvalid, UnknownMonitor
from agent.core.manager import MonitorManager
from agent.core.pipeline import SinkFactory
from agent.kernel.capabilities import CapabilityReport, Feature, build_report
from agent.model.targets import TargetError, TargetLimits, TargetSet
from agent.monitors.contract import BaseMonitor, MonitorError, MonitorOptions
from agent.monitors.registry import MonitorRegistry, discover_monitors
from tests.support.kernel import CollectingSink, loaded_prog_ids, prog_ids_held_by


class FakeOptions(MonitorOptions):
    level: int = Field(1, ge=0, le=9)


def fake_registry() -> tuple[MonitorRegistry, list]:
    reg = MonitorRegistry()
    log: list = []

    @reg.register("fake", "a fake monitor")
    class Fake(BaseMonitor):
        Options = FakeOptions

        def load(self) -> None:
            log.append(("load", self.options.level, self.ctx.targets))

        def poll(self, timeout_ms: int) -> None:
            time.sleep(timeout_ms / 1000)

        def close(self) -> None:
            log.append(("close",))

        def set_targets(self, targets: TargetSet) -> None:
            log.append(("targets", targets))

    @reg.register("broken", "fails to load")
    class Broken(Fake):
        def load(self) -> None:
            raise MonitorError("broken: verifier said no")

    @reg.register("needy", "needs kprobes")
    class Needy(Fake):
        REQUIRED_FEATURES = ("kprobes",)

    return reg, log


def fake_report() -> CapabilityReport:
    return CapabilityReport("test", "x86_64", {"kprobes": Feature(False, "CONFIG_KPROBES off")})


@pytest.fixture
def fake():
    reg, log = fake_registry()
    mgr = MonitorManager(reg, fake_report(), limits=TargetLimits(pids=3, uids=1024, comms=256,
                                                                  cgroups=8, containers=8))
    yield mgr, log
    mgr.shutdown()


def test_states_and_idempotent_stop(fake) -> None:
    mgr, log = fake
    states = {m["name"]: m["state"] for m in mgr.monitors()}
    assert states == {"fake": "stopped", "broken": "stopped", "needy": "unsupported"}
    assert mgr.start_monitor("fake")["state"] == "running"
    assert mgr.stop_monitor("fake")["state"] == "stopped"
    assert mgr.stop_monitor("fake")["state"] == "stopped"
    assert [x[0] for x in log] == ["load", "close"]


def test_restart_only_when_options_change(fake) -> None:
    mgr, log = fake
    mgr.start_monitor("fake", {"level": 2})
    mgr.start_monitor("fake", {"level": 2})
    assert [x[0] for x in log] == ["load"]
    info = mgr.start_monitor("fake", {"level": 5})
    assert info["options"] == {"level": 5} and info["state"] == "running"
    assert [x[:2] for x in log] == [("load", 2), ("close",), ("load", 5)]


@pytest.mark.parametrize(
    ("name", "options", "error", "message"),
    [
        ("nosuch", None, UnknownMonitor, "nosuch"),
        ("fake", {"level": 99}, OptionsInvalid, "invalid options"),
        ("fake", {"colour": 1}, OptionsInvalid, "invalid options"),
        ("needy", None, MonitorUnsupported, "kprobes: CONFIG_KPROBES off"),
        ("broken", None, MonitorUnsupported, "verifier said no"),
    ],
)
def test_refusals_change_nothing(fake, name, options, error, message) -> None:
    mgr, log = fake
    with pytest.raises(error, match=message):
        mgr.start_monitor(name, options)
    assert mgr.running() == []
    if name == "broken":
        info = mgr.monitor_info("broken")
        assert info["state"] == "failed" and "verifier said no" in info["reason"]


def test_targets_reach_running_and_later_monitors(fake) -> None:
    mgr, log = fake
    mgr.start_monitor("fake")
    assert mgr.update_targets("pids", "add", [10, 11])["pids"] == [10, 11]
    assert log[-1] == ("targets", TargetSet(pids=frozenset({10, 11})))
    assert mgr.update_targets("pids", "remove", [10])["pids"] == [11]
    mgr.stop_monitor("fake")
    mgr.start_monitor("fake")
    assert log[-1] == ("load", 1, TargetSet(pids=frozenset({11})))


@pytest.mark.parametrize(
    ("kind", "op", "values"),
    [("pids", "add", [1, 2, 3]), ("pids", "replace", [-1]), ("comms", "add", [""]),
     ("uids", "replace", ["x"])],
)
def test_invalid_targets_change_nothing(fake, kind, op, values) -> None:
    mgr, log = fake
    mgr.update_targets("pids", "replace", [7])
    mgr.start_monitor("fake")
    before = list(log)
    with pytest.raises(TargetError):
        mgr.update_targets(kind, op, values)
    assert log == before
    assert mgr.targets()["pids"] == [7]


# -- the real kernel ---------------------------------------------------------------------

def test_real_exec_through_the_manager(kernel) -> None:
    reg = discover_monitors()
    sink = CollectingSink()
    mgr = MonitorManager(reg, build_report(reg), sinks=SinkFactory([sink]))
    before = prog_ids_held_by(os.getpid())
    try:
        mgr.start_monitor("exec")
        loaded = prog_ids_held_by(os.getpid()) - before
        idle = subprocess.Popen(["sleep", "30"])
        mgr.update_targets("pids", "replace", [idle.pid])
        assert mgr.targets() == {"pids": [idle.pid], "uids": [], "comms": [], "cgroups": [],
                                 "containers": [], "follow_children": True,
                                 "cgroup_ids": [], "container_cgroups": []}
        subprocess.run(["/bin/echo", "filtered-out"], stdout=subprocess.DEVNULL, check=True)
        mgr.update_targets("pids", "replace", [])
        subprocess.run(["/bin/echo", "manager-marker"], stdout=subprocess.DEVNULL, check=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            e["argv"] == ["/bin/echo", "manager-marker"] for e in sink.events
        ):
            time.sleep(0.05)
        idle.kill()
        # Other processes on the host may exec meanwhile: bracket the read.
        seen_before = len(sink.events)
        stats = mgr.monitor_stats("exec")
        seen_after = len(sink.events)
        argvs = [e["argv"] for e in sink.events]
        assert ["/bin/echo", "manager-marker"] in argvs
        assert ["/bin/echo", "filtered-out"] not in argvs
        assert seen_before <= stats["events_delivered"] <= seen_after
        assert stats["kernel"]["submitted"] >= stats["events_delivered"]
        assert stats["events_dropped_kernel"] == 0
    finally:
        mgr.shutdown()
    assert not (loaded & loaded_prog_ids())
