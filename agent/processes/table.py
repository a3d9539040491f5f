"""ProcessTable: the processes the agent knows, live and recently exited; bounded.

Written by the tracker's thread (fork, exec and exit records, the /proc seed, reparent
checks), read by the event loop (the API) and by the pollers (event ancestors): one
lock around every method; what leaves a method is a copy.

Bounds: ``capacity`` entries in all. A new entry over it evicts the exited process that
exited first, else the live one that entered first (``evicted``). Exited processes are
kept ``exited_keep`` at most and ``exited_ttl_s`` at most (``expired``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from agent.processes.process import Process

MAX_DEPTH = 4096  # ancestry walked at most (a pid chain is far shorter; guards cycles)
# Fields an exec or a later record of the same process brings up to date.
EXEC_FIELDS = ("comm", "exe", "argv", "argv_truncated", "uid", "gid")
LINEAGE_FIELDS = ("ppid", "parent_process_id")


class CursorError(ValueError):
    """A paging cursor that is not a process id."""


@dataclass(frozen=True)
class ProcessQuery:
    alive: bool | None = None
    comm: str | None = None
    container_id: str | None = None  # prefix
    cgroup: str | None = None  # the path and its subtree
    limit: int = 100
    after: str | None = None  # a process id: the last one of the previous page

    def matches(self, p: Process) -> bool:
        if self.alive is not None and p.alive != self.alive:
            return False
        if self.comm is not None and p.comm != self.comm:
            return False
        w = p.workload
        if self.container_id is not None and not (
                w and w.container_id and w.container_id.startswith(self.container_id)):
            return False
        if self.cgroup is not None:
            prefix = self.cgroup.rstrip("/")
            path = w.cgroup if w else None
            if path is None or not (prefix == "" or path == prefix
                                    or path.startswith(prefix + "/")):
                return False
        return True


def sort_key(process_id: str) -> tuple[int, int]:
    """(pid, start ticks) of "<boot>-<ticks>-<pid>": the table's order."""
    try:
        _, ticks, pid = process_id.rsplit("-", 2)
        return int(pid), int(ticks)
    except ValueError:
        raise CursorError(f"after: {process_id!r} is not a process id") from None


class ProcessTable:
    def __init__(self, capacity: int, exited_keep: int, exited_ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.exited_keep = exited_keep
        self.exited_ttl_s = exited_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Process] = {}  # insertion order: oldest first
        self._live: dict[int, str] = {}  # pid -> process_id of the live process
        self._exited: OrderedDict[str, None] = OrderedDict()  # exit order
        # parent process_id -> its children's ids (live and exited): an exit asks for
        # the children of the process that exited, and a scan of the whole table per
        # exit cost more than the rest of a record's handling.
        self._children: dict[str, set[str]] = {}
        self.evicted = 0
        self.expired = 0

    # -- writers (the tracker's thread) ---------------------------------------------
    def seed(self, processes: Iterator[Process]) -> int:
        """Processes read from /proc; one already known (from a record) is kept."""
        n = 0
        with self._lock:
            for p in processes:
                if p.process_id not in self._by_id:
                    self._insert(p)
                    n += 1
        return n

    def forked(self, child: Process) -> None:
        """A new process: it runs its parent's program with its parent's argv until
        it execs (fork(2)). Known already (the seed was first): only its lineage."""
        with self._lock:
            known = self._by_id.get(child.process_id)
            if known is not None:
                self._update(known, child, LINEAGE_FIELDS)
                return
            parent = self._by_id.get(child.parent_process_id or "")
            if parent is not None:
                child.exe, child.argv_truncated = parent.exe, parent.argv_truncated
                child.argv = list(parent.argv) if parent.argv is not None else None
            self._insert(child)

    def execed(self, image: Process) -> None:
        """A successful exec: the new program, argv, comm and credentials."""
        with self._lock:
            known = self._by_id.get(image.process_id)
            if known is None:
                self._insert(image)
            else:
                self._update(known, image, EXEC_FIELDS + LINEAGE_FIELDS)
                self._update_cgroup(known, image)

    def exited(self, last: Process, exit_time: str, exit_code: int | None,
               exit_signal: str | None, core_dumped: bool | None) -> Process:
        """The last thread of a process exited (``last``: what the record says of it)."""
        with self._lock:
            p = self._by_id.get(last.process_id)
            if p is None:  # started and ended between two reads: keep what we know
                self._insert(last)
                p = last
            else:
                self._update(p, last, LINEAGE_FIELDS)
            self._end(p, exit_time, exit_code, exit_signal, core_dumped)
            return p

    def exited_known(self, process_id: str, ppid: int, parent_process_id: str | None,
                     exit_time: str, exit_code: int | None, exit_signal: str | None,
                     core_dumped: bool | None) -> Process | None:
        """``exited`` for a process the table knows, without a Process built from the
        record (the common case: the tracker saw its fork); None when it is unknown."""
        with self._lock:
            p = self._by_id.get(process_id)
            if p is None:
                return None
            p.ppid = ppid
            if parent_process_id is not None:
                self._set_parent(p, parent_process_id)
            self._end(p, exit_time, exit_code, exit_signal, core_dumped)
            return p

    def _end(self, p: Process, exit_time: str, exit_code: int | None,
             exit_signal: str | None, core_dumped: bool | None) -> None:
        self._mark_exited(p)
        p.exit_time, p.exit_code = exit_time, exit_code
        p.exit_signal, p.core_dumped = exit_signal, core_dumped
        self._trim_exited()

    def reparented(self, process_id: str, ppid: int, parent_process_id: str | None) -> bool:
        """A live process's new parent (its old one exited); False when unknown."""
        with self._lock:
            p = self._by_id.get(process_id)
            if p is None or not p.alive:
                return False
            p.ppid = ppid
            self._set_parent(p, parent_process_id)
            return True

    def prune(self) -> int:
        """Drop exited processes older than exited_ttl_s; how many."""
        with self._lock:
            return self._trim_exited()

    def _insert(self, p: Process) -> None:
        self._by_id[p.process_id] = p
        if p.parent_process_id is not None:
            self._children.setdefault(p.parent_process_id, set()).add(p.process_id)
        if p.alive:
            old = self._live.get(p.pid)
            if old is not None and old != p.process_id and old in self._by_id:
                # The pid's previous process: its exit record was lost (a full ring).
                self._mark_exited(self._by_id[old])
            self._live[p.pid] = p.process_id
        else:
            p.exited_at = self._clock()
            self._exited[p.process_id] = None
        while len(self._by_id) > self.capacity:
            victim = next(iter(self._exited), None) or next(iter(self._by_id))
            self._remove(victim)
            self.evicted += 1

    def _update(self, p: Process, new: Process, names: tuple[str, ...]) -> None:
        for name in names:
            value = getattr(new, name)
            if value is not None:
                if name == "parent_process_id":
                    self._set_parent(p, value)
                else:
                    setattr(p, name, value)

    def _set_parent(self, p: Process, parent_process_id: str | None) -> None:
        old = p.parent_process_id
        if old == parent_process_id:
            return
        if old is not None:
            self._unlink_child(old, p.process_id)
        p.parent_process_id = parent_process_id
        if parent_process_id is not None:
            self._children.setdefault(parent_process_id, set()).add(p.process_id)

    def _unlink_child(self, parent_process_id: str, process_id: str) -> None:
        siblings = self._children.get(parent_process_id)
        if siblings is not None:
            siblings.discard(process_id)
            if not siblings:
                del self._children[parent_process_id]

    def _update_cgroup(self, p: Process, new: Process) -> None:
        if new.cgroup_id:
            p.cgroup_id, p.workload = new.cgroup_id, new.workload

    def _mark_exited(self, p: Process) -> None:
        if not p.alive:
            return
        p.alive = False
        p.exited_at = self._clock()
        if self._live.get(p.pid) == p.process_id:
            del self._live[p.pid]
        self._exited[p.process_id] = None

    def _trim_exited(self) -> int:
        n = 0
        deadline = self._clock() - self.exited_ttl_s
        while self._exited:
            oldest = next(iter(self._exited))
            if len(self._exited) <= self.exited_keep and \
                    self._by_id[oldest].exited_at > deadline:
                break
            self._remove(oldest)
            self.expired += 1
            n += 1
        return n

    def _remove(self, process_id: str) -> None:
        p = self._by_id.pop(process_id)
        self._exited.pop(process_id, None)
        if p.parent_process_id is not None:
            self._unlink_child(p.parent_process_id, process_id)
        if self._live.get(p.pid) == process_id:
            del self._live[p.pid]

    # -- readers (any thread) ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self._by_id)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._by_id), "live": len(self._live),
                    "exited": len(self._exited), "capacity": self.capacity,
                    "evicted": self.evicted, "expired": self.expired}

    def live_pid(self, pid: int) -> Process | None:
        with self._lock:
            pid_id = self._live.get(pid)
            return self._by_id[pid_id] if pid_id is not None else None

    def get(self, process_id: str) -> Process | None:
        with self._lock:
            return self._by_id.get(process_id)

    def children_ids(self, process_id: str) -> list[str]:
        """The live processes whose parent is ``process_id``."""
        with self._lock:
            return [c for c in self._children.get(process_id, ())
                    if self._by_id[c].alive]

    def query(self, q: ProcessQuery) -> tuple[list[dict[str, Any]], int, str | None]:
        """One page of matching processes ordered by (pid, start), the number of all
        matching ones, and the cursor of the next page (None on the last)."""
        after = sort_key(q.after) if q.after is not None else None
        with self._lock:
            matching = [p for p in self._by_id.values() if q.matches(p)]
            total = len(matching)
            if after is not None:
                matching = [p for p in matching if (p.pid, p.start_ticks) > after]
            matching.sort(key=lambda p: (p.pid, p.start_ticks))
            page = matching[:q.limit]
            nxt = page[-1].process_id if len(matching) > q.limit else None
            return [p.as_dict() for p in page], total, nxt

    def lineage(self, p: Process) -> dict[str, Any]:
        """A process with its ancestors (parent first, up to pid 1 or the first one
        the table does not know) and its live children."""
        with self._lock:
            out = p.as_dict()
            out["ancestors"] = [a.as_dict() for a in self._ancestors(p, MAX_DEPTH)]
            children = (self._by_id[c] for c in self._children.get(p.process_id, ()))
            out["children"] = sorted(
                (c.as_dict() for c in children if c.alive),
                key=lambda c: (c["pid"], c["start_time"] or ""))
            return out

    def ancestors_brief(self, parent_process_id: str | None, ppid: int | None,
                        limit: int) -> tuple[list[dict[str, Any]], bool]:
        """(process_id, pid, comm) of up to ``limit`` ancestors of a process whose parent
        is ``parent_process_id`` (or the live ``ppid``), parent first; and whether the
        chain is whole (``limit`` long, or ending at a process without a parent) rather
        than cut at a process the table does not know."""
        with self._lock:
            parent = self._by_id.get(parent_process_id) if parent_process_id else None
            if parent is None and ppid and not parent_process_id:
                pid_id = self._live.get(ppid)
                parent = self._by_id.get(pid_id) if pid_id else None
            if parent is None:
                return [], not parent_process_id and not ppid
            chain = [parent, *self._ancestors(parent, limit - 1)]
            whole = len(chain) >= limit or chain[-1].parent_process_id is None
            return [{"process_id": a.process_id, "pid": a.pid, "comm": a.comm}
                    for a in chain], whole

    def _ancestors(self, p: Process, limit: int) -> list[Process]:
        out: list[Process] = []
        seen = {p.process_id}
        while len(out) < limit:
            parent = self._by_id.get(p.parent_process_id) if p.parent_process_id else None
            if parent is None or parent.process_id in seen:
                break
            out.append(parent)
            seen.add(parent.process_id)
            p = parent
        return out
