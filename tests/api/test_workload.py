"""Workload filters of the streams and GET /containers against a real agent: the test runs
processes in real cgroups named as container runtimes and systemd name them, and
checks the exact events each filtered stream delivers and the counts per container.

Other work may run on this machine at the same time: every count is of events carrying
this test's markers.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from agent.kernel.identity import local_identity
from tests.support.api import Agent, SseMessage, StreamReader, read_sse, read_ws, start_agent
from tests.support.cgroups import cgroup_dir, run_in, spawn_in

pytestmark = pytest.mark.kernel

ROOT = "/ebpf-agent-surface.slice"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    from tests.support.kernel import require_kernel

    require_kernel()
    a = start_agent(tmp_path_factory.mktemp("agent"))  # exec enabled (write_config)
    try:
        yield a
    finally:
        a.stop()


def ids() -> tuple[str, str, str]:
    """Fresh container ids (64 hex) so counts of one test never mix with another's."""
    return uuid.uuid4().hex * 2, uuid.uuid4().hex * 2, uuid.uuid4().hex * 2


def ws(agent: Agent, params: list[tuple[str, str]]) -> StreamReader:
    url = agent.url.replace("http", "ws") + "/events/ws?" + urlencode(params)
    return read_ws(url, agent.headers)


def until_end(reader: StreamReader, end: str) -> list[SseMessage]:
    """The messages up to the first exec of ``end`` (run after everything else: a stream
    that delivered it has judged every earlier event)."""
    out: list[SseMessage] = []

    def seen(m: SseMessage) -> bool:
        out.append(m)
        return m.event == "exec" and end in (m.data.get("argv") or [])

    reader.wait_for(seen, timeout=30)
    return out


def argv_with(messages: list[SseMessage], marker: str) -> list[dict]:
    return [m.data for m in messages if m.event == "exec" and marker in (m.data["argv"] or [])]


def test_each_workload_filter_delivers_exactly_its_processes(agent: Agent) -> None:
    docker, podman, kube = ids()
    pod = str(uuid.uuid4())
    web = f"ebpf-agent-test-web-{docker[:6]}.service"
    paths = {
        "docker": f"{ROOT}/system.slice/docker-{docker}.scope",
        "podman": f"{ROOT}/machine.slice/libpod-{podman}.scope",
        "kube": f"{ROOT}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                f"{pod.replace('-', '_')}.slice/cri-containerd-{kube}.scope",
        "web": f"{ROOT}/system.slice/{web}",
        "worker": f"{ROOT}/system.slice/{web}/worker",
        "webx": f"{ROOT}/system.slice/{web}x",  # a sibling whose name extends web's
    }
    runs = {"docker": 3, "podman": 2, "kube": 1, "web": 2, "worker": 1, "webx": 1}
    marker, end = f"wl-{uuid.uuid4().hex[:8]}", f"wl-end-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as stack:
        dirs = {k: stack.enter_context(cgroup_dir(p)) for k, p in paths.items()}
        r = agent.request("POST", "/events/tickets", json={"container_id": [podman[:12]]})
        assert r.status_code == 200, r.text
        ticket = r.json()["ticket"]
        streams = {
            "all": read_sse(f"{agent.url}/events", agent.headers, {"monitor": "exec"}),
            "docker": read_sse(f"{agent.url}/events", agent.headers,
                               {"container_id": docker[:12]}),
            "containers": read_sse(f"{agent.url}/events", agent.headers,
                                   [("container_id", docker[:4]), ("container_id", kube)]),
            "web_tree": read_sse(f"{agent.url}/events", agent.headers,
                                 {"cgroup": paths["web"]}),
            "unit": ws(agent, [("unit", web), ("monitor", "exec")]),
            "root": ws(agent, [("cgroup", ROOT)]),
            "ticket": read_sse(f"{agent.url}/events", None, {"ticket": ticket}),
        }
        try:
            for _ in range(2):  # outside every cgroup of the test: no filtered stream
                subprocess.run(["/bin/echo", marker], stdout=subprocess.DEVNULL, check=True)
            for name, n in runs.items():
                for _ in range(n):
                    assert run_in(dirs[name], ["/bin/echo", marker]).returncode == 0
            everything = until_end_of_all(streams["all"], marker, sum(runs.values()) + 2)
            for name in ("docker", "kube", "web", "podman"):
                assert run_in(dirs[name], ["/bin/echo", end]).returncode == 0
            got = {k: argv_with(until_end(s, end), marker) for k, s in streams.items()
                   if k != "all"}
        finally:
            for s in streams.values():
                s.stop()

    def where(events: list[dict]) -> list[str]:
        return sorted(next(k for k, p in paths.items() if e["cgroup"] == p) for e in events)

    assert len(everything) == 12
    assert where(got["docker"]) == ["docker"] * 3
    assert where(got["containers"]) == ["docker"] * 3 + ["kube"]
    assert where(got["web_tree"]) == ["web"] * 2 + ["worker"]  # not the webx sibling
    assert where(got["unit"]) == ["web"] * 2 + ["worker"]
    assert where(got["root"]) == sorted(k for k, n in runs.items() for _ in range(n))
    assert where(got["ticket"]) == ["podman"] * 2
    for e in got["containers"]:
        assert e["container_id"] in (docker, kube) and e["comm"] == "echo"
    assert {e["pod_uid"] for e in got["containers"]} == {None, pod}
    assert {e["unit"] for e in got["unit"]} == {web}

    # GET /containers: per container, the exec events of this test (runs + end marker).
    r = agent.get("/containers")
    assert r.status_code == 200, r.text
    body = r.json()
    by_id = {c["container_id"]: c for c in body["containers"]}
    assert by_id[docker]["events"] == {"exec": 3 + 1}
    assert by_id[docker]["cgroups"] == [paths["docker"]]
    assert by_id[docker]["units"] == [f"docker-{docker}.scope"]
    assert by_id[docker]["pod_uid"] is None
    assert by_id[podman]["events"] == {"exec": 2 + 1}
    assert (by_id[kube]["events"], by_id[kube]["pod_uid"]) == ({"exec": 1 + 1}, pod)
    assert body["evicted"] == 0 and body["capacity"] == 4096
    assert by_id[docker]["first_seen"] <= by_id[docker]["last_seen"]
    metrics = agent.get("/metrics").text.splitlines()
    tracked = [float(m.split()[1]) for m in metrics
               if m.startswith("ebpf_agent_containers_tracked ")]
    assert len(tracked) == 1 and tracked[0] >= 3
    assert "ebpf_agent_containers_evicted_total 0.0" in metrics


def until_end_of_all(reader: StreamReader, marker: str, count: int) -> list[dict]:
    """The unfiltered stream's ``count`` events with ``marker``: all published."""
    seen: list[dict] = []

    def enough(m: SseMessage) -> bool:
        if m.event == "exec" and marker in (m.data.get("argv") or []):
            seen.append(m.data)
        return len(seen) == count

    reader.wait_for(enough, timeout=30)
    return seen


def test_a_process_id_filter_follows_one_process_instance(agent: Agent) -> None:
    """A process that execs keeps its process_id: a stream filtered on it gets the exec
    of that instance and none of the same program run by other processes before it."""
    (cid, _, _) = ids()
    marker = f"pid-{uuid.uuid4().hex[:8]}"
    with cgroup_dir(f"{ROOT}/system.slice/docker-{cid}.scope") as d:
        waiting = spawn_in(d, ["sh", "-c", f"read x; exec /bin/echo {marker}"])
        try:
            process_id = _wait_identity(waiting.pid)
            stream = ws(agent, [("process_id", process_id)])
            try:
                for _ in range(2):  # the same program, other processes: not delivered
                    subprocess.run(["/bin/echo", marker], stdout=subprocess.DEVNULL,
                                   check=True)
                assert waiting.stdin is not None
                waiting.stdin.write(b"go\n")
                waiting.stdin.flush()
                waiting.wait(10)
                msgs = until_end(stream, marker)
            finally:
                stream.stop()
        finally:
            with contextlib.suppress(ProcessLookupError):
                waiting.kill()
            waiting.wait()
    # (The shell's own exec may be delivered too if the agent published it after the
    # stream opened: the same instance.)
    assert {m.data["process_id"] for m in msgs} == {process_id}
    assert [(m.data["pid"], m.data["argv"], m.data["container_id"]) for m in msgs
            if m.data["argv"] == ["/bin/echo", marker]] == [
        (waiting.pid, ["/bin/echo", marker], cid)]


def _wait_identity(pid: int) -> str:
    """The process_id of ``pid`` once it runs the shell (after spawn_in's exec)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"read x" in cmdline:
            found = local_identity().of_pid(pid)
            assert found is not None
            return found
        time.sleep(0.02)
    raise AssertionError("the shell did not start")


def test_bad_workload_filters_are_refused_before_any_stream(agent: Agent) -> None:
    with httpx.Client(base_url=agent.url, headers=agent.headers, timeout=10) as c:
        for params in ({"container_id": "not-hex"}, {"cgroup": "no/slash"},
                       {"process_id": "123"}, {"unit": ""}):
            r = c.get("/events", params=params)
            assert r.status_code == 422, (params, r.text)
