"""A failed start leaves nothing loaded; a refused reload leaves the running monitor as it
was. Programs are counted as those held by this process (other tests load their own)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import Field

from agent.config import OutputSettings
from agent.core.failures import MonitorUnsupported
from agent.core.manager import MonitorManager
from agent.core.pipeline import SinkFactory
from agent.kernel.capabilities import CapabilityReport, build_report
from agent.model.targets import TargetSet
from agent.monitors.bcc import BccMonitor
from agent.monitors.contract import BaseMonitor, MonitorOptions
from agent.monitors.registry import MonitorRegistry, discover_monitors
from agent.output.writer import OutputPathError, WriterFactory
from tests.support.kernel import prog_ids_held_by


# -- fakes -------------------------------------------------------------------------------
class Opts(MonitorOptions):
    pattern: str = "ok"
    level: int = Field(1, ge=0, le=9)


def refusing_registry(log: list) -> MonitorRegistry:
    reg = MonitorRegistry()

    @reg.register("fake", "refuses some patterns before loading")
    class Fake(BaseMonitor):
        Options = Opts

        @classmethod
        def option_errors(cls, options: MonitorOptions, report: object) -> str | None:
            return "needs kprobes" if getattr(options, "pattern", "") == "kernel" else None

        def prepare(self) -> None:
            if self.options.pattern == "nomatch":
                raise ValueError("pattern 'nomatch' matches no function")

        def load(self) -> None:
            log.append(("load", self.options.pattern))

        def poll(self, timeout_ms: int) -> None:
            time.sleep(timeout_ms / 1000)

        def close(self) -> None:
            log.append(("close", self.options.pattern))

        def set_targets(self, targets: TargetSet) -> None:
            pass

    return reg


@pytest.mark.parametrize(("options", "error"), [
    ({"pattern": "kernel"}, MonitorUnsupported),
    ({"pattern": "nomatch"}, ValueError),
])
def test_refused_reload_keeps_the_running_monitor(options: dict, error: type) -> None:
    log: list = []
    mgr = MonitorManager(refusing_registry(log), CapabilityReport("t", "x86_64", {}))
    try:
        mgr.start_monitor("fake", {"level": 3})
        with pytest.raises(error):
            mgr.start_monitor("fake", options)
        info = mgr.monitor_info("fake")
        assert info["state"] == "running" and info["options"] == {"pattern": "ok", "level": 3}
        assert log == [("load", "ok")]
    finally:
        mgr.shutdown()


def test_refused_output_path_keeps_the_running_monitor(tmp_path: Path) -> None:
    log: list = []
    out = tmp_path / "out"
    mgr = MonitorManager(refusing_registry(log), CapabilityReport("t", "x86_64", {}),
                         sinks=SinkFactory(writers=WriterFactory(
                             OutputSettings(formats=["jsonl"], directory=out))))
    try:
        mgr.start_monitor("fake")
        (out / "fake.jsonl").unlink()
        (out / "fake.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
        with pytest.raises(OutputPathError):
            mgr.start_monitor("fake", {"level": 2})
        assert mgr.monitor_info("fake")["state"] == "running"
        assert log == [("load", "ok")]
    finally:
        mgr.shutdown()


# -- the real kernel ---------------------------------------------------------------------
def broken_outputs(tmp_path: Path) -> list[tuple[Path, type]]:
    regular = tmp_path / "regular-file"
    regular.write_text("not a directory")
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "exec.jsonl").symlink_to(tmp_path / "victim.jsonl")
    return [(regular, MonitorUnsupported), (regular / "sub", MonitorUnsupported),
            (escaping, OutputPathError)]


def test_failed_starts_leave_no_program_loaded(tmp_path: Path, kernel: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    reg = discover_monitors()
    report = build_report(reg)
    before = prog_ids_held_by(os.getpid())
    for directory, error in broken_outputs(tmp_path):
        mgr = MonitorManager(reg, report, sinks=SinkFactory(writers=WriterFactory(
            OutputSettings(formats=["jsonl"], directory=directory))))
        try:
            with pytest.raises(error):
                mgr.start_monitor("exec")
            assert mgr.monitor_info("exec")["state"] in ("stopped", "failed")
            assert prog_ids_held_by(os.getpid()) == before, directory
        finally:
            mgr.shutdown()
    assert not (tmp_path / "victim.jsonl").exists()

    # A failure after the programs are loaded and attached unloads them too.
    def refuse(self: BccMonitor) -> None:
        raise OSError("cannot open the ring buffer")

    monkeypatch.setattr(BccMonitor, "open_buffer", refuse)
    mgr = MonitorManager(reg, report)
    try:
        with pytest.raises(MonitorUnsupported, match="ring buffer"):
            mgr.start_monitor("exec")
        assert mgr.monitor_info("exec")["state"] == "failed"
        assert prog_ids_held_by(os.getpid()) == before
    finally:
        mgr.shutdown()


def test_refused_func_reload_keeps_counting(kernel: None) -> None:
    from agent.monitors.func.monitor import FuncPatternError

    reg = discover_monitors()
    mgr = MonitorManager(reg, build_report(reg))
    try:
        mgr.start_monitor("func", {"patterns": ["c:getpid"]})
        held = prog_ids_held_by(os.getpid())
        for patterns, error in [(["vfs_read"], MonitorUnsupported),
                                (["c:no_such_fn_xyz"], FuncPatternError),
                                (["c:*"], FuncPatternError)]:
            with pytest.raises(error):
                mgr.start_monitor("func", {"patterns": patterns})
            info = mgr.monitor_info("func")
            assert info["state"] == "running", patterns
            assert info["options"]["patterns"] == ["c:getpid"]
        assert prog_ids_held_by(os.getpid()) == held
        proc = subprocess.run(["python3", "-c", "import os; [os.getpid() for _ in range(7)]"],
                              check=True)
        assert proc.returncode == 0
        rows = mgr.monitor_stats("func")["functions"]
        assert rows and rows[0]["name"] == "getpid" and rows[0]["count"] >= 7
    finally:
        mgr.shutdown()
