"""The bytes subscribers receive. Built from the event JSON the hub encoded once, never
re-serialized: SSE frames and WebSocket text frames carry the same bytes as JSONL. SSE
frames are stored ready-made in the hub's ring (agent/stream/hub.py); WebSocket messages
are made from a batch of them (``ws_array_of``, ``ws_messages_of``: compiled in
agent/stream/ringstore.c, the Python functions here being the reference and fallback).
"""

from __future__ import annotations

import orjson

from agent.stream.hub import Batch, HubEvent
from agent.stream.ring import _ringstore


def sse_event(ev: HubEvent) -> bytes:
    # encode_event never emits a raw newline (JSON escapes them), so one data: line.
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (ev.seq, ev.monitor.encode(), ev.data)


def sse_missed(missed: int) -> bytes:
    return b'event: dropped\ndata: {"missed":%d}\n\n' % missed


HEARTBEAT = b": heartbeat\n\n"


def sse_parts(batch: Batch) -> tuple[bytes, bytes]:
    """(head, body) of one chunk per batch, sent one after the other without joining
    them: the ``dropped`` frame when the batch has a missed count, then the events'
    frames; a heartbeat comment when the batch is empty (an idle stream)."""
    body = batch.frames or b"".join(sse_event(ev) for ev in batch.events)
    head = sse_missed(batch.missed) if batch.missed else b""
    return (head, body) if head or body else (b"", HEARTBEAT)


def sse_chunk(batch: Batch) -> bytes:
    """One chunk per batch: one socket write for up to a batch of events."""
    return b"".join(sse_parts(batch))


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


# -- from a batch of SSE frames (read_sse): what the WebSocket routes send ----------------
def ws_objects(frames: bytes) -> list[bytes]:
    """Each SSE event frame as the WebSocket object ws_event makes (the reference of
    ringstore.c's ws_objects)."""
    out = []
    for frame in frames.split(b"\n\n")[:-1]:
        head, data = frame.split(b"\ndata: ", 1)
        seq, monitor = head.split(b"\nevent: ", 1)
        if not seq.startswith(b"id: "):
            raise ValueError("not a run of SSE event frames")
        name = monitor.decode("utf-8", "replace")
        out.append(b'{"id":%d%s%s}' % (int(seq[4:]), _ws_head(name), data))
    return out


def py_ws_array_of(batch: Batch) -> bytes:
    parts = [ws_missed(batch.missed)] if batch.missed else []
    return b"[" + b",".join(parts + ws_objects(batch.frames)) + b"]"


def py_ws_messages_of(batch: Batch) -> list[bytes]:
    return ([ws_missed(batch.missed)] if batch.missed else []) + ws_objects(batch.frames)


def ws_array_of(batch: Batch) -> bytes:
    """A read_sse batch as one JSON array (the ``batch`` mode): equal to ws_array of the
    same events read one by one."""
    if _ringstore is None:
        return py_ws_array_of(batch)
    data: bytes = _ringstore.ws_array(batch.frames, batch.missed)
    return data


def ws_messages_of(batch: Batch) -> list[bytes]:
    """A read_sse batch as one JSON text per event (and one for a missed count)."""
    if _ringstore is None:
        return py_ws_messages_of(batch)
    messages: list[bytes] = _ringstore.ws_messages(batch.frames, batch.missed)
    return messages
