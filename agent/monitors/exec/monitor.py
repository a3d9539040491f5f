"""ExecMonitor: every execve/execveat with argv, ppid, uid and the return value."""

from __future__ import annotations

import ctypes
from functools import cached_property
from typing import Any

from pydantic import Field

from agent.model.event_decl import Csv, Decode, EventDecl, EventField, Member
from agent.monitors.bcc import BccMonitor
from agent.monitors.contract import MonitorOptions
from agent.monitors.decoder import Hook
from agent.monitors.registry import register_monitor

# Mirrors of agent/monitors/exec/exec.h (tests/monitors/test_exec_struct.py checks them
# with gcc, tests/support/layout.py).
FILENAME_SIZE = 256
EXEC_F_ARGS_TRUNCATED = 1
EXEC_F_ARGS_RAW = 4
EXEC_F_ARGS_CUT = 8

EXEC_EVENT = EventDecl(
    struct="exec_event", header="exec.h",
    doc="An exec: the common fields (comm: the new program's when the exec succeeded).",
    members=(
        Member("ret", "s32"),
        Member("args_count", "u32"),
        Member("args_size", "u32"),  # bytes used in args
        Member("flags", "u32"),  # EXEC_F_*
        Member("filename", "char", FILENAME_SIZE),
        Member("args", "char", "ARGS_AREA"),  # sent only up to args_size
    ),
    fields=(
        EventField("filename", "string", "the path passed to execve/execveat"),
        EventField("argv", "string[]", "arguments; bytes that are not UTF-8 as \\udcXX",
                   Decode.HOOK, arg="args", csv=Csv.JSON),
        EventField("truncated", "boolean", "max_args or arg_size cut something",
                   Decode.HOOK, arg="args"),
        EventField("ret", "integer", "0, or -errno when the exec failed"),
    ),
    console="pid={pid} ppid={ppid} uid={uid} comm={comm} ret={ret} {argv:words}",
)


class ExecOptions(MonitorOptions):
    max_args: int = Field(20, ge=1, le=64, description="arguments kept per exec")
    arg_size: int = Field(128, ge=8, le=1024, description="bytes kept per argument")


def args_area(max_args: int, arg_size: int) -> int:
    """exec.h ARGS_AREA: each argument's slot holds ARG_SIZE + 1 bytes and a NUL."""
    return max_args * (arg_size + 2)


def exec_event_struct(max_args: int, arg_size: int) -> type[ctypes.Structure]:
    """The ctypes mirror of ``struct exec_event`` in agent/monitors/exec/exec.h for these sizes."""
    return EXEC_EVENT.ctypes_struct({"ARGS_AREA": args_area(max_args, arg_size)}, "ExecEvent")


@register_monitor("exec", "process executions (execve, execveat) with argv and result")
class ExecMonitor(BccMonitor[ExecOptions]):
    """Process executions."""

    Options = ExecOptions
    EVENT = EXEC_EVENT
    BPF_SOURCE = "exec.c"
    REQUIRED_TRACEPOINTS = (
        "syscalls:sys_enter_execve",
        "syscalls:sys_exit_execve",
        "syscalls:sys_enter_execveat",
        "syscalls:sys_exit_execveat",
        "sched:sched_process_exec",
    )

    def extra_cflags(self) -> dict[str, int | str]:
        return {"ARGS_MAX": self.options.max_args, "ARG_SIZE": self.options.arg_size}

    @cached_property
    def _args_offset(self) -> int:
        return EXEC_EVENT.offsets()["args"]

    def decode_hooks(self) -> dict[str, Hook]:
        return {"args": self.decode_args}

    def decode_args(self, raw: bytes, members: dict[str, Any]) -> dict[str, Any]:
        """argv and truncated from the argument area (the kernel sends only its used
        part: args_size bytes)."""
        flags = members["flags"]
        area = raw[self._args_offset : self._args_offset + members["args_size"]]
        if flags & EXEC_F_ARGS_RAW:
            argv, cut = split_arg_area(area, self.options.max_args, self.options.arg_size,
                                       bool(flags & EXEC_F_ARGS_CUT))
        else:
            argv, cut = split_args(area, members["args_count"], self.options.arg_size)
        return {"argv": argv, "truncated": cut or bool(flags & EXEC_F_ARGS_TRUNCATED)}


def _decode_args(parts: list[bytes], arg_size: int) -> tuple[list[str], bool]:
    """Arguments cut to ``arg_size`` bytes (saying whether any was) and decoded."""
    truncated = False
    argv = []
    for p in parts:
        if len(p) > arg_size:
            p, truncated = p[:arg_size], True
        argv.append(p.decode("utf-8", "surrogateescape"))
    return argv, truncated


def split_args(area: bytes, count: int, arg_size: int) -> tuple[list[str], bool]:
    """Arguments read one by one at sys_enter, each NUL-terminated in its slot; one
    that filled its slot (more than arg_size bytes) is cut."""
    return _decode_args(area.split(b"\0")[:count], arg_size)


def split_arg_area(
    area: bytes, max_args: int, arg_size: int, area_cut: bool
) -> tuple[list[str], bool]:
    """The new image's argument area: NUL-terminated strings back to back. When the
    kernel side had to cut the area, its last string has no NUL and is incomplete."""
    parts = area.split(b"\0")
    complete, tail = parts[:-1], parts[-1]
    if area_cut and tail:
        complete.append(tail)
    argv, cut = _decode_args(complete[:max_args], arg_size)
    return argv, cut or area_cut or len(complete) > max_args
