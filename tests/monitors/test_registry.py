"""The monitor registry: discovery, duplicates, fresh instances."""

from __future__ import annotations

import pytest

from agent.monitors.contract import BaseMonitor
from agent.monitors.registry import DuplicateMonitorError, MonitorRegistry, default_registry


class _Fake(BaseMonitor):
    """A fake monitor."""

    def load(self) -> None: ...
    def poll(self, timeout_ms: int) -> None: ...
    def close(self) -> None: ...
    def set_targets(self, targets) -> None: ...


def test_fresh_registry_is_empty_and_independent() -> None:
    reg = MonitorRegistry()
    assert reg.names() == []
    reg.register("fake")(type("Fake", (_Fake,), {"__doc__": "fake one"}))
    assert reg.names() == ["fake"] and "fake" not in default_registry


def test_duplicate_name_fails_loudly() -> None:
    reg = MonitorRegistry()
    reg.register("dup")(type("A", (_Fake,), {}))
    with pytest.raises(DuplicateMonitorError, match="'dup' registered twice"):
        reg.register("dup")(type("B", (_Fake,), {}))


def test_description_defaults_to_docstring() -> None:
    reg = MonitorRegistry()
    cls = reg.register("doc")(type("Doc", (_Fake,), {"__doc__": "First line.\nMore."}))
    assert cls.name == "doc" and cls.description == "First line."


def test_discovery_finds_every_monitor_module() -> None:
    reg = MonitorRegistry()
    reg.discover()
    # A superset: adding a monitor folder must not need this test changed.
    assert {"exec", "func", "syscall"} <= set(reg.names())
    # A second registry discovers the same classes (imports are cached, the
    # declarations are not lost).
    again = MonitorRegistry()
    again.discover()
    assert again.names() == reg.names()
    assert all(again.get(n) is reg.get(n) for n in reg.names())


def test_duplicate_across_modules_fails_at_import(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "dupmons"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from agent.monitors.registry import MonitorRegistry\n"
                                     "REG = MonitorRegistry()\n")
    body = ("from agent.monitors.contract import BaseMonitor\nfrom dupmons import REG\n"
            "@REG.register('same')\nclass {name}(BaseMonitor):\n    pass\n")
    for name in ("one", "two"):  # monitors are folders (sub-packages)
        (pkg / name).mkdir()
        (pkg / name / "__init__.py").write_text(body.format(name=name.title()))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DuplicateMonitorError, match="same"):
        MonitorRegistry().discover("dupmons")
