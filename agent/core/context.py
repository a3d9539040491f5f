"""Builds the pieces both the CLI and the REST app need from Settings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from agent.config import Settings
from agent.core.manager import MonitorManager
from agent.kernel.capabilities import CapabilityReport
from agent.model.events import Event
from agent.model.targets import TargetSet
from agent.monitors.registry import MonitorRegistry
from agent.output.writer import WriterFactory

log = logging.getLogger(__name__)


def target_set(settings: Settings) -> TargetSet:
    t = settings.targets
    return TargetSet(frozenset(t.pids), frozenset(t.uids), frozenset(t.comms), t.follow_children)


def build_manager(
    settings: Settings,
    registry: MonitorRegistry,
    report: CapabilityReport,
    publish: Callable[[Event], object] | None = None,
    formats: Sequence[str] | None = None,
    targets: TargetSet | None = None,
) -> MonitorManager:
    return MonitorManager(
        registry,
        report,
        targets=targets or target_set(settings),
        limits=settings.targets.limits(),
        transport=settings.transport,
        output=settings.output,
        publish=publish,
        writers=WriterFactory(settings.output, formats),
    )


def autostart(manager: MonitorManager, settings: Settings) -> dict[str, str]:
    """Start the monitors the config enables; returns {name: error} for those that failed."""
    errors: dict[str, str] = {}
    for name, mon in settings.monitors.items():
        if not mon.enabled:
            continue
        try:
            manager.start_monitor(name, mon.options)
        except Exception as e:
            errors[name] = str(e)
            log.error("monitor %s did not start: %s", name, e)
    return errors
