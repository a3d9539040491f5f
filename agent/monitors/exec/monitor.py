"""ExecMonitor: every execve/execveat with argv, ppid, uid and the return value."""

from __future__ import annotations

import ctypes
from functools import cached_property
from typing import ClassVar

import orjson
from pydantic import Field

from agent.model.events import (
    COMMON_CSV_FIELDS,
    Event,
    EventHeader,
    EventModel,
    decode_c_string,
)
from agent.monitors.bcc import BccMonitor
from agent.monitors.contract import MonitorOptions
from agent.monitors.registry import register_monitor

# Mirrors of agent/monitors/exec/exec.h (tests/monitors/test_exec_struct.py checks them
# with gcc, tests/support/layout.py).
FILENAME_SIZE = 256
EXEC_F_ARGS_TRUNCATED = 1
EXEC_F_ARGS_RAW = 4
EXEC_F_ARGS_CUT = 8


class ExecOptions(MonitorOptions):
    max_args: int = Field(20, ge=1, le=64, description="arguments kept per exec")
    arg_size: int = Field(128, ge=8, le=1024, description="bytes kept per argument")


class ExecEventModel(EventModel):
    """An exec: the common fields (comm: the new program's when the exec succeeded)."""

    filename: str = Field(description="the path passed to execve/execveat")
    argv: list[str] = Field(description="arguments; bytes that are not UTF-8 as \\udcXX")
    truncated: bool = Field(description="max_args or arg_size cut something")
    ret: int = Field(description="0, or -errno when the exec failed")


def exec_event_struct(max_args: int, arg_size: int) -> type[ctypes.Structure]:
    """The ctypes mirror of ``struct exec_event`` in agent/monitors/exec/exec.h for these sizes."""

    class ExecEvent(ctypes.Structure):
        _fields_ = [
            ("hdr", EventHeader),
            ("ret", ctypes.c_int32),
            ("args_count", ctypes.c_uint32),
            ("args_size", ctypes.c_uint32),
            ("flags", ctypes.c_uint32),
            ("filename", ctypes.c_char * FILENAME_SIZE),
            ("args", ctypes.c_char * (max_args * (arg_size + 2))),
        ]

    return ExecEvent


@register_monitor("exec", "process executions (execve, execveat) with argv and result")
class ExecMonitor(BccMonitor[ExecOptions]):
    """Process executions."""

    Options = ExecOptions
    EventModel = ExecEventModel
    BPF_SOURCE = "exec.c"
    REQUIRED_TRACEPOINTS = (
        "syscalls:sys_enter_execve",
        "syscalls:sys_exit_execve",
        "syscalls:sys_enter_execveat",
        "syscalls:sys_exit_execveat",
        "sched:sched_process_exec",
        "sched:sched_process_fork",
        "sched:sched_process_exit",
    )
    CSV_FIELDS: ClassVar[tuple[str, ...]] = (
        *COMMON_CSV_FIELDS, "filename", "argv", "truncated", "ret",
    )


    def extra_cflags(self) -> dict[str, int | str]:
        return {"ARGS_MAX": self.options.max_args, "ARG_SIZE": self.options.arg_size}

    @cached_property
    def _struct(self) -> type[ctypes.Structure]:
        return exec_event_struct(self.options.max_args, self.options.arg_size)

    @cached_property
    def _args_offset(self) -> int:
        return self._struct.args.offset  # type: ignore[attr-defined]

    def parse_event(self, raw: bytes) -> Event:
        # The kernel sends only the used part of args[]; pad to the struct's size.
        full = raw.ljust(ctypes.sizeof(self._struct), b"\0")
        e = self._struct.from_buffer_copy(full)
        area = raw[self._args_offset : self._args_offset + e.args_size]
        if e.flags & EXEC_F_ARGS_RAW:
            argv, cut = split_arg_area(area, self.options.max_args, self.options.arg_size,
                                       bool(e.flags & EXEC_F_ARGS_CUT))
        else:
            argv, cut = split_args(area, e.args_count, self.options.arg_size)
        return {
            **self.common_fields(e.hdr),
            "filename": decode_c_string(e.filename),
            "argv": argv,
            "truncated": cut or bool(e.flags & EXEC_F_ARGS_TRUNCATED),
            "ret": e.ret,
        }

    def csv_row(self, event: Event) -> list:
        row = super().csv_row(event)
        # argv as one JSON array cell: survives commas, quotes and newlines (RFC 4180
        # quoting does the rest) and keeps argument boundaries.
        row[self.CSV_FIELDS.index("argv")] = orjson_dumps_str(event["argv"])
        return row

    def console_line(self, event: Event) -> str:
        args = " ".join(event["argv"]).replace("\n", "\\n")
        return (
            f"{event['timestamp']} exec pid={event['pid']} ppid={event['ppid']} "
            f"uid={event['uid']} comm={event['comm']} ret={event['ret']} {args}"
        )


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


def orjson_dumps_str(value: list[str]) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # surrogate-escaped bytes: the stdlib writes \udcXX escapes
        import json

        return json.dumps(value, ensure_ascii=False)
