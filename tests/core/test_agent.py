"""The composition root and the fan-out: one encoding per event, offered in the order the
consumers were registered, the same bytes in the hub (SSE frame), in the JSONL file and
in every other consumer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from agent.core.agent import Agent
from agent.core.pipeline import MonitorSink
from agent.model.events import Event
from tests.support.api import fake_registry, fake_report, settings


class Recorder:
    """A consumer that keeps what it was offered, and where it stood in the order."""

    def __init__(self, name: str, order: list[str]) -> None:
        self.name, self.order = name, order
        self.offered: list[tuple[Event, bytes]] = []

    def offer(self, event: Event, data: bytes) -> None:
        self.order.append(self.name)
        self.offered.append((event, data))


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_one_encoding_reaches_hub_writer_and_registered_consumers(tmp_path: Path) -> None:
    s = settings(output={"formats": ["jsonl"], "directory": str(tmp_path)})
    registry = fake_registry()
    agent = Agent(s, registry, fake_report(), streams=True)
    order: list[str] = []
    first, second = Recorder("first", order), Recorder("second", order)
    agent.register(first)
    agent.register(second)
    assert agent.hub is not None and agent.containers is not None
    assert agent.consumers == [agent.hub, agent.containers, first, second]
    inbox = registry.get("fake").inbox  # type: ignore[attr-defined]
    try:
        agent.manager.start_monitor("fake")
        for n in range(3):
            inbox.put({"pid": 100 + n, "comm": "sh"})
        wait_for(lambda: len(second.offered) == 3)
        agent.manager.stop_monitor("fake")  # the writer flushes and closes
    finally:
        agent.shutdown()
    assert order == ["first", "second"] * 3
    for (e1, d1), (e2, d2) in zip(first.offered, second.offered, strict=True):
        assert e1 is e2 and d1 is d2  # encoded once, the same object for each consumer
    lines = (tmp_path / "fake.jsonl").read_bytes().splitlines()
    assert lines == [d for _, d in first.offered]
    assert [json.loads(x)["pid"] for x in lines] == [100, 101, 102]
    assert agent.hub.stats()["published"] == 3
    frames = [f for f in agent.hub._buf.split(b"\n\n") if f.startswith(b"id: ")]
    assert [f.split(b"data: ", 1)[1] for f in frames] == lines


def test_run_builds_no_hub_and_no_exporter_unless_asked(tmp_path: Path) -> None:
    agent = Agent(settings(output={"formats": []}), fake_registry(), fake_report(),
                  streams=False)
    try:
        assert (agent.hub, agent.exporter, agent.consumers) == (None, None, [])
    finally:
        agent.shutdown()


def test_sink_without_consumers_counts_and_encodes_nothing() -> None:
    sink = MonitorSink()
    sink.publish({"monitor": "m", "bad": object()})  # would not encode: never tried
    assert sink.delivered == 1 and sink.dropped == 0 and not sink.wants_snapshots
