"""The process table's bodies (GET /processes...), as the OpenAPI document shows them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Process(BaseModel):
    """One process instance; null where unknown or not applicable (exit fields of a live
    process, the workload fields outside a container or unit)."""

    process_id: str = Field(description="<boot id, 16 hex>-<start time in clock ticks>-<pid>")
    parent_process_id: str | None
    pid: int
    ppid: int | None = Field(description="the real parent's pid; after the parent's exit, "
                             "the subreaper or init that adopted it")
    uid: int | None = Field(description="real user id")
    gid: int | None = Field(description="real group id")
    comm: str | None
    exe: str | None = Field(description="the program of the last exec (the path it was "
                            "given), or /proc/<pid>/exe for a process seen at start")
    argv: list[str] | None = Field(description="of the last exec, at most "
                                   "processes.argv_bytes bytes")
    argv_truncated: bool | None
    start_time: str | None = Field(description="UTC, /proc/stat btime + starttime (as ps)")
    alive: bool
    exit_time: str | None
    exit_code: int | None = Field(description="status >> 8 of a normal exit")
    exit_signal: str | None = Field(description="the signal that ended it (SIGKILL)")
    core_dumped: bool | None
    cgroup_id: int | None
    cgroup: str | None
    container_id: str | None
    pod_uid: str | None
    unit: str | None


class ProcessLineage(Process):
    ancestors: list[Process] = Field(description="parent first, up to pid 1 (or the first "
                                     "ancestor the table does not hold)")
    children: list[Process] = Field(description="live processes whose parent this is")


class ProcessPage(BaseModel):
    processes: list[Process]
    total: int = Field(description="processes matching the filters, on every page")
    next: str | None = Field(description="the `after` of the next page; null on the last")
    capacity: int = Field(description="processes.capacity")
    size: int = Field(description="entries in the table, live and exited")
    evicted: int = Field(description="entries evicted because the table was full")
