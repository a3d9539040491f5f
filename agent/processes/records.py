"""The tracker's records (``struct proc_record`` in tracker.h) and the wait status.

tests/processes/test_records.py compiles tracker.h with gcc and checks the mirror.
"""

from __future__ import annotations

import ctypes
import signal
from typing import NamedTuple

COMM_LEN = 16
FILENAME_SIZE = 256
CGROUP_PATH_SIZE = 256
PROC_FORK, PROC_EXEC, PROC_EXIT = 1, 2, 3
PROC_F_ARGS_CUT = 1
# The BPF counters (tracker.c CNT_*), by index.
COUNTERS = ("dropped", "cgroups_created")


def proc_record_struct(args_area: int) -> type[ctypes.Structure]:
    """The ctypes mirror of ``struct proc_record`` for an ARGS_AREA of ``args_area``."""
    return type("ProcRecord", (ctypes.Structure,), {"_fields_": [
        ("ts_ns", ctypes.c_uint64), ("start_ns", ctypes.c_uint64),
        ("parent_start_ns", ctypes.c_uint64), ("cgroup_id", ctypes.c_uint64),
        ("kind", ctypes.c_uint32), ("pid", ctypes.c_uint32), ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("status", ctypes.c_int32),
        ("flags", ctypes.c_uint32), ("args_size", ctypes.c_uint32),
        ("comm", ctypes.c_char * COMM_LEN), ("filename", ctypes.c_char * FILENAME_SIZE),
        ("args", ctypes.c_char * args_area),
    ]})


class CgroupPath(ctypes.Structure):
    """``struct cgroup_path``: the value of the cgroup_paths map."""

    _fields_ = [("path", ctypes.c_char * CGROUP_PATH_SIZE)]


class ExitStatus(NamedTuple):
    """A wait status (wait(2)) decoded: exit_code for a normal exit, else the signal's
    name and whether it dumped core; the other fields None."""

    exit_code: int | None
    exit_signal: str | None
    core_dumped: bool | None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"


def exit_status(status: int) -> ExitStatus:
    """As WIFEXITED/WEXITSTATUS/WTERMSIG/WCOREDUMP (wait(2)) read it: the low 7 bits are
    the terminating signal (0: a normal exit, whose code is bits 8-15), bit 7 the core
    dump."""
    sig = status & 0x7F
    if sig == 0:
        return ExitStatus((status >> 8) & 0xFF, None, None)
    return ExitStatus(None, signal_name(sig), bool(status & 0x80))


def split_argv(area: bytes, cut: bool) -> tuple[list[str], bool]:
    """A process's argument area (NUL-terminated strings back to back, as the kernel
    lays out argv and /proc/<pid>/cmdline shows it): the arguments, and whether it was
    cut (the last one is then incomplete but kept)."""
    parts = area.split(b"\0")
    complete, tail = parts[:-1], parts[-1]
    if tail:  # no final NUL: cut there
        complete.append(tail)
        cut = True
    return [p.decode("utf-8", "surrogateescape") for p in complete], cut
