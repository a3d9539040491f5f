"""The process table: GET /processes, /processes/{pid}, /processes/by-id/{process_id}."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.concurrency import run_in_threadpool

from agent.api.access.scopes import needs
from agent.api.deps import ContextDep
from agent.api.models import ERROR_RESPONSES, ErrorBody
from agent.api.process_models import ProcessLineage, ProcessPage
from agent.processes.process import Process
from agent.processes.table import CursorError, ProcessQuery, ProcessTable

router = APIRouter(tags=["processes"], dependencies=[Depends(needs("read"))],
                   responses=ERROR_RESPONSES)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "no such process in the table"}}


async def get_table(ctx: ContextDep) -> ProcessTable:
    """The table, with every record the kernel produced before the request applied
    (the tracker reads its records in batches: ProcessTracker.catch_up)."""
    if ctx.agent is None:
        raise HTTPException(503, "the agent is starting")
    if ctx.agent.processes is None:
        raise HTTPException(503, "the process table is off (processes.enabled: false)")
    tracker = ctx.agent.tracker
    if tracker is not None and tracker.behind():
        await run_in_threadpool(tracker.catch_up)
    return ctx.agent.processes


TableDep = Annotated[ProcessTable, Depends(get_table)]


@router.get("/processes", response_model=ProcessPage,
            summary="processes in the table, ordered by pid then start time, paged")
async def list_processes(
    table: TableDep,
    alive: Annotated[bool | None, Query(description="only live (true) or exited (false)")] = None,
    comm: Annotated[str | None, Query(min_length=1, max_length=15)] = None,
    container_id: Annotated[str | None, Query(min_length=1, max_length=64,
                                              pattern="^[0-9a-f]+$",
                                              description="a container id prefix")] = None,
    cgroup: Annotated[str | None, Query(min_length=1, max_length=4096, description=(
        "a cgroup path: it and its subtree"))] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(min_length=1, max_length=128, description=(
        "the `next` of the previous page"))] = None,
) -> dict[str, Any]:
    q = ProcessQuery(alive, comm, container_id, cgroup, limit, after)
    try:  # sorting a full table takes a while: not on the event loop
        rows, total, nxt = await run_in_threadpool(table.query, q)
    except CursorError as e:
        raise HTTPException(422, [{"loc": ["query", "after"], "msg": str(e),
                                   "type": "value_error"}]) from None
    stats = table.stats()
    return {"processes": rows, "total": total, "next": nxt, "capacity": stats["capacity"],
            "size": stats["size"], "evicted": stats["evicted"]}


@router.get("/processes/by-id/{process_id}", response_model=ProcessLineage,
            responses=NOT_FOUND,
            summary="a process, live or exited, with its ancestors and live children")
async def process_by_id(table: TableDep, process_id: str) -> dict[str, Any]:
    return lineage_or_404(table, table.get(process_id), f"no process {process_id} in the table")


@router.get("/processes/{pid}", response_model=ProcessLineage, responses=NOT_FOUND,
            summary="the live process with this pid, its ancestors and its children")
async def process_by_pid(table: TableDep, pid: int) -> dict[str, Any]:
    return lineage_or_404(table, table.live_pid(pid), f"no live process with pid {pid}")


def lineage_or_404(table: ProcessTable, p: Process | None, missing: str) -> dict[str, Any]:
    if p is None:
        raise HTTPException(404, missing)
    return table.lineage(p)
