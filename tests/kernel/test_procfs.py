"""agent/kernel/procfs.py: process_start on a fake /proc (table-driven) and on the real
one (this process, one of its threads, a zombie, a pid with no process)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.kernel.procfs import process_start


def stat_line(pid: int, comm: str, state: str, start: int) -> str:
    # proc(5): pid (comm) state ppid ... field 22 is starttime.
    fields = [state, "1"] + ["0"] * 17 + [str(start)] + ["0"] * 10
    return f"{pid} ({comm}) {' '.join(fields)}\n"


@pytest.mark.parametrize(("comm", "state", "tgid", "expected"), [
    ("sleep", "S", 40, 123456),
    ("a) b (c", "R", 40, 123456),  # comm with parentheses and spaces
    ("sleep", "Z", 40, None),  # a zombie: nothing to probe
    ("sleep", "X", 40, None),
    ("worker", "S", 39, None),  # a thread of process 39, not a process
])
def test_process_start_on_a_fake_proc(tmp_path: Path, comm: str, state: str, tgid: int,
                                      expected: int | None) -> None:
    d = tmp_path / "40"
    d.mkdir()
    (d / "stat").write_text(stat_line(40, comm, state, 123456))
    (d / "status").write_text(f"Name:\t{comm}\nTgid:\t{tgid}\nPid:\t40\n")
    assert process_start(40, proc=str(tmp_path)) == expected


def test_process_start_without_a_process(tmp_path: Path) -> None:
    assert process_start(40, proc=str(tmp_path)) is None


def test_process_start_on_the_real_proc() -> None:
    me = process_start(os.getpid())
    assert isinstance(me, int) and me > 0
    assert process_start(os.getpid()) == me  # the same process: the same start
    tid: list[int] = []
    done = threading.Event()
    thread = threading.Thread(target=lambda: (tid.append(threading.get_native_id()),
                                              done.wait(5)))
    thread.start()
    try:
        while not tid:
            time.sleep(0.01)
        assert tid[0] != os.getpid()
        assert process_start(tid[0]) is None  # a thread, not a process
    finally:
        done.set()
        thread.join()
    child = subprocess.Popen(["true"])
    while Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        time.sleep(0.01)  # exited, not yet reaped: a zombie
    assert process_start(child.pid) is None
    child.wait()
    assert process_start(child.pid) is None
