"""A program for func's probe-scope tests (tests/monitors/test_func_scope.py and the
HTTP ones): it calls libc's getpid a known number of times and forks on command, and
``probed`` reads from a process's own memory whether a uprobe breakpoint is in it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from agent.kernel.symbols import file_offsets, user_symbols

K = 37  # getpid calls per "go": odd, so neither 0 nor a doubling passes

# Commands on stdin, one line each: "go" calls getpid K times and answers "done";
# "fork" forks a child that takes over stdin (the parent waits for it) and answers
# "child <pid>", then the same commands reach the child until "exit"; the parent
# answers "reaped" when the child is gone; "exec" runs the program anew in the same
# process (answering "ready"); "exit" ends the process.
PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t (*volatile call)(void) = getpid;

/* Probed with the libc functions: a function no other test on the host probes, so
 * that whether its breakpoint is in a process's memory depends on this test only. */
void __attribute__((noinline)) scope_marker(void)
{
    __asm__ volatile("");
}

int main(int argc, char **argv)
{
    int k = atoi(argv[1]);
    char line[16];
    setvbuf(stdout, NULL, _IONBF, 0);
    scope_marker();
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (!strcmp(line, "go\n")) {
            for (int i = 0; i < k; i++)
                call();
            printf("done\n");
        } else if (!strcmp(line, "fork\n")) {
            /* the child names itself through syscall(2), not the counted getpid */
            pid_t child = fork();
            if (child == 0) {
                printf("child %ld\n", syscall(SYS_getpid));
                continue;
            }
            waitpid(child, NULL, 0);
            printf("reaped\n");
        } else if (!strcmp(line, "exec\n")) {
            execl("/proc/self/exe", argv[0], argv[1], (char *)NULL);
            return 1;
        } else {
            return 0;
        }
    }
    return 0;
}
"""


@dataclass
class Proc:
    """The program, answering commands; ``pid`` is whichever process reads stdin."""

    popen: subprocess.Popen[bytes]
    pid: int

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        return self.popen.stdin, self.popen.stdout

    def send(self, command: str) -> str:
        stdin, stdout = self._pipes()
        stdin.write(f"{command}\n".encode())
        stdin.flush()
        return stdout.readline().decode().strip()

    def go(self) -> None:
        assert self.send("go") == "done"

    def fork(self) -> Proc:
        answer = self.send("fork").split()
        assert answer[0] == "child"
        return Proc(self.popen, int(answer[1]))

    def exec(self) -> None:
        """The process runs the program anew (same pid, a new address space)."""
        assert self.send("exec") == "ready"

    def end_child(self) -> None:
        assert self.send("exit") == "reaped"


@contextmanager
def running(binary: Path) -> Iterator[Proc]:
    popen = subprocess.Popen([str(binary), str(K)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert popen.stdout is not None and popen.stdout.readline() == b"ready\n"
        yield Proc(popen, popen.pid)
    finally:
        popen.kill()
        popen.wait()


MARKER = "scope_marker"


def marker_pattern(binary: Path) -> str:
    """The pattern probing PROGRAM's own marker function (see ``probed``)."""
    return f"{binary}:{MARKER}"


def probed(pid: int, binary: Path) -> bool:
    """Whether the process's code at PROGRAM's marker function differs from the file's
    (a uprobe breakpoint is written over the function's first instruction). The monitor
    must probe ``marker_pattern(binary)``: libc functions may be probed host-wide by
    other tests on a shared machine, the marker only by this one."""
    path = os.path.realpath(binary)
    offset = file_offsets(path, [dict(user_symbols(path, MARKER))[MARKER]])[0]
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or os.path.realpath(fields[5]) != path:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pgoff = int(fields[2], 16)
            if pgoff <= offset < pgoff + end - start:
                break
        else:
            raise AssertionError(f"{path} offset {offset:#x} is not mapped in {pid}")
    with open(f"/proc/{pid}/mem", "rb") as mem, open(path, "rb") as file:
        mem.seek(start + offset - pgoff)
        file.seek(offset)
        return mem.read(4) != file.read(4)
