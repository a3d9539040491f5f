"""Helpers for the process-table tests: a small C program whose processes the tests
start (chains, exit statuses, threads), an app with the real tracker, waiting for the
table to show something."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from fastapi.testclient import TestClient

from agent.api.app import context_of, create_app
from tests.support.api import BASE, settings
from tests.support.kernel import compile_c

T = TypeVar("T")

# argv[0] must be the binary's absolute path: "chain" re-execs it.
#   chain N          N processes, each the parent of the next; the last pauses
#   exit N           exit(N)
#   signal N         raise(N)
#   segv             a NULL write (SIGSEGV)
#   thread-exit N    a second thread calls exit_group(N); the leader waits in pause()
#   leader-exit N    the leader leaves with pthread_exit, the other thread with exit(N)
#   wait-exec PATH.. reads a line from stdin, then execs PATH ARGS
PROGRAM = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static int code;
static void *group_exit(void *arg) { (void)arg; syscall(SYS_exit_group, code); return 0; }
static void *thread_exit(void *arg)
{
    (void)arg;
    usleep(100000);
    syscall(SYS_exit, code);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) return 2;
    if (!strcmp(argv[1], "chain")) {
        int n = atoi(argv[2]);
        if (n <= 1) { pause(); return 0; }
        pid_t c = fork();
        if (c == 0) {
            char buf[16];
            snprintf(buf, sizeof(buf), "%d", n - 1);
            execl(argv[0], argv[0], "chain", buf, (char *)0);
            _exit(127);
        }
        int st;
        waitpid(c, &st, 0);
        return 0;
    }
    if (!strcmp(argv[1], "exit")) exit(atoi(argv[2]));
    if (!strcmp(argv[1], "signal")) { raise(atoi(argv[2])); return 0; }
    if (!strcmp(argv[1], "segv")) { *(volatile int *)0 = 1; return 0; }
    if (!strcmp(argv[1], "thread-exit") || !strcmp(argv[1], "leader-exit")) {
        pthread_t t;
        code = atoi(argv[2]);
        pthread_create(&t, 0, argv[1][0] == 't' ? group_exit : thread_exit, 0);
        if (argv[1][0] == 'l') pthread_exit(0);
        pause();
        return 0;
    }
    if (!strcmp(argv[1], "wait-exec")) {
        char line[8];
        if (!fgets(line, sizeof(line), stdin)) return 3;
        execv(argv[2], argv + 2);
        return 127;
    }
    return 2;
}
"""


@lru_cache(maxsize=1)
def program() -> Path:
    """The test program, compiled once per session (its name is its comm: ptprog)."""
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"ebpf-agent-ptprog-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    return compile_c(directory, "ptprog", PROGRAM, "-O0", "-pthread")


@contextlib.contextmanager
def tracked_app(**processes: Any) -> Iterator[TestClient]:
    """An in-process app on this kernel with the real tracker, once it has seeded."""
    from agent.kernel.capabilities import build_report
    from agent.monitors.registry import discover_monitors

    registry = discover_monitors()
    app = create_app(settings(processes=processes), registry, report=build_report(registry))
    with TestClient(app, base_url=BASE) as client:
        agent = context_of(app).agent
        assert agent is not None and agent.tracker is not None
        assert agent.tracker.ready.wait(120), "the tracker did not start"
        assert agent.tracker.state == "running", agent.tracker.error
        yield client


def wait_for(get: Callable[[], T | None], what: str, timeout: float = 20) -> T:
    """Polls ``get`` until it returns something other than None (the tracker applies
    records on its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def proc_children(pid: int) -> list[int]:
    """proc(5) /proc/<pid>/task/<tid>/children of every thread."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def proc_ppid(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return int(raw[raw.rfind(b")") + 2:].split()[1])


PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """This process adopts its orphaned descendants (prctl(2) PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
