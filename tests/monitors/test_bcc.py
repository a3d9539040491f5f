"""BccMonitor.close(): a closed BPF object is released, not kept until exit."""

from __future__ import annotations

import atexit
import gc
import sys
import weakref
from typing import Any

import pytest

from agent.model.targets import TargetSet
from agent.monitors import bcc
from agent.monitors.contract import MonitorContext
from agent.monitors.registry import default_registry
from tests.support.monitors import CollectingSink, loaded_monitor


class FakeBPF:
    """Registers its cleanup with atexit at creation, as bcc.BPF.__init__ does (and
    donothing when a program fails to load)."""

    def __init__(self, failed_load: bool) -> None:
        self.cleanups = 0
        atexit.register(self.cleanup)
        if failed_load:
            atexit.register(self.donothing)

    def cleanup(self) -> None:
        self.cleanups += 1

    def donothing(self) -> None:
        pass


def exec_monitor() -> Any:
    default_registry.discover()
    cls = default_registry.get("exec")
    return cls(cls.Options(), MonitorContext(targets=TargetSet(), sink=CollectingSink()))


def test_close_releases_the_bpf_object() -> None:
    for failed_load in (False, True):
        monitor = exec_monitor()
        bpf = FakeBPF(failed_load)
        ref = weakref.ref(bpf)
        monitor.bpf = bpf
        del bpf
        monitor.close()
        assert monitor.bpf is None
        gc.collect()
        assert ref() is None, f"BPF object still referenced (failed_load={failed_load})"


def test_close_cleans_up_once() -> None:
    monitor = exec_monitor()
    bpf = monitor.bpf = FakeBPF(True)
    monitor.close()
    monitor.close()  # idempotent: the object is gone
    assert bpf.cleanups == 1


def test_a_real_bpf_object_is_released_after_close(kernel: None) -> None:
    refs = []
    for _ in range(2):
        with loaded_monitor("exec", CollectingSink()) as monitor:
            refs.append(weakref.ref(monitor.bpf))
    gc.collect()
    assert [r() for r in refs] == [None, None]



class FakeBcc:
    """The bcc module build_bpf imports, with a BPF class that records when it runs
    (whether under COMPILE_LOCK) or fails like a program that does not compile."""

    def __init__(self, calls: list[Any], fail: bool) -> None:
        class BPF:
            def __init__(self, text: str, cflags: list[str]) -> None:
                calls.append(("BPF", text, cflags, bcc.COMPILE_LOCK.locked()))
                if fail:
                    raise RuntimeError("clang: error")

        self.BPF = BPF


@pytest.mark.parametrize("fail", [False, True])
def test_build_bpf_compiles_under_the_lock_then_trims_the_heaps(monkeypatch: Any,
                                                                 fail: bool) -> None:
    calls: list[Any] = []
    monkeypatch.setitem(sys.modules, "bcc", FakeBcc(calls, fail))
    monkeypatch.setattr(bcc, "_MALLOC_TRIM",
                        lambda pad: calls.append(("trim", pad, bcc.COMPILE_LOCK.locked())))
    if fail:
        with pytest.raises(RuntimeError, match="clang: error"):
            bcc.build_bpf("int x;", ["-DX=1"])
    else:
        assert type(bcc.build_bpf("int x;", ["-DX=1"])).__name__ == "BPF"
    # Compiled under the lock, then malloc_trim(0) once, failed or not; lock released.
    assert calls == [("BPF", "int x;", ["-DX=1"], True), ("trim", 0, True)]
    assert not bcc.COMPILE_LOCK.locked()
