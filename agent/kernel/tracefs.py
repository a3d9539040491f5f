"""tracefs: where it is mounted, and removing a uprobe event by name."""

from __future__ import annotations

import os
from pathlib import Path

TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # tracefs is root-only (0700): a non-root check sees EACCES
        return False


def find_tracefs() -> Path | None:
    """The mounted tracefs (its ``events`` directory is readable), or None."""
    for p in TRACEFS_CANDIDATES:
        if is_dir(p / "events"):
            return p
    return None


def has_uprobe_event(tracefs: Path, group_name: str) -> bool:
    """Whether ``uprobe_events`` lists ``group/name`` (e.g. ``uprobes/p__bin_0x1_bcc_42``)."""
    return f"{group_name} " in (tracefs / "uprobe_events").read_text()


def remove_uprobe_event(tracefs: Path, group_name: str) -> None:
    """Delete one dynamic uprobe event (``-:group/name``, Documentation/trace/uprobetracer.rst)."""
    # os.open, not open(..., "a"): Python seeks to the end of a file opened for
    # appending, and tracefs refuses that seek with EINVAL.
    fd = os.open(tracefs / "uprobe_events", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"-:{group_name}\n".encode())
    finally:
        os.close(fd)
