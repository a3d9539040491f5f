"""GET /processes, /processes/{pid}, /processes/by-id/{id} on this kernel: processes the
tests start, checked against /proc and against what waitpid(2) reported to their parent.
Negative cases (422, 404) and the table's bounds through the API as well."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.kernel.cgroups import Cgroups, default_resolver
from agent.kernel.identity import local_identity
from tests.support.api import client_for
from tests.support.cgroups import CONTAINER_ID, cgroup_dir, spawn_in
from tests.support.processes import (
    proc_children,
    proc_ppid,
    program,
    subreaper,
    tracked_app,
    wait_for,
)

IDENT = local_identity


@pytest.fixture(scope="module")
def client(kernel_module: None) -> Iterator[TestClient]:
    with tracked_app() as c:
        yield c


@pytest.fixture(scope="module")
def kernel_module() -> None:
    from tests.support.kernel import require_kernel

    require_kernel()


def live(client: TestClient, pid: int) -> dict[str, Any] | None:
    r = client.get(f"/processes/{pid}")
    return r.json() if r.status_code == 200 else None


def by_id(client: TestClient, process_id: str) -> dict[str, Any] | None:
    r = client.get(f"/processes/by-id/{process_id}")
    return r.json() if r.status_code == 200 else None


def descendants_chain(top: int, depth: int) -> list[int]:
    """[top, child, grandchild, ...] once all ``depth`` levels exist (/proc)."""
    def chain() -> list[int] | None:
        pids = [top]
        while len(pids) < depth:
            kids = proc_children(pids[-1])
            if not kids:
                return None
            pids.append(kids[0])
        return pids
    return wait_for(chain, f"a chain of {depth}")


def sleeping_in(pid: int, comm: str) -> bool:
    """proc(5) stat: the process runs ``comm`` and is asleep (state S)."""
    with open(f"/proc/{pid}/stat") as f:
        name, rest = f.read().rsplit(")", 1)
    return name.split("(", 1)[1] == comm and rest.split()[0] == "S"


def proc_ancestry(pid: int) -> list[int]:
    out = []
    while pid != 1:
        pid = proc_ppid(pid)
        out.append(pid)
    return out


def test_a_process_is_in_the_table_as_soon_as_it_has_exec_ed(client: TestClient) -> None:
    """The tracker reads its records in batches; a request catches it up first, so
    a process that exec'd before the request is there without waiting."""
    for _ in range(20):
        time.sleep(0.2)  # the tracker idle: the fork's record starts its next batch
        child = subprocess.Popen(["/bin/sleep", "30"])
        pid = child.pid
        try:
            # In nanosleep(2): its exec (and the tracepoint after it) is over. Polled
            # closely, so the request comes well within the tracker's batch interval.
            deadline = time.monotonic() + 20
            while not sleeping_in(pid, "sleep"):
                assert time.monotonic() < deadline, "sleep(1) did not start"
                time.sleep(0.0005)
            ident = IDENT().of_pid(pid)
            body = live(client, pid)  # at once: no wait_for
            assert body is not None
            assert (body["process_id"], body["comm"], body["argv"]) == (
                ident, "sleep", ["/bin/sleep", "30"])
        finally:
            child.kill()
            child.wait()


def test_a_four_level_chain_has_the_ancestry_proc_shows(client: TestClient) -> None:
    top = subprocess.Popen([str(program()), "chain", "4"])
    try:
        pids = descendants_chain(top.pid, 4)
        leaf = pids[-1]
        # Wait for the leaf's exec record: its argv is its own ("chain 1").
        body = wait_for(lambda: (b := live(client, leaf)) and b["argv"][-1] == "1" and b or None,
                        "the leaf's exec")
        want = proc_ancestry(leaf)
        assert [a["pid"] for a in body["ancestors"]] == want
        assert [a["process_id"] for a in body["ancestors"]] == [IDENT().of_pid(p) for p in want]
        assert body["process_id"] == IDENT().of_pid(leaf)
        assert body["parent_process_id"] == IDENT().of_pid(pids[-2])
        assert (body["pid"], body["ppid"], body["comm"], body["alive"]) == \
            (leaf, pids[-2], "ptprog", True)
        assert body["exe"] == str(program())
        assert body["argv"] == [str(program()), "chain", "1"] and body["argv_truncated"] is False
        assert (body["uid"], body["gid"]) == (os.getuid(), os.getgid())
        assert body["children"] == []
        for level, pid in enumerate(pids[:-1]):
            b = live(client, pid)
            assert b is not None
            assert [c["pid"] for c in b["children"]] == [pids[level + 1]]
            assert b["argv"] == [str(program()), "chain", str(4 - level)]
    finally:
        top.kill()
        top.wait()
        for pid in pids[1:]:
            os.kill(pid, signal.SIGKILL)


def run_and_wait(argv: list[str], core: int | None = None,
                 cwd: Path | None = None) -> tuple[int, int]:
    """Start ``argv``, reap it with waitpid(2): (pid, raw status)."""
    def limits() -> None:
        if core is not None:
            resource.setrlimit(resource.RLIMIT_CORE, (core, core))
    child = subprocess.Popen(argv, preexec_fn=limits, cwd=cwd)
    _, status = os.waitpid(child.pid, 0)
    child.returncode = 0  # reaped here; keep Popen from waiting again
    return child.pid, status


INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(("args", "core"), [
    (["exit", "3"], None),
    (["exit", "0"], None),
    (["signal", str(int(signal.SIGKILL))], None),
    (["signal", str(int(signal.SIGTERM))], None),
    (["segv"], 0),
    (["segv"], INF),
    (["thread-exit", "7"], None),  # exit_group(2) from a thread other than the leader
    (["leader-exit", "5"], None),  # the leader leaves first; the last thread calls exit(2)
], ids=["exit-3", "exit-0", "sigkill", "sigterm", "segv-no-core", "segv-core",
        "exit-group-from-thread", "last-thread-exit"])
def test_exit_status_is_what_waitpid_saw(client: TestClient, tmp_path: Path, args: list[str],
                                         core: int | None) -> None:
    pid, status = run_and_wait([str(program()), *args], core, tmp_path)
    rows = wait_for(lambda: [r for r in client.get(
        "/processes", params={"alive": "false", "comm": "ptprog", "limit": 1000}
    ).json()["processes"] if r["pid"] == pid] or None, "the exit record")
    (row,) = rows
    if os.WIFEXITED(status):
        want = (os.WEXITSTATUS(status), None, None)
    else:
        want = (None, signal.Signals(os.WTERMSIG(status)).name, os.WCOREDUMP(status))
    assert (row["exit_code"], row["exit_signal"], row["core_dumped"]) == want
    assert row["alive"] is False and row["exit_time"] is not None
    assert row["ppid"] == os.getpid()
    exited = by_id(client, row["process_id"])  # exited, still in the table
    assert exited is not None and exited["alive"] is False
    assert exited["ancestors"][0]["pid"] == os.getpid() and exited["children"] == []
    assert client.get(f"/processes/{pid}").status_code == 404  # no live process has it
    if args[0] == "thread-exit":
        assert want == (7, None, None)
    if args == ["segv"] and core == 0:
        assert want == (None, "SIGSEGV", False)


def test_a_process_started_before_the_agent_keeps_its_id_across_restarts(
        kernel_module: None) -> None:
    waiting = subprocess.Popen([str(program()), "wait-exec", "/bin/sleep", "60"],
                               stdin=subprocess.PIPE)
    try:
        want = wait_for(lambda: IDENT().of_pid(waiting.pid), "/proc")
        with tracked_app() as c:
            first = live(c, waiting.pid)
            assert first is not None and first["process_id"] == want
            assert first["argv"] == [str(program()), "wait-exec", "/bin/sleep", "60"]
            # Its exec, seen by the tracker: the same process, the new program.
            assert waiting.stdin is not None
            waiting.stdin.write(b"go\n")
            waiting.stdin.flush()
            after = wait_for(lambda: (b := live(c, waiting.pid)) and b["comm"] == "sleep"
                             and b or None, "the exec record")
            assert (after["process_id"], after["exe"], after["argv"], after["argv_truncated"]) \
                == (want, "/bin/sleep", ["/bin/sleep", "60"], False)
            matching = c.get("/processes", params={"comm": "sleep", "limit": 1000}).json()
            assert [r["process_id"] for r in matching["processes"]
                    if r["pid"] == waiting.pid] == [want]
        with tracked_app() as c:  # the agent restarted: the same id from /proc
            again = live(c, waiting.pid)
            assert again is not None and again["process_id"] == want
            assert (again["start_time"], again["argv"]) == (after["start_time"], after["argv"])
    finally:
        waiting.kill()
        waiting.wait()


def test_an_orphan_is_adopted_by_the_subreaper(client: TestClient) -> None:
    with subreaper():
        top = subprocess.Popen([str(program()), "chain", "3"])
        middle = grandchild = 0
        try:
            top_, middle, grandchild = descendants_chain(top.pid, 3)
            wait_for(lambda: (b := live(client, grandchild)) and b["ppid"] == middle and b
                     or None, "the grandchild in the table")
            os.kill(middle, signal.SIGKILL)
            body = wait_for(lambda: (b := live(client, grandchild)) and
                            b["ppid"] == os.getpid() and b or None, "the reparenting")
            assert proc_ppid(grandchild) == os.getpid()
            assert body["parent_process_id"] == IDENT().of_pid(os.getpid())
            assert [a["pid"] for a in body["ancestors"]] == proc_ancestry(grandchild)
            mine = live(client, os.getpid())
            assert mine is not None and grandchild in [c["pid"] for c in mine["children"]]
        finally:
            top.kill()
            top.wait()
            if grandchild:
                os.kill(grandchild, signal.SIGKILL)
                os.waitpid(grandchild, 0)


def test_a_cgroup_created_and_removed_at_once_is_still_resolved(client: TestClient) -> None:
    cg = Cgroups()
    path = f"/ebpf-agent-test.slice/system.slice/docker-{CONTAINER_ID[::-1]}.scope"
    with cgroup_dir(path) as d:
        cid = d.stat().st_ino
    assert cg.path_of(cid) is None  # gone: the file handle cannot name it any more
    w = wait_for(lambda: (w := default_resolver().resolve(cid)).cgroup and w or None,
                 "the tracker's cgroup map")
    assert (w.cgroup, w.container_id, w.unit) == (path, CONTAINER_ID[::-1],
                                                  f"docker-{CONTAINER_ID[::-1]}.scope")
    assert default_resolver().resolve(2**62).cgroup is None  # never created


def test_filters_and_paging_over_the_live_table(client: TestClient) -> None:
    path = f"/ebpf-agent-test.slice/system.slice/docker-{CONTAINER_ID}.scope"
    with cgroup_dir(path) as d:
        inside = spawn_in(d, [str(program()), "chain", "1"])
        try:
            def rows(**params: Any) -> list[dict[str, Any]]:
                r = client.get("/processes", params={"limit": 1000, **params})
                assert r.status_code == 200, r.text
                return r.json()["processes"]
            row = wait_for(lambda: next((r for r in rows(container_id=CONTAINER_ID[:12])
                                         if r["comm"] == "ptprog"), None), "the container")
            assert (row["pid"], row["cgroup"], row["container_id"], row["cgroup_id"]) == \
                (inside.pid, path, CONTAINER_ID, d.stat().st_ino)
            for params in ({"cgroup": path}, {"cgroup": "/ebpf-agent-test.slice"},
                           {"comm": "ptprog", "alive": "true"}):
                assert inside.pid in [r["pid"] for r in rows(**params)], params
            for params in ({"cgroup": path + "x"}, {"container_id": "0123456789ab"},
                           {"comm": "ptprog", "alive": "false"}):
                assert inside.pid not in [r["pid"] for r in rows(**params)], params
        finally:
            inside.kill()
            inside.wait()
    # Every process once, in (pid, start) order, whatever the page size.
    first = client.get("/processes", params={"limit": 1000}).json()
    seen: list[str] = []
    after = None
    while True:
        params = {"limit": 7, **({"after": after} if after else {})}
        page = client.get("/processes", params=params).json()
        seen += [r["process_id"] for r in page["processes"]]
        after = page["next"]
        if after is None:
            break
    assert len(seen) == len(set(seen)) >= first["total"] - 50  # the table moves meanwhile
    keys = [(int(s.rsplit("-", 1)[1]), int(s.split("-")[1])) for s in seen]
    assert keys == sorted(keys)
    assert {k: first[k] for k in ("capacity", "evicted")} == {"capacity": 32768, "evicted": 0}


@pytest.mark.parametrize(("path", "status", "needle"), [
    ("/processes?limit=0", 422, "limit"),
    ("/processes?limit=1001", 422, "limit"),
    ("/processes?after=garbage", 422, "is not a process id"),
    ("/processes?alive=maybe", 422, "alive"),
    ("/processes?container_id=XYZ", 422, "container_id"),
    ("/processes/0", 404, "no live process with pid 0"),
    ("/processes/4194305", 404, "no live process"),
    ("/processes/abc", 422, "pid"),
    ("/processes/by-id/" + "ab" * 8 + "-1-999999", 404, "no process"),
])
def test_bad_requests(client: TestClient, path: str, status: int, needle: str) -> None:
    r = client.get(path)
    assert r.status_code == status and needle in r.text, r.text


def test_metrics_and_stats_show_the_table(client: TestClient) -> None:
    stats = client.get("/stats").json()["processes"]
    assert stats["capacity"] == 32768 and stats["size"] >= stats["live"] > 0
    assert stats["tracker"]["state"] == "running" and stats["tracker"]["ring_dropped"] == 0
    text = client.get("/metrics").text
    for name in ("ebpf_agent_process_table_size ", "ebpf_agent_process_table_capacity 32768",
                 "ebpf_agent_process_table_evicted_total 0",
                 "ebpf_agent_process_tracker_ring_dropped_total 0",
                 'ebpf_agent_process_tracker_records_total{kind="exec"}'):
        assert name in text, name


def test_a_small_table_evicts_and_counts(kernel_module: None) -> None:
    with tracked_app(capacity=16) as c:
        body = c.get("/processes", params={"limit": 1000}).json()
        stats = c.get("/stats").json()["processes"]
        assert (body["size"], body["capacity"], len(body["processes"])) == (16, 16, 16)
        # The seed alone brought more than 16: each one beyond was evicted and counted.
        assert body["evicted"] >= stats["tracker"]["seeded"] - 16 > 0
        before = body["evicted"]
        for _ in range(3):
            run_and_wait([str(program()), "exit", "0"])
        after = wait_for(lambda: (b := c.get("/processes").json())["evicted"] >= before + 3
                         and b or None, "three more evictions")
        assert after["size"] == 16
        assert f"ebpf_agent_process_table_evicted_total {float(after['evicted'])}" in \
            c.get("/metrics").text or after["evicted"] < c.get("/processes").json()["evicted"]


def test_without_the_kernel_features_the_table_is_empty_and_says_why() -> None:
    with client_for() as c:  # a fake capability report: the tracker cannot start
        body = c.get("/processes").json()
        assert (body["processes"], body["total"], body["next"], body["size"]) == ([], 0, None, 0)
        assert c.get("/stats").json()["processes"]["tracker"]["state"] == "unavailable"
        assert c.get("/processes/1").status_code == 404
    with client_for(processes={"enabled": False}) as c:
        r = c.get("/processes")
        assert r.status_code == 503 and "processes.enabled" in r.json()["detail"]
        assert c.get("/stats").json()["processes"] is None
