"""The application context (one per app: no module-level singletons) and the FastAPI
dependencies handlers use to reach it."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from agent.config import Settings
from agent.core.context import autostart, build_manager
from agent.core.manager import MonitorManager
from agent.kernel.capabilities import CapabilityReport, build_report
from agent.model.events import Event
from agent.monitors.registry import MonitorRegistry
from agent.stream.hub import EventHub

log = logging.getLogger(__name__)


@dataclass
class AppContext:
    settings: Settings
    registry: MonitorRegistry
    token: str | None
    report: CapabilityReport | None = None
    hub: EventHub | None = None
    manager: MonitorManager | None = None
    metrics: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=False))
    autostart_done: threading.Event = field(default_factory=threading.Event)
    autostart_errors: dict[str, str] = field(default_factory=dict)
    exporter: Any = None  # agent.export.nats.NatsExporter when export.nats is enabled

    async def start(self) -> None:
        """Lifespan start-up: the hub, the capability report, the manager, autostart."""
        stream = self.settings.stream
        self.hub = EventHub(stream.replay_buffer, stream.max_subscribers)
        self.hub.attach_loop(asyncio.get_running_loop())
        if self.report is None:
            self.report = await run_in_threadpool(build_report, self.registry)
        self.manager = build_manager(self.settings, self.registry, self.report,
                                     publish=self._publisher(self.hub))
        # autostart blocks (BCC compiles each monitor): a thread, so the API answers
        # meanwhile; /ready turns 200 when it is done.
        threading.Thread(target=self._autostart, name="autostart", daemon=True).start()

    def _publisher(self, hub: EventHub) -> Callable[[Event], Any]:
        """The hub, plus the NATS exporter fed with the bytes the hub encoded."""
        nats_cfg = self.settings.export.nats
        if not nats_cfg.enabled:
            return hub.publish
        from agent.export.nats import NatsExporter

        host = self.settings.export.host_name or socket.gethostname()
        exporter = self.exporter = NatsExporter(nats_cfg, host)
        exporter.start()
        hub_publish, offer = hub.publish, exporter.offer

        def publish(event: Event) -> None:
            offer(str(event.get("monitor", "")), hub_publish(event))

        return publish

    def _autostart(self) -> None:
        try:
            assert self.manager is not None
            self.autostart_errors.update(autostart(self.manager, self.settings))
        finally:
            self.autostart_done.set()

    def begin_shutdown(self) -> None:
        """Ends every open stream; safe from any thread, before the lifespan ends."""
        if self.hub is not None:
            self.hub.close_threadsafe()

    async def stop(self) -> None:
        """Lifespan shutdown: close streams, stop every monitor (detaching every probe)."""
        if self.hub is not None:
            self.hub.close()
        if self.manager is not None:
            timeout = self.settings.api.shutdown_timeout_s * 4
            await run_in_threadpool(self.manager.shutdown, timeout)
        if self.exporter is not None:  # after the monitors: their last events go out too
            await run_in_threadpool(self.exporter.stop)

    @property
    def ready(self) -> bool:
        return self.manager is not None and self.autostart_done.is_set()


def get_context(conn: HTTPConnection) -> AppContext:
    ctx: AppContext = conn.app.state.ctx
    return ctx


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_manager(ctx: ContextDep) -> MonitorManager:
    if ctx.manager is None:
        raise HTTPException(503, "the agent is starting")
    return ctx.manager


def get_hub(ctx: ContextDep) -> EventHub:
    if ctx.hub is None:
        raise HTTPException(503, "the agent is starting")
    return ctx.hub


def get_settings(ctx: ContextDep) -> Settings:
    return ctx.settings


ManagerDep = Annotated[MonitorManager, Depends(get_manager)]
HubDep = Annotated[EventHub, Depends(get_hub)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
