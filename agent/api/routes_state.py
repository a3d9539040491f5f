"""The agent's state as one document: GET with an ETag, PUT with If-Match (all or nothing).

This is what `ebpf-agentctl apply/diff` and configuration management tools use."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Request, Response

from agent.api.access.scopes import needs
from agent.api.deps import ManagerDep
from agent.api.errors import http_errors, validation_detail
from agent.api.models import ERROR_RESPONSES, ErrorBody, StateDoc, StateIn, StateResult, errors
from agent.core.commands import ApplyState, ReadState


class DuplicateKey(ValueError):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def duplicate_key(body: bytes) -> str | None:
    """The first key that appears twice in one object of the JSON ``body`` (the parser
    FastAPI uses keeps the last silently: two entries for one monitor would apply one)."""
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicates)
    except DuplicateKey as e:
        return str(e.args[0])
    except ValueError:  # not JSON: FastAPI has answered already
        return None
    return None


router = APIRouter(tags=["state"], responses=ERROR_RESPONSES)

ETAG_HEADER = {"ETag": {"description": "the state's version; send it back in If-Match",
                        "schema": {"type": "string"}}}


@router.get("/state", dependencies=[Depends(needs("read"))],
            response_model=StateDoc,
            responses={200: {"headers": ETAG_HEADER}},
            summary="running monitors with their options, and the targets, with an ETag")
async def get_state(manager: ManagerDep, response: Response) -> dict[str, Any]:
    with http_errors():
        doc, etag = await manager.execute_async(ReadState())
    response.headers["ETag"] = etag
    return doc


@router.put(
    "/state",
    dependencies=[Depends(needs("control"))],
    response_model=StateResult,
    responses={
        **errors(404, 422),
        200: {"headers": ETAG_HEADER},
        400: {"description": "a malformed request (e.g. an If-Match value HTTP does not "
              "allow), refused by the HTTP server before the API sees it",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        409: {"model": ErrorBody, "description": "a monitor failed to start: every change "
              "was rolled back; detail: {message, monitor, rolled_back}"},
        412: {"model": ErrorBody, "description": "If-Match names a state that is no longer "
              "current (the ETag header holds the current one)"},
    },
    summary="make the agent match a whole state document, atomically",
)
async def put_state(
    manager: ManagerDep,
    request: Request,
    response: Response,
    body: Annotated[StateIn, Body()],
    if_match: Annotated[str | None, Header(description="the ETag the change is based on; "
                                           "absent or *: unconditional")] = None,
    dry_run: Annotated[bool, Query(description="only report what would change")] = False,
) -> Any:
    dup = duplicate_key(await request.body())  # read and cached by FastAPI already
    if dup is not None:
        raise HTTPException(422, validation_detail(f"key {dup!r} appears twice in one "
                                                   "object"))
    desired: dict[str, Any] = {"monitors": body.monitors}
    if body.targets is not None:
        desired["targets"] = body.targets.model_dump()
    with http_errors(checks_input=True):  # 412 carries the current ETag header
        monitors, targets = manager.parse_state(desired)
        command = ApplyState(monitors, targets, if_match, dry_run)
        doc, etag, changes = await manager.execute_async(command)
    response.headers["ETag"] = etag
    return {"state": doc, "changes": changes, "applied": bool(changes) and not dry_run}
