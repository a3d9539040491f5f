"""The target set: which processes the monitors watch, filtered in the kernel.

An empty set of a kind means "everything" for that kind; kinds combine with AND
(``--pid 10 --uid 1000`` watches pid 10 only while it runs as uid 1000).

``cgroups`` are cgroup v2 paths relative to the hierarchy's root (a path matches its
whole subtree); the id each had when it was targeted is kept in ``cgroup_ids`` (the
kernel matches ids: a cgroup removed and made again under the same path is another
cgroup). ``containers`` are container id prefixes (12 to 64 lower-case hex digits):
the cgroups runtimes name after a matching container, including later ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

U32_MAX = 2**32 - 1
COMM_MAX_BYTES = 15  # TASK_COMM_LEN (16) minus the NUL (the kernel's TASK_COMM_LEN)
CONTAINER_PREFIX_MIN, CONTAINER_PREFIX_MAX = 12, 64  # docker's short id .. the full id
CGROUP_PATH_MAX = 4096  # PATH_MAX
_HEX = frozenset("0123456789abcdef")

TargetKind = Literal["pids", "uids", "comms", "cgroups", "containers"]
KINDS: tuple[TargetKind, ...] = ("pids", "uids", "comms", "cgroups", "containers")
STRING_KINDS = frozenset({"comms", "cgroups", "containers"})


class TargetError(ValueError):
    """A target value the kernel maps cannot hold; nothing was changed."""


@dataclass(frozen=True)
class TargetLimits:
    """The kernel target maps' sizes. No defaults here: they come from the settings
    (agent/config.py TargetSettings.limits())."""

    pids: int
    uids: int
    comms: int
    cgroups: int
    containers: int


@dataclass(frozen=True)
class TargetSet:
    pids: frozenset[int] = field(default_factory=frozenset)
    uids: frozenset[int] = field(default_factory=frozenset)
    comms: frozenset[str] = field(default_factory=frozenset)
    follow_children: bool = True
    cgroups: frozenset[str] = field(default_factory=frozenset)
    containers: frozenset[str] = field(default_factory=frozenset)
    # (path, id) of each of ``cgroups``, sorted: what the kernel map holds.
    cgroup_ids: tuple[tuple[str, int], ...] = ()

    def get(self, kind: TargetKind) -> frozenset:
        return getattr(self, kind)

    def with_values(self, kind: TargetKind, values: frozenset) -> TargetSet:
        updated = replace(self, **{kind: values})  # type: ignore[arg-type]
        if kind == "cgroups":
            updated = replace(updated, cgroup_ids=tuple(
                (p, i) for p, i in self.cgroup_ids if p in values))
        return updated

    def id_of_cgroup(self) -> dict[str, int]:
        return dict(self.cgroup_ids)

    def as_dict(self) -> dict:
        return {
            "pids": sorted(self.pids),
            "uids": sorted(self.uids),
            "comms": sorted(self.comms),
            "cgroups": sorted(self.cgroups),
            "containers": sorted(self.containers),
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


def validate_cgroup_path(value: object) -> str:
    """A cgroup path relative to the cgroup v2 root, normalized ("/a/b", "/" for the
    root). Whether it exists is checked where its id is taken (agent/kernel/cgroups.py)."""
    if not isinstance(value, str):
        raise TargetError(f"cgroups: {value!r} is not a string")
    if not value.startswith("/"):
        raise TargetError(f"cgroups: {value!r} must start with '/' (a path relative to "
                          "the cgroup v2 root)")
    if "\0" in value or len(value.encode("utf-8", "surrogateescape")) > CGROUP_PATH_MAX:
        raise TargetError(f"cgroups: {value[:64]!r}... is not a path")
    parts = [p for p in value.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise TargetError(f"cgroups: {value!r}: '.' and '..' are not allowed")
    return "/" + "/".join(parts)


def validate_container(value: object) -> str:
    """A container id prefix as runtimes print ids: lower-case hex, 12 to 64 digits."""
    if not isinstance(value, str):
        raise TargetError(f"containers: {value!r} is not a string")
    if not CONTAINER_PREFIX_MIN <= len(value) <= CONTAINER_PREFIX_MAX or \
            not set(value) <= _HEX:
        raise TargetError(f"containers: {value!r} is not a container id prefix "
                          f"({CONTAINER_PREFIX_MIN} to {CONTAINER_PREFIX_MAX} lower-case "
                          "hex digits)")
    return value


def validate_values(kind: TargetKind, values: object) -> frozenset:
    if not isinstance(values, list | tuple | set | frozenset):
        raise TargetError(f"{kind}: expected a list")
    if kind == "comms":
        return frozenset(validate_comm(v) for v in values)
    if kind == "cgroups":
        return frozenset(validate_cgroup_path(v) for v in values)
    if kind == "containers":
        return frozenset(validate_container(v) for v in values)
    return frozenset(validate_id(v, kind) for v in values)


def check_capacity(targets: TargetSet, limits: TargetLimits) -> None:
    for kind in KINDS:
        size, cap = len(targets.get(kind)), getattr(limits, kind)
        if size > cap:
            raise TargetError(f"{kind}: {size} values exceed the kernel map's {cap} entries")
