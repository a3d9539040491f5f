"""The exec event struct is defined in agent/monitors/exec/exec.h and declared once in
Python (EXEC_EVENT); what is derived from the declaration must agree with what a C
compiler makes of the header, for the default and for other sizes."""

from __future__ import annotations

import pytest

from agent.monitors.exec.monitor import (
    EXEC_F_ARGS_CUT,
    EXEC_F_ARGS_RAW,
    EXEC_F_ARGS_TRUNCATED,
    FILENAME_SIZE,
    ExecMonitor,
    args_area,
    exec_event_struct,
)
from tests.support.layout import assert_constants, assert_event_layout, assert_layout

HEADER = ExecMonitor.source_dir() / "exec.h"


@pytest.mark.parametrize(("max_args", "arg_size"), [(20, 128), (1, 8), (64, 1024), (7, 33)])
def test_ctypes_mirror_matches_c(max_args: int, arg_size: int) -> None:
    # 7 x 35 bytes of args: the struct's tail is padded to 8 in C and in ctypes alike.
    defines = {"ARGS_MAX": max_args, "ARG_SIZE": arg_size}
    assert_event_layout(ExecMonitor.EVENT, ExecMonitor.source_dir(), defines,
                        sizes={"ARGS_AREA": args_area(max_args, arg_size)})
    assert_layout(HEADER, "exec_event", exec_event_struct(max_args, arg_size), defines)


def test_header_constants_match_python() -> None:
    assert_constants(HEADER, {
        "FILENAME_SIZE": FILENAME_SIZE,
        "EXEC_F_ARGS_TRUNCATED": EXEC_F_ARGS_TRUNCATED,
        "EXEC_F_ARGS_RAW": EXEC_F_ARGS_RAW,
        "EXEC_F_ARGS_CUT": EXEC_F_ARGS_CUT,
    }, defines={"ARGS_MAX": 20, "ARG_SIZE": 128})


def test_args_area_matches_c() -> None:
    assert_constants(HEADER, {"ARGS_AREA": args_area(7, 33)},
                     defines={"ARGS_MAX": 7, "ARG_SIZE": 33})
