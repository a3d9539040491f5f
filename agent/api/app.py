"""The FastAPI application. ``create_app`` builds everything per app (hub, manager,
metrics registry) in the lifespan, so two apps can live side by side in one process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.api import (
    routes_auth,
    routes_containers,
    routes_events,
    routes_monitors,
    routes_processes,
    routes_state,
    routes_system,
    routes_targets,
    routes_ui,
)
from agent.api.access.audit import AuditTrail
from agent.api.access.gate import AuthGate
from agent.api.access.origin import RequestGuard
from agent.api.access.principal import TokenStore
from agent.api.deps import AppContext
from agent.api.errors import SafeJSONResponse, http_error, request_validation_error
from agent.api.metrics import AgentCollector, RequestDuration
from agent.api.schemas import add_monitor_components
from agent.config import Settings
from agent.kernel.capabilities import CapabilityReport
from agent.monitors.registry import MonitorRegistry, discover_monitors

DESCRIPTION = """Loads eBPF monitors into the kernel and serves them.

Every endpoint but `/health` and the `/ui` page needs `Authorization: Bearer <token>`
(a token from the config, or the one generated into `api.runtime_dir`), or the session
cookie of `POST /auth/session`, or (streams only) a ticket of `POST /events/tickets`.
A `read` token may read, stream, log in and make tickets; everything that changes state
needs a `control` token (403 otherwise): each operation's security requirement names the
scope it needs. With `api.auth: none` (loopback only) nothing is
required. The gate authenticates before it reads a body; bodies are capped at
`api.max_body_bytes` (413). Errors are `{"detail": ...}`; a 422's detail is a list of
`{loc, msg, type}`.

Live events: `GET /events` (Server-Sent Events: `id:` sequence number, `event:` monitor
name, `data:` the JSON event, the same bytes as the JSONL output) and `GET /events/ws`
(WebSocket, not listed below: the same filters `monitor`, `pid`, `uid`, `comm`,
`process_id`, `container_id`, `cgroup`, `unit` and `last_event_id`, and JSON text
frames `{"id": N, "event": "exec", "data": {...}}`).
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
    generated_token: str | None = None,
) -> FastAPI:
    """``report``: a capability report to use instead of probing this host (tests);
    ``generated_token``: the token ``serve`` generated into api.runtime_dir (control)."""
    ctx = AppContext(
        settings=settings,
        registry=registry if registry is not None else discover_monitors(),
        tokens=TokenStore.from_settings(settings, generated_token),
        report=report,
    )
    docs = settings.api.docs
    app = FastAPI(title="ebpf-agent", version=_version(), description=DESCRIPTION,
                  lifespan=lifespan, default_response_class=SafeJSONResponse,
                  docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    app.add_exception_handler(RequestValidationError, request_validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.state.ctx = ctx
    ctx.metrics.register(AgentCollector(ctx))
    _add_middleware(app, settings, ctx)
    # Each route declares the scope it needs (agent/api/access/scopes.py).
    app.include_router(routes_system.public)
    app.include_router(routes_ui.router)
    app.include_router(routes_auth.public)
    app.include_router(routes_auth.router)
    app.include_router(routes_system.router)
    app.include_router(routes_monitors.router)
    app.include_router(routes_targets.router)
    app.include_router(routes_state.router)
    app.include_router(routes_processes.router)
    app.include_router(routes_events.router)
    app.include_router(routes_containers.router)
    app.include_router(routes_events.ws_router)
    add_monitor_components(app, ctx.registry)
    return app


def _add_middleware(app: FastAPI, settings: Settings, ctx: AppContext) -> None:
    api = settings.api
    # Added last = outermost: host and origin checks, the audit trail, authentication
    # (before any body is read), then CORS and the routes.
    if api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=api.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        )
    app.add_middleware(AuthGate, ctx=ctx)
    app.add_middleware(AuditTrail, audit=ctx.audit)
    trusted = [*api.trusted_hosts, api.host]
    app.add_middleware(RequestGuard, trusted_hosts=trusted, origins=api.cors_origins)
    # Outermost: refusals by the guard (403, 400) are timed too.
    app.add_middleware(RequestDuration, registry=context_of(app).metrics)


def context_of(app: FastAPI) -> AppContext:
    ctx: AppContext = app.state.ctx
    return ctx
