"""Health, readiness, capabilities, agent statistics and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from agent.api.access.scopes import needs
from agent.api.deps import ContextDep, HubDep, ManagerDep
from agent.api.errors import http_errors
from agent.api.models import ERROR_RESPONSES, AgentStats, Capabilities, Health, Ready
from agent.core.commands import ReadCounters
from agent.core.manager import process_figures

public = APIRouter(tags=["system"])
router = APIRouter(tags=["system"], responses=ERROR_RESPONSES)


@public.get("/health", response_model=Health, summary="liveness (no authentication)")
async def health() -> dict[str, str]:
    from agent.api.app import _version

    return {"status": "ok", "version": _version()}


@router.get("/ready", dependencies=[Depends(needs("read"))],
            response_model=Ready, summary="200 once monitors are up, 503 before")
async def ready(ctx: ContextDep, response: Response) -> dict[str, Any]:
    if not ctx.ready:
        response.status_code = 503
        return {"status": "starting"}
    return {"status": "ready", "autostart_errors": ctx.autostart_errors}


@router.get("/capabilities", dependencies=[Depends(needs("read"))],
            response_model=Capabilities,
            summary="what this kernel supports (the report of `ebpf-agent check`)")
async def capabilities(ctx: ContextDep, _: ManagerDep) -> dict[str, Any]:
    assert ctx.report is not None  # set before the manager
    return ctx.report.as_dict()


@router.get("/stats", dependencies=[Depends(needs("read"))],
            response_model=AgentStats,
            summary="agent uptime, CPU and RSS; per monitor and per stream subscriber")
async def stats(ctx: ContextDep, manager: ManagerDep, hub: HubDep) -> dict[str, Any]:
    with http_errors():
        monitors = await manager.execute_async(ReadCounters())
    out = {"agent": process_figures(manager.started), "monitors": monitors}
    out["streams"] = hub.stats()
    if ctx.exporter is not None:
        out["export"] = {"nats": ctx.exporter.stats()}
    if ctx.agent is not None and ctx.agent.processes is not None:
        out["processes"] = ctx.agent.process_stats()
    return out


@router.get("/metrics", dependencies=[Depends(needs("read"))],
            summary="Prometheus text format",
            response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(ctx: ContextDep, _: ManagerDep) -> Response:
    # The collector asks the manager's control thread: not on the event loop.
    body = await run_in_threadpool(generate_latest, ctx.metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
