"""Reading /proc: process trees for following children that already exist."""

from __future__ import annotations

import os
from collections.abc import Iterable


def parent_map(proc: str = "/proc") -> dict[int, int]:
    """tgid -> ppid for every process, from /proc/PID/stat (proc(5): field 4)."""
    parents: dict[int, int] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # comm (field 2) may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(b")") + 2 :].split()
        parents[int(entry)] = int(rest[1])
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
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"{proc}/{pid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return None
    rest = stat[stat.rfind(b")") + 2 :].split()  # from field 3 (state) on
    if rest[0] in (b"Z", b"X"):
        return None
    tgid = next((line.split()[1] for line in status.splitlines()
                 if line.startswith(b"Tgid:")), None)
    if tgid is None or int(tgid) != pid:
        return None
    return int(rest[19])  # field 22
