"""A real `ebpf-agent serve` against hostile clients (issue 7: bounded before
authentication, slow headers, connection floods, credentials in logs) and the secure
default (a generated token in a root-only runtime directory).

No monitor is started: these are properties of the HTTP layer, so they need no kernel.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from agent.auth_files import default_token_header
from tests.support.api import AGENT_BIN, Agent, read_sse, read_ws, start_agent, write_config

TOKEN = "hardening-token-5f3c9a1e"
NO_MONITORS = {"monitors": {"exec": {"enabled": False}}}
MB = 1024 * 1024


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@contextlib.contextmanager
def running(agent: Agent) -> Iterator[Agent]:
    try:
        yield agent
    finally:
        agent.stop()


def address(agent: Agent) -> tuple[str, int]:
    host, port = agent.url.removeprefix("http://").split(":")
    return host, int(port)


# -- secure by default ----------------------------------------------------------------
def test_no_token_configured_generates_one_into_a_root_only_runtime_dir(tmp_path: Path) \
        -> None:
    run = tmp_path / "run"
    with running(start_agent(tmp_path, NO_MONITORS, token=None, generated=True)) as a:
        assert a.token and len(a.token) >= 40
        assert mode(run) == 0o700
        assert mode(run / "token") == 0o600 and mode(run / "auth.header") == 0o600
        header = (run / "auth.header").read_text()
        assert header == f"Authorization: Bearer {a.token}\n"
        # The README's one-liner: curl reads the header from the file.
        out = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
             "-H", f"@{run / 'auth.header'}", f"{a.url}/monitors/nosuch/stop"],
            capture_output=True, text=True, timeout=30)
        assert out.stdout == "404"  # authenticated; the monitor does not exist
        assert httpx.post(f"{a.url}/monitors/nosuch/stop").status_code == 401
        assert default_token_header(run) == {"Authorization": f"Bearer {a.token}"}
        log = a.log_text()
        assert f"generated one: curl -H @{run / 'auth.header'}" in log
        assert a.token not in log
        # A second agent that cannot start (the port is taken) leaves the token alone.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
        second = subprocess.run(
            [str(AGENT_BIN), "--config", str(tmp_path / "agent.yaml"), "serve", "--port",
             str(address(a)[1])], capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode != 0 and "cannot listen" in second.stderr
        assert (run / "token").read_text() == f"{a.token}\n"
    # Removed on exit: the secret of a stopped agent does not linger.
    assert not (run / "token").exists() and not (run / "auth.header").exists()
    assert default_token_header(run) == {}


def test_runtime_dir_writable_by_others_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o777)
    os.chmod(run, 0o777)
    path = write_config(tmp_path, {**NO_MONITORS, "api": {"runtime_dir": str(run)}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    out = subprocess.run([str(AGENT_BIN), "--config", str(path), "serve", "--port", "0"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2, out.stderr
    assert "writable by group or others" in out.stderr
    assert not (run / "token").exists()


def test_auth_none_is_loopback_only_and_warns(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    path = write_config(tmp_path, {**NO_MONITORS, "api": {"auth": "none",
                                                          "runtime_dir": str(tmp_path)}})
    out = subprocess.run([str(AGENT_BIN), "--config", str(path), "serve", "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "api.auth: none" in out.stderr and "loopback" in out.stderr
    ok = tmp_path / "ok"
    ok.mkdir()
    with running(start_agent(ok, NO_MONITORS, token=None)) as a:  # api.auth: none
        assert httpx.get(f"{a.url}/monitors").status_code == 200
        assert "api.auth is none" in a.log_text()
        assert not (ok / "run" / "token").exists()


# -- bounded before authentication -----------------------------------------------------
def test_unauthenticated_200mb_body_is_refused_without_buffering(tmp_path: Path) -> None:
    with running(start_agent(tmp_path, NO_MONITORS, token=TOKEN)) as a:
        for _ in range(3):  # warm up: the first requests allocate what they always will
            a.get("/stats")
        before = rss(a.proc.pid)
        head = (b"POST /targets/pids HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (200 * MB))
        chunk = b"[" + b"1," * (MB // 2 - 1)
        sent = 0
        with socket.create_connection(address(a), timeout=30) as s:
            s.sendall(head)
            with contextlib.suppress(OSError):  # the agent may close before the end
                while sent < 200 * MB:
                    s.sendall(chunk)
                    sent += len(chunk)
            s.settimeout(10)
            reply = b""
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in reply and (data := s.recv(4096)):
                    reply += data
        assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
        grown = rss(a.proc.pid) - before
        assert grown < 30 * MB, f"RSS grew by {grown / MB:.0f} MB ({sent / MB:.0f} MB sent)"
        assert a.get("/health").status_code == 200
        assert a.get("/targets").json()["pids"] == []


def test_oversize_headers_and_url_are_431(tmp_path: Path) -> None:
    with running(start_agent(tmp_path, NO_MONITORS, token=TOKEN)) as a:
        before = rss(a.proc.pid)
        with socket.create_connection(address(a), timeout=30) as s:
            s.sendall(b"GET /" + b"a" * 40_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 431")
        with socket.create_connection(address(a), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 40_000 + b"\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 431")
        # A 100 MB URL: cut off after the cap, never held.
        with socket.create_connection(address(a), timeout=30) as s, \
                contextlib.suppress(OSError):
            s.sendall(b"GET /")
            for _ in range(100):
                s.sendall(b"u" * MB)
        assert rss(a.proc.pid) - before < 30 * MB
        assert a.get("/health").status_code == 200


FLOOD = 1100  # sockets, against an agent limited to 1,024 file descriptors


@contextlib.contextmanager
def fd_limited_agent(tmp_path: Path, api: dict[str, Any]) -> Iterator[Agent]:
    """An agent under ``prlimit --nofile=1024:1024`` (systemd's default), with room in
    this process for FLOOD sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD + 300
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    agent = start_agent(tmp_path, {**NO_MONITORS, "api": api}, token=TOKEN,
                        prefix=["prlimit", "--nofile=1024:1024", "--"])
    with running(agent) as a:
        yield a


@contextlib.contextmanager
def stuck_sockets(a: Agent, first_bytes: bytes) -> Iterator[list[socket.socket]]:
    """FLOOD connections that each send ``first_bytes`` and then nothing more."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            s = socket.create_connection(address(a), timeout=30)
            s.sendall(first_bytes)
            sockets.append(s)
        yield sockets
    finally:
        for s in sockets:
            s.close()


def closed_with_408(sockets: list[socket.socket]) -> int:
    """How many of the sockets the agent answered 408 (or just closed)."""
    closed = 0
    for s in sockets:
        s.settimeout(30)
        try:
            data = s.recv(4096)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except ConnectionResetError:
            closed += 1
    return closed


def test_slow_headers_cannot_exhaust_connections(tmp_path: Path) -> None:
    """1,100 sockets that never finish their headers, against an agent limited to 1,024
    file descriptors (systemd's default): /health still answers, and the stuck sockets
    are closed after api.header_timeout_s."""
    with fd_limited_agent(tmp_path, {"header_timeout_s": 4}) as a, \
            stuck_sockets(a, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n") as sockets:
        # Health checks while all 1,100 are open (each new connection pushes out
        # the oldest half-sent one when the agent is at its connection cap).
        for _ in range(5):
            assert httpx.get(f"{a.url}/health", timeout=30).status_code == 200
        # Every stuck socket is answered 408 (evicted or timed out) and closed.
        assert closed_with_408(sockets) == len(sockets)
        assert httpx.get(f"{a.url}/health", timeout=30).status_code == 200
        log = a.log_text()
        assert "Too many open files" not in log, log[-2000:]


def test_slow_login_bodies_cannot_exhaust_connections(tmp_path: Path) -> None:
    """1,100 sockets that send complete login headers (Content-Length 16000) and part of
    the body, then stall, against an agent limited to 1,024 file descriptors: /health and
    an authenticated GET /stats still answer 200 while they are open, an authenticated
    stream opened before stays open, the stuck logins are answered 408 (shed or past
    api.header_timeout_s) and closed, and the shedding is logged."""
    login = (b"POST /auth/session HTTP/1.1\r\nHost: 127.0.0.1\r\n"
             b"Content-Type: application/json\r\nContent-Length: 16000\r\n\r\n"
             b'{"token": "')  # headers complete, the body never is
    with fd_limited_agent(tmp_path, {"header_timeout_s": 4}) as a:
        sse = read_sse(f"{a.url}/events", headers=a.headers)
        try:
            with stuck_sockets(a, login) as sockets:
                for _ in range(5):
                    assert httpx.get(f"{a.url}/health", timeout=30).status_code == 200
                    assert a.get("/stats").status_code == 200
                assert closed_with_408(sockets) == len(sockets)
            assert sse.thread is not None and sse.thread.is_alive() and sse.error is None
        finally:
            sse.stop()
        assert httpx.get(f"{a.url}/health", timeout=30).status_code == 200
        log = a.log_text()
        assert "Too many open files" not in log, log[-2000:]
        assert "shed" in log and "unauthenticated connection" in log, log[-2000:]
        closed = {ln.split("reason=")[1].split('"')[1]: float(ln.split()[-1])
                  for ln in a.get("/metrics").text.splitlines()
                  if ln.startswith("ebpf_agent_api_connections_closed_total")}
        assert closed["shed"] + closed["body_timeout"] == FLOOD, closed
        assert closed["full"] == 0


def test_idle_keepalive_connections_are_closed(tmp_path: Path) -> None:
    config = {**NO_MONITORS, "api": {"keepalive_timeout_s": 1}}
    with running(start_agent(tmp_path, config, token=TOKEN)) as a, \
            socket.create_connection(address(a), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        t0 = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):  # until the agent closes (or our 30 s timeout raises)
            reply += chunk
        waited = time.monotonic() - t0
        assert reply.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in reply, reply
        assert waited < 25  # closed by the agent after keepalive_timeout_s, not by us


# -- credentials never logged -------------------------------------------------------------
def test_no_credential_in_the_debug_log(tmp_path: Path) -> None:
    config = {**NO_MONITORS, "logging": {"level": "DEBUG"}}
    with running(start_agent(tmp_path, config, token=TOKEN)) as a:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert a.get("/monitors").status_code == 200
        assert httpx.get(f"{a.url}/monitors", headers={"Authorization": "Bearer wrong-xyz"},
                         ).status_code == 401
        sse = read_sse(f"{a.url}/events", headers=auth)
        sse.stop()
        ws = read_ws(a.url.replace("http", "ws") + "/events/ws", headers=auth)
        ws.stop()
        with httpx.Client(base_url=a.url) as c:
            r = c.post("/auth/session", json={"token": TOKEN})
            session = r.cookies["ebpf_agent_session"]
            assert c.get("/monitors").status_code == 200
        ticket = a.request("POST", "/events/tickets", json={}).json()["ticket"]
        sse = read_sse(f"{a.url}/events", params={"ticket": ticket})
        sse.stop()
    # Read once the agent has exited (not after a fixed 0.5 s): a thread writes the log
    # from a queue, and the agent drains that queue on its way out.
    assert a.proc.returncode == 0, a.log_text()[-2000:]
    log = a.log_text()
    assert "/events/ws" in log and "GET /monitors" in log  # it did log at DEBUG
    for secret in (TOKEN, session, ticket, "wrong-xyz"):
        assert secret not in log, secret
