"""Targets: read back from the kernel maps; replace, add or remove pids, uids, comms,
cgroups and containers."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, HTTPException
from starlette.convertors import Convertor, register_url_convertor

from agent.api.access.scopes import needs
from agent.api.deps import ManagerDep
from agent.api.errors import http_errors, validation_detail
from agent.api.models import ERROR_RESPONSES, FollowChildren, Targets, TargetValues, errors
from agent.core.commands import ReadTargets, SetFollowChildren, TargetOp
from agent.core.manager import MonitorManager, target_command
from agent.model.targets import STRING_KINDS

router = APIRouter(prefix="/targets", tags=["targets"], responses=ERROR_RESPONSES)
Kind = Literal["pids", "uids", "comms", "cgroups", "containers"]
ValuesBody = Annotated[TargetValues, Body(description="pids/uids: integers 0..2^32-1; "
                                          "comms: 1-15 byte process names; cgroups: "
                                          "existing cgroup v2 paths relative to its root "
                                          "(\"/system.slice\"); containers: container id "
                                          "prefixes, 12-64 lower-case hex digits")]


@router.get("", dependencies=[Depends(needs("read"))],
            response_model=Targets, summary="the targets as the kernel maps hold them")
async def get_targets(manager: ManagerDep) -> dict[str, Any]:
    with http_errors():
        return await manager.execute_async(ReadTargets())


# Declared before /{kind}: "follow_children" is not a kind.
@router.put("/follow_children", dependencies=[Depends(needs("control"))],
            response_model=Targets, responses=errors(422))
async def put_follow_children(
    follow: Annotated[FollowChildren, Body(description="children of target pids are "
                                           "followed in the kernel")],
    manager: ManagerDep,
) -> dict[str, Any]:
    with http_errors():
        await manager.execute_async(SetFollowChildren(follow))
        return await manager.execute_async(ReadTargets())


@router.put("/{kind}", dependencies=[Depends(needs("control"))],
            response_model=Targets, responses=errors(422),
            summary="replace the values of one kind")
async def replace_targets(kind: Kind, values: ValuesBody, manager: ManagerDep) -> dict[str, Any]:
    return await _update(manager, kind, "replace", values)


@router.post("/{kind}", dependencies=[Depends(needs("control"))],
             response_model=Targets, responses=errors(422), summary="add values")
async def add_targets(kind: Kind, values: ValuesBody, manager: ManagerDep) -> dict[str, Any]:
    return await _update(manager, kind, "add", values)


class TargetValueConvertor(Convertor[str]):
    """One target value in a path, whatever it holds: a comm may hold "/" (sent as %2F,
    which the server decodes before routing) or a newline; Starlette's "path" convertor
    stops at a newline (``.*``), its default at "/"."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("target_value", TargetValueConvertor())


@router.delete("/{kind}/{value:target_value}", dependencies=[Depends(needs("control"))],
               response_model=Targets, responses=errors(422),
               summary="remove one value (idempotent)")
async def remove_target(kind: Kind, value: str, manager: ManagerDep) -> dict[str, Any]:
    parsed: int | str = value
    if kind == "cgroups":  # /targets/cgroups/system.slice/x or /targets/cgroups//system.slice/x
        parsed = value if value.startswith("/") else "/" + value
    elif kind not in STRING_KINDS:
        if not value.isascii() or not value.isdigit():
            raise HTTPException(422, validation_detail(f"{kind}: {value!r} is not an integer",
                                                       ("path", "value")))
        parsed = int(value)
    return await _update(manager, kind, "remove", [parsed])


async def _update(manager: MonitorManager, kind: Kind, op: TargetOp, values: list[Any]) -> Any:
    with http_errors():
        await manager.execute_async(target_command(kind, op, values))
        # Answer with what the kernel maps now hold, not with what was asked for.
        return await manager.execute_async(ReadTargets())
