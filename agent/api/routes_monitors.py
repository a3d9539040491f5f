"""Monitors: list, inspect, start (with options), stop, statistics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query

from agent.api.access.scopes import needs
from agent.api.deps import ManagerDep, SettingsDep
from agent.api.errors import http_errors, validation_detail
from agent.api.models import (
    ERROR_RESPONSES,
    ErrorBody,
    LeaseRequest,
    MonitorInfo,
    MonitorStats,
    errors,
)
from agent.core.commands import DescribeMonitor, ListMonitors, ReadStats, RenewLease, Start, Stop
from agent.core.leases import MAX_LEASE_S
from agent.core.manager import MonitorManager

router = APIRouter(prefix="/monitors", tags=["monitors"], responses=ERROR_RESPONSES)


@router.get("", dependencies=[Depends(needs("read"))],
            response_model=list[MonitorInfo], response_model_exclude_unset=True,
            summary="every registered monitor with its state")
async def list_monitors(manager: ManagerDep) -> list[dict[str, Any]]:
    with http_errors():
        return await manager.execute_async(ListMonitors())


@router.get("/{name}", dependencies=[Depends(needs("read"))],
            response_model=MonitorInfo, response_model_exclude_unset=True,
            responses=errors(404))
async def get_monitor(name: str, manager: ManagerDep) -> dict[str, Any]:
    with http_errors():
        return await manager.execute_async(DescribeMonitor(name))


@router.post("/{name}/start", dependencies=[Depends(needs("control"))],
             response_model=MonitorInfo, response_model_exclude_unset=True,
             responses=errors(404, 409, 422),
             summary="start, or apply new options to a running monitor")
async def start_monitor(
    name: str,
    manager: ManagerDep,
    settings: SettingsDep,
    options: Annotated[dict[str, Any] | None, Body(
        description="the monitor's options; absent: a running monitor keeps its options "
        "and a stopped one starts with the configured ones")] = None,
    lease_s: Annotated[float | None, Query(ge=1, le=MAX_LEASE_S, description=(
        "stop by itself after this many seconds unless renewed (POST .../lease); absent: "
        "an existing lease is kept, else none"))] = None,
) -> dict[str, Any]:
    with http_errors(checks_input=True):
        if options is None:
            info: dict[str, Any] = await manager.execute_async(DescribeMonitor(name))
            if info["state"] == "running":
                if lease_s is None:
                    return info
                options = info["options"]
            else:
                configured = settings.monitors.get(name)
                options = dict(configured.options) if configured else {}
        command = Start(name, manager.parse_options(name, options), lease_s)
        return await manager.execute_async(command)


@router.post("/{name}/lease", dependencies=[Depends(needs("control"))],
             response_model=MonitorInfo, response_model_exclude_unset=True,
             responses={**errors(404, 422),
                        409: {"model": ErrorBody, "description": "the monitor is not running"}},
             summary="renew (or remove) the lease of a running monitor")
async def renew_lease(name: str, body: LeaseRequest, manager: ManagerDep) -> dict[str, Any]:
    if body.lease_s is not None and not 1 <= body.lease_s <= MAX_LEASE_S:
        raise HTTPException(422, validation_detail(
            f"lease_s: {body.lease_s} is outside 1..{int(MAX_LEASE_S)}", ("body", "lease_s")))
    with http_errors():
        return await manager.execute_async(RenewLease(name, body.lease_s))


@router.post("/{name}/stop", dependencies=[Depends(needs("control"))],
             response_model=MonitorInfo, response_model_exclude_unset=True,
             responses=errors(404), summary="stop (idempotent): detaches every probe")
async def stop_monitor(name: str, manager: ManagerDep) -> dict[str, Any]:
    with http_errors():
        return await manager.execute_async(Stop(name))


@router.get("/{name}/stats", dependencies=[Depends(needs("read"))],
            response_model=MonitorStats, responses=errors(404, 422),
            summary="counters, and the tables of aggregating monitors")
async def monitor_stats(
    name: str,
    manager: ManagerDep,
    sort: Annotated[str | None, Query(max_length=64, description="table sort key")] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="rows per table")] = None,
) -> dict[str, Any]:
    """Read-only: a GET never changes anything (see POST .../stats/reset)."""
    given = {"sort": sort, "limit": limit}
    query = {k: v for k, v in given.items() if v is not None}
    # Validated against the monitor's StatsQuery model; what it does not declare is
    # ignored (exec's stats() takes nothing).
    return await _read_stats(manager, name, query)


@router.post("/{name}/stats/reset", dependencies=[Depends(needs("control"))],
             response_model=MonitorStats, responses=errors(404, 422),
             summary="read the tables and start a new window (aggregating monitors)")
async def reset_monitor_stats(
    name: str,
    manager: ManagerDep,
    sort: Annotated[str | None, Query(max_length=64, description="table sort key")] = None,
    limit: Annotated[int | None, Query(ge=1, le=100_000, description="rows per table")] = None,
) -> dict[str, Any]:
    """A POST, so that no foreign page can trigger it with a link or an <img>. Monitors
    without a window (exec) answer their stats unchanged."""
    given = {"sort": sort, "limit": limit, "reset": True}
    query = {k: v for k, v in given.items() if v is not None}
    return await _read_stats(manager, name, query)


@router.get("/{name}/schema", dependencies=[Depends(needs("read"))],
            response_model=dict[str, Any], responses=errors(404),
            summary="the JSON Schema of the monitor's options")
async def monitor_schema(name: str, manager: ManagerDep) -> dict[str, Any]:
    with http_errors():
        cls = manager.monitor_class(name)  # the registry: no control-thread work
    return cls.Options.model_json_schema()


async def _read_stats(manager: MonitorManager, name: str, query: dict[str, Any]
                      ) -> dict[str, Any]:
    with http_errors(checks_input=True):
        command = ReadStats(name, manager.parse_stats_query(name, query))
        return await manager.execute_async(command)
