"""The monitor contract: what every monitor implements and what it receives.

The registry lives in agent.monitors.registry, the BCC-backed base in agent.monitors.bcc;
a monitor is one folder agent/monitors/<name>/ (see CONTRIBUTING.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from agent.config import TargetSettings, TransportSettings
from agent.kernel.cgroups import CgroupResolver, default_resolver
from agent.kernel.identity import ProcessIdentity, local_identity
from agent.model.event_decl import EventDecl
from agent.model.events import COMMON_CSV_FIELDS, Event, EventModel, EventSink
from agent.model.targets import TargetLimits, TargetSet


@dataclass(frozen=True)
class MetricSeries:
    """One Prometheus family a monitor exports: ``ebpf_agent_<monitor>_<name>`` with one
    label whose values come from a bounded set (syscall names, probed functions)."""

    name: str
    doc: str
    label: str
    values: dict[str, float]
    counter: bool = True


class MonitorError(Exception):
    """A monitor could not be loaded or attached; the message says why."""


class MonitorOptions(BaseModel):
    """Base of every monitor's options: unknown keys are errors, and values must have the
    declared JSON type (strict: ``true`` is not 1, ``"5"`` is not 5, ``"yes"`` is not
    true), as the targets are checked."""

    model_config = ConfigDict(extra="forbid", strict=True)


class MonitorStatsQuery(BaseModel):
    """Base of the query parameters a monitor's stats() takes (GET
    /monitors/{name}/stats). Validated like options; the route's parameters a monitor
    does not declare are ignored, so none is passed to a stats() that takes none."""

    model_config = ConfigDict(extra="ignore", frozen=True)


OptionsT = TypeVar("OptionsT", bound=MonitorOptions)


@dataclass
class MonitorContext:
    """What a running monitor receives from the manager."""

    targets: TargetSet
    sink: EventSink
    transport: TransportSettings = field(default_factory=TransportSettings)
    limits: TargetLimits = field(default_factory=lambda: TargetSettings().limits())
    ringbuf_supported: bool = True
    kernel_offsets: dict[str, int] = field(default_factory=dict)
    # Who an event's process is and what its cgroup names (the agent's shared ones).
    identity: ProcessIdentity = field(default_factory=local_identity)
    cgroups: CgroupResolver = field(default_factory=default_resolver)


class BaseMonitor(ABC, Generic[OptionsT]):
    """A monitor, generic over its options model: ``class X(BccMonitor[XOptions])`` with
    ``Options = XOptions`` (a ClassVar cannot name the type variable).

    Threads: every hook runs on the manager's control thread, except poll() (the
    monitor's poller thread, and what it calls: parsing, ctx.sink.publish) and
    request_stop() (control thread, while the poller may be inside poll()), and
    csv_row()/console_line() (the output writer's thread: pure functions of the event)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[MonitorOptions]] = MonitorOptions
    # The keyword arguments stats() takes, as a model (OpenAPI: <Name>StatsQuery).
    StatsQuery: ClassVar[type[MonitorStatsQuery]] = MonitorStatsQuery
    # The monitor's event, declared once (agent/model/event_decl.py): EventModel,
    # CSV_FIELDS, csv_row(), console_line() and BccMonitor.parse_event() derive from it.
    EVENT: ClassVar[EventDecl | None] = None
    # The fields of this monitor's events (OpenAPI: <Name>Event); the common ones first.
    EventModel: ClassVar[type[EventModel]] = EventModel
    # "category:event" tracepoints and capability names (agent.kernel.capabilities).
    REQUIRED_TRACEPOINTS: ClassVar[tuple[str, ...]] = ()
    REQUIRED_FEATURES: ClassVar[tuple[str, ...]] = ()
    CSV_FIELDS: ClassVar[tuple[str, ...]] = ()
    # Aggregating monitors: columns of the periodic snapshot rows (<name>-snapshot.csv).
    SNAPSHOT_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        event = cls.__dict__.get("EVENT")
        if event is None:
            return
        if "EventModel" not in cls.__dict__:
            cls.EventModel = event.model(cls.__name__.removesuffix("Monitor") + "Event",
                                         base=EventModel)
        if "CSV_FIELDS" not in cls.__dict__:
            cls.CSV_FIELDS = (*COMMON_CSV_FIELDS, *event.csv_columns)

    def __init__(self, options: OptionsT, ctx: MonitorContext) -> None:
        self.options: OptionsT = options
        self.ctx = ctx

    @classmethod
    def option_errors(cls, options: MonitorOptions, report: Any) -> str | None:
        """Why these options cannot run on this kernel (409), beyond the static needs."""
        return None

    def prepare(self) -> None:  # noqa: B027 (optional hook)
        """Control thread, before anything is loaded and before a running monitor of
        the same name is stopped for a reload: resolve and check whatever can refuse
        these options without touching the kernel (ValueError subclasses: 422;
        MonitorError: 409), so that a refused change leaves the running one as it was."""

    @abstractmethod
    def load(self) -> None:
        """Compile, load and attach; raise MonitorError with the reason on failure, with
        nothing left loaded."""

    @abstractmethod
    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events to ctx.sink; called in a loop by the poller thread.
        Must return within about ``timeout_ms`` plus a bounded amount of work at any
        event rate: the manager stops a monitor by letting its poll return."""

    def request_stop(self) -> None:  # noqa: B027 (optional hook)
        """Control thread, before the poller is joined: make a poll in progress return
        promptly and keep it from starting another long one. Must be safe while the
        poller is inside poll(); close() follows once the poller has returned."""

    @abstractmethod
    def close(self) -> None:
        """Detach every probe and free every map. Idempotent."""

    @abstractmethod
    def set_targets(self, targets: TargetSet) -> None:
        """Write the target set into the kernel maps."""

    def apply_options(self, options: MonitorOptions) -> bool:
        """Take new options without reloading, when only live-changeable ones differ;
        False (the default) makes the manager reload the monitor with them."""
        return False

    def kernel_counters(self) -> dict[str, int]:
        return {}

    def stats(self) -> dict[str, Any]:
        """Monitor-specific figures (aggregating monitors return their tables). Takes the
        fields of StatsQuery as keyword arguments, those the client gave."""
        return {}

    def status(self) -> dict[str, Any]:
        """What a running monitor reports about itself in GET /monitors/{name} ("status")
        beyond its options (e.g. where func's probes are placed); control thread."""
        return {}

    def periodic(self) -> None:  # noqa: B027 (optional hook)
        """Called about once a second on the control thread (housekeeping)."""

    def snapshot_rows(self) -> list[dict[str, Any]]:
        """The aggregate tables as rows of SNAPSHOT_FIELDS (aggregating monitors); read
        on the control thread every output.snapshot_interval_s and at stop."""
        return []

    def metric_series(self) -> list[MetricSeries]:
        """Prometheus series of aggregating monitors' tables (control thread, read at
        scrape time)."""
        return []

    def csv_row(self, event: Event) -> list[Any]:
        if self.EVENT is not None:
            return self.EVENT.csv_row(event, COMMON_CSV_FIELDS)
        return [event.get(f) for f in self.CSV_FIELDS]

    def console_line(self, event: Event) -> str:
        if self.EVENT is not None:
            from agent.monitors.decoder import console_line

            return console_line(self.EVENT, event)
        return " ".join(f"{k}={event[k]}" for k in self.CSV_FIELDS if k in event)
