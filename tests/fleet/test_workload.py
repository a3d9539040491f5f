"""ebpf-agentctl processes and containers against fake agents answering the process-table
and container API (tests/support/fleet.py TableAgent): the query each host is asked,
paging, the merged table with a host column, -o json, lineage, per-host failures."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.kernel.identity import local_identity
from tests.support.cgroups import cgroup_dir, spawn_in
from tests.support.fleet import TableAgent, agentctl, process_doc, table_agents

TOKEN = "fleet-token-0123456789"
CID = "ab12cd34ef56" + "0" * 52
WEB = [process_doc(1, 0, "systemd"), process_doc(40, 1, "nginx", unit="nginx.service",
                                                  argv=["nginx", "-g", "daemon off;"]),
       process_doc(41, 40, "nginx", unit="nginx.service"),
       process_doc(42, 40, "nginx", alive=False, exit_code=3),
       process_doc(43, 40, "sh", alive=False, exit_signal=9, core_dumped=True)]
DB = [process_doc(1, 0, "systemd"),
      process_doc(77, 1, "postgres", container_id=CID, cgroup=f"/system.slice/docker-{CID}"
                  ".scope", argv=["postgres", "-D", "/data"], argv_truncated=True)]
CONTAINERS = [{"container_id": CID, "pod_uid": None, "cgroups": ["/x"],
               "units": [f"docker-{CID}.scope"], "events": {"exec": 5, "syscall": 7},
               "first_seen": "t1", "last_seen": "t2", "paths_dropped": 0}]


@pytest.fixture
def agents() -> Iterator[dict[str, TableAgent]]:
    with table_agents({"web": (WEB, []), "db": (DB, CONTAINERS)}) as agents:
        yield agents


def hosts(agents: dict[str, TableAgent]) -> list[str]:
    out = ["--token", TOKEN]
    for name, a in agents.items():
        out += ["--host", f"{name}={a.url}"]
    return out


def test_processes_table_is_merged_with_a_host_column(agents: dict[str, TableAgent]) -> None:
    r = agentctl(*hosts(agents), "processes")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["HOST", "PID", "PPID", "UID", "COMM", "STATE", "WORKLOAD",
                                "ARGV"]
    rows = [line.split(None, 6) for line in lines[1:]]
    assert [(r_[0], r_[1], r_[4]) for r_ in rows] == [
        ("web", "1", "systemd"), ("web", "40", "nginx"), ("web", "41", "nginx"),
        ("web", "42", "nginx"), ("web", "43", "sh"), ("db", "1", "systemd"),
        ("db", "77", "postgres")]
    by_pid = {(r_[0], r_[1]): line for r_, line in zip(rows, lines[1:], strict=True)}
    assert "unit=nginx.service" in by_pid[("web", "40")] and "nginx -g daemon off;" in \
        by_pid[("web", "40")]
    assert "exit=3" in by_pid[("web", "42")] and "killed sig=9 core" in by_pid[("web", "43")]
    assert "ctr=ab12cd34ef56 " in by_pid[("db", "77")]
    assert by_pid[("db", "77")].endswith("postgres -D /data ...")
    # Pages of 2 followed to the end: web's 5 rows took 3 requests.
    assert [q.get("after") for p, q in agents["web"].queries] == [None, ["2"], ["4"]]


def test_processes_options_are_the_query_and_json_has_every_field(
        agents: dict[str, TableAgent]) -> None:
    r = agentctl(*hosts(agents), "processes", "--alive", "--comm", "nginx", "--container",
                 "ab12", "--cgroup", "/system.slice", "--limit", "1", "-o", "json")
    assert r.returncode == 0, r.stderr
    for a in agents.values():
        ((path, q),) = a.queries  # --limit 1: one page
        assert path == "/processes"
        assert q == {"alive": ["true"], "comm": ["nginx"], "container_id": ["ab12"],
                     "cgroup": ["/system.slice"], "limit": ["1"]}
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert [(p["host"], p["pid"]) for p in doc["processes"]] == [("web", 40)]
    assert doc["processes"][0] == {"host": "web", **WEB[1]}
    assert doc["hosts"]["web"]["result"]["total"] == 3
    assert doc["hosts"]["web"]["result"]["evicted"] == 3
    r = agentctl(*hosts(agents), "processes", "--exited")
    assert all(q["alive"] == ["false"] for a in agents.values() for _, q in a.queries[1:])


@pytest.mark.parametrize(("args", "error"), [
    (["--container", "XYZ"], "--container: a container id prefix"),
    (["--cgroup", "system.slice"], "--cgroup: a path relative to the cgroup2 root"),
    (["--comm", "a" * 16], "--comm: a process name of 1-15 bytes"),
    (["--limit", "0"], "--limit: between 1 and 100000"),
    (["--alive", "--exited"], "not allowed with argument"),
])
def test_bad_process_options_ask_no_host(agents: dict[str, TableAgent], args: list[str],
                                         error: str) -> None:
    r = agentctl(*hosts(agents), "processes", *args)
    assert r.returncode == 2 and error in r.stderr
    assert all(not a.queries for a in agents.values())


def test_one_process_with_ancestors_and_children(agents: dict[str, TableAgent]) -> None:
    r = agentctl(*hosts(agents), "processes", "--pid", "40")
    # web has a live pid 40; db has none: found, so the command succeeds.
    assert r.returncode == 0, r.stderr
    rows = [line.split()[:5] for line in r.stdout.splitlines()[1:]]
    assert rows == [["web", "self", "40", "1", "nginx"],
                    ["web", "parent", "1", "0", "systemd"],
                    ["web", "child", "41", "40", "nginx"]]
    r = agentctl(*hosts(agents), "processes", "--id", WEB[3]["process_id"], "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    found = doc["hosts"]["web"]["result"]
    assert (found["pid"], found["alive"], found["exit_code"]) == (42, False, 3)
    assert [a["pid"] for a in found["ancestors"]] == [40, 1]
    assert doc["hosts"]["db"]["status"] == 404
    r = agentctl(*hosts(agents), "processes", "--pid", "999")
    assert r.returncode == 1 and "no such process" in r.stderr


def test_containers_merged_over_hosts(agents: dict[str, TableAgent]) -> None:
    r = agentctl(*hosts(agents), "containers")
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    assert head.split() == ["HOST", "CONTAINER", "POD", "UNITS", "EVENTS", "LAST_SEEN"]
    assert [row.split() for row in rows] == [
        ["db", "ab12cd34ef56", f"docker-{CID}.scope", "12", "(exec:5", "syscall:7)", "t2"]]
    r = agentctl(*hosts(agents), "containers", "-o", "json")
    doc = json.loads(r.stdout)
    assert doc["containers"] == [{"host": "db", **CONTAINERS[0]}]
    assert doc["hosts"]["web"]["result"]["containers"] == []


def test_a_host_answering_nonsense_fails_alone(agents: dict[str, TableAgent]) -> None:
    agents["web"].processes = [{"pid": "not a number"}]  # type: ignore[list-item]
    r = agentctl(*hosts(agents), "processes")
    assert r.returncode == 1
    assert "web: bad answer: the answer to GET /processes.processes[0].pid is a string" \
        in r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()[1:]] == ["db", "db"]


@pytest.mark.kernel
def test_processes_and_containers_of_a_real_agent(tmp_path: Path) -> None:
    """A real agent (process table, exec monitor): a process this test runs in a
    docker-named cgroup is listed by ``processes --container``, ``--pid`` shows this
    test's process as its parent, and ``containers`` counts its exec."""
    from tests.support.api import start_agent
    from tests.support.kernel import require_kernel

    require_kernel()
    cid = uuid.uuid4().hex * 2
    path = f"/ebpf-agent-surface.slice/system.slice/docker-{cid}.scope"
    agent = start_agent(tmp_path, token=TOKEN)
    try:
        with cgroup_dir(path) as d:
            # An absolute path: a shell searching PATH makes one failed execve per
            # directory before it, each an exec event.
            child = spawn_in(d, ["/bin/sleep", "60"])
            try:
                one = ["--host", f"h1={agent.url}", "--token", TOKEN]
                deadline = time.monotonic() + 30
                while True:  # the tracker's exec event reaches the table asynchronously
                    r = agentctl(*one, "processes", "--container", cid[:12], "-o", "json")
                    assert r.returncode == 0, r.stderr
                    rows = json.loads(r.stdout)["processes"]
                    if any(p["comm"] == "sleep" for p in rows) or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                (p,) = [p for p in rows if p["comm"] == "sleep"]
                assert (p["host"], p["pid"], p["ppid"], p["argv"], p["alive"]) == (
                    "h1", child.pid, os.getpid(), ["/bin/sleep", "60"], True)
                assert (p["container_id"], p["cgroup"]) == (cid, path)
                assert p["process_id"] == local_identity().of_pid(child.pid)

                r = agentctl(*one, "processes", "--pid", str(child.pid))
                assert r.returncode == 0, r.stderr
                rows_ = [line.split()[:3] for line in r.stdout.splitlines()[1:]]
                assert rows_[:2] == [["h1", "self", str(child.pid)],
                                     ["h1", "parent", str(os.getpid())]]

                r = agentctl(*one, "containers", "-o", "json")
                assert r.returncode == 0, r.stderr
                (ctr,) = [c for c in json.loads(r.stdout)["containers"]
                          if c["container_id"] == cid]
                assert (ctr["host"], ctr["events"], ctr["cgroups"]) == (
                    "h1", {"exec": 1}, [path])
            finally:
                child.kill()
                child.wait()
    finally:
        agent.stop()
