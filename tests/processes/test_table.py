"""ProcessTable without the kernel: bounds, counts, merges, queries, ancestry."""

from __future__ import annotations

import pytest

from agent.model.workload import workload_of
from agent.processes.process import Process, StartClock
from agent.processes.table import CursorError, ProcessQuery, ProcessTable

BOOT = "ab" * 8
CONTAINER = "4f3c" * 16


def pid_id(pid: int, ticks: int = 100) -> str:
    return f"{BOOT}-{ticks}-{pid}"


def proc(pid: int, ppid: int = 1, comm: str = "sh", ticks: int = 100, cgroup: str = "/",
         **kw: object) -> Process:
    return Process(process_id=pid_id(pid, ticks), pid=pid, start_ticks=ticks, ppid=ppid,
                   parent_process_id=pid_id(ppid) if ppid else None, comm=comm,
                   workload=workload_of(cgroup), **kw)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def table(capacity: int = 100, exited_keep: int = 10, ttl: float = 60.0) -> ProcessTable:
    return ProcessTable(capacity, exited_keep, ttl, clock=Clock())


def test_capacity_evicts_exited_first_then_the_oldest_live_and_counts() -> None:
    t = table(capacity=3)
    t.seed(iter([proc(1, 0), proc(10), proc(11)]))
    t.exited(proc(10), "x", 0, None, None)
    t.forked(proc(12))  # full: the exited 10 goes
    assert (t.get(pid_id(10)), len(t), t.evicted) == (None, 3, 1)
    t.forked(proc(13))  # no exited one left: the oldest live (pid 1) goes
    assert (t.get(pid_id(1)), t.live_pid(1), len(t), t.evicted) == (None, None, 3, 2)
    assert t.stats() == {"size": 3, "live": 3, "exited": 0, "capacity": 3,
                         "evicted": 2, "expired": 0}


def test_exited_processes_are_kept_by_count_and_by_age() -> None:
    clock = Clock()
    t = ProcessTable(100, 2, 30.0, clock=clock)
    for pid in (10, 11, 12):
        t.forked(proc(pid))
        t.exited(proc(pid), "x", 0, None, None)
    assert [t.get(pid_id(p)) is None for p in (10, 11, 12)] == [True, False, False]
    assert t.expired == 1
    clock.now += 31
    assert (t.prune(), t.expired, len(t)) == (2, 3, 0)
    assert t.prune() == 0


def test_fork_inherits_the_parents_program_and_exec_replaces_it() -> None:
    t = table()
    t.seed(iter([proc(10, exe="/bin/sh", argv=["sh", "-c", "x"], argv_truncated=False)]))
    t.forked(proc(11, ppid=10, ticks=200))
    child = t.live_pid(11)
    assert child is not None and (child.exe, child.argv) == ("/bin/sh", ["sh", "-c", "x"])
    t.execed(proc(11, ppid=10, ticks=200, comm="true", exe="/bin/true", argv=["true"],
                  argv_truncated=False, uid=5, gid=6))
    assert (child.comm, child.exe, child.argv, child.uid, child.gid) == \
        ("true", "/bin/true", ["true"], 5, 6)
    assert t.live_pid(10).argv == ["sh", "-c", "x"]  # type: ignore[union-attr]


def test_a_fork_record_after_the_seed_keeps_what_the_seed_read() -> None:
    t = table()
    t.seed(iter([proc(10, comm="nginx", exe="/usr/sbin/nginx", argv=["nginx"])]))
    t.forked(proc(10, ppid=7, comm="bash"))  # the record of its fork, applied after
    p = t.live_pid(10)
    assert p is not None and (p.comm, p.exe, p.ppid) == ("nginx", "/usr/sbin/nginx", 7)


def test_exit_of_an_unknown_process_is_kept_and_a_reused_pid_ends_the_old_one() -> None:
    t = table()
    t.exited(proc(20, comm="fast"), "2026-01-01T00:00:00Z", None, "SIGKILL", False)
    p = t.get(pid_id(20))
    assert p is not None and (p.alive, p.exit_signal, t.live_pid(20)) == (False, "SIGKILL", None)
    t.forked(proc(30, ticks=1))
    t.forked(proc(30, ticks=2))  # the first one's exit record was lost
    old = t.get(pid_id(30, 1))
    assert old is not None and not old.alive and old.exit_time is None
    assert t.live_pid(30) is t.get(pid_id(30, 2))


def test_reparented_changes_only_a_live_known_process() -> None:
    t = table()
    t.seed(iter([proc(1, 0), proc(10), proc(11, ppid=10)]))
    assert t.reparented(pid_id(11), 1, pid_id(1))
    assert t.live_pid(11).ppid == 1  # type: ignore[union-attr]
    assert not t.reparented(pid_id(99), 1, pid_id(1))
    t.exited(proc(11, ppid=1), "x", 0, None, None)
    assert not t.reparented(pid_id(11), 10, pid_id(10))


def test_lineage_ancestors_parent_first_and_live_children() -> None:
    t = table()
    t.seed(iter([proc(1, 0, "init"), proc(10, 1, "a"), proc(11, 10, "b"), proc(12, 11, "c"),
                 proc(13, 11, "d")]))
    t.exited(proc(13, 11), "x", 0, None, None)
    out = t.lineage(t.live_pid(11))  # type: ignore[arg-type]
    assert [a["pid"] for a in out["ancestors"]] == [10, 1]
    assert [c["pid"] for c in out["children"]] == [12]  # 13 exited
    assert t.ancestors_brief(pid_id(11), 11, 2) == ([
        {"process_id": pid_id(11), "pid": 11, "comm": "b"},
        {"process_id": pid_id(10), "pid": 10, "comm": "a"}], True)
    chain, whole = t.ancestors_brief(None, 10, 5)  # no parent id: the live ppid
    assert [a["pid"] for a in chain] == [10, 1] and whole  # init has no parent: whole
    assert t.ancestors_brief(pid_id(99), 99, 5) == ([], False)  # unknown: maybe late
    assert t.ancestors_brief(None, 0, 5) == ([], True)  # no parent at all


def test_a_chain_cut_at_an_unknown_process_is_not_whole() -> None:
    t = table()
    t.seed(iter([proc(10, 5), proc(11, 10)]))  # 10's parent, 5, is unknown
    chain, whole = t.ancestors_brief(pid_id(11), 11, 5)
    assert [a["pid"] for a in chain] == [11, 10] and not whole
    assert t.ancestors_brief(pid_id(11), 11, 2)[1]  # the limit reached: whole


def test_ancestry_stops_at_a_cycle() -> None:
    t = table()
    t.seed(iter([proc(10, 11), proc(11, 10)]))
    assert [a["pid"] for a in t.lineage(t.live_pid(10))["ancestors"]] == [11]  # type: ignore[arg-type]


SEEDED = [proc(1, 0, "init"), proc(5, 1, "nginx", cgroup=f"/system.slice/docker-{CONTAINER}.scope"),
          proc(6, 5, "nginx", cgroup=f"/system.slice/docker-{CONTAINER}.scope/sub"),
          proc(7, 1, "sshd", cgroup="/system.slice/ssh.service"),
          proc(8, 7, "bash", cgroup="/system.slice/ssh.serviced")]


@pytest.mark.parametrize(("query", "pids"), [
    (ProcessQuery(), [1, 5, 6, 7, 8, 9]),
    (ProcessQuery(alive=True), [1, 5, 6, 7, 8]),
    (ProcessQuery(alive=False), [9]),
    (ProcessQuery(comm="nginx"), [5, 6]),
    (ProcessQuery(comm="ngin"), []),  # comm is exact
    (ProcessQuery(container_id=CONTAINER[:12]), [5, 6]),
    (ProcessQuery(container_id="ffff"), []),
    (ProcessQuery(cgroup="/system.slice/ssh.service"), [7]),  # not ssh.serviced
    (ProcessQuery(cgroup="/system.slice/"), [5, 6, 7, 8]),
    (ProcessQuery(cgroup="/"), [1, 5, 6, 7, 8, 9]),
    (ProcessQuery(cgroup="/nowhere"), []),
    (ProcessQuery(alive=True, comm="nginx", cgroup=f"/system.slice/docker-{CONTAINER}.scope/sub"),
     [6]),
])
def test_query_filters(query: ProcessQuery, pids: list[int]) -> None:
    t = table()
    t.seed(iter(SEEDED))
    t.exited(proc(9, 1, "gone"), "x", 1, None, None)
    rows, total, nxt = t.query(query)
    assert ([r["pid"] for r in rows], total, nxt) == (pids, len(pids), None)


def test_paging_visits_every_process_once_in_order() -> None:
    t = table()
    t.seed(iter([proc(pid, ticks=ticks) for pid in (3, 1, 2) for ticks in (5, 7)]))
    seen, after, pages = [], None, 0
    while True:
        rows, total, after = t.query(ProcessQuery(limit=4, after=after))
        assert total == 6
        seen += [(r["pid"], r["process_id"]) for r in rows]
        pages += 1
        if after is None:
            break
    assert pages == 2 and seen == sorted(seen, key=lambda s: (s[0], int(s[1].split("-")[1])))
    assert len(set(seen)) == 6


@pytest.mark.parametrize("cursor", ["nope", "a-b-c", "", "ab-12"])
def test_a_cursor_that_is_no_process_id_is_refused(cursor: str) -> None:
    with pytest.raises(CursorError, match="is not a process id"):
        table().query(ProcessQuery(after=cursor))


def test_children_follow_reparenting_exits_and_removal() -> None:
    t = table(exited_keep=1)
    t.seed(iter([proc(1, 0), proc(10), proc(11, ppid=10), proc(12, ppid=10)]))
    assert sorted(t.children_ids(pid_id(10))) == [pid_id(11), pid_id(12)]
    assert t.reparented(pid_id(11), 1, pid_id(1))  # moved to init
    assert t.children_ids(pid_id(10)) == [pid_id(12)]
    assert sorted(t.children_ids(pid_id(1))) == [pid_id(10), pid_id(11)]
    t.exited(proc(12, ppid=10), "x", 0, None, None)  # exited: no longer a child
    assert t.children_ids(pid_id(10)) == []
    t.exited(proc(11, ppid=1), "x", 0, None, None)  # evicts 12 (exited_keep=1)
    assert t.get(pid_id(12)) is None and t.children_ids(pid_id(1)) == [pid_id(10)]
    # an exec record with a new parent id (its parent learnt late) re-links it
    t.forked(proc(20, ppid=10, ticks=200))
    t.execed(proc(20, ppid=1, ticks=200))
    assert pid_id(20, 200) in t.children_ids(pid_id(1))
    assert pid_id(20, 200) not in t.children_ids(pid_id(10))
    assert [c["pid"] for c in t.lineage(t.live_pid(1))["children"]] == [  # type: ignore[arg-type]
        10, 20]


def test_start_clock_is_ps_arithmetic() -> None:
    assert StartClock(1_700_000_000, 100).iso(12345) == "2023-11-14T22:15:23.450000Z"
    clock = StartClock(1_700_000_000, 100)  # the same second twice, then the next
    assert [clock.iso(t) for t in (12345, 12399, 12400)] == [
        "2023-11-14T22:15:23.450000Z", "2023-11-14T22:15:23.990000Z",
        "2023-11-14T22:15:24.000000Z"]


def test_exited_known_ends_a_known_process_and_leaves_an_unknown_one_to_exited() -> None:
    t = table()
    t.seed(iter([proc(1, 0), proc(10), proc(11, ppid=10)]))
    assert t.exited_known(pid_id(99), 1, pid_id(1), "x", 0, None, None) is None
    assert t.get(pid_id(99)) is None
    p = t.exited_known(pid_id(11), 1, pid_id(1), "2026-12-03T00:00:00.000000000Z", None,
                       "SIGKILL", False)
    assert p is not None and not p.alive and p.exit_signal == "SIGKILL" and p.ppid == 1
    assert t.live_pid(11) is None and t.children_ids(pid_id(10)) == []
    assert t.stats()["exited"] == 1
