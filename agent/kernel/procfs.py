"""Reading /proc: process trees for following children that already exist."""

from __future__ import annotations

import os
from collections.abc import Iterable

# Indices into stat_fields(): proc(5) fields 3 (state), 4 (ppid) and 22 (starttime).
STATE, PPID, STARTTIME = 0, 1, 19


def stat_fields(raw: bytes) -> list[bytes]:
    """The fields of a /proc/PID/stat line from field 3 (state) on. comm (field 2) may
    hold spaces and parentheses: they start after the last ')'."""
    return raw[raw.rfind(b")") + 2:].split()


def read_stat(pid: int, proc: str = "/proc") -> list[bytes] | None:
    """stat_fields() of /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            return stat_fields(f.read())
    except OSError:
        return None


def parent_map(proc: str = "/proc") -> dict[int, int]:
    """tgid -> ppid for every process, from /proc/PID/stat (proc(5): field 4)."""
    parents: dict[int, int] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        fields = read_stat(int(entry), proc)
        if fields is not None:
            parents[int(entry)] = int(fields[PPID])
    return parents


def descendants(roots: Iterable[int], proc: str = "/proc") -> set[int]:
    """Every living descendant of ``roots`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_map(proc).items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def process_start(pid: int, proc: str = "/proc") -> int | None:
    """The start time (proc(5) /proc/PID/stat field 22, clock ticks since boot) of the
    living process ``pid``; None when there is none, when it is a zombie, or when
    ``pid`` is the id of a thread that does not lead its thread group (/proc answers
    for those too, though it does not list them). Together with the pid, the start time
    names one process: a pid the kernel reuses gets another."""
    rest = read_stat(pid, proc)
    try:
        with open(f"{proc}/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    if rest is None or rest[STATE] in (b"Z", b"X"):
        return None
    tgid = next((line.split()[1] for line in status.splitlines()
                 if line.startswith(b"Tgid:")), None)
    if tgid is None or int(tgid) != pid:
        return None
    return int(rest[STARTTIME])
