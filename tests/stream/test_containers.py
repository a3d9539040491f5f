"""The container book behind GET /containers: counts per container and monitor, bounded,
evictions counted."""

from __future__ import annotations

from agent.stream.containers import MAX_PATHS, ContainerBook

A, B, C = "a" * 64, "b" * 64, "c" * 64


def ev(cid: str | None, monitor: str = "exec", cgroup: str = "/x", unit: str | None = None,
       ts: str = "2026-12-03T10:00:00.000000000Z", pod: str | None = None) -> dict:
    return {"monitor": monitor, "container_id": cid, "cgroup": cgroup, "unit": unit,
            "pod_uid": pod, "timestamp": ts}


def test_counts_per_container_and_monitor_with_paths_units_and_times() -> None:
    book = ContainerBook()
    book.offer(ev(A, ts="t1", cgroup="/system.slice/docker-a.scope",
                  unit="docker-a.scope"), b"")
    book.offer(ev(A, "syscall", ts="t2", cgroup="/system.slice/docker-a.scope",
                  unit="docker-a.scope"), b"")
    book.offer(ev(A, ts="t3", cgroup="/system.slice/docker-a.scope/init.scope",
                  unit="init.scope"), b"")
    book.offer(ev(B, pod="uid-1"), b"")
    book.offer(ev(None), b"")  # outside any container: not counted
    snap = book.snapshot()
    assert snap["evicted"] == 0 and len(snap["containers"]) == 2
    b, a = snap["containers"]  # the most recently seen first
    assert a == {"container_id": A, "pod_uid": None,
                 "cgroups": ["/system.slice/docker-a.scope",
                             "/system.slice/docker-a.scope/init.scope"],
                 "units": ["docker-a.scope", "init.scope"],
                 "events": {"exec": 2, "syscall": 1}, "first_seen": "t1", "last_seen": "t3",
                 "paths_dropped": 0}
    assert (b["container_id"], b["pod_uid"], b["events"]) == (B, "uid-1", {"exec": 1})


def test_the_least_recently_seen_container_is_evicted_and_counted() -> None:
    book = ContainerBook(capacity=2)
    for cid in (A, B, A, C):  # A was seen again after B: B goes
        book.offer(ev(cid), b"")
    snap = book.snapshot()
    assert [c["container_id"] for c in snap["containers"]] == [C, A]
    assert snap["evicted"] == 1 and len(book) == 2
    assert snap["containers"][1]["events"] == {"exec": 2}


def test_paths_per_container_are_bounded() -> None:
    book = ContainerBook()
    for i in range(MAX_PATHS + 3):
        book.offer(ev(A, cgroup=f"/c/{i}"), b"")
    (a,) = book.snapshot()["containers"]
    assert len(a["cgroups"]) == MAX_PATHS and a["paths_dropped"] == 3
    assert a["events"] == {"exec": MAX_PATHS + 3}
