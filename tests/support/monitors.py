"""Monitors loaded directly (no manager, no API): one helper for tests and bench/."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from agent.model.events import Event, EventSink
from agent.model.targets import TargetSet
from agent.monitors.contract import BaseMonitor, MonitorContext, TransportSettings
from agent.monitors.registry import MonitorRegistry, default_registry


class NullSink:
    """Drops every event (benchmarks that measure the kernel side only)."""

    def publish(self, event: Event) -> None:
        pass


class CollectingSink:
    """Keeps every event in a list: a monitor's sink (publish), or a consumer of the
    pipeline (offer: agent/core/pipeline.py)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)

    def offer(self, event: Event, data: bytes) -> None:
        self.events.append(event)


class RowMonitor:
    """What an OutputWriter needs of a monitor, for writer tests: CSV columns and rows,
    and console lines, of events {"pid": ..., "argv": [...]}."""

    CSV_FIELDS = ("pid", "argv")

    def csv_row(self, e: Event) -> list[Any]:
        return [e["pid"], json.dumps(e["argv"])]

    def console_line(self, e: Event) -> str:
        return f"pid={e['pid']}"


def monitor_context(sink: EventSink, targets: TargetSet | None = None,
                    transport: TransportSettings | None = None) -> MonitorContext:
    """What the manager hands a monitor, for one built outside it."""
    from agent.kernel.btf import kernel_offsets

    return MonitorContext(
        targets=targets or TargetSet(), sink=sink,
        transport=transport or TransportSettings(), kernel_offsets=kernel_offsets(),
    )


@contextmanager
def loaded_monitor(
    name: str, sink: EventSink, *, targets: TargetSet | None = None,
    transport: TransportSettings | None = None, registry: MonitorRegistry | None = None,
    before_load: Callable[[Any], None] | None = None, **options: Any,
) -> Iterator[Any]:
    """The monitor ``name`` of the registry (the default one, discovered), loaded into
    the kernel with these options; closed on exit. ``before_load`` may adjust the
    instance first (e.g. FuncMonitor.prefer_uprobe_multi)."""
    registry = registry or default_registry
    registry.discover()
    cls = registry.get(name)
    monitor: BaseMonitor = cls(cls.Options(**options), monitor_context(sink, targets, transport))
    if before_load is not None:
        before_load(monitor)
    monitor.load()
    try:
        yield monitor
    finally:
        monitor.close()


def drain(monitor: BaseMonitor, rounds: int = 5, timeout_ms: int = 50) -> None:
    """Poll a few times: what the kernel has buffered reaches the sink."""
    for _ in range(rounds):
        monitor.poll(timeout_ms)


def wait_for_events(monitor: BaseMonitor, sink: CollectingSink, pred: Callable[[Event], bool],
                    timeout: float = 5.0) -> list[Event]:
    """Poll until the sink holds events matching ``pred`` (returned), or the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        monitor.poll(50)
        found = [e for e in sink.events if pred(e)]
        if found:
            return found
    return []


@contextmanager
def polled(monitor: BaseMonitor) -> Iterator[None]:
    """A poller thread, as the agent runs one, for the duration: events leave the ring
    buffer (benchmarks, which measure what the workload pays while they do)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            monitor.poll(50)

    t = threading.Thread(target=loop, name=f"poll-{monitor.name}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
