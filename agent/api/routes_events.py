"""Live events over Server-Sent Events and WebSocket, both fed by the hub."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocketDisconnect, WebSocketState

from agent.api.access.origin import deny
from agent.api.access.principal import client_address, principal_of
from agent.api.access.scopes import needs
from agent.api.chunked import ChunkedBody
from agent.api.deps import ContextDep, HubDep, SettingsDep
from agent.api.models import ERROR_RESPONSES
from agent.model.filters import StreamFilters
from agent.stream.hub import (
    DEFAULT_BATCH,
    SSE_BATCH_EVENTS,
    EventHub,
    Filters,
    HubFull,
    Subscriber,
)
from agent.stream.wire import sse_chunk, sse_parts, ws_array_of, ws_messages_of

log = logging.getLogger(__name__)
router = APIRouter(tags=["events"], responses=ERROR_RESPONSES)
ws_router = APIRouter(tags=["events"])  # not in OpenAPI: see events_ws


def filters(
    conn: HTTPConnection,
    monitor: Annotated[list[str] | None, Query(description="monitor name (repeatable)")] = None,
    pid: Annotated[list[int] | None, Query(description="process id (repeatable)")] = None,
    uid: Annotated[list[int] | None, Query(description="user id (repeatable)")] = None,
    comm: Annotated[list[str] | None, Query(description="process name (repeatable)")] = None,
    process_id: Annotated[list[str] | None, Query(
        description="process instance id, exact (repeatable)")] = None,
    container_id: Annotated[list[str] | None, Query(
        description="container id prefix, 1-64 hex digits (repeatable)")] = None,
    cgroup: Annotated[list[str] | None, Query(
        description="cgroup path relative to the cgroup2 root; matches its subtree"
                    " (repeatable)")] = None,
    unit: Annotated[list[str] | None, Query(
        description="systemd unit, exact (repeatable)")] = None,
) -> Filters:
    """The stream filters of the query (limits: agent/model/filters.py), or those of the
    ticket that opened the stream (the gate checked that the query asks for no other)."""
    who = principal_of(conn.scope)
    if who is not None and who.filters is not None:
        return Filters.of(who.filters)
    try:
        asked = StreamFilters(monitor=monitor or [], pid=pid or [], uid=uid or [],
                              comm=comm or [], process_id=process_id or [],
                              container_id=container_id or [], cgroup=cgroup or [],
                              unit=unit or [])
    except ValidationError as e:
        errors = [{**err, "loc": ("query", *err["loc"])}
                  for err in e.errors(include_url=False, include_context=False)]
        if conn.scope["type"] == "websocket":
            raise WebSocketRequestValidationError(errors) from None
        raise RequestValidationError(errors) from None
    return Filters.of(asked)


FiltersDep = Annotated[Filters, Depends(filters)]
LAST_ID = re.compile(r"[0-9]{1,18}")
LastIdQuery = Annotated[int | None, Query(
    ge=0, le=2**63 - 1, description="resume after this id (like the Last-Event-ID header)")]
MAX_LAG_DOC = (
    "skip ahead when the oldest event this client has not read was stored longer ago than "
    "this (ms); the skipped events are counted like evicted ones (`dropped` notice, "
    "/stats). Default `stream.max_lag_ms`; 0: never skip. A resume (Last-Event-ID) is "
    "exempt until it has caught up with the newest event once.")
MaxLagQuery = Annotated[int | None, Query(ge=0, le=3_600_000, description=MAX_LAG_DOC)]


def resume_from(header: str | None, query: int | None) -> int | None:
    if query is not None:
        return query
    # ASCII digits only: str.isdigit() also accepts "²", which int() refuses. An id
    # that is not one (or absurdly long) is ignored, as a missing header is.
    if header is not None and LAST_ID.fullmatch(header.strip()):
        return int(header.strip())
    return None


def subscribe(hub: EventHub, kind: str, conn: HTTPConnection, f: Filters,
              last_id: int | None, max_lag_ms: int | None = None) -> Subscriber:
    try:
        return hub.subscribe(kind, f, client_address(conn.scope), last_id, max_lag_ms)
    except HubFull as e:
        raise HTTPException(503, str(e)) from None


# -- Server-Sent Events ------------------------------------------------------------------
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]
# A batch this large means the stream is busy: wait BUSY_STREAM_WAIT_S before reading
# again (the added latency is that, only under load; at low rates every event goes out at
# once). Not agent/monitors/ringbuf.py's LINGER_S, which paces a poller thread.
BUSY_STREAM_BATCH = 256
BUSY_STREAM_WAIT_S = 0.003
# Events per WebSocket message in the batch=true mode (one JSON array; unfiltered or
# monitor-filtered reads are also bounded by SSE_BATCH_BYTES of frames).
WS_ARRAY_BATCH = 2048


class SubscriberStream(Response):
    """An SSE response streaming one subscriber's batches: one chunk per batch, written
    to the connection (agent/api/chunked.py) or through one ASGI send, and no
    per-send task, cancel scope or timer (sse-starlette cost ~10x the hub's work per
    batch at low rates). Two helper tasks per connection: one notices the client going
    away, one sends heartbeats on an idle stream and cuts a send that stayed blocked
    longer than stall_timeout_s (counted as ``stalled``), so the others are not slowed."""

    media_type = "text/event-stream"

    def __init__(self, hub: EventHub, sub: Subscriber, heartbeat_s: float,
                 stall_timeout_s: float) -> None:
        super().__init__()
        self.hub, self.sub = hub, sub
        self.heartbeat_s, self.stall_timeout_s = heartbeat_s, stall_timeout_s
        self._sending_since: float | None = None
        self._last_send = 0.0
        self._stalled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sub, loop = self.sub, asyncio.get_running_loop()
        pump = asyncio.current_task()
        helpers = [asyncio.create_task(self._watch_disconnect(receive)),
                   asyncio.create_task(self._watchdog(loop, pump))]
        reason = "disconnected"
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": SSE_HEADERS})
            self._last_send = loop.time()
            # Straight to the connection where it is uvicorn's (agent/api/chunked.py): no
            # copy of the frames per client on the way; otherwise through ASGI send.
            body = ChunkedBody.of(scope)
            while (batch := await sub.next_batch(SSE_BATCH_EVENTS, sse=True)) is not None:
                sub.inflight = batch.count
                self._sending_since = loop.time()
                if body is None:
                    await send({"type": "http.response.body", "body": sse_chunk(batch),
                                "more_body": True})
                elif not await body.write(*sse_parts(batch)):  # the client is gone
                    sub.dropped += sub.inflight  # read for it, never written: lost
                    sub.inflight = 0
                    sub.close("disconnected")
                    break
                self._last_send, self._sending_since = loop.time(), None
                sub.confirm()
                if batch.count >= BUSY_STREAM_BATCH:
                    # Under load: let a few ms of events gather into the next write
                    # instead of a read, a send and a GIL hand-over per few events.
                    await asyncio.sleep(BUSY_STREAM_WAIT_S)
            if sub.closed_reason != "disconnected":  # shutdown: end the response
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"",
                                "more_body": False})
        except asyncio.CancelledError:
            if not self._stalled:
                raise
            if pump is not None:
                pump.uncancel()  # our own watchdog's cancel, handled here
            reason = "stalled"
            sub.dropped += sub.inflight  # never confirmed: lost for this client
            sub.inflight = 0
            log.warning("stream subscriber %d (%s) stalled: disconnected", sub.id, sub.client)
        except OSError:
            pass
        finally:
            for t in helpers:
                t.cancel()
            self.hub.unsubscribe(sub, sub.closed_reason or reason)

    async def _watch_disconnect(self, receive: Receive) -> None:
        with contextlib.suppress(Exception):
            while (await receive())["type"] != "http.disconnect":
                pass
        self.sub.close("disconnected")

    async def _watchdog(self, loop: asyncio.AbstractEventLoop,
                        pump: asyncio.Task[Any] | None) -> None:
        tick = min(self.heartbeat_s, self.stall_timeout_s) / 2
        while not self.sub.closed:
            await asyncio.sleep(tick)
            now = loop.time()
            since = self._sending_since
            if since is not None and now - since > self.stall_timeout_s:
                self._stalled = True
                if pump is not None:
                    pump.cancel()
                return
            if since is None and now - self._last_send >= self.heartbeat_s:
                self.sub.ping()


@router.get(
    "/events",
    dependencies=[Depends(needs("read"))],
    summary="live events as Server-Sent Events",
    description="Every subscriber reads the shared replay ring at its own position. A live "
                "client slower than the events skips ahead when its oldest unread event is "
                "older than `max_lag_ms` (default `stream.max_lag_ms`): the skipped events "
                "are counted like evicted ones, in the `dropped` notice and /stats. A resume "
                "(`Last-Event-ID` header or `last_event_id`) replays what the ring holds: it "
                "is exempt until it has caught up with the newest event once. GET "
                "/events/ws (WebSocket) takes the same parameters.",
    response_class=EventSourceResponse,
    responses={200: {"description": "id: sequence number, event: monitor name, data: the "
                     "JSON event; `event: dropped` with {\"missed\": N} when this client "
                     "fell out of the replay buffer or skipped ahead (max_lag_ms)",
                     "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def events_sse(
    request: Request,
    hub: HubDep,
    settings: SettingsDep,
    f: FiltersDep,
    last_event_id: LastIdQuery = None,
    last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    max_lag_ms: MaxLagQuery = None,
) -> SubscriberStream:
    sub = subscribe(hub, "sse", request, f, resume_from(last_event_id_header, last_event_id),
                    max_lag_ms)
    stream = settings.stream
    return SubscriberStream(hub, sub, stream.heartbeat_s, stream.stall_timeout_s)


# -- WebSocket ---------------------------------------------------------------------------
@ws_router.websocket("/events/ws", dependencies=[Depends(needs("read"))])
async def events_ws(
    websocket: WebSocket,
    ctx: ContextDep,
    f: FiltersDep,
    last_event_id: LastIdQuery = None,
    batch: Annotated[bool, Query(description="send each batch of events as one JSON array "
                                 "per frame (same objects as one-per-frame mode)")] = False,
    max_lag_ms: MaxLagQuery = None,
) -> None:
    # Before accept: a refusal is an HTTP response, not a WebSocket close code. The gate
    # authenticated the handshake (bearer, session cookie or ticket), needs("read") is
    # the route's rule as for every other route.
    if ctx.hub is None:
        await deny(websocket.scope, websocket.send, 503, "the agent is starting")
        return
    last_id = resume_from(websocket.headers.get("last-event-id"), last_event_id)
    try:
        sub = ctx.hub.subscribe("ws", f, client_address(websocket.scope), last_id,
                                max_lag_ms)
    except HubFull as e:
        await deny(websocket.scope, websocket.send, 503, str(e))
        return
    reason = "disconnected"
    try:
        await websocket.accept()
        reason = await _pump_ws(websocket, sub, ctx.settings.stream.stall_timeout_s, batch)
    finally:
        ctx.hub.unsubscribe(sub, sub.closed_reason or reason)


async def _pump_ws(websocket: WebSocket, sub: Subscriber, stall_timeout: float,
                   as_array: bool = False) -> str:
    watcher = asyncio.create_task(_watch_client(websocket, sub))
    try:
        # Read as SSE frames (one slice of the ring when unfiltered, shared by subscribers
        # in step) and turned into WebSocket objects in one pass (agent/stream/wire.py).
        limit = WS_ARRAY_BATCH if as_array else DEFAULT_BATCH
        while (batch := await sub.next_batch(limit, sse=True)) is not None:
            messages = [ws_array_of(batch)] if as_array else ws_messages_of(batch)
            sub.inflight = batch.count
            # One deadline per batch: wait_for per frame wrapped every send in a task,
            # which capped a client at ~20k frames/s.
            async with asyncio.timeout(stall_timeout):
                for msg in messages:
                    await websocket.send_text(msg.decode())
            sub.confirm()
            if BUSY_STREAM_BATCH <= batch.count < limit:
                # Under load (see SubscriberStream); a full batch means more is waiting
                # already: read it at once.
                await asyncio.sleep(BUSY_STREAM_WAIT_S)
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
