"""Typed commands: run on the control thread in one place, awaited on the event loop
without a pool thread, a command whose caller gave up before it ran is skipped, and one
table turns refusals into HTTP statuses and exit codes."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from agent.core.commands import (
    Command,
    DescribeMonitor,
    ListRunning,
    ReadStats,
    Start,
    Stop,
)
from agent.core.failures import (
    CommandTimeout,
    ManagerClosed,
    MonitorUnsupported,
    NotRunning,
    OptionsInvalid,
    PreconditionFailed,
    StateRejected,
    UnknownMonitor,
    failure_of,
)
from agent.core.manager import MonitorManager
from agent.model.targets import TargetError
from agent.output.writer import OutputPathError
from tests.support.api import FakeOptions, fake_registry, fake_report


def gated_manager() -> tuple[MonitorManager, threading.Event, list[str]]:
    """A manager with a monitor ``gated`` whose stats() waits for the returned event
    and records the thread it ran on."""
    registry = fake_registry()
    release, threads = threading.Event(), []
    base: Any = registry.get("fake")

    @registry.register("gated", "stats() waits")
    class Gated(base):  # type: ignore[misc, valid-type]
        def stats(self, **_: Any) -> dict[str, Any]:
            threads.append(threading.current_thread().name)
            release.wait(30)
            return {"gated": True}

    return MonitorManager(registry, fake_report()), release, threads


def test_routes_await_commands_answered_from_the_control_thread() -> None:
    mgr, release, threads = gated_manager()
    release.set()

    async def scenario() -> tuple[Any, Any, set[str], set[str]]:
        before = {t.name for t in threading.enumerate()}
        started = await mgr.execute_async(Start("gated", FakeOptions()))
        stats = await mgr.execute_async(ReadStats("gated", {}))
        return started, stats, before, {t.name for t in threading.enumerate()}

    try:
        started, stats, before, after = asyncio.run(scenario())
    finally:
        mgr.shutdown()
    assert started["state"] == "running" and stats["gated"] is True
    assert threads == ["bpf-control"]
    assert after - before == {"poll-gated"}  # no pool thread waited for an answer


def test_a_command_whose_caller_gave_up_is_not_run() -> None:
    mgr, release, threads = gated_manager()
    mgr.start_monitor("gated")

    async def scenario() -> None:
        busy = asyncio.ensure_future(mgr.execute_async(ReadStats("gated", {})))
        while not threads:  # the control thread is inside stats()
            await asyncio.sleep(0.01)
        with pytest.raises(CommandTimeout):
            await mgr.execute_async(Stop("gated"), timeout=0.2)  # queued behind busy
        release.set()
        await busy

    try:
        asyncio.run(scenario())
        assert mgr.execute(ListRunning()) == ["gated"]  # the Stop was skipped
        release.clear()
        threading.Thread(target=mgr.monitor_stats, args=("gated",), daemon=True).start()
        while len(threads) < 2:
            time.sleep(0.01)
        with pytest.raises(CommandTimeout):  # the blocking path gives up the same way
            mgr.execute(Stop("gated"), timeout=0.2)
        release.set()
        assert mgr.execute(ListRunning()) == ["gated"]
    finally:
        mgr.shutdown()
    with pytest.raises(ManagerClosed):
        mgr.execute(DescribeMonitor("gated"))


def test_an_unknown_command_is_a_type_error() -> None:
    mgr, release, _ = gated_manager()
    try:
        with pytest.raises(TypeError, match="unknown command"):
            mgr.execute(Command())
        with pytest.raises(UnknownMonitor):
            mgr.execute(DescribeMonitor("nope"))
    finally:
        mgr.shutdown()


@pytest.mark.parametrize(("error", "checks_input", "status", "exit_code"), [
    (UnknownMonitor("x"), False, 404, 2),
    (MonitorUnsupported("no BTF"), False, 409, 3),
    (NotRunning("x"), False, 409, 1),
    (StateRejected("x", "exec", True), False, 409, 1),
    (PreconditionFailed('"etag"'), False, 412, 1),
    (OptionsInvalid("bad"), False, 422, 2),
    (TargetError("pids: -1"), False, 422, 2),
    (ManagerClosed(), False, 503, 1),
    (CommandTimeout(), False, 503, 1),
    (OutputPathError("escapes"), True, 422, 2),  # a ValueError while input is checked
    (ValueError("sort: unknown key"), True, 422, 2),
])
def test_one_table_for_statuses_and_exit_codes(error: Exception, checks_input: bool,
                                               status: int, exit_code: int) -> None:
    failure = failure_of(error, checks_input)
    assert failure is not None
    assert (failure.status, failure.exit_code) == (status, exit_code)


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("k"), RuntimeError("r"),
                                   OutputPathError("outside input checks")])
def test_other_failures_are_not_refusals(error: Exception) -> None:
    assert failure_of(error) is None  # propagates: a 500, a traceback


def test_commands_that_check_input() -> None:
    assert [c.checks_input for c in (Start, ReadStats, Stop, DescribeMonitor)] == [
        True, True, False, False]
