"""The processes running now, from /proc (proc(5)): the table's seed at start.

What /proc cannot give: a process that exited before it was read is not seen (the
tracker, attached before the scan, records its exit); a process's fields are read one
file at a time, so an exec in between may mix two images (the tracker's exec record,
applied after the scan, sets the new one).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from agent.kernel import procfs
from agent.kernel.identity import ProcessIdentity
from agent.model.workload import Workload
from agent.processes.process import Process, StartClock
from agent.processes.records import split_argv


def read_file(path: str, limit: int = 65536) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return None


def stat_fields(raw: bytes) -> tuple[str, int, int]:
    """(comm, ppid, starttime) of a /proc/<pid>/stat line; comm may hold spaces and
    parentheses, so the fields after it start after the last ')'."""
    comm = raw[raw.find(b"(") + 1:raw.rfind(b")")].decode("utf-8", "surrogateescape")
    rest = procfs.stat_fields(raw)
    return comm, int(rest[procfs.PPID]), int(rest[procfs.STARTTIME])


def status_ids(raw: bytes) -> tuple[int | None, int | None]:
    """The real uid and gid of /proc/<pid>/status ("Uid:\\treal\\teffective...")."""
    uid = gid = None
    for line in raw.splitlines():
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])
        elif line.startswith(b"Gid:"):
            gid = int(line.split()[1])
    return uid, gid


def cgroup_v2_path(raw: bytes) -> str | None:
    for line in raw.splitlines():
        if line.startswith(b"0::"):
            return line[3:].decode("utf-8", "surrogateescape")
    return None


def read_process(pid: int, identity: ProcessIdentity, clock: StartClock, argv_bytes: int,
                 cgroup_of: Callable[[str], tuple[int | None, Workload | None]],
                 proc: str = "/proc") -> Process | None:
    """One process from /proc; None when it is gone. ``cgroup_of``: a cgroup path ->
    (its id, its workload)."""
    stat = read_file(f"{proc}/{pid}/stat")
    if not stat:
        return None
    comm, ppid, ticks = stat_fields(stat)
    uid, gid = status_ids(read_file(f"{proc}/{pid}/status") or b"")
    try:
        exe: str | None = os.readlink(f"{proc}/{pid}/exe")
    except OSError:
        exe = None  # a kernel thread, or no permission
    raw_args = read_file(f"{proc}/{pid}/cmdline", argv_bytes + 1) or b""
    cut = len(raw_args) > argv_bytes
    argv, cut = split_argv(raw_args[:argv_bytes], cut) if raw_args else ([], False)
    path = cgroup_v2_path(read_file(f"{proc}/{pid}/cgroup") or b"")
    cgroup_id, workload = cgroup_of(path) if path is not None else (None, None)
    return Process(
        process_id=identity.from_ticks(pid, ticks), pid=pid, start_ticks=ticks,
        ppid=ppid, uid=uid, gid=gid, comm=comm, exe=exe, argv=argv, argv_truncated=cut,
        start_time=clock.iso(ticks), cgroup_id=cgroup_id, workload=workload)


def running_pids(proc: str = "/proc") -> list[int]:
    return sorted(int(n) for n in os.listdir(proc) if n.isdigit())


def scan(identity: ProcessIdentity, clock: StartClock, argv_bytes: int,
         cgroup_of: Callable[[str], tuple[int | None, Workload | None]],
         proc: str = "/proc") -> Iterator[Process]:
    """Every running process, with parent_process_id from the parent's own entry
    (None when the parent was gone by the time it was read, or for pid 0)."""
    found = [p for pid in running_pids(proc)
             if (p := read_process(pid, identity, clock, argv_bytes, cgroup_of, proc))]
    start = {p.pid: p.start_ticks for p in found}
    for p in found:
        if p.ppid and p.ppid in start:
            p.parent_process_id = identity.from_ticks(p.ppid, start[p.ppid])
        yield p
