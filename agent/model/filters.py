"""The stream filters, declared once: their names, types and limits.

Process filters (``monitor``, ``pid``, ``uid``, ``comm``, ``process_id``) match a value
exactly; the workload filters match the fields every event carries since issue 17
(agent/model/workload.py): ``container_id`` by prefix (an id as ``docker ps`` shortens
it), ``cgroup`` by path prefix component-wise (``/a/b`` matches ``/a/b`` and
``/a/b/c``, not ``/a/bc``), ``unit`` exactly.

A stream (`GET /events`, `GET /events/ws`), a ticket (`POST /events/tickets`), the
gate that redeems a ticket and ``ebpf-agentctl events`` all take a ``StreamFilters``.
The limits live in ``LIMITS`` only and are checked when a model is built (not frozen
into the field types at import), so changing one there changes every entry point and
the OpenAPI document alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)

from agent.model.targets import COMM_MAX_BYTES, U32_MAX

FILTER_KEYS = ("monitor", "pid", "uid", "comm", "process_id", "container_id", "cgroup",
               "unit")
# Keys whose values are strings (the others are integers).
_PROCESS_ID = re.compile(r"[0-9a-f]{16}-[0-9]{1,20}-[0-9]{1,10}")  # agent/kernel/identity.py
_HEX = re.compile(r"[0-9a-f]+")


@dataclass
class FilterLimits:
    """How many values one filter may hold, and how long one value may be."""

    monitors: int = 64
    monitor_chars: int = 64
    pids: int = 1024
    uids: int = 1024
    comms: int = 256
    comm_bytes: int = COMM_MAX_BYTES  # an event's comm never holds more
    process_ids: int = 1024
    container_ids: int = 256
    cgroups: int = 256
    cgroup_chars: int = 4096  # PATH_MAX
    units: int = 256
    unit_chars: int = 256  # systemd.unit(5): a unit name is at most 255 characters


def _counts() -> dict[str, int]:
    """How many values each filter may hold (LIMITS as it is when asked)."""
    return {"monitor": LIMITS.monitors, "pid": LIMITS.pids, "uid": LIMITS.uids,
            "comm": LIMITS.comms, "process_id": LIMITS.process_ids,
            "container_id": LIMITS.container_ids, "cgroup": LIMITS.cgroups,
            "unit": LIMITS.units}


LIMITS = FilterLimits()


def _schema_limits(schema: dict[str, Any]) -> None:
    """The limits of LIMITS in the JSON schema (OpenAPI), as they are when asked."""
    props = schema.get("properties", {})
    for key, count in _counts().items():
        if key in props:
            props[key]["maxItems"] = count
    if "monitor" in props:
        props["monitor"]["items"]["maxLength"] = LIMITS.monitor_chars
    if "comm" in props:
        props["comm"]["items"].update(minLength=1, maxLength=LIMITS.comm_bytes)
    for key in ("pid", "uid"):
        if key in props:
            props[key]["items"].update(minimum=0, maximum=U32_MAX)
    items = {"process_id": {"pattern": f"^{_PROCESS_ID.pattern}$"},
             "container_id": {"pattern": "^[0-9a-f]{1,64}$"},
             "cgroup": {"pattern": "^/", "maxLength": LIMITS.cgroup_chars},
             "unit": {"minLength": 1, "maxLength": LIMITS.unit_chars}}
    for key, extra in items.items():
        if key in props:
            props[key]["items"].update(extra)


class StreamFilters(BaseModel):
    """Each non-empty list must contain the event's value; empty lists match every event;
    the lists combine with AND."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_schema_limits)
    monitor: list[StrictStr] = Field(default_factory=list, description="monitor names")
    pid: list[StrictInt] = Field(default_factory=list, description="process ids")
    uid: list[StrictInt] = Field(default_factory=list, description="user ids")
    comm: list[StrictStr] = Field(
        default_factory=list,
        description="process names (1-15 bytes; \\udcXX stands for the byte XX)")
    process_id: list[StrictStr] = Field(
        default_factory=list, description="process instance ids (exact)")
    container_id: list[StrictStr] = Field(
        default_factory=list,
        description="container id prefixes (1-64 lower-case hex digits)")
    cgroup: list[StrictStr] = Field(
        default_factory=list,
        description="cgroup paths relative to the cgroup2 root; each matches its subtree"
                    " (/a/b matches /a/b and /a/b/c, not /a/bc)")
    unit: list[StrictStr] = Field(
        default_factory=list, description="systemd units, e.g. nginx.service (exact)")

    @field_validator(*FILTER_KEYS)
    @classmethod
    def _within_limits(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        key = str(info.field_name)
        most = _counts()[key]
        if len(values) > most:
            raise ValueError(f"at most {most} {key} values")
        for v in values:
            problem = _value_problem(key, v)
            if problem:
                raise ValueError(f"{v!r}: {problem}")
        return values

    @property
    def empty(self) -> bool:
        return not any(getattr(self, k) for k in FILTER_KEYS)

    def as_dict(self) -> dict[str, list[Any]]:
        """The non-empty filters, each sorted."""
        return {k: sorted(getattr(self, k)) for k in FILTER_KEYS if getattr(self, k)}

    def params(self) -> list[tuple[str, str]]:
        """As query parameters of /events (repeated keys)."""
        return [(k, str(v)) for k in FILTER_KEYS for v in getattr(self, k)]

    def matches(self, event: dict[str, Any]) -> bool:
        """Whether a decoded event passes (the hub matches the encoded one itself)."""
        return ((not self.monitor or event.get("monitor") in self.monitor)
                and (not self.pid or event.get("pid") in self.pid)
                and (not self.uid or event.get("uid") in self.uid)
                and (not self.comm or event.get("comm") in self.comm)
                and (not self.process_id or event.get("process_id") in self.process_id)
                and workload_matches(self.container_id, self.cgroup, self.unit, event))


def cgroup_within(path: Any, prefix: str) -> bool:
    """Whether the cgroup ``path`` is ``prefix`` or below it, component-wise."""
    if not isinstance(path, str):
        return False
    if prefix == "/":
        return path.startswith("/")
    return path == prefix or path.startswith(prefix + "/")


def workload_matches(container_ids: Any, cgroups: Any, units: Any,
                     event: dict[str, Any]) -> bool:
    """The workload filters (empty ones match everything) against an event's fields."""
    if container_ids:
        cid = event.get("container_id")
        if not isinstance(cid, str) or not any(cid.startswith(p) for p in container_ids):
            return False
    if cgroups and not any(cgroup_within(event.get("cgroup"), p) for p in cgroups):
        return False
    return not units or event.get("unit") in units


def _value_problem(key: str, value: Any) -> str | None:
    if key == "monitor":
        if len(value) > LIMITS.monitor_chars:
            return f"longer than {LIMITS.monitor_chars} characters"
        return None
    if key in ("pid", "uid"):
        return None if 0 <= value <= U32_MAX else f"outside 0..{U32_MAX}"
    if key == "process_id":
        return None if _PROCESS_ID.fullmatch(value) else (
            "not a process id (<16 hex>-<start ticks>-<pid>)")
    if key == "container_id":
        if not value or len(value) > 64 or not _HEX.fullmatch(value):
            return "not a container id prefix (1-64 lower-case hex digits)"
        return None
    if key == "cgroup":
        return _cgroup_problem(value)
    if key == "unit":
        if not value or len(value) > LIMITS.unit_chars or "/" in value:
            return f"not a unit name (1-{LIMITS.unit_chars} characters, no '/')"
        return None
    try:
        # "\udcXX" (the form non-UTF-8 bytes take in our JSON) stands for byte XX.
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return "holds a lone surrogate that is not a \\udc80-\\udcff byte escape"
    if not raw:
        return "empty process name"
    if len(raw) > LIMITS.comm_bytes:
        return f"{len(raw)} bytes; a comm holds at most {LIMITS.comm_bytes}"
    return None


def _cgroup_problem(path: str) -> str | None:
    if len(path) > LIMITS.cgroup_chars:
        return f"longer than {LIMITS.cgroup_chars} characters"
    if not path.startswith("/"):
        return "a cgroup path starts with '/' (relative to the cgroup2 root)"
    if path == "/":
        return None
    parts = path[1:].split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "empty, '.' or '..' component (write /a/b, not /a//b/ or /a/../b)"
    return None
