"""Process: one process instance (a pid with its start time) as the table holds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.model.workload import Workload

# The keys of a process in the API, in order (agent/api/process_models.py declares them).
API_KEYS = ("process_id", "parent_process_id", "pid", "ppid", "uid", "gid", "comm", "exe",
            "argv", "argv_truncated", "start_time", "alive", "exit_time", "exit_code",
            "exit_signal", "core_dumped", "cgroup_id", "cgroup", "container_id", "pod_uid",
            "unit")


@dataclass(slots=True, eq=False)
class Process:
    process_id: str
    pid: int
    start_ticks: int               # /proc/<pid>/stat starttime: sorts by (pid, start)
    parent_process_id: str | None = None
    ppid: int | None = None
    uid: int | None = None
    gid: int | None = None
    comm: str | None = None
    exe: str | None = None
    argv: list[str] | None = None
    argv_truncated: bool | None = None
    start_time: str | None = None
    alive: bool = True
    exit_time: str | None = None
    exit_code: int | None = None
    exit_signal: str | None = None
    core_dumped: bool | None = None
    cgroup_id: int | None = None
    workload: Workload | None = None
    exited_at: float = field(default=0.0)  # monotonic seconds of the exit (retention)

    def as_dict(self) -> dict[str, Any]:
        w = self.workload
        return {
            "process_id": self.process_id, "parent_process_id": self.parent_process_id,
            "pid": self.pid, "ppid": self.ppid, "uid": self.uid, "gid": self.gid,
            "comm": self.comm, "exe": self.exe,
            "argv": list(self.argv) if self.argv is not None else None,
            "argv_truncated": self.argv_truncated, "start_time": self.start_time,
            "alive": self.alive, "exit_time": self.exit_time, "exit_code": self.exit_code,
            "exit_signal": self.exit_signal, "core_dumped": self.core_dumped,
            "cgroup_id": self.cgroup_id,
            "cgroup": w.cgroup if w else None, "container_id": w.container_id if w else None,
            "pod_uid": w.pod_uid if w else None, "unit": w.unit if w else None,
        }


class StartClock:
    """A start time in clock ticks after boot -> ISO 8601 UTC, as ps(1) computes it:
    /proc/stat ``btime`` (the boot time in whole seconds, proc(5)) + ticks / USER_HZ.
    Every agent of one boot reads the same btime, so a process's start_time is the same
    across agent restarts; it may differ from the true start by under a second."""

    def __init__(self, btime: int, hz: int) -> None:
        self.btime = btime
        self.hz = hz
        self._memo = (-1, "")  # (seconds, "YYYY-MM-DDTHH:MM:SS."): one object, read whole

    @classmethod
    def local(cls) -> StartClock:
        import os

        btime = 0
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    btime = int(line.split()[1])
                    break
        return cls(btime, os.sysconf("SC_CLK_TCK"))

    def iso(self, ticks: int) -> str:
        seconds, rest = divmod(ticks, self.hz)
        second, prefix = self._memo
        if seconds != second:  # processes come in bursts: format a second once
            when = datetime.fromtimestamp(self.btime + seconds, UTC)
            prefix = when.strftime("%Y-%m-%dT%H:%M:%S.")
            self._memo = (seconds, prefix)
        return f"{prefix}{rest * 1_000_000 // self.hz:06d}Z"
