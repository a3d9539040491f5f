"""The exec event struct is defined once, in agent/monitors/exec/exec.h; the Python mirror
must agree with what a C compiler makes of it, for the default and for other sizes."""

from __future__ import annotations

import pytest

from agent.monitors.exec.monitor import (
    EXEC_F_ARGS_CUT,
    EXEC_F_ARGS_RAW,
    EXEC_F_ARGS_TRUNCATED,
    FILENAME_SIZE,
    ExecMonitor,
    exec_event_struct,
)
from tests.support.layout import assert_constants, assert_layout

HEADER = ExecMonitor.source_dir() / "exec.h"


@pytest.mark.parametrize(("max_args", "arg_size"), [(20, 128), (1, 8), (64, 1024), (7, 33)])
def test_ctypes_mirror_matches_c(max_args: int, arg_size: int) -> None:
    # 7 x 35 bytes of args: the struct's tail is padded to 8 in C and in ctypes alike.
    assert_layout(HEADER, "exec_event", exec_event_struct(max_args, arg_size),
                  defines={"ARGS_MAX": max_args, "ARG_SIZE": arg_size})


def test_header_constants_match_python() -> None:
    assert_constants(HEADER, {
        "FILENAME_SIZE": FILENAME_SIZE,
        "EXEC_F_ARGS_TRUNCATED": EXEC_F_ARGS_TRUNCATED,
        "EXEC_F_ARGS_RAW": EXEC_F_ARGS_RAW,
        "EXEC_F_ARGS_CUT": EXEC_F_ARGS_CUT,
    }, defines={"ARGS_MAX": 20, "ARG_SIZE": 128})
