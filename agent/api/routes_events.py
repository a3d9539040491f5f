"""Live events over Server-Sent Events and WebSocket, both fed by the hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, WebSocket
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.requests import HTTPConnection, Request
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from agent.api.deps import ContextDep, HubDep, SettingsDep
from agent.api.gate import principal_of
from agent.api.models import ERROR_RESPONSES
from agent.api.security import deny
from agent.stream.hub import EventHub, Filters, HubFull, Subscriber
from agent.stream.wire import sse_chunk, ws_messages

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"], responses=ERROR_RESPONSES)
ws_router = APIRouter(tags=["events"])  # not in OpenAPI: see events_ws


def filters(
    monitor: Annotated[list[str] | None, Query(description="monitor name (repeatable)")] = None,
    pid: Annotated[list[int] | None, Query(description="process id (repeatable)")] = None,
    uid: Annotated[list[int] | None, Query(description="user id (repeatable)")] = None,
    comm: Annotated[list[str] | None, Query(description="process name (repeatable)")] = None,
) -> Filters:
    return Filters(frozenset(monitor or ()), frozenset(pid or ()), frozenset(uid or ()),
                   frozenset(comm or ()))


FiltersDep = Annotated[Filters, Depends(filters)]
LAST_ID = re.compile(r"[0-9]{1,18}")
LastIdQuery = Annotated[int | None, Query(
    ge=0, le=2**63 - 1, description="resume after this id (like the Last-Event-ID header)")]


def client_of(conn: HTTPConnection) -> str:
    if conn.client is None:
        return "unix"
    return f"{conn.client.host}:{conn.client.port}"


def resume_from(header: str | None, query: int | None) -> int | None:
    if query is not None:
        return query
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses. An id
    # that is not one (or absurdly long) is ignored, as a missing header is.
    if header is not None and LAST_ID.fullmatch(header.strip()):
        return int(header.strip())
    return None


def subscribe(hub: EventHub, kind: str, conn: HTTPConnection, f: Filters,
              last_id: int | None) -> Subscriber:
    try:
        return hub.subscribe(kind, f, client_of(conn), last_id)
    except HubFull as e:
        raise HTTPException(503, str(e)) from None


# -- Server-Sent Events ------------------------------------------------------------------
class SubscriberStream(EventSourceResponse):
    """An SSE response that always releases its subscriber, and turns a send that stayed
    blocked longer than stall_timeout_s (sse-starlette's send_timeout) into a counted
    disconnect instead of an application error."""

    def __init__(self, hub: EventHub, sub: Subscriber, **kwargs: Any) -> None:
        super().__init__(_sse_body(sub), **kwargs)
        self.hub, self.sub = hub, sub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        reason = "disconnected"
        try:
            await super().__call__(scope, receive, send)
        except SendTimeoutError:
            reason = "stalled"
            self.sub.dropped += self.sub.inflight  # never confirmed: lost for this client
            self.sub.inflight = 0
            log.warning("stream subscriber %d (%s) stalled: disconnected",
                        self.sub.id, self.sub.client)
        finally:
            self.hub.unsubscribe(self.sub, self.sub.closed_reason or reason)


async def _sse_body(sub: Subscriber) -> AsyncIterator[bytes]:
    while (batch := await sub.next_batch()) is not None:
        sub.inflight = len(batch.events)
        yield sse_chunk(batch)
        sub.confirm()  # sse-starlette resumes us only after the send completed


@router.get(
    "/events",
    summary="live events as Server-Sent Events",
    response_class=EventSourceResponse,
    responses={200: {"description": "id: sequence number, event: monitor name, data: the "
                     "JSON event; `event: dropped` with {\"missed\": N} when this client "
                     "fell out of the replay buffer",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def events_sse(
    request: Request,
    hub: HubDep,
    settings: SettingsDep,
    f: FiltersDep,
    last_event_id: LastIdQuery = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> SubscriberStream:
    sub = subscribe(hub, "sse", request, f, resume_from(last_event_id_header, last_event_id))
    stream = settings.stream
    return SubscriberStream(
        hub, sub,
        ping=stream.heartbeat_s,
        ping_message_factory=lambda: ServerSentEvent(comment="heartbeat", sep="\n"),
        send_timeout=stream.stall_timeout_s,
        sep="\n",
    )


# -- WebSocket ---------------------------------------------------------------------------
@ws_router.websocket("/events/ws")
async def events_ws(
    websocket: WebSocket,
    ctx: ContextDep,
    f: FiltersDep,
    last_event_id: LastIdQuery = None,
) -> None:
    # Before accept: a refusal is an HTTP response, not a WebSocket close code. The gate
    # authenticated the handshake (bearer, session cookie or ticket).
    if principal_of(websocket.scope) is None:
        await deny(websocket.scope, websocket.send, 401, "missing or invalid bearer token")
        return
    if ctx.hub is None:
        await deny(websocket.scope, websocket.send, 503, "the agent is starting")
        return
    last_id = resume_from(websocket.headers.get("last-event-id"), last_event_id)
    try:
        sub = ctx.hub.subscribe("ws", f, client_of(websocket), last_id)
    except HubFull as e:
        await deny(websocket.scope, websocket.send, 503, str(e))
        return
    reason = "disconnected"
    try:
        await websocket.accept()
        reason = await _pump_ws(websocket, sub, ctx.settings.stream.stall_timeout_s)
    finally:
        ctx.hub.unsubscribe(sub, sub.closed_reason or reason)


async def _pump_ws(websocket: WebSocket, sub: Subscriber, stall_timeout: float) -> str:
    watcher = asyncio.create_task(_watch_client(websocket, sub))
    try:
        while (batch := await sub.next_batch()) is not None:
            messages = ws_messages(batch)
            sub.inflight = len(batch.events)
            # One deadline per batch: wait_for per frame wrapped every send in a task,
            # which capped a client at ~20k frames/s.
            async with asyncio.timeout(stall_timeout):
                for msg in messages:
                    await websocket.send_text(msg.decode())
            sub.confirm()
        if sub.closed_reason == "shutdown":
            await _close(websocket, 1001)  # going away
        return sub.closed_reason or "disconnected"
    except TimeoutError:
        sub.dropped += sub.inflight
        sub.inflight = 0
        log.warning("stream subscriber %d (%s) stalled: disconnected", sub.id, sub.client)
        await _close(websocket, 1008)
        return "stalled"
    except (WebSocketDisconnect, RuntimeError, OSError):
        return "disconnected"
    finally:
        watcher.cancel()


async def _watch_client(websocket: WebSocket, sub: Subscriber) -> None:
    """Reads (and ignores) client frames so a closed connection ends the stream."""
    with contextlib.suppress(Exception):
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass
    sub.close("disconnected")


async def _close(websocket: WebSocket, code: int) -> None:
    if websocket.application_state is WebSocketState.CONNECTED:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(websocket.close(code), 1.0)
