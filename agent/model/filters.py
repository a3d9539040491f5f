"""The stream filters, declared once: their names, types and limits.

A stream (`GET /events`, `GET /events/ws`), a ticket (`POST /events/tickets`), the
gate that redeems a ticket and ``ebpf-agentctl events`` all take a ``StreamFilters``.
The limits live in ``LIMITS`` only and are checked when a model is built (not frozen
into the field types at import), so changing one there changes every entry point and
the OpenAPI document alike.
"""

from __future__ import annotations

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

FILTER_KEYS = ("monitor", "pid", "uid", "comm")


@dataclass
class FilterLimits:
    """How many values one filter may hold, and how long one value may be."""

    monitors: int = 64
    monitor_chars: int = 64
    pids: int = 1024
    uids: int = 1024
    comms: int = 256
    comm_bytes: int = COMM_MAX_BYTES  # an event's comm never holds more


LIMITS = FilterLimits()


def _schema_limits(schema: dict[str, Any]) -> None:
    """The limits of LIMITS in the JSON schema (OpenAPI), as they are when asked."""
    props = schema.get("properties", {})
    for key, count in (("monitor", LIMITS.monitors), ("pid", LIMITS.pids),
                       ("uid", LIMITS.uids), ("comm", LIMITS.comms)):
        if key in props:
            props[key]["maxItems"] = count
    if "monitor" in props:
        props["monitor"]["items"]["maxLength"] = LIMITS.monitor_chars
    if "comm" in props:
        props["comm"]["items"].update(minLength=1, maxLength=LIMITS.comm_bytes)
    for key in ("pid", "uid"):
        if key in props:
            props[key]["items"].update(minimum=0, maximum=U32_MAX)


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

    @field_validator("monitor", "pid", "uid", "comm")
    @classmethod
    def _within_limits(cls, values: list[Any], info: ValidationInfo) -> list[Any]:
        key = str(info.field_name)
        most = {"monitor": LIMITS.monitors, "pid": LIMITS.pids, "uid": LIMITS.uids,
                "comm": LIMITS.comms}[key]
        if len(values) > most:
            raise ValueError(f"at most {most} {key} values")
        for v in values:
            problem = _value_problem(key, v)
            if problem:
                raise ValueError(f"{v!r}: {problem}")
        return values

    @property
    def empty(self) -> bool:
        return not (self.monitor or self.pid or self.uid or self.comm)

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
                and (not self.comm or event.get("comm") in self.comm))


def _value_problem(key: str, value: Any) -> str | None:
    if key == "monitor":
        if len(value) > LIMITS.monitor_chars:
            return f"longer than {LIMITS.monitor_chars} characters"
        return None
    if key in ("pid", "uid"):
        return None if 0 <= value <= U32_MAX else f"outside 0..{U32_MAX}"
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
