"""The path an event takes once a monitor has parsed it: one fan-out.

Each running monitor has a ``MonitorSink`` (its poller thread calls ``publish``): it
counts the event, samples its delivery latency, encodes it once (encode_event) and
offers ``(event, bytes)`` to the consumers registered with the agent (the stream hub,
the NATS exporter; agent/core/agent.py) and to the monitor's own output writer. A
consumer never blocks the poller: one that falls behind drops and counts.

Before the encoding, the sink runs the agent's stages (``Stage``: a function that adds
fields to the event in place, e.g. the process ancestors of agent/processes/lineage.py),
in order; the composition root (agent/core/agent.py) chooses them.

``SinkFactory`` is what the manager receives to make those sinks; it never builds one
itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from agent.config import OutputSettings
from agent.core.latency import LatencyHistogram
from agent.model.events import Event, encode_event
from agent.output.writer import OutputWriter, WriterFactory


class Consumer(Protocol):
    """Takes each event with its JSON bytes (the same bytes for every consumer).
    Runs on a poller thread and must not block."""

    def offer(self, event: Event, data: bytes) -> None: ...


# Adds fields to an event in place (poller thread; must not block).
Stage = Callable[[Event], None]


class MonitorSink:
    """One running monitor's end of the pipeline. ``publish`` runs on its poller
    thread; the rest on the control thread."""

    def __init__(self, latency: LatencyHistogram | None = None,
                 consumers: Sequence[Consumer] = (), stages: Sequence[Stage] = ()) -> None:
        self.delivered = 0
        self.latency = latency if latency is not None else LatencyHistogram()
        # Observe the latency of events whose count has these bits clear: 0 = every event;
        # the manager raises it under load (one in LATENCY_SAMPLE_FAST events).
        self.sample_mask = 0
        self.writer: OutputWriter | None = None
        self._offers = tuple(c.offer for c in consumers)
        self._stages = tuple(stages)

    def connect(self, consumers: Sequence[Consumer], writer: OutputWriter | None) -> None:
        """Before the poller starts: the agent's consumers, then the monitor's writer."""
        self.writer = writer
        self._offers = tuple(c.offer for c in (*consumers, *([writer] if writer else [])))

    def publish(self, event: Event) -> None:
        n = self.delivered = self.delivered + 1
        if not n & self.sample_mask:
            ts_ns = event.get("ts_ns")
            if ts_ns:  # kernel timestamp -> handed to the consumers: now
                self.latency.observe_since(ts_ns)
        offers = self._offers
        if offers:
            for stage in self._stages:
                stage(event)
            data = encode_event(event)
            for offer in offers:
                offer(event, data)

    # -- control thread -----------------------------------------------------------------
    @property
    def dropped(self) -> int:
        """Events the monitor's output lost (hub and exporter count their own)."""
        return self.writer.dropped if self.writer is not None else 0

    @property
    def wants_snapshots(self) -> bool:
        return self.writer is not None and self.writer.wants_snapshots

    def offer_snapshot(self, rows: list[dict[str, Any]]) -> None:
        if self.writer is not None:
            self.writer.offer_snapshot(rows)

    def close(self) -> None:
        """After the poller has ended: the writer writes what is queued and closes."""
        if self.writer is not None:
            self.writer.close()


class SinkFactory:
    """Makes each started monitor's sink (manager, control thread): the consumers
    registered with the agent plus, with ``writers``, the monitor's output writer."""

    def __init__(self, consumers: Sequence[Consumer] = (),
                 writers: WriterFactory | None = None, stages: Sequence[Stage] = ()) -> None:
        self.consumers = consumers  # the agent's list: a consumer registered later reaches
        self.writers = writers  # the monitors started after it
        self.stages = tuple(stages)

    @property
    def output(self) -> OutputSettings | None:
        return self.writers.output if self.writers is not None else None

    def check(self, name: str) -> None:
        """Output paths that would fail: OutputPathError (422) or OSError."""
        if self.writers is not None:
            self.writers.check(name)

    def make(self, latency: LatencyHistogram) -> MonitorSink:
        """A sink that counts and delivers nowhere yet (before the monitor exists)."""
        return MonitorSink(latency, stages=self.stages)

    def connect(self, sink: MonitorSink, name: str, monitor: Any) -> None:
        """Once the monitor is about to start: opens its output (OSError) and joins
        the consumers."""
        writer = self.writers.open(name, monitor) if self.writers is not None else None
        sink.connect(self.consumers, writer)
