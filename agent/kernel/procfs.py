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
