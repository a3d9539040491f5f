"""The application context (one per app: no module-level singletons) and the FastAPI
dependencies handlers use to reach it."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from agent.api.access.audit import AuditLog
from agent.api.access.logins import LoginLimiter
from agent.api.access.principal import TokenStore
from agent.api.access.sessions import SessionStore, TicketStore
from agent.config import Settings
from agent.core import memory
from agent.core.agent import Agent
from agent.core.manager import MonitorManager
from agent.kernel.capabilities import CapabilityReport, build_report
from agent.monitors.registry import MonitorRegistry
from agent.stream.containers import ContainerBook
from agent.stream.hub import EventHub

if TYPE_CHECKING:
    from agent.export.nats import NatsExporter

log = logging.getLogger(__name__)
TRIM_IDLE_S = 2.0


@dataclass
class AppContext:
    settings: Settings
    registry: MonitorRegistry
    tokens: TokenStore
    report: CapabilityReport | None = None
    agent: Agent | None = None  # built by start(): the manager, the hub, the exporter
    metrics: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=False))
    autostart_done: threading.Event = field(default_factory=threading.Event)
    autostart_errors: dict[str, str] = field(default_factory=dict)
    _trimmer: asyncio.Task[None] | None = None
    sessions: SessionStore = field(init=False)
    tickets: TicketStore = field(init=False)
    audit: AuditLog = field(init=False)
    logins: LoginLimiter = field(init=False)
    # Failed authentications by kind (login, bearer, session, ticket): /metrics.
    auth_failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("login", "bearer", "session", "ticket"), 0))

    def __post_init__(self) -> None:
        api = self.settings.api
        self.sessions = SessionStore(api.session_ttl_s, api.max_sessions, time.monotonic,
                                     api.max_sessions_per_token)
        self.tickets = TicketStore(api.ticket_ttl_s, api.max_tickets, time.monotonic,
                                   api.max_tickets_per_token)
        logging_ = self.settings.logging
        self.audit = AuditLog(api.audit_entries, logging_.audit_file,
                              refused_capacity=api.audit_refused_entries,
                              max_file_bytes=logging_.audit_file_max_bytes)
        self.logins = LoginLimiter(api.login_failures_per_minute,
                                   max_in_flight=api.logins_in_flight_per_client)

    @property
    def open(self) -> bool:
        """``api.auth: none``: no authentication (the server allows it on loopback only).
        With auth on and no token at all, nothing is open: every request is a 401."""
        return self.settings.api.auth == "none"

    def auth_failed(self, kind: str) -> None:
        self.auth_failures[kind] = self.auth_failures.get(kind, 0) + 1

    @property
    def manager(self) -> MonitorManager | None:
        return self.agent.manager if self.agent is not None else None

    @property
    def hub(self) -> EventHub | None:
        return self.agent.hub if self.agent is not None else None

    @property
    def containers(self) -> ContainerBook | None:
        return self.agent.containers if self.agent is not None else None

    @property
    def exporter(self) -> NatsExporter | None:
        return self.agent.exporter if self.agent is not None else None

    async def start(self) -> None:
        """Lifespan start-up: the capability report, the agent (hub, exporter, manager),
        autostart."""
        self.audit.open()
        if self.report is None:
            self.report = await run_in_threadpool(build_report, self.registry)
        agent = Agent(self.settings, self.registry, self.report, streams=True)
        assert agent.hub is not None
        agent.hub.attach_loop(asyncio.get_running_loop())
        agent.start()
        agent.manager.lease_expired_hook = self._audit_lease_expiry
        self.agent = agent
        # autostart blocks (BCC compiles each monitor): a thread, so the API answers
        # meanwhile; /ready turns 200 when it is done.
        threading.Thread(target=self._autostart, name="autostart", daemon=True).start()
        self._trimmer = asyncio.get_running_loop().create_task(self._trim_when_idle())

    def _audit_lease_expiry(self, name: str, lease_s: float, expired_at: str) -> None:
        """An expired lease stops a monitor with no request behind it: the audit entry
        names the agent itself as the actor (control thread)."""
        self.audit.record(token=None, client="agent", method="LEASE-EXPIRED",
                          path=f"/monitors/{name}/lease",
                          body=f"lease_s={lease_s:g} expired_at={expired_at}", status=200)

    async def _trim_when_idle(self) -> None:
        """After a burst, once no event was published for TRIM_IDLE_S, give the heaps'
        free memory back (agent/core/memory.py); once per burst."""
        last, trimmed = -1, True
        while True:
            await asyncio.sleep(TRIM_IDLE_S)
            seq = self.hub.next_seq if self.hub is not None else 0
            if seq != last:
                last, trimmed = seq, False
            elif not trimmed:
                trimmed = True
                await run_in_threadpool(memory.trim)

    def _autostart(self) -> None:
        try:
            assert self.agent is not None
            self.autostart_errors.update(self.agent.autostart())
        finally:
            self.autostart_done.set()

    def begin_shutdown(self) -> None:
        """Ends every open stream; safe from any thread, before the lifespan ends."""
        if self.hub is not None:
            self.hub.close_threadsafe()

    async def stop(self) -> None:
        """Lifespan shutdown: close streams, stop every monitor (detaching every probe)."""
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self.hub is not None:
            self.hub.close()
        if self.agent is not None:  # blocks: joins pollers, flushes the exporter
            await run_in_threadpool(self.agent.shutdown, self.settings.api.shutdown_timeout_s * 4)
        self.audit.close()

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


def get_containers(ctx: ContextDep) -> ContainerBook:
    if ctx.containers is None:
        raise HTTPException(503, "the agent is starting")
    return ctx.containers


def get_settings(ctx: ContextDep) -> Settings:
    return ctx.settings


ManagerDep = Annotated[MonitorManager, Depends(get_manager)]
HubDep = Annotated[EventHub, Depends(get_hub)]
ContainersDep = Annotated[ContainerBook, Depends(get_containers)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
