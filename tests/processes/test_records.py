"""The tracker's record layout against gcc, and the wait status decoded as wait(2) does."""

from __future__ import annotations

import os
import signal

import pytest

from agent.processes.records import (
    CGROUP_PATH_SIZE,
    FILENAME_SIZE,
    PROC_EXEC,
    PROC_EXIT,
    PROC_F_ARGS_CUT,
    PROC_FORK,
    CgroupPath,
    ExitStatus,
    exit_status,
    proc_record_struct,
    split_argv,
)
from agent.processes.tracker import FILENAME_AT, HEAD
from tests.support.layout import assert_constants, assert_layout

HEADER = "agent/processes/tracker.h"


@pytest.mark.parametrize("args_area", [64, 1024, 8192])
def test_record_layout_matches_the_c_header(args_area: int) -> None:
    cls = proc_record_struct(args_area)
    assert_layout(HEADER, "proc_record", cls, {"ARGS_AREA": args_area})
    assert HEAD.size == FILENAME_AT == cls.filename.offset  # type: ignore[attr-defined]


def test_constants_and_cgroup_path_match() -> None:
    assert_constants(HEADER, {"PROC_FORK": PROC_FORK, "PROC_EXEC": PROC_EXEC,
                              "PROC_EXIT": PROC_EXIT, "PROC_F_ARGS_CUT": PROC_F_ARGS_CUT,
                              "FILENAME_SIZE": FILENAME_SIZE,
                              "CGROUP_PATH_SIZE": CGROUP_PATH_SIZE}, {"ARGS_AREA": 64})
    assert_layout(HEADER, "cgroup_path", CgroupPath, {"ARGS_AREA": 64})


@pytest.mark.parametrize(("status", "want"), [
    (0, ExitStatus(0, None, None)),
    (3 << 8, ExitStatus(3, None, None)),
    (255 << 8, ExitStatus(255, None, None)),
    (signal.SIGKILL, ExitStatus(None, "SIGKILL", False)),
    (signal.SIGSEGV | 0x80, ExitStatus(None, "SIGSEGV", True)),
    (signal.SIGTERM, ExitStatus(None, "SIGTERM", False)),
    (signal.SIGRTMIN + 2, ExitStatus(None, "SIGRTMIN+2", False)),
])
def test_exit_status_decodes_as_wait_does(status: int, want: ExitStatus) -> None:
    assert exit_status(status) == want
    # The same reading as os.W* (wait(2)'s macros).
    if want.exit_code is not None:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == want.exit_code
    else:
        assert os.WIFSIGNALED(status) and os.WCOREDUMP(status) == want.core_dumped


@pytest.mark.parametrize(("area", "cut", "want"), [
    (b"ls\0-l\0", False, (["ls", "-l"], False)),
    (b"ls\0-", True, (["ls", "-"], True)),       # the kernel cut the area
    (b"ls\0-l", False, (["ls", "-l"], True)),    # no final NUL: cut
    (b"", False, ([], False)),
    (b"a\0\0b\0", False, (["a", "", "b"], False)),  # an empty argument stays
    (b"\xff\0", False, (["\udcff"], False)),     # not UTF-8: surrogate-escaped
])
def test_split_argv(area: bytes, cut: bool, want: tuple[list[str], bool]) -> None:
    assert split_argv(area, cut) == want
