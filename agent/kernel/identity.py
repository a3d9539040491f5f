"""Process identity: one string per process instance, the same wherever it is computed.

A pid is reused; a (pid, start time) pair is not, within one boot; the boot id
(/proc/sys/kernel/random/boot_id, random(4)) is unique per boot of every host. So

    process_id = "<first 16 hex digits of the boot id>-<start time in clock ticks>-<pid>"

The start time is the thread-group leader's ``start_boottime`` (ns since boot,
suspend included) at the granularity /proc shows it: proc(5) ``/proc/<pid>/stat``
field 22, ``starttime``, in clock ticks (sysconf(_SC_CLK_TCK), USER_HZ). The kernel
writes that field as ``start_boottime / (NSEC_PER_SEC / USER_HZ)`` (nsec_to_clock_t),
so a BPF program that sends the nanoseconds and a reader of /proc for a process that
ran before the agent started compute the same string, and so does the next agent
after a restart. Two processes with one pid inside one tick (10 ms at USER_HZ 100)
would need the pid space to wrap within it.

An exec keeps the identity (the process instance is the same; a non-leader thread
that execs takes the leader's start time: execve(2), "All threads other than the
calling thread are destroyed"). A reader in another time namespace would see a
shifted starttime (time_namespaces(7)); the agent runs in the host's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from agent.kernel.procfs import STARTTIME, read_stat

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NSEC_PER_SEC = 1_000_000_000


def boot_id(path: Path = BOOT_ID) -> str:
    """This boot's id as 32 lower-case hex digits."""
    return path.read_text().strip().replace("-", "").lower()


def stat_start_ticks(pid: int, proc: str = "/proc") -> int | None:
    """proc(5) /proc/<pid>/stat field 22 (starttime, clock ticks after boot); None
    when the process is gone."""
    fields = read_stat(pid, proc)
    return None if fields is None else int(fields[STARTTIME])


@dataclass(frozen=True)
class ProcessIdentity:
    """Builds process ids for one boot of one host."""

    boot: str             # 16 hex digits of the boot id
    ns_per_tick: int      # NSEC_PER_SEC / USER_HZ

    @classmethod
    def local(cls) -> ProcessIdentity:
        return cls(boot_id()[:16], NSEC_PER_SEC // os.sysconf("SC_CLK_TCK"))

    def from_ticks(self, pid: int, start_ticks: int) -> str:
        return f"{self.boot}-{start_ticks}-{pid}"

    def from_ns(self, pid: int, start_ns: int) -> str | None:
        """From the kernel's start_boottime in ns; None for pid 0 (no process: the
        parent of init and of kernel threads' kthreadd)."""
        if not pid:
            return None
        return f"{self.boot}-{start_ns // self.ns_per_tick}-{pid}"

    def of_pid(self, pid: int, proc: str = "/proc") -> str | None:
        """From /proc, for a running process; None when it is gone."""
        ticks = stat_start_ticks(pid, proc)
        return None if ticks is None else self.from_ticks(pid, ticks)


_LOCAL: ProcessIdentity | None = None


def local_identity() -> ProcessIdentity:
    """This host's identity builder (the boot id read once)."""
    global _LOCAL
    if _LOCAL is None:
        _LOCAL = ProcessIdentity.local()
    return _LOCAL
