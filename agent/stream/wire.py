"""The bytes subscribers receive. Built from the event JSON the hub encoded once, never
re-serialized: SSE frames and WebSocket text frames carry the same bytes as JSONL."""

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
    head = sse_missed(batch.missed) if batch.missed else b""
    return head + b"".join(sse_event(ev) for ev in batch.events)


def ws_event(ev: HubEvent) -> bytes:
    return b'{"id":%d,"event":%s,"data":%s}' % (ev.seq, orjson.dumps(ev.monitor), ev.data)


def ws_missed(missed: int) -> bytes:
    return b'{"event":"dropped","missed":%d}' % missed


def ws_messages(batch: Batch) -> list[bytes]:
    """UTF-8 JSON texts (sent as text frames)."""
    head = [ws_missed(batch.missed)] if batch.missed else []
    return head + [ws_event(ev) for ev in batch.events]
