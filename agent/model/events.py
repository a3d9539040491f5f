"""Event encoding shared by the JSONL output, SSE and WebSocket streams."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

Event = dict[str, Any]


class EventSink(Protocol):
    """Receives decoded events from a monitor's poller thread. Must not block."""

    def publish(self, event: Event) -> None: ...


def encode_event(event: Event) -> bytes:
    """One JSON object. Strings decoded with surrogateescape (bytes that are not UTF-8)
    are written as \\udcXX escapes, which json.loads + encode('utf-8', 'surrogateescape')
    turn back into the original bytes; orjson refuses them, so those take the slow path."""
    try:
        return orjson.dumps(event)
    except TypeError:
        return json.dumps(event, separators=(",", ":")).encode()


def decode_c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class MonotonicClock:
    """Turns bpf_ktime_get_ns() (CLOCK_MONOTONIC) into wall-clock ISO 8601 UTC."""

    def __init__(self) -> None:
        import time

        self._offset_ns = time.time_ns() - time.monotonic_ns()
        self._second = -1
        self._prefix = ""

    def iso(self, ts_ns: int) -> str:
        wall = ts_ns + self._offset_ns
        second, nanos = divmod(wall, 1_000_000_000)
        if second != self._second:  # formatting the date part once a second is enough
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            self._second = second
        return f"{self._prefix}{nanos:09d}Z"
