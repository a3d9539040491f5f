"""The syscall and func monitors driven through a real `ebpf-agent serve` over HTTP,
checked against a workload that makes a known number of calls."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import Agent, kernel_agent
from tests.support.func_scope import PROGRAM, K, marker_pattern, probed, running
from tests.support.kernel import compile_c
from tests.support.workloads import calls_c

pytestmark = pytest.mark.kernel

GETPPID = 1000
GETPID = 37

WORKLOAD_C = calls_c(GETPPID, GETPID)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with kernel_agent(tmp_path_factory.mktemp("agent")) as a:
        yield a


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[subprocess.Popen]:
    binary = compile_c(tmp_path, "workload", WORKLOAD_C)
    proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def run_workload(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "done\n"


def test_syscall_counts_over_http_are_exact(agent: Agent, workload: subprocess.Popen) -> None:
    assert agent.request("PUT", "/targets/pids", json=[workload.pid]).status_code == 200
    try:
        r = agent.request("POST", "/monitors/syscall/start", json={"per_process": True})
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        run_workload(workload)
        stats = agent.request("GET", "/monitors/syscall/stats", params={"limit": 50}).json()
        rows = {row["name"]: row for row in stats["syscalls"]}
        assert rows["getppid"]["count"] == GETPPID
        assert rows["getppid"]["errors"] == 0 and rows["getppid"]["category"] == "process"
        assert sum(rows["getppid"]["histogram"]) == GETPPID
        procs = {p["pid"]: p for p in stats["processes"]}
        assert workload.pid in procs
        by_time = agent.request("GET", "/monitors/syscall/stats",
                                params={"sort": "time", "limit": 1}).json()
        assert len(by_time["syscalls"]) == 1
        bad = agent.request("GET", "/monitors/syscall/stats", params={"sort": "colour"})
        assert bad.status_code == 422
        metrics = agent.request("GET", "/metrics").text
        assert f'ebpf_agent_syscall_calls_total{{syscall="getppid"}} {GETPPID}.0' in metrics
        assert 'ebpf_agent_syscall_latency_seconds_total{syscall="getppid"}' in metrics
    finally:
        agent.request("POST", "/monitors/syscall/stop")
        agent.request("PUT", "/targets/pids", json=[])


def test_func_counts_over_http_are_exact(agent: Agent, workload: subprocess.Popen) -> None:
    assert agent.request("PUT", "/targets/pids", json=[workload.pid]).status_code == 200
    try:
        r = agent.request("POST", "/monitors/func/start",
                          json={"patterns": ["c:getpid"], "latency": True})
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        run_workload(workload)
        stats = agent.request("GET", "/monitors/func/stats").json()
        getpid = [f for f in stats["functions"] if f["name"] in ("getpid", "__getpid")]
        assert [f["count"] for f in getpid] == [GETPID]
        assert sum(getpid[0]["histogram"]) == GETPID
        metrics = agent.request("GET", "/metrics").text
        assert f'ebpf_agent_func_calls_total{{function="libc.so.6:{getpid[0]["name"]}"}} ' \
            f'{GETPID}.0' in metrics
    finally:
        agent.request("POST", "/monitors/func/stop")
        agent.request("PUT", "/targets/pids", json=[])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"patterns": ["vfs_read"]}, 409, "kprobes"),
        ({"patterns": ["c:no_such_function_xyz*"]}, 422, "matches no function"),
        ({"patterns": ["c:str*"], "max_probes": 1}, 422, "max_probes=1"),
        ({"patterns": []}, 422, "patterns"),
        ({}, 422, "patterns"),
    ],
)
def test_func_refusals_over_http_leave_it_stopped(agent: Agent, body, status, needle) -> None:
    if status == 409 and agent.request("GET", "/capabilities").json()["features"][
            "kprobes"]["available"]:
        pytest.skip("this kernel has kprobes: kernel patterns are allowed here")
    r = agent.request("POST", "/monitors/func/start", json=body)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert agent.request("GET", "/monitors/func").json()["state"] in ("stopped", "failed")


def test_threshold_change_applies_without_reload(agent: Agent) -> None:
    """Only the slow-call threshold differs: it goes into the running program's map."""
    try:
        first = agent.request("POST", "/monitors/syscall/start", json={}).json()
        started = agent.request("GET", "/monitors/syscall/stats").json()["started_at"]
        r = agent.request("POST", "/monitors/syscall/start", json={"slow_threshold_us": 50000})
        assert r.status_code == 200 and r.json()["options"]["slow_threshold_us"] == 50000
        assert first["options"]["slow_threshold_us"] is None
        stats = agent.request("GET", "/monitors/syscall/stats").json()
        assert stats["started_at"] == started  # the same load: no reload
        r = agent.request("POST", "/monitors/syscall/start", json={"per_process": True})
        assert r.json()["options"]["per_process"] is True
        reloaded = agent.request("GET", "/monitors/syscall/stats").json()["started_at"]
        assert reloaded != started  # a compiled-in option: reloaded
    finally:
        agent.request("POST", "/monitors/syscall/stop")


@pytest.fixture(scope="module")
def scope_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("scope"), "scopecaller", PROGRAM)


def func_status(agent: Agent) -> dict:
    info = agent.request("GET", "/monitors/func").json()
    assert info["state"] == "running", info
    return info["status"]


def test_func_probe_scope_over_http(agent: Agent, scope_program: Path) -> None:
    """GET /monitors/func says where the uprobes are; the agent's own tick gives a
    followed child its probes, and its calls from then on are counted exactly."""
    with running(scope_program) as target, running(scope_program) as other:
        assert agent.request("PUT", "/targets/pids", json=[target.pid]).status_code == 200
        try:
            r = agent.request("POST", "/monitors/func/start",
                              json={"patterns": ["c:getpid", marker_pattern(scope_program)],
                                    "latency": False})
            assert r.status_code == 200, r.text
            status = func_status(agent)
            assert (status["probe_scope"], status["probed_pids"]) == ("pids", [target.pid])
            assert "only" in status["probe_scope_detail"]
            assert probed(target.pid, scope_program) and not probed(other.pid, scope_program)
            child = target.fork()
            deadline = time.monotonic() + 10  # the tick runs about once a second
            while child.pid not in func_status(agent)["probed_pids"]:
                assert time.monotonic() < deadline, "the child was never probed"
                time.sleep(0.1)
            child.go()
            other.go()
            stats = agent.request("GET", "/monitors/func/stats").json()
            assert [(f["name"], f["count"]) for f in stats["functions"]] == [
                ("getpid", K), ("scope_marker", 0)]
            assert stats["children_attached"] == 1
            child.end_child()
            # No pid left (a comm only these programs have): every process is probed.
            assert agent.request("PUT", "/targets/comms",
                                 json=["scopecaller"]).status_code == 200
            assert agent.request("PUT", "/targets/pids", json=[]).status_code == 200
            status = func_status(agent)
            assert status["probe_scope"] == "host" and "probed_pids" not in status
            assert probed(other.pid, scope_program)
        finally:
            agent.request("POST", "/monitors/func/stop")
            agent.request("PUT", "/targets/pids", json=[])
            agent.request("PUT", "/targets/comms", json=[])
