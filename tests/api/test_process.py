"""`ebpf-agent serve` as a real process: real uvicorn, real BPF programs, real execs.

Other work may run on this machine at the same time, so every assertion is about events
this test caused (unique markers, known pids) and about BPF programs this agent held.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.auth_files import default_token_header
from tests.support.api import (
    AGENT_BIN,
    Agent,
    SseMessage,
    free_port,
    read_sse,
    read_ws,
    self_signed_cert,
    start_agent,
    write_config,
)
from tests.support.kernel import compile_c, loaded_prog_ids, prog_ids_held_by

pytestmark = pytest.mark.kernel

EXEC_STORM_C = r"""
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
/* exec_storm COUNT MARKER: fork+exec "/bin/true MARKER FILLER..." COUNT times, one at a
   time; 15 filler arguments of 120 bytes make each event ~2.5 KB, so a client that does
   not read fills its socket buffers quickly. The strings are on the stack: a fresh child
   may not have the file-backed .rodata page mapped, and BPF cannot fault it in. */
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    char path[] = "/bin/true";
    char marker[128];
    char filler[121];
    char *args[18];
    strncpy(marker, argv[2], sizeof(marker) - 1);
    marker[sizeof(marker) - 1] = 0;
    memset(filler, 'x', 120);
    filler[120] = 0;
    args[0] = path;
    args[1] = marker;
    for (int i = 2; i < 17; i++) args[i] = filler;
    args[17] = 0;
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) { execv(path, args); _exit(127); }
        waitpid(pid, 0, 0);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    from tests.support.kernel import require_kernel

    require_kernel()
    a = start_agent(tmp_path_factory.mktemp("agent"))
    try:
        yield a
    finally:
        a.stop()


def is_exec_of(marker: str):  # noqa: ANN201
    return lambda m: m.event == "exec" and marker in m.data.get("argv", [])


def run_echo(marker: str) -> subprocess.Popen:
    proc = subprocess.Popen(["/bin/echo", marker], stdout=subprocess.DEVNULL)
    proc.wait(10)
    return proc


def assert_exact_exec_event(msg: SseMessage, proc: subprocess.Popen, marker: str) -> None:
    e = msg.data
    assert e["argv"] == ["/bin/echo", marker]
    assert e["pid"] == proc.pid
    assert e["ppid"] == os.getpid()
    assert e["uid"] == os.getuid()
    assert e["ret"] == 0
    assert e["filename"] == "/bin/echo" and e["comm"] == "echo"
    assert isinstance(msg.id, int) and msg.id > 0


# -- events, monitors ---------------------------------------------------------------------
def test_exec_event_over_sse_and_websocket(agent: Agent) -> None:
    r = agent.request("POST", "/monitors/exec/start", json={"max_args": 20, "arg_size": 128})
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    ws_url = agent.url.replace("http", "ws") + "/events/ws?monitor=exec&comm=echo"
    sse = read_sse(f"{agent.url}/events", agent.headers, {"monitor": "exec", "comm": "echo"})
    ws = read_ws(ws_url, agent.headers)
    try:
        marker = f"unique-marker-{uuid.uuid4().hex[:8]}"
        proc = run_echo(marker)
        assert_exact_exec_event(sse.wait_for(is_exec_of(marker)), proc, marker)
        assert_exact_exec_event(ws.wait_for(is_exec_of(marker)), proc, marker)
    finally:
        sse.stop()
        ws.stop()


def test_monitor_endpoints_and_error_statuses_leave_state_unchanged(agent: Agent) -> None:
    monitors = {m["name"]: m for m in agent.get("/monitors").json()}
    assert monitors["exec"]["state"] == "running"
    assert agent.get("/monitors/exec").json()["options"] == {"max_args": 20, "arg_size": 128}
    assert agent.get("/monitors/nope").status_code == 404
    assert agent.request("POST", "/monitors/nope/start").status_code == 404
    r = agent.request("POST", "/monitors/exec/start", json={"max_args": 0})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "max_args"]
    for name, info in monitors.items():
        if info["state"] == "unsupported":  # this kernel cannot run it: 409 with the reason
            r = agent.request("POST", f"/monitors/{name}/start", json={})
            assert r.status_code == 409 and info["reason"] in r.json()["detail"]
    assert {m["name"]: m for m in agent.get("/monitors").json()} == monitors
    stats = agent.get("/monitors/exec/stats").json()
    assert stats["state"] == "running" and stats["events_seen_kernel"] > 0
    assert agent.get("/capabilities").json()["features"]["bcc"]["available"] is True


def test_stop_and_start_over_http(agent: Agent) -> None:
    for _ in range(2):
        r = agent.request("POST", "/monitors/exec/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped"
    assert agent.get("/monitors/exec/stats").json() == {"name": "exec", "state": "stopped"}
    r = agent.request("POST", "/monitors/exec/start", json={"max_args": 20, "arg_size": 128})
    assert r.json()["state"] == "running"


# -- targets ------------------------------------------------------------------------------
def test_targets_are_read_back_from_the_maps_and_filter_in_the_kernel(agent: Agent) -> None:
    # A shell that waits on stdin, then execs echo as its child (followed: a child of a
    # target pid is a target).
    target_marker = f"target-{uuid.uuid4().hex[:8]}"
    other_marker = f"other-{uuid.uuid4().hex[:8]}"
    target = subprocess.Popen(["/bin/sh", "-c", f"read x; /bin/echo {target_marker}"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    sse = read_sse(f"{agent.url}/events", agent.headers, {"monitor": "exec"})
    try:
        r = agent.request("PUT", "/targets/pids", json=[target.pid])
        assert r.status_code == 200 and r.json()["pids"] == [target.pid]
        assert agent.get("/targets").json() == {
            "pids": [target.pid], "uids": [], "comms": [], "cgroups": [], "containers": [],
            "follow_children": True, "cgroup_ids": [], "container_cgroups": []}
        before = agent.get("/targets").json()
        for method, path, body in [("PUT", "/targets/pids", [-1]),
                                   ("POST", "/targets/pids", [2**32]),
                                   ("POST", "/targets/comms", ["much-too-long-comm"]),
                                   ("PUT", "/targets/uids", ["0"])]:
            assert agent.request(method, path, json=body).status_code == 422
        assert agent.request("DELETE", "/targets/pids/x").status_code == 422
        assert agent.get("/targets").json() == before

        run_echo(other_marker)  # not a target: filtered in the kernel
        time.sleep(0.3)
        target.communicate(b"go\n", timeout=10)
        hit = sse.wait_for(lambda m: m.event == "exec" and target_marker in m.data["argv"])
        assert hit.data["ppid"] == target.pid
        seen = [m for m in sse.drain() if other_marker in m.data.get("argv", [])]
        assert seen == []
    finally:
        sse.stop()
        if target.poll() is None:
            target.kill()
        agent.request("PUT", "/targets/pids", json=[])
    assert agent.get("/targets").json()["pids"] == []


def test_follow_children_and_uid_targets_round_trip(agent: Agent) -> None:
    try:
        assert agent.request("PUT", "/targets/uids", json=[0, 4242]).json()["uids"] == [0, 4242]
        assert agent.request("DELETE", "/targets/uids/4242").json()["uids"] == [0]
        r = agent.request("PUT", "/targets/follow_children", json=False)
        assert r.json()["follow_children"] is False
        assert agent.get("/targets").json()["follow_children"] is False
        assert agent.request("PUT", "/targets/follow_children", json="no").status_code == 422
    finally:
        agent.request("PUT", "/targets/uids", json=[])
        agent.request("PUT", "/targets/follow_children", json=True)


# -- stats, metrics, resume ---------------------------------------------------------------
def test_stats_and_metrics(agent: Agent) -> None:
    sse = read_sse(f"{agent.url}/events", agent.headers, {"comm": "echo"})
    try:
        marker = f"stats-{uuid.uuid4().hex[:8]}"
        run_echo(marker)
        sse.wait_for(is_exec_of(marker))
        stats = agent.get("/stats").json()
        assert stats["agent"]["rss_bytes"] > 0 and stats["agent"]["cpu_s"] > 0
        exec_stats = stats["monitors"]["exec"]
        assert exec_stats["events_seen_kernel"] >= exec_stats["events_delivered"] > 0
        subs = stats["streams"]["subscribers"]
        assert any(s["kind"] == "sse" and s["delivered"] >= 1 and s["filters"]["comm"] == ["echo"]
                   for s in subs)
        text = agent.get("/metrics").text
        assert 'ebpf_agent_monitor_events_seen_total{monitor="exec"}' in text
        assert 'ebpf_agent_stream_subscribers{kind="sse"}' in text
    finally:
        sse.stop()


def test_failed_starts_over_http_leave_no_program_attached(tmp_path: Path,
                                                          kernel: None) -> None:
    """output.directory a regular file (was a 500), or exec.jsonl a symlink out of it (a
    422): each attempt used to leave 7 exec programs attached."""
    regular = tmp_path / "regular"
    regular.write_text("x")
    a = start_agent(tmp_path, {"monitors": {},
                               "output": {"directory": str(regular), "formats": ["jsonl"]}})
    try:
        held = prog_ids_held_by(a.proc.pid)
        for _ in range(2):
            r = a.request("POST", "/monitors/exec/start", json={})
            assert r.status_code == 409 and "is not a directory" in r.text, r.text
            assert prog_ids_held_by(a.proc.pid) == held
            assert a.get("/monitors/exec").json()["state"] in ("stopped", "failed")
    finally:
        a.stop()
    out = tmp_path / "out2"
    out.mkdir()
    (out / "exec.jsonl").symlink_to(tmp_path / "victim")
    a = start_agent(tmp_path, {"monitors": {},
                               "output": {"directory": str(out), "formats": ["jsonl"]}})
    try:
        held = prog_ids_held_by(a.proc.pid)
        r = a.request("POST", "/monitors/exec/start", json={})
        assert r.status_code == 422 and "escapes the output directory" in r.text, r.text
        assert prog_ids_held_by(a.proc.pid) == held
    finally:
        a.stop()
    assert not (tmp_path / "victim").exists()


NON_UTF8_SYMBOL_C = r"""
__attribute__((noinline)) int badXname(int x) { return x + 1; }
int main(void) { int s = 0; for (int i = 0; i < 7; i++) s = badXname(s); return s == 7 ? 0 : 1; }
"""


def test_a_symbol_name_that_is_not_utf8_is_served(agent: Agent, tmp_path: Path) -> None:
    """A func monitor on an ELF whose symbol name holds byte 0xff: stats show it as the
    \\udcff escape, /metrics as \\xff (both were 500s)."""
    binary = compile_c(tmp_path, "nonutf8", NON_UTF8_SYMBOL_C)
    data = binary.read_bytes()
    assert data.count(b"badXname") == 1  # the .symtab string (no debug info)
    binary.write_bytes(data.replace(b"badXname", b"bad\xffname"))
    r = agent.request("POST", "/monitors/func/start", json={"patterns": [f"{binary}:bad*"]})
    assert r.status_code == 200, r.text
    try:
        assert subprocess.run([str(binary)]).returncode == 0
        r = agent.get("/monitors/func/stats")
        assert r.status_code == 200, r.text
        (row,) = r.json()["functions"]
        assert row["name"] == "bad\udcffname" and row["count"] == 7
        assert row["name"].encode("utf-8", "surrogateescape") == b"bad\xffname"
        metrics = agent.get("/metrics")
        assert metrics.status_code == 200, metrics.text
        assert 'ebpf_agent_func_calls_total{function="nonutf8:bad\\\\xffname"} 7.0' in metrics.text
    finally:
        agent.request("POST", "/monitors/func/stop")


def test_last_event_id_resume(agent: Agent) -> None:
    first, second = (f"resume-{i}-{uuid.uuid4().hex[:8]}" for i in range(2))
    sse = read_sse(f"{agent.url}/events", agent.headers, {"comm": "echo"})
    try:
        run_echo(first)
        last_id = sse.wait_for(is_exec_of(first)).id
    finally:
        sse.stop()
    proc = run_echo(second)  # while no client is connected
    sse = read_sse(f"{agent.url}/events", {**agent.headers, "Last-Event-ID": str(last_id)},
                   {"comm": "echo"})
    try:
        first_after = sse.wait_for(lambda m: True)
        msg = first_after if is_exec_of(second)(first_after) else sse.wait_for(is_exec_of(second))
        assert_exact_exec_event(msg, proc, second)  # it happened while disconnected
        assert last_id is not None and first_after.id is not None
        assert last_id < first_after.id <= msg.id
    finally:
        sse.stop()


# -- auth ---------------------------------------------------------------------------------
def test_token_is_required_everywhere_but_health(agent: Agent) -> None:
    assert httpx.get(f"{agent.url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        for path in ("/monitors", "/targets", "/stats", "/events", "/ready"):
            r = httpx.get(f"{agent.url}{path}", headers=headers)
            assert r.status_code == 401 and r.json()["detail"], path
        r = httpx.put(f"{agent.url}/targets/pids", json=[1], headers=headers)
        assert r.status_code == 401
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as denied:
        connect(agent.url.replace("http", "ws") + "/events/ws", open_timeout=10)
    assert denied.value.response.status_code == 401
    assert "test-token" not in agent.log_text()  # the token is never logged


def test_refuses_non_loopback_without_authentication(tmp_path: Path) -> None:
    # Without a token the agent generates one (tests/api/test_hardening.py); running
    # open is the explicit api.auth: none, refused off loopback before anything binds.
    path = write_config(tmp_path, {"api": {"auth": "none", "runtime_dir": str(tmp_path)}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    r = subprocess.run([str(AGENT_BIN), "--config", str(path), "serve", "--host", "0.0.0.0",
                        "--port", str(free_port())], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 2
    assert "refusing api.auth: none on 0.0.0.0" in r.stderr and "loopback" in r.stderr


# -- slow and stalled subscribers ---------------------------------------------------------
def raw_stalled_client(url: str, headers: dict[str, str], path: str) -> socket.socket:
    """Connects, asks for the stream and never reads (a tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream",
             *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode())
    return sock


def test_stalled_subscriber_is_bounded_counted_and_cut_while_a_fast_one_gets_all(
        tmp_path: Path, kernel: None) -> None:
    storm = compile_c(tmp_path, "exec_storm", EXEC_STORM_C)
    a = start_agent(tmp_path, {"stream": {"replay_buffer": 4096, "stall_timeout_s": 2}})
    stalled = None
    try:
        marker = f"storm-{uuid.uuid4().hex[:8]}"
        fast = read_sse(f"{a.url}/events", a.headers, {"monitor": "exec", "comm": "true"})
        stalled = raw_stalled_client(a.url, a.headers, "/events?monitor=exec")
        # Until the agent subscribed the raw request too (not a fixed 0.5 s): subscribed
        # after the storm, it would have nothing to stall on.
        deadline = time.monotonic() + 30
        while len(a.get("/stats").json()["streams"]["subscribers"]) < 2:
            assert time.monotonic() < deadline, "the raw request was not subscribed"
            time.sleep(0.05)
        total = 0
        for _ in range(3):  # bursts, so the fast reader never lags 4096 events behind
            subprocess.run([str(storm), "2500", marker], check=True, timeout=120)
            total += 2500
        got = 0
        deadline = time.monotonic() + 60
        while got < total and time.monotonic() < deadline:
            msg = fast.wait_for(lambda m: m.event == "dropped" or marker in m.data["argv"], 30)
            assert msg.event != "dropped", f"the fast subscriber lost events: {msg.data}"
            got += 1
        assert got == total
        streams = a.get("/stats").json()["streams"]
        assert streams["buffered"] <= 4096
        deadline = time.monotonic() + 15
        while streams["closed"].get("stalled", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
            streams = a.get("/stats").json()["streams"]
        assert streams["closed"].get("stalled") == 1, json.dumps(streams)[-2000:]
        assert streams["totals"]["sse_dropped"] > 0
        (fast_sub,) = [s for s in streams["subscribers"] if s["filters"]["comm"] == ["true"]]
        assert fast_sub["dropped"] == 0 and fast_sub["delivered"] >= total
        fast.stop()
        log = a.log_text()
        assert "stalled: disconnected" in log and "Traceback" not in log, log[-3000:]
    finally:
        if stalled is not None:
            stalled.close()
        a.stop()


# -- shutdown -----------------------------------------------------------------------------
def test_sigterm_with_open_streams_exits_0_and_unloads_every_program(
        tmp_path: Path, kernel: None) -> None:
    a = start_agent(tmp_path)
    held = prog_ids_held_by(a.proc.pid)
    assert held and held <= loaded_prog_ids()
    sse = read_sse(f"{a.url}/events", a.headers)
    ws = read_ws(a.url.replace("http", "ws") + "/events/ws", a.headers)
    try:
        code, took = a.sigterm(15)
    finally:
        sse.stop()
        ws.stop()
        a.stop()
    assert code == 0, a.log_text()
    assert took < 5, f"shutdown took {took:.1f}s"
    deadline = time.monotonic() + 5  # programs are freed asynchronously (RCU)
    while held & loaded_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not held & loaded_prog_ids()
    assert "monitor exec stopped" in a.log_text()


# -- daemon mode --------------------------------------------------------------------------
def test_daemon_pid_file_and_refusal_of_a_second_instance(tmp_path: Path, kernel: None) -> None:
    pid_file = tmp_path / "agent.pid"
    port = free_port()
    # No token configured: the daemon generates one into the runtime dir.
    path = write_config(tmp_path, {"logging": {"file": str(tmp_path / "daemon.log")},
                                   "api": {"runtime_dir": str(tmp_path / "run")}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    cmd = [str(AGENT_BIN), "--config", str(path), "serve", "--port", str(port), "--daemon",
           "--pid-file", str(pid_file)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    assert r.returncode == 0, r.stderr
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)  # the daemon is alive, and serving since the parent exited 0
        auth = default_token_header(tmp_path / "run")
        assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10,
                         headers=auth).status_code == 200
        again = subprocess.run([*cmd[:-4], str(free_port()), "--daemon", "--pid-file",
                                str(pid_file)], capture_output=True, text=True, timeout=60,
                               env=env)
        assert again.returncode != 0
        assert f"pid {pid}" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_file.exists()


def test_unix_socket_mode(tmp_path: Path, kernel: None) -> None:
    sock_path = tmp_path / "agent.sock"
    a = start_agent(tmp_path, {"api": {"unix_socket": str(sock_path)},
                               "monitors": {"exec": {"enabled": False}}}, token=None)
    try:
        assert oct(sock_path.stat().st_mode & 0o777) == "0o600"
        transport = httpx.HTTPTransport(uds=str(sock_path))
        with httpx.Client(transport=transport, base_url="http://localhost") as c:
            assert c.get("/health").json()["status"] == "ok"
            assert c.get("/monitors").status_code == 200
    finally:
        a.stop()
    assert not sock_path.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_tls_and_non_loopback_with_a_token(tmp_path: Path, kernel: None) -> None:
    cert, key = self_signed_cert(tmp_path)
    port = free_port()
    path = write_config(tmp_path, {"api": {"tls_certfile": str(cert), "tls_keyfile": str(key)},
                                   "monitors": {"exec": {"enabled": False}}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    env["EBPF_AGENT_TOKEN"] = "tls-token"
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(AGENT_BIN), "--config", str(path), "serve", "--host",
                                 "0.0.0.0", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    ctx = ssl.create_default_context(cafile=str(cert))
    agent = Agent(proc, f"https://127.0.0.1:{port}", "tls-token", log,
                  {"Authorization": "Bearer tls-token"})
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"{agent.url}/ready", headers=agent.headers, verify=ctx)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.2)
        assert httpx.get(f"{agent.url}/monitors", verify=ctx).status_code == 401
        assert "https://0.0.0.0:" in log.read_text()
    finally:
        assert agent.stop() == 0
