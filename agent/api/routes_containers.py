"""GET /containers: the containers the agent saw events of, with counts per monitor
(agent/stream/containers.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from agent.api.access.scopes import needs
from agent.api.deps import ContainersDep
from agent.api.models import ERROR_RESPONSES

router = APIRouter(tags=["containers"], responses=ERROR_RESPONSES)


class Container(BaseModel):
    container_id: str = Field(description="the container's 64-hex id")
    pod_uid: str | None = Field(description="the Kubernetes pod uid, if in a pod")
    cgroups: list[str] = Field(description="cgroup paths its events came from (at most 16)")
    units: list[str] = Field(description="systemd units of those cgroups (at most 16)")
    events: dict[str, int] = Field(description="events seen per monitor")
    first_seen: str = Field(description="timestamp of its first event seen")
    last_seen: str = Field(description="timestamp of its last event seen")
    paths_dropped: int = Field(description="cgroup paths and units not kept (over 16)")


class Containers(BaseModel):
    containers: list[Container] = Field(description="most recently seen first")
    evicted: int = Field(description="containers dropped to stay within capacity")
    capacity: int = Field(description="stream.max_containers")


@router.get("/containers", dependencies=[Depends(needs("read"))], response_model=Containers,
            summary="containers seen in events, with event counts per monitor")
async def containers(book: ContainersDep) -> dict[str, Any]:
    return book.snapshot()
