"""The work the control thread does, one frozen dataclass per kind.

A caller checks its input first (MonitorManager.parse_options, parse_stats_query,
parse_state; agent.model.targets.validate_values), builds a command and hands it to
MonitorManager.execute (blocking: the CLI, tests, the metrics scrape) or
MonitorManager.execute_async (awaited on the event loop by the API's routes). The
control thread runs it in one place, MonitorManager._dispatch, and the answer (or the
exception, see agent/core/failures.py) goes back to the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

from agent.model.targets import TargetKind, TargetSet
from agent.monitors.contract import MetricSeries, MonitorOptions

TargetOp = Literal["replace", "add", "remove"]
R = TypeVar("R", covariant=True)  # what the command answers
Info = dict[str, Any]  # a monitor's state, options and lease (MonitorInfo in the API)


@dataclass(frozen=True)
class Command(Generic[R]):
    # A ValueError it raises is bad input (422, exit 2), not a bug (failures.failure_of).
    checks_input: ClassVar[bool] = False


@dataclass(frozen=True)
class ListMonitors(Command[list[Info]]):
    """Every registered monitor: state, options, lease."""


@dataclass(frozen=True)
class DescribeMonitor(Command[Info]):
    name: str


@dataclass(frozen=True)
class ListRunning(Command[list[str]]):
    """The names of the running monitors."""


@dataclass(frozen=True)
class Start(Command[Info]):
    """Start, or apply new options to a running monitor. With ``lease_s`` it stops by
    itself after that many seconds unless renewed; without, an existing lease is kept."""

    checks_input: ClassVar[bool] = True  # the monitor's prepare/load checks its options
    name: str
    options: MonitorOptions
    lease_s: float | None = None


@dataclass(frozen=True)
class Stop(Command[Info]):
    name: str


@dataclass(frozen=True)
class StopAll(Command[None]):
    """Shutdown: every monitor stopped, late pollers waited for."""


@dataclass(frozen=True)
class RenewLease(Command[Info]):
    """``lease_s`` more seconds; None removes the lease (runs until stopped)."""

    name: str
    lease_s: float | None


@dataclass(frozen=True)
class ReadTargets(Command[dict[str, Any]]):
    """The targets as the kernel maps hold them (the stored set when no monitor runs)."""


@dataclass(frozen=True)
class SetTargets(Command[dict[str, Any]]):
    kind: TargetKind
    op: TargetOp
    values: frozenset[int | str]


@dataclass(frozen=True)
class SetFollowChildren(Command[dict[str, Any]]):
    follow: bool


@dataclass(frozen=True)
class ReadStats(Command[dict[str, Any]]):
    """One monitor's counters and stats(query)."""

    checks_input: ClassVar[bool] = True  # stats() refuses unknown sort keys
    name: str
    query: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReadCounters(Command[dict[str, dict[str, Any]]]):
    """Every monitor's counters."""


@dataclass(frozen=True)
class ReadMetricSeries(Command[dict[str, list[MetricSeries]]]):
    """The Prometheus series of every running monitor."""


@dataclass(frozen=True)
class ReadState(Command[tuple[dict[str, Any], str]]):
    """The state document (running monitors' options, targets) and its ETag."""


@dataclass(frozen=True)
class ApplyState(Command[tuple[dict[str, Any], str, list[dict[str, Any]]]]):
    """Make the running monitors and the targets match, all or nothing."""

    checks_input: ClassVar[bool] = True
    monitors: Mapping[str, MonitorOptions]
    targets: TargetSet | None
    if_match: str | None = None
    dry_run: bool = False
