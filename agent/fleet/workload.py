"""``ebpf-agentctl processes`` and ``containers``: each host's process table
(GET /processes) and container counts (GET /containers), merged into one list with a
``host`` on every row.

Like the other operations (agent/fleet/ops.py), each ``*_op`` takes an AgentClient and
returns plain data that ``Fleet.each`` runs on the selected hosts; the answers are
checked (a host that answers nonsense is a failed host, not a crash).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent.fleet.client import AgentClient, expect, member
from agent.fleet.events import SHORT_ID, workload_label
from agent.fleet.ops import UsageError

# A page of GET /processes holds at most this many (the agent's limit).
MAX_PAGE = 1000
_HEX = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class ProcessFilter:
    """The options of ``processes``: the query of GET /processes on every host."""

    alive: bool | None = None
    comm: str | None = None
    container_id: str | None = None
    cgroup: str | None = None
    limit: int = 100  # rows per host, pages followed until reached

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 100_000:
            raise UsageError("--limit: between 1 and 100000 processes per host")
        if self.comm is not None and not 1 <= len(self.comm.encode()) <= 15:
            raise UsageError("--comm: a process name of 1-15 bytes")
        if self.container_id is not None and not _HEX.fullmatch(self.container_id):
            raise UsageError("--container: a container id prefix (1-64 lower-case hex)")
        if self.cgroup is not None and not self.cgroup.startswith("/"):
            raise UsageError("--cgroup: a path relative to the cgroup2 root, from '/'")

    def params(self) -> dict[str, str]:
        out = {k: v for k, v in (("comm", self.comm), ("container_id", self.container_id),
                                 ("cgroup", self.cgroup)) if v is not None}
        if self.alive is not None:
            out["alive"] = "true" if self.alive else "false"
        return out


def processes_op(f: ProcessFilter) -> Any:
    """Up to ``f.limit`` processes of one host, following ``next`` page by page."""

    async def op(c: AgentClient) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        after: str | None = None
        what = "the answer to GET /processes"
        while True:
            params = {**f.params(), "limit": str(min(MAX_PAGE, f.limit - len(rows)))}
            if after is not None:
                params["after"] = after
            page = await c.get_object("/processes", params=params)
            for i, p in enumerate(member(page, "processes", list, what)):
                p = expect(p, dict, f"{what}.processes[{i}]")
                member(p, "pid", int, f"{what}.processes[{i}]")
                rows.append(p)
            nxt = page.get("next")
            if nxt is None or len(rows) >= f.limit:
                break
            after = expect(nxt, str, f"{what}.next")
        return {"processes": rows[:f.limit],
                **{k: page.get(k) for k in ("total", "capacity", "size", "evicted")}}

    return op


def lineage_op(pid: int | None = None, process_id: str | None = None) -> Any:
    """One process with its ancestors and children: by process_id (live or exited)
    or the live one with ``pid``."""
    path = f"/processes/by-id/{process_id}" if process_id else f"/processes/{pid}"

    async def op(c: AgentClient) -> dict[str, Any]:
        p = await c.get_object(path)
        what = f"the answer to GET {path}"
        member(p, "pid", int, what)
        for key in ("ancestors", "children"):
            for i, q in enumerate(member(p, key, list, what)):
                member(expect(q, dict, f"{what}.{key}[{i}]"), "pid", int,
                       f"{what}.{key}[{i}]")
        return p

    return op


async def containers_op(c: AgentClient) -> dict[str, Any]:
    page = await c.get_object("/containers")
    what = "the answer to GET /containers"
    for i, ctr in enumerate(member(page, "containers", list, what)):
        ctr = expect(ctr, dict, f"{what}.containers[{i}]")
        member(ctr, "container_id", str, f"{what}.containers[{i}]")
        events = member(ctr, "events", dict, f"{what}.containers[{i}]")
        for k, n in events.items():
            expect(n, int, f"{what}.containers[{i}].events.{k}")
    return page


def merged(results: list[Any], key: str) -> list[dict[str, Any]]:
    """Every ok host's rows of ``key``, each with its ``host``, in host order."""
    return [{"host": r.host.name, **row} for r in results if r.ok for row in r.value[key]]


# -- table rows ---------------------------------------------------------------------------
PROCESS_HEAD = ["HOST", "PID", "PPID", "UID", "COMM", "STATE", "WORKLOAD", "ARGV"]
CONTAINER_HEAD = ["HOST", "CONTAINER", "POD", "UNITS", "EVENTS", "LAST_SEEN"]
LINEAGE_HEAD = ["HOST", "RELATION", "PID", "PPID", "COMM", "STATE", "WORKLOAD", "PROCESS_ID"]


def _workload(p: dict[str, Any]) -> str:
    return workload_label(p) or str(p.get("cgroup") or "")


def _state(p: dict[str, Any]) -> str:
    if p.get("alive", True):
        return "alive"
    if p.get("exit_signal"):
        core = " core" if p.get("core_dumped") else ""
        return f"killed sig={p['exit_signal']}{core}"
    return f"exit={p.get('exit_code')}"


def _argv(p: dict[str, Any]) -> str:
    argv = p.get("argv")
    text = " ".join(str(a) for a in argv) if isinstance(argv, list) else ""
    return text + (" ..." if p.get("argv_truncated") else "")


def process_row(p: dict[str, Any]) -> list[Any]:
    return [p["host"], p.get("pid"), p.get("ppid"), p.get("uid"), p.get("comm"), _state(p),
            _workload(p), _argv(p)]


def lineage_rows(host: str, p: dict[str, Any]) -> list[list[Any]]:
    """The process, its ancestors (parent first) and its children."""
    def row(rel: str, q: dict[str, Any]) -> list[Any]:
        return [host, rel, q.get("pid"), q.get("ppid"), q.get("comm"), _state(q),
                _workload(q), q.get("process_id")]

    return [row("self", p), *(row("parent" if i == 0 else f"ancestor-{i + 1}", a)
                              for i, a in enumerate(p["ancestors"])),
            *(row("child", ch) for ch in p["children"])]


def container_row(c: dict[str, Any]) -> list[Any]:
    events = c.get("events") or {}
    counts = " ".join(f"{k}:{v}" for k, v in sorted(events.items()))
    total = sum(v for v in events.values() if isinstance(v, int))
    return [c["host"], str(c["container_id"])[:SHORT_ID], c.get("pod_uid") or "",
            ",".join(str(u) for u in c.get("units") or []), f"{total} ({counts})",
            c.get("last_seen") or ""]
