"""One thread owns BCC: periodic work runs on the control thread, pollers only poll, and a
BPF object is never freed while its poller may still be inside it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import OutputSettings
from agent.core import manager as manager_mod
from agent.core.manager import MonitorManager
from agent.core.pipeline import SinkFactory
from agent.kernel.capabilities import CapabilityReport
from agent.model.targets import TargetSet
from agent.monitors.contract import BaseMonitor
from agent.monitors.registry import MonitorRegistry
from agent.output.writer import WriterFactory


class Busy(BaseMonitor):
    """A poll that, like libbpf's consume under a flood, does not return by itself: it
    delivers events until request_stop() (or, with ``stubborn``, until ``release``)."""

    SNAPSHOT_FIELDS = ("timestamp", "name", "count")
    CSV_FIELDS = ("n",)
    stubborn = False
    release = threading.Event()
    calls: list[tuple[str, str]] = []

    def load(self) -> None:
        self.stopping = threading.Event()
        self.closed = False

    def poll(self, timeout_ms: int) -> None:
        n = 0
        while not (self.release.is_set() if self.stubborn else self.stopping.is_set()):
            n += 1
            self.ctx.sink.publish({"monitor": self.name, "n": n})
            time.sleep(0.0001)

    def request_stop(self) -> None:
        self.calls.append(("request_stop", threading.current_thread().name))
        self.stopping.set()

    def close(self) -> None:
        self.calls.append(("close", threading.current_thread().name))
        self.closed = True

    def set_targets(self, targets: TargetSet) -> None:
        pass

    def periodic(self) -> None:
        self.calls.append(("periodic", threading.current_thread().name))

    def snapshot_rows(self) -> list[dict[str, Any]]:
        self.calls.append(("snapshot_rows", threading.current_thread().name))
        return [{"timestamp": "t", "name": "x", "count": 1}]


def registry(stubborn: bool) -> MonitorRegistry:
    reg = MonitorRegistry()
    cls = type("BusyMon", (Busy,), {"stubborn": stubborn, "release": threading.Event(),
                                    "calls": []})
    reg.register("busy", "never idle")(cls)
    return reg


def test_rate_periodic_and_snapshots_while_the_poller_never_returns(tmp_path: Path) -> None:
    reg = registry(stubborn=False)
    mgr = MonitorManager(reg, CapabilityReport("t", "x86_64", {}),
                         sinks=SinkFactory(writers=WriterFactory(OutputSettings(
                             formats=["csv"], directory=tmp_path, snapshot_interval_s=0.5))))
    cls: Any = reg.get("busy")
    try:
        mgr.start_monitor("busy")
        # Until two snapshots and a rate, not a fixed 2.5 s: a loaded machine can give
        # the control thread fewer ticks in that time.
        deadline = time.monotonic() + 30
        while (sum(what == "snapshot_rows" for what, _ in cls.calls) < 2
               or mgr.monitor_stats("busy")["events_per_second"] == 0):
            assert time.monotonic() < deadline, (cls.calls, mgr.monitor_stats("busy"))
            time.sleep(0.1)
        stats = mgr.monitor_stats("busy")
        assert stats["events_per_second"] > 0  # was 0.0: computed on the stuck poller
        threads = {name for what, name in cls.calls if what in ("periodic", "snapshot_rows")}
        assert threads == {"bpf-control"}
        assert mgr.stop_monitor("busy")["state"] == "stopped"
    finally:
        mgr.shutdown()
    assert ("close", "bpf-control") in cls.calls
    rows = (tmp_path / "busy-snapshot.csv").read_text().splitlines()
    assert rows[0] == "timestamp,name,count" and len(rows) >= 3


def test_a_poller_that_does_not_return_keeps_its_object_until_it_does(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_mod, "STOP_JOIN_S", 0.2)
    monkeypatch.setattr(manager_mod, "TICK_S", 0.05)
    reg = registry(stubborn=True)
    mgr = MonitorManager(reg, CapabilityReport("t", "x86_64", {}))
    cls: Any = reg.get("busy")
    try:
        mgr.start_monitor("busy")
        assert mgr.stop_monitor("busy")["state"] == "stopped"
        assert [w for w, _ in cls.calls if w != "periodic"] == ["request_stop"]  # not freed
        cls.release.set()  # the poller returns: the control thread frees the object
        deadline = time.monotonic() + 10
        while ("close", "bpf-control") not in cls.calls:
            assert time.monotonic() < deadline, cls.calls
            time.sleep(0.02)
    finally:
        cls.release.set()
        mgr.shutdown()
    assert [w for w, _ in cls.calls if w != "periodic"] == ["request_stop", "close"]
