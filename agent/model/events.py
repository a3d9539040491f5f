"""The event contract and its encoding (JSONL output, SSE and WebSocket streams).

Every event of every monitor starts with the same fields, COMMON_FIELDS, decoded from
``struct event_hdr`` (agent/bpf/types.h) by header_fields(); the monitor's own fields
follow. Stream filters (monitor, pid, uid, comm) therefore work on every monitor.
"""

from __future__ import annotations

import ctypes
import json
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field

Event = dict[str, Any]

COMM_LEN = 16  # agent/bpf/types.h
# The fields every event carries first, with one meaning for every monitor.
COMMON_FIELDS = ("monitor", "timestamp", "ts_ns", "pid", "tid", "ppid", "uid", "gid", "comm")
# The first CSV columns of every monitor (one file per monitor: no monitor column).
COMMON_CSV_FIELDS = COMMON_FIELDS[1:]


class EventHeader(ctypes.Structure):
    """Mirror of ``struct event_hdr`` in agent/bpf/types.h (checked against gcc by
    tests/monitors/test_common.py): the first member of every
    monitor's event struct."""

    _fields_ = [
        ("ts_ns", ctypes.c_uint64),  # bpf_ktime_get_ns(): CLOCK_MONOTONIC
        ("pid", ctypes.c_uint32),  # tgid
        ("tid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),  # real parent's tgid
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * COMM_LEN),
    ]


class EventSink(Protocol):
    """Receives decoded events from a monitor's poller thread. Must not block."""

    def publish(self, event: Event) -> None: ...


def encode_event(event: Event) -> bytes:
    """One JSON object. Strings decoded with surrogateescape (bytes that are not UTF-8)
    are written as \\udcXX escapes, which json.loads + encode('utf-8', 'surrogateescape')
    turn back into the original bytes; orjson refuses them, so those take the slow path."""
    try:
        # orjson hands back a bytes object that still owns its 4 KiB working buffer
        # (measured with tracemalloc: 4,097 B for a 237-byte event); whatever keeps the
        # bytes (the output queue, an exporter's queue) would pay that per event. An
        # exact-size copy costs ~0.1 us.
        return bytes(memoryview(orjson.dumps(event)))
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


def header_fields(monitor: str, hdr: EventHeader, clock: MonotonicClock) -> Event:
    """The common fields of an event (COMMON_FIELDS, in that order) from its header."""
    return {
        "monitor": monitor,
        "timestamp": clock.iso(hdr.ts_ns),
        "ts_ns": hdr.ts_ns,
        "pid": hdr.pid,
        "tid": hdr.tid,
        "ppid": hdr.ppid,
        "uid": hdr.uid,
        "gid": hdr.gid,
        "comm": decode_c_string(hdr.comm),
    }


class EventModel(BaseModel):
    """The fields every event starts with, the same for every monitor (COMMON_FIELDS).
    Each monitor's model extends it (OpenAPI components <Name>Event)."""

    model_config = ConfigDict(extra="forbid")

    monitor: str = Field(description="the monitor's name")
    timestamp: str = Field(description="ts_ns as UTC wall-clock time, ISO 8601, ns precision")
    ts_ns: int = Field(description="CLOCK_MONOTONIC ns (bpf_ktime_get_ns) of the event")
    pid: int = Field(description="process id (the kernel's tgid)")
    tid: int = Field(description="thread id")
    ppid: int = Field(description="the real parent's process id")
    uid: int = Field(description="real user id")
    gid: int = Field(description="real group id")
    comm: str = Field(description="the task's name (at most 15 bytes)")
