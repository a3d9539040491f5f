"""Builds the pieces both the CLI and the REST app need from Settings."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from agent.config import Settings, group_id
from agent.core.manager import MonitorManager, OutputConfig
from agent.kernel.capabilities import CapabilityReport
from agent.model.events import Event
from agent.model.targets import TargetLimits, TargetSet
from agent.monitors.contract import TransportSettings
from agent.monitors.registry import MonitorRegistry

log = logging.getLogger(__name__)


def target_set(settings: Settings) -> TargetSet:
    t = settings.targets
    return TargetSet(frozenset(t.pids), frozenset(t.uids), frozenset(t.comms), t.follow_children)


def build_manager(
    settings: Settings,
    registry: MonitorRegistry,
    report: CapabilityReport,
    publish: Callable[[Event], None] | None = None,
    formats: Sequence[str] | None = None,
    targets: TargetSet | None = None,
) -> MonitorManager:
    t, tr, out = settings.targets, settings.transport, settings.output
    return MonitorManager(
        registry,
        report,
        targets=targets or target_set(settings),
        limits=TargetLimits(t.max_pids, t.max_uids, t.max_comms),
        transport=TransportSettings(tr.kind, tr.ringbuf_pages, tr.perf_pages, tr.wakeup_every),
        output=OutputConfig(
            tuple(out.formats if formats is None else formats),
            out.directory,
            out.queue_size,
            out.flush_interval_s,
            out.snapshot_interval_s,
            None if out.group is None else group_id(out.group),
        ),
        publish=publish,
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
