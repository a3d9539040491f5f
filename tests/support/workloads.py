"""Small C workloads whose calls tests count exactly."""

from __future__ import annotations

CALLS_C = r"""
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
/* Waits for a line on stdin, makes exactly N getppid syscalls and K libc getpid()
   calls (through a volatile pointer, so the compiler keeps every call), then waits for
   a second line before exiting. */
int main(void) {
    pid_t (*volatile get_pid)(void) = getpid;
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
    for (int i = 0; i < N_GETPPID; i++) syscall(SYS_getppid);
    for (int i = 0; i < N_GETPID; i++) get_pid();
    printf("done\n");
    fflush(stdout);
    fgets(line, sizeof line, stdin);
    return 0;
}
"""


def calls_c(getppid: int, getpid: int) -> str:
    """The source of a program making ``getppid`` getppid(2) syscalls and ``getpid``
    libc getpid() calls once told to on stdin."""
    return CALLS_C.replace("N_GETPPID", str(getppid)).replace("N_GETPID", str(getpid))

ROUNDS_C = r"""
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
/* For every line read on stdin: exactly N_GETPPID getppid syscalls, then "done".
   Exits at end of input. */
int main(void) {
    char line[16];
    while (fgets(line, sizeof line, stdin)) {
        for (int i = 0; i < N_GETPPID; i++) syscall(SYS_getppid);
        printf("done\n");
        fflush(stdout);
    }
    return 0;
}
"""


def rounds_c(getppid: int) -> str:
    """The source of a program making ``getppid`` getppid(2) syscalls per line read on
    stdin, as many rounds as lines (one process across target or cgroup changes)."""
    return ROUNDS_C.replace("N_GETPPID", str(getppid))
