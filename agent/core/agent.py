"""The composition root: ``Agent`` builds and owns the pieces of one running agent.

``ebpf-agent serve`` (the API's lifespan, agent/api/deps.py) and ``ebpf-agent run``
(agent/cli.py) build it the same way; they differ only in what the settings and flags
ask for:

- the consumers every event is offered to, in this order: the stream hub (serve: SSE
  and WebSocket clients) and the NATS exporter (``export.nats.enabled``, or
  ``run --export nats``); each monitor's output writer joins them when it starts
  (``output.formats``, or ``run --format``). See agent/core/pipeline.py.
- the manager (agent/core/manager.py), given a SinkFactory over those consumers.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING

from agent.config import Settings
from agent.core.manager import MonitorManager
from agent.core.pipeline import Consumer, SinkFactory
from agent.kernel.capabilities import CapabilityReport
from agent.model.targets import TargetError, TargetSet
from agent.monitors.registry import MonitorRegistry
from agent.output.writer import WriterFactory
from agent.stream.hub import EventHub

if TYPE_CHECKING:
    from agent.export.nats import NatsExporter

log = logging.getLogger(__name__)


def target_set(settings: Settings) -> TargetSet:
    t = settings.targets
    return TargetSet(frozenset(t.pids), frozenset(t.uids), frozenset(t.comms), t.follow_children,
                     cgroups=frozenset(t.cgroups), containers=frozenset(t.containers))


class Agent:
    def __init__(
        self,
        settings: Settings,
        registry: MonitorRegistry,
        report: CapabilityReport,
        *,
        streams: bool,
        formats: Sequence[str] | None = None,
    ) -> None:
        """``streams``: keep a hub for SSE/WebSocket subscribers (serve); ``formats``:
        output formats instead of the configured ones (run --format)."""
        self.settings = settings
        self.consumers: list[Consumer] = []
        self.hub: EventHub | None = None
        self.exporter: NatsExporter | None = None
        if streams:
            s = settings.stream
            self.hub = EventHub(s.replay_buffer, s.max_subscribers, s.replay_bytes)
            self.register(self.hub)
        if settings.export.nats.enabled:
            from agent.export.nats import NatsExporter  # imports nats-py: only when used

            host = settings.export.host_name or socket.gethostname()
            self.exporter = NatsExporter(settings.export.nats, host)
            self.register(self.exporter)
        try:
            self.manager = MonitorManager(
                registry,
                report,
                targets=target_set(settings),
                limits=settings.targets.limits(),
                transport=settings.transport,
                output=settings.output,
                sinks=SinkFactory(self.consumers, WriterFactory(settings.output, formats)),
            )
        except TargetError as e:  # a configured cgroup that does not exist: name the field
            raise TargetError(f"targets.{e}") from None

    def register(self, consumer: Consumer) -> None:
        """Every event of the monitors started from now on is offered to ``consumer``."""
        self.consumers.append(consumer)

    def start(self) -> None:
        """Connects the exporter (its own thread; waits for it at most a few seconds)."""
        if self.exporter is not None:
            self.exporter.start()

    def autostart(self) -> dict[str, str]:
        """Starts the monitors the config enables; {name: error} for those that failed."""
        errors: dict[str, str] = {}
        for name, mon in self.settings.monitors.items():
            if not mon.enabled:
                continue
            try:
                self.manager.start_monitor(name, mon.options)
            except Exception as e:
                errors[name] = str(e)
                log.error("monitor %s did not start: %s", name, e)
        return errors

    def shutdown(self, timeout: float = 30) -> None:
        """Stops every monitor (detaching every probe), then the exporter, so that the
        monitors' last events go out too. The hub's streams are ended by its owner on
        the event loop (EventHub.close)."""
        try:
            self.manager.shutdown(timeout)
        finally:
            if self.exporter is not None:
                self.exporter.stop()
