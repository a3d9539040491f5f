"""The bytes subscribers receive. Built from the event JSON the hub encoded once, never
re-serialized: SSE frames and WebSocket text frames carry the same bytes as JSONL. SSE
frames are stored ready-made in the hub's ring (agent/stream/hub.py)."""

from __future__ import annotations

import orjson

from agent.stream.hub import Batch, HubEvent


def sse_event(ev: HubEvent) -> bytes:
    # encode_event never emits a raw newline (JSON escapes them), so one data: line.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.seq, ev.monitor.encode(), ev.data)


def sse_missed(missed: int) -> bytes:
    return b'event: dropped\ndata: {"missed":%d}\n\n' % missed


def sse_chunk(batch: Batch) -> bytes:
    """One chunk per batch: one socket write for up to a batch of events."""
    body = batch.frames or b"".join(sse_event(ev) for ev in batch.events)
    return sse_missed(batch.missed) + body if batch.missed else body


_WS_EVENT: dict[str, bytes] = {}


def _ws_head(monitor: str) -> bytes:
    head = _WS_EVENT.get(monitor)
    if head is None:
        head = b',"event":' + orjson.dumps(monitor) + b',"data":'
        if len(_WS_EVENT) < 1024:  # monitor names: a handful
            _WS_EVENT[monitor] = head
    return head


def ws_event(ev: HubEvent) -> bytes:
    return b'{"id":%d%s%s}' % (ev.seq, _ws_head(ev.monitor), ev.data)


def ws_missed(missed: int) -> bytes:
    return b'{"event":"dropped","missed":%d}' % missed


def ws_messages(batch: Batch) -> list[bytes]:
    """UTF-8 JSON texts (sent as text frames): one per event."""
    head = [ws_missed(batch.missed)] if batch.missed else []
    return head + [ws_event(ev) for ev in batch.events]


def ws_array(batch: Batch) -> bytes:
    """The batch as one JSON array of the same objects (the opt-in ``batch`` mode)."""
    parts = [ws_missed(batch.missed)] if batch.missed else []
    parts += [ws_event(ev) for ev in batch.events]
    return b"[" + b",".join(parts) + b"]"
