"""The exec event struct is defined once, in agent/monitors/exec/exec.h; the Python mirror must
agree with what a C compiler makes of it, for the default and for other sizes."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from agent.monitors.bcc import BPF_DIR
from agent.monitors.exec.monitor import ExecMonitor, exec_event_struct

MONITOR_DIR = ExecMonitor.source_dir()

FIELDS = ("hdr", "ret", "args_count", "args_size", "flags", "filename", "args")

PROGRAM = """
#include <stdio.h>
#include <stddef.h>
typedef unsigned long long u64;
typedef unsigned int u32;
typedef int s32;
typedef unsigned char u8;
#include "exec.h"
int main(void) {
    printf("size %zu\\n", sizeof(struct exec_event));
{body}
    return 0;
}
"""


def c_layout(tmp_path: Path, max_args: int, arg_size: int) -> dict[str, int]:
    lines = "\n".join(
        f'    printf("{f} %zu\\n", offsetof(struct exec_event, {f}));' for f in FIELDS
    )
    src = tmp_path / "layout.c"
    src.write_text(PROGRAM.replace("{body}", lines))
    binary = tmp_path / "layout"
    subprocess.run(
        ["gcc", f"-I{MONITOR_DIR}", f"-I{BPF_DIR}",
         f"-DARGS_MAX={max_args}", f"-DARG_SIZE={arg_size}",
         "-o", str(binary), str(src)],
        check=True,
    )
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize(("max_args", "arg_size"), [(20, 128), (1, 8), (64, 1024), (7, 33)])
def test_ctypes_mirror_matches_c(tmp_path: Path, max_args: int, arg_size: int) -> None:
    expected = c_layout(tmp_path, max_args, arg_size)
    struct = exec_event_struct(max_args, arg_size)
    got = {f: getattr(struct, f).offset for f in FIELDS}
    got["size"] = ctypes.sizeof(struct)
    assert got == expected
