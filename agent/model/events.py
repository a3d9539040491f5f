"""The event contract and its encoding (JSONL output, SSE and WebSocket streams).

Every event of every monitor starts with the same fields, COMMON_FIELDS, decoded from
``struct event_hdr`` (agent/bpf/types.h), declared once below as HEADER
(agent/model/event_decl.py); the monitor's own fields follow. Stream filters (monitor,
pid, uid, comm) therefore work on every monitor.
"""

from __future__ import annotations

import ctypes
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from pydantic import BaseModel, Field, create_model

from agent.model.event_decl import Decode, EventDecl, EventField, Member

Event = dict[str, Any]

COMM_LEN = 16  # agent/bpf/types.h

# ``struct event_hdr`` (agent/bpf/types.h), the first member of every monitor's event,
# and the fields every event carries first, with one meaning for every monitor; checked
# against gcc by tests/monitors/test_common.py.
HEADER = EventDecl(
    struct="event_hdr", header="types.h", with_header=False,
    doc="The fields every event starts with, the same for every monitor (COMMON_FIELDS).\n"
        "Each monitor's model extends it (OpenAPI components <Name>Event).",
    members=(
        Member("ts_ns", "u64"),  # bpf_ktime_get_ns(): CLOCK_MONOTONIC
        Member("pid", "u32"),  # tgid
        Member("tid", "u32"),
        Member("ppid", "u32"),  # real parent's tgid
        Member("uid", "u32"),
        Member("gid", "u32"),
        Member("_pad", "u32"),
        Member("comm", "char", COMM_LEN),
        Member("start_ns", "u64"),  # the thread-group leader's start_boottime
        Member("parent_start_ns", "u64"),
        Member("cgroup_id", "u64"),
    ),
    fields=(
        EventField("monitor", "string", "the monitor's name", Decode.MONITOR),
        EventField("timestamp", "string", "ts_ns as UTC wall-clock time, ISO 8601, ns precision",
                   Decode.WALLTIME, source="ts_ns"),
        EventField("ts_ns", "integer", "CLOCK_MONOTONIC ns (bpf_ktime_get_ns) of the event"),
        EventField("pid", "integer", "process id (the kernel's tgid)"),
        EventField("tid", "integer", "thread id"),
        EventField("ppid", "integer", "the real parent's process id"),
        EventField("uid", "integer", "real user id"),
        EventField("gid", "integer", "real group id"),
        EventField("comm", "string", "the task's name (at most 15 bytes)"),
        EventField("process_id", "string",
                   "the process instance: <boot id, 16 hex>-<start time in clock ticks>-<pid>,"
                   " unique across pid reuse, reboots and hosts, the same in every monitor"
                   " and from /proc/<pid>/stat (agent/kernel/identity.py)",
                   Decode.PROCESS_ID, source="pid", arg="start_ns", nullable=True),
        EventField("parent_process_id", "string", "the real parent's process_id",
                   Decode.PROCESS_ID, source="ppid", arg="parent_start_ns", nullable=True),
        EventField("cgroup_id", "integer",
                   "the task's cgroup v2 id (the inode number of its cgroup directory)"),
        EventField("cgroup", "string", "the cgroup's path relative to the cgroup2 root;"
                   " null when it could not be resolved", Decode.WORKLOAD,
                   source="cgroup_id", arg=0, nullable=True),
        EventField("container_id", "string", "the container's 64-hex id (docker,"
                   " containerd, CRI-O, podman), from the cgroup path; null outside one",
                   Decode.WORKLOAD, source="cgroup_id", arg=1, nullable=True),
        EventField("pod_uid", "string", "the Kubernetes pod uid from a kubepods cgroup",
                   Decode.WORKLOAD, source="cgroup_id", arg=2, nullable=True),
        EventField("unit", "string", "the systemd unit (.service or .scope) of the cgroup",
                   Decode.WORKLOAD, source="cgroup_id", arg=3, nullable=True),
    ),
)
COMMON_FIELDS = HEADER.keys
# The first CSV columns of every monitor (one file per monitor: no monitor column).
COMMON_CSV_FIELDS = COMMON_FIELDS[1:]



class EventHeader(ctypes.Structure):
    """The ctypes mirror of ``struct event_hdr``: the first member of every monitor's
    event struct."""

    _fields_ = HEADER.ctypes_fields()



class Ancestor(BaseModel):
    """One ancestor of an event's process, as the process table knows it."""

    process_id: str
    pid: int
    comm: str | None


# Fields a stage of the agent adds to every event after decoding (agent/core/pipeline.py),
# declared once here: the event models (OpenAPI) show them as optional.
ANCESTORS = "ancestors"
ENRICHED_FIELDS: dict[str, Any] = {
    ANCESTORS: (list[Ancestor] | None, Field(
        None, description="the process's ancestors (parent first) from the process table,"
        " at most processes.event_ancestors of them; absent when that is 0 (the default)")),
}

if TYPE_CHECKING:  # at run time the class is derived from HEADER

    class EventModel(BaseModel):
        """The common fields; each monitor's model extends it."""

else:
    EventModel = create_model("EventModel", __base__=HEADER.model("EventHeaderModel"),
                              __doc__=HEADER.doc, **ENRICHED_FIELDS)


class EventSink(Protocol):
    """Receives decoded events from a monitor's poller thread. Must not block."""

    def publish(self, event: Event) -> None: ...


def encode_event(event: Event) -> bytes:
    """One JSON object. Strings decoded with surrogateescape (bytes that are not UTF-8)
    are written as \\udcXX escapes, which json.loads + encode('utf-8', 'surrogateescape')
    turn back into the original bytes; orjson refuses them, so those take the slow path."""
    try:
        # orjson hands back a bytes object that still owns its working buffer (4 KiB);
        # whatever keeps the bytes (the output queue, an exporter's queue) would pay
        # that per event, so keep an exact-size copy (bench/RESULTS.md, "Figures the
        # code cites").
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
