"""Events counted per container: what ``GET /containers`` shows.

A consumer of the pipeline (agent/core/pipeline.py): every event that carries a
``container_id`` (agent/model/workload.py: the cgroup path names it) counts for that
container, per monitor. Bounded in containers (``stream.max_containers``): the one seen
least recently is evicted and counted; per container at most ``MAX_PATHS`` cgroup paths
and units are kept (a container's own sub-cgroups: systemd inside it, for instance),
the rest counted in ``paths_dropped``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.model.events import Event

MAX_PATHS = 16


@dataclass(slots=True)
class ContainerEntry:
    container_id: str
    pod_uid: str | None
    first_seen: str
    last_seen: str
    cgroups: list[str] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    paths_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"container_id": self.container_id, "pod_uid": self.pod_uid,
                "cgroups": list(self.cgroups), "units": list(self.units),
                "events": dict(self.events), "first_seen": self.first_seen,
                "last_seen": self.last_seen, "paths_dropped": self.paths_dropped}


class ContainerBook:
    """Per-container event counts; ``offer`` runs on poller threads, ``snapshot`` on
    the event loop: one lock between them, held for a few dict operations."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.evicted = 0
        self._entries: OrderedDict[str, ContainerEntry] = OrderedDict()
        self._lock = threading.Lock()

    def offer(self, event: Event, data: bytes) -> None:
        """A consumer of the pipeline: O(1), never blocks on anything but the lock."""
        cid = event.get("container_id")
        if type(cid) is not str:
            return
        monitor = str(event.get("monitor", ""))
        now = event.get("timestamp")
        seen = now if type(now) is str else _now_iso()
        with self._lock:
            entry = self._entries.get(cid)
            if entry is None:
                if len(self._entries) >= self.capacity:
                    self._entries.popitem(last=False)
                    self.evicted += 1
                entry = self._entries[cid] = ContainerEntry(
                    cid, event.get("pod_uid"), seen, seen)
            else:
                self._entries.move_to_end(cid)
                entry.last_seen = seen
            entry.events[monitor] = entry.events.get(monitor, 0) + 1
            _remember(entry, entry.cgroups, event.get("cgroup"))
            _remember(entry, entry.units, event.get("unit"))
            if entry.pod_uid is None and type(event.get("pod_uid")) is str:
                entry.pod_uid = event["pod_uid"]

    def snapshot(self) -> dict[str, Any]:
        """The containers, most recently seen first, and how many were evicted."""
        with self._lock:
            rows = [e.as_dict() for e in reversed(self._entries.values())]
            evicted = self.evicted
        return {"containers": rows, "evicted": evicted, "capacity": self.capacity}

    def __len__(self) -> int:
        return len(self._entries)


def _remember(entry: ContainerEntry, values: list[str], value: Any) -> None:
    if type(value) is not str or value in values:
        return
    if len(values) >= MAX_PATHS:
        entry.paths_dropped += 1
        return
    values.append(value)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
