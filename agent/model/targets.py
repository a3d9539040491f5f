"""The target set: which processes the monitors watch, filtered in the kernel.

An empty set of a kind means "everything" for that kind; kinds combine with AND
(``--pid 10 --uid 1000`` watches pid 10 only while it runs as uid 1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

U32_MAX = 2**32 - 1
COMM_MAX_BYTES = 15  # TASK_COMM_LEN (16) minus the NUL (the kernel's TASK_COMM_LEN)

TargetKind = Literal["pids", "uids", "comms"]
KINDS: tuple[TargetKind, ...] = ("pids", "uids", "comms")


class TargetError(ValueError):
    """A target value the kernel maps cannot hold; nothing was changed."""


@dataclass(frozen=True)
class TargetLimits:
    """The kernel target maps' sizes. No defaults here: they come from the settings
    (agent/config.py TargetSettings.limits())."""

    pids: int
    uids: int
    comms: int


@dataclass(frozen=True)
class TargetSet:
    pids: frozenset[int] = field(default_factory=frozenset)
    uids: frozenset[int] = field(default_factory=frozenset)
    comms: frozenset[str] = field(default_factory=frozenset)
    follow_children: bool = True

    def get(self, kind: TargetKind) -> frozenset:
        return getattr(self, kind)

    def with_values(self, kind: TargetKind, values: frozenset) -> TargetSet:
        return replace(self, **{kind: values})  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        return {
            "pids": sorted(self.pids),
            "uids": sorted(self.uids),
            "comms": sorted(self.comms),
            "follow_children": self.follow_children,
        }


def validate_id(value: object, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TargetError(f"{kind}: {value!r} is not an integer")
    if not 0 <= value <= U32_MAX:
        raise TargetError(f"{kind}: {value} is outside 0..{U32_MAX}")
    return value


def validate_comm(value: object) -> str:
    if not isinstance(value, str):
        raise TargetError(f"comms: {value!r} is not a string")
    try:
        # "\udcXX" (the form non-UTF-8 bytes take in our JSON) stands for byte XX.
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise TargetError(f"comms: {value!r} holds a lone surrogate that is not a "
                          "\\udc80-\\udcff byte escape") from None
    if not raw:
        raise TargetError("comms: empty process name")
    if len(raw) > COMM_MAX_BYTES:
        raise TargetError(
            f"comms: {value!r} is {len(raw)} bytes; "
            f"the kernel keeps {COMM_MAX_BYTES} (TASK_COMM_LEN)"
        )
    if b"\0" in raw:
        raise TargetError(f"comms: {value!r} contains a NUL byte")
    return value


def validate_values(kind: TargetKind, values: object) -> frozenset:
    if not isinstance(values, list | tuple | set | frozenset):
        raise TargetError(f"{kind}: expected a list")
    if kind == "comms":
        return frozenset(validate_comm(v) for v in values)
    return frozenset(validate_id(v, kind) for v in values)


def check_capacity(targets: TargetSet, limits: TargetLimits) -> None:
    for kind in KINDS:
        size, cap = len(targets.get(kind)), getattr(limits, kind)
        if size > cap:
            raise TargetError(f"{kind}: {size} values exceed the kernel map's {cap} entries")
