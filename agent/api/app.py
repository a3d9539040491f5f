"""The FastAPI application. ``create_app`` builds everything per app (hub, manager,
metrics registry) in the lifespan, so two apps can live side by side in one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware

from agent.api import (
    routes_events,
    routes_monitors,
    routes_state,
    routes_system,
    routes_targets,
)
from agent.api.deps import AppContext
from agent.api.errors import SafeJSONResponse, request_validation_error
from agent.api.metrics import AgentCollector, RequestDuration
from agent.api.schemas import add_monitor_components
from agent.api.security import RequestGuard, require_token
from agent.config import Settings
from agent.kernel.capabilities import CapabilityReport
from agent.monitors.registry import MonitorRegistry, discover_monitors

DESCRIPTION = """Loads eBPF monitors into the kernel and serves them.

Every endpoint but `/health` needs `Authorization: Bearer <token>` when a token is
configured (EBPF_AGENT_TOKEN, token_file or token). Without a token the agent only
listens on loopback and needs no authentication. Errors are `{"detail": ...}`; a 422's
detail is a list of `{loc, msg, type}`.

Live events: `GET /events` (Server-Sent Events: `id:` sequence number, `event:` monitor
name, `data:` the JSON event, the same bytes as the JSONL output) and `GET /events/ws`
(WebSocket, not listed below: the same filters `monitor`, `pid`, `uid`, `comm` and
`last_event_id`, and JSON text frames `{"id": N, "event": "exec", "data": {...}}`).
Both resume with `Last-Event-ID` from a bounded replay buffer; a client that fell out of
it gets `event: dropped` / `{"event": "dropped", "missed": N}` first."""


def _version() -> str:
    try:
        return version("ebpf-agent")
    except PackageNotFoundError:
        return "0+unknown"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.ctx
    await ctx.start()
    try:
        yield
    finally:
        await ctx.stop()


def create_app(
    settings: Settings,
    registry: MonitorRegistry | None = None,
    *,
    report: CapabilityReport | None = None,
) -> FastAPI:
    """``report``: a capability report to use instead of probing this host (tests)."""
    ctx = AppContext(
        settings=settings,
        registry=registry if registry is not None else discover_monitors(),
        token=settings.resolve_token(),
        report=report,
    )
    app = FastAPI(title="ebpf-agent", version=_version(), description=DESCRIPTION,
                  lifespan=lifespan, default_response_class=SafeJSONResponse)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.state.ctx = ctx
    ctx.metrics.register(AgentCollector(ctx))
    _add_middleware(app, settings)
    auth = [Depends(require_token)]
    app.include_router(routes_system.public)
    app.include_router(routes_system.router, dependencies=auth)
    app.include_router(routes_monitors.router, dependencies=auth)
    app.include_router(routes_targets.router, dependencies=auth)
    app.include_router(routes_state.router, dependencies=auth)
    app.include_router(routes_events.router, dependencies=auth)
    app.include_router(routes_events.ws_router)
    add_monitor_components(app, ctx.registry)
    return app


def _add_middleware(app: FastAPI, settings: Settings) -> None:
    api = settings.api
    # Added last = outermost: host and origin checks run before CORS and the routes.
    if api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=api.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    trusted = [*api.trusted_hosts, api.host]
    app.add_middleware(RequestGuard, trusted_hosts=trusted, origins=api.cors_origins)
    # Outermost: refusals by the guard (403, 400) are timed too.
    app.add_middleware(RequestDuration, registry=context_of(app).metrics)


def context_of(app: FastAPI) -> AppContext:
    ctx: AppContext = app.state.ctx
    return ctx
