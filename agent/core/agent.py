"""The composition root: ``Agent`` builds and owns the pieces of one running agent.

``ebpf-agent serve`` (the API's lifespan, agent/api/deps.py) and ``ebpf-agent run``
(agent/cli.py) build it the same way; they differ only in what the settings and flags
ask for:

- the consumers every event is offered to, in this order: the stream hub (serve: SSE
  and WebSocket clients), the container book (serve: GET /containers) and the NATS
  exporter (``export.nats.enabled``, or
  ``run --export nats``); each monitor's output writer joins them when it starts
  (``output.formats``, or ``run --format``). See agent/core/pipeline.py.
- the manager (agent/core/manager.py), given a SinkFactory over those consumers and
  the stages every event passes before it is encoded (``processes.event_ancestors``).
- the process table and its tracker (agent/processes/, ``processes.enabled``): started
  with the agent, stopped after the monitors.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.config import Settings
from agent.core.manager import MonitorManager
from agent.core.pipeline import Consumer, SinkFactory, Stage
from agent.kernel.capabilities import CapabilityReport
from agent.kernel.cgroups import default_resolver
from agent.kernel.identity import local_identity
from agent.model.targets import TargetError, TargetSet
from agent.monitors.registry import MonitorRegistry
from agent.output.writer import WriterFactory
from agent.processes.lineage import AncestorStage
from agent.processes.table import ProcessTable
from agent.processes.tracker import REQUIRED_FEATURES, ProcessTracker
from agent.stream.containers import ContainerBook
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
        self.report = report
        self.consumers: list[Consumer] = []
        self.hub: EventHub | None = None
        self.containers: ContainerBook | None = None
        self.exporter: NatsExporter | None = None
        if streams:
            s = settings.stream
            # transport.decoder "python" takes the whole per-event path in Python: the
            # hub's ring store too (agent/stream/ring.py).
            store = "python" if settings.transport.decoder == "python" else "auto"
            self.hub = EventHub(s.replay_buffer, s.max_subscribers, s.replay_bytes, store,
                                max_lag_ms=s.max_lag_ms)
            self.register(self.hub)
            self.containers = ContainerBook(s.max_containers)
            self.register(self.containers)
        if settings.export.nats.enabled:
            from agent.export.nats import NatsExporter  # imports nats-py: only when used

            host = settings.export.host_name or socket.gethostname()
            self.exporter = NatsExporter(settings.export.nats, host)
            self.register(self.exporter)
        self.processes: ProcessTable | None = None
        self.tracker: ProcessTracker | None = None
        stages: list[Stage] = []
        p = settings.processes
        # `run` has no API to read the table from: it keeps one only for the events'
        # ancestors lists.
        if p.enabled and (streams or p.event_ancestors):
            self.processes = ProcessTable(p.capacity, p.exited_keep, p.exited_ttl_s)
            self.tracker = ProcessTracker(p, self.processes, report.kernel_offsets,
                                          default_resolver(), local_identity())
            if p.event_ancestors:
                stages.append(AncestorStage(self.processes, p.event_ancestors,
                                            self.tracker.catch_up))
        try:
            self.manager = MonitorManager(
                registry,
                report,
                targets=target_set(settings),
                limits=settings.targets.limits(),
                transport=settings.transport,
                output=settings.output,
                sinks=SinkFactory(self.consumers, WriterFactory(settings.output, formats),
                                  stages),
            )
        except TargetError as e:  # a configured cgroup that does not exist: name the field
            raise TargetError(f"targets.{e}") from None

    def register(self, consumer: Consumer) -> None:
        """Every event of the monitors started from now on is offered to ``consumer``."""
        self.consumers.append(consumer)

    def start(self) -> None:
        """Connects the exporter (its own thread; waits for it at most a few seconds);
        starts the process tracker (its own thread: it compiles, attaches, then reads
        /proc; ``tracker.ready`` is set when it is done)."""
        if self.exporter is not None:
            self.exporter.start()
        if self.tracker is not None:
            missing = self.report.missing(REQUIRED_FEATURES)
            if missing:
                self.tracker.fail("; ".join(missing))
                log.warning("process table off: %s", self.tracker.error)
            else:
                self.tracker.start()

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

    def process_stats(self) -> dict[str, Any]:
        """The process table's figures and its tracker's (any thread)."""
        if self.processes is None or self.tracker is None:
            return {}
        return {**self.processes.stats(), "tracker": self.tracker.stats()}

    def shutdown(self, timeout: float = 30) -> None:
        """Stops every monitor (detaching every probe), then the process tracker and the
        exporter, so that the monitors' last events go out too. The hub's streams are
        ended by its owner on the event loop (EventHub.close)."""
        try:
            self.manager.shutdown(timeout)
        finally:
            if self.tracker is not None:
                self.tracker.stop()
            if self.exporter is not None:
                self.exporter.stop()
