"""Helpers for the API tests (no tests here): fake monitors, an in-thread uvicorn server,
a real `ebpf-agent serve` subprocess, and SSE / WebSocket readers."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi.testclient import TestClient
from pydantic import Field

from agent.api.app import create_app
from agent.api.server import AgentServer, tcp_socket, uvicorn_config
from agent.config import Settings
from agent.kernel.capabilities import CapabilityReport
from agent.model.targets import TargetSet
from agent.monitors.contract import (
    BaseMonitor,
    MonitorError,
    MonitorOptions,
    MonitorStatsQuery,
)
from agent.monitors.registry import MonitorRegistry

REPO = Path(__file__).resolve().parents[2]
AGENT_BIN = REPO / ".venv" / "bin" / "ebpf-agent"


# -- fakes ---------------------------------------------------------------------------------
class FakeOptions(MonitorOptions):
    level: int = Field(1, ge=0, le=10)
    label: str = "x"


class FakeStatsQuery(MonitorStatsQuery):
    sort: str = "count"
    limit: int = 10
    reset: bool = False  # POST .../stats/reset


class PatternError(ValueError):
    """Like FuncMonitor's FuncPatternError: a ValueError that is not a pydantic error."""


def fake_registry() -> MonitorRegistry:
    """A fresh registry: ``fake`` (emits what tests put in ``Fake.inbox``), ``plain``
    (stats() takes no arguments, like exec) and ``needy`` (needs a missing feature)."""
    registry = MonitorRegistry()

    @registry.register("fake", "a fake monitor for tests")
    class Fake(BaseMonitor[FakeOptions]):
        Options = FakeOptions
        StatsQuery = FakeStatsQuery
        inbox: queue.Queue[dict] = queue.Queue()
        targets_seen: list[TargetSet] = []

        def load(self) -> None:
            if self.options.label == "bad-pattern":
                raise PatternError("label: not a valid pattern")
            if self.options.label == "fails":
                raise MonitorError("fake: attach failed")

        def poll(self, timeout_ms: int) -> None:
            try:
                event = self.inbox.get(timeout=timeout_ms / 1000)
            except queue.Empty:
                return
            self.ctx.sink.publish({"monitor": "fake", **event})

        def close(self) -> None:
            pass

        def set_targets(self, targets: TargetSet) -> None:
            type(self).targets_seen.append(targets)

        def kernel_counters(self) -> dict[str, int]:
            return {"seen": 0, "dropped": 0}

        def stats(self, sort: str = "count", limit: int = 10,  # type: ignore[override]
                  reset: bool = False) -> dict[str, Any]:
            if sort not in ("count", "name"):
                raise ValueError(f"sort: unknown key {sort!r}")
            return {"table": [{"name": "a", "count": 1}][:limit], "sort": sort, "limit": limit,
                    "reset": reset}

    @registry.register("plain", "stats without parameters")
    class Plain(Fake):
        StatsQuery = MonitorStatsQuery

        def stats(self) -> dict[str, Any]:
            return {"plain": True}

    @registry.register("needy", "needs a feature this host lacks")
    class Needy(Fake):
        REQUIRED_FEATURES = ("time_machine",)

    return registry


def fake_report() -> CapabilityReport:
    """A report that probes nothing: only the feature list of the fakes matters."""
    return CapabilityReport(kernel="test", machine="x86_64", features={})


def settings(**overrides: Any) -> Settings:
    """Settings for in-process apps: without any token given, ``api.auth: none`` (the
    explicit opt-in to an open API), so tests of other features need no credentials."""
    if not any(k in overrides for k in ("token", "token_file", "tokens")):
        api = dict(overrides.get("api") or {})
        api.setdefault("auth", "none")
        overrides["api"] = api
    # Live readers never skip ahead here (stream.max_lag_ms 0): on a loaded machine a
    # test's loop may well be slower than the default bound. The tests of max_lag set it.
    stream = dict(overrides.get("stream") or {})
    stream.setdefault("max_lag_ms", 0)
    overrides["stream"] = stream
    return Settings(**overrides)


# -- in-thread server (fakes) --------------------------------------------------------------
@dataclass
class ThreadServer:
    app: Any
    settings: Settings
    url: str = ""
    server: AgentServer | None = None
    thread: threading.Thread | None = None

    def start(self) -> ThreadServer:
        sock = tcp_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn_config(self.app, self.settings)
        config.access_log = False
        self.server = AgentServer(config, lambda: None)
        self.thread = threading.Thread(target=self.server.run, args=([sock],), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10) -> float:
        """Seconds the shutdown took."""
        t0 = time.monotonic()
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "server did not stop"
        return time.monotonic() - t0


@contextlib.contextmanager
def thread_server(app: Any, s: Settings) -> Iterator[ThreadServer]:
    server = ThreadServer(app, s).start()
    try:
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop()


# -- real agent process --------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Agent:
    proc: subprocess.Popen
    url: str
    token: str | None
    log: Path
    headers: dict[str, str] = field(default_factory=dict)

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        with self.client() as c:
            return c.get(path, **kw)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        with self.client() as c:
            return c.request(method, path, **kw)

    def sigterm(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds until the process ended."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - t0

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def write_config(tmp_path: Path, config: dict[str, Any]) -> Path:
    base: dict[str, Any] = {
        # Readers notice stop() at the next heartbeat; they never skip ahead (see
        # settings()).
        "stream": {"heartbeat_s": 0.5, "max_lag_ms": 0},
        "output": {"directory": str(tmp_path / "out"), "formats": []},
        "monitors": {"exec": {"enabled": True}},
        # Never the real /run/ebpf-agent: a generated token lands in the test's tmp dir.
        "api": {"runtime_dir": str(tmp_path / "run")},
    }
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@contextlib.contextmanager
def kernel_agent(tmp_path: Path) -> Iterator[Agent]:
    """A real agent with no monitor enabled, for tests that start monitors over its API
    (skips without eBPF, fails under CI=true); stopped on exit."""
    from tests.support.kernel import require_kernel

    require_kernel()
    a = start_agent(tmp_path, {"monitors": {}})
    try:
        yield a
    finally:
        a.stop()


def start_agent(tmp_path: Path, config: dict[str, Any] | None = None,
                token: str | None = "test-token-0123456789", extra_args: list[str] | None = None,
                wait_ready: bool = True, generated: bool = False,
                prefix: list[str] | None = None,
                headers: dict[str, str] | None = None) -> Agent:
    """``token``: EBPF_AGENT_TOKEN; None: ``api.auth: none`` unless ``generated`` (then
    the agent generates one into tmp_path/run and the Agent reads it from there).
    ``prefix``: a command to run the agent under (e.g. prlimit); ``headers``: what the
    Agent sends (default: the token's bearer header)."""
    port = free_port()
    config = dict(config or {})
    api = {"runtime_dir": str(tmp_path / "run"), **(config.get("api") or {})}
    if token is None and not generated and not config.get("tokens"):
        api.setdefault("auth", "none")
    config["api"] = api
    path = write_config(tmp_path, config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    if token:
        env["EBPF_AGENT_TOKEN"] = token
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*(prefix or []), str(AGENT_BIN), "--config", str(path), "serve",
             "--port", str(port),
             *(extra_args or [])],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )
    agent = Agent(proc, f"http://127.0.0.1:{port}", token, log,
                  headers if headers is not None else
                  {"Authorization": f"Bearer {token}"} if token else {})
    if generated:
        _read_generated(agent, tmp_path / "run")
    if wait_ready:
        try:
            wait_until_ready(agent)
        except BaseException:
            agent.stop()
            raise
    return agent


def _read_generated(agent: Agent, runtime_dir: Path, timeout: float = 120) -> None:
    from agent.auth_files import read_default_token

    deadline = time.monotonic() + timeout
    while (token := read_default_token(runtime_dir)) is None:
        if agent.proc.poll() is not None or time.monotonic() > deadline:
            agent.stop()
            raise AssertionError(f"no generated token in {runtime_dir}:\n{agent.log_text()}")
        time.sleep(0.05)
    agent.token = token
    agent.headers = {"Authorization": f"Bearer {token}"}


def wait_until_ready(agent: Agent, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.proc.poll() is not None:
            raise AssertionError(f"agent exited {agent.proc.returncode}:\n{agent.log_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if agent.get("/ready").status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"agent not ready in {timeout}s:\n{agent.log_text()}")


# -- stream readers ------------------------------------------------------------------------
@dataclass
class SseMessage:
    id: int | None
    event: str
    data: Any


class SseParser:
    """SSE frames from text lines, one line at a time (comments skipped)."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}

    def feed(self, line: str) -> SseMessage | None:
        if line == "":
            fields, self.fields = self.fields, {}
            if "data" in fields:
                return SseMessage(int(fields["id"]) if "id" in fields else None,
                                  fields.get("event", "message"), json.loads(fields["data"]))
        elif not line.startswith(":"):
            key, _, value = line.partition(":")
            self.fields[key] = value[1:] if value.startswith(" ") else value
        return None


class StreamReader:
    """Reads an SSE or WebSocket stream on a thread into a queue, so tests can wait for a
    message with a deadline."""

    def __init__(self) -> None:
        self.messages: queue.Queue[SseMessage] = queue.Queue()
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.closer: Callable[[], None] | None = None  # unblocks a read in progress

    def wait_for(self, pred: Callable[[SseMessage], bool], timeout: float = 15) -> SseMessage:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message in {timeout}s (error: {self.error})")
            try:
                msg = self.messages.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if pred(msg):
                return msg

    def drain(self) -> list[SseMessage]:
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.messages.get_nowait())
        return out

    def stop(self) -> None:
        self._stop.set()
        if self.closer is not None:
            with contextlib.suppress(Exception):
                self.closer()
        if self.thread is not None:
            self.thread.join(10)


def read_sse(url: str, headers: dict[str, str] | None = None,
             params: Any = None) -> StreamReader:
    reader = StreamReader()

    def run() -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(30, read=60)) as c, \
                    c.stream("GET", url, headers=headers, params=params) as r:
                r.raise_for_status()
                reader.closer = r.close
                reader.connected.set()
                parser = SseParser()
                for line in r.iter_lines():  # heartbeats let a stop() be noticed
                    if reader._stop.is_set():
                        return
                    if (msg := parser.feed(line)) is not None:
                        reader.messages.put(msg)
        except BaseException as e:  # reported through wait_for's assertion
            reader.error = e
        finally:
            reader.connected.set()

    return _started(reader, run, "SSE")


def _started(reader: StreamReader, run: Callable[[], None], what: str) -> StreamReader:
    """Runs the reader's loop in a thread; returns once it is connected."""
    reader.thread = threading.Thread(target=run, daemon=True)
    reader.thread.start()
    assert reader.connected.wait(15), f"{what} connection not established"
    assert reader.error is None, reader.error
    return reader


def read_ws(url: str, headers: dict[str, str] | None = None) -> StreamReader:
    from websockets.sync.client import connect

    reader = StreamReader()

    def run() -> None:
        try:
            with connect(url, additional_headers=headers or {}, open_timeout=15) as ws:
                reader.connected.set()
                while not reader._stop.is_set():
                    try:
                        text = ws.recv(timeout=0.5)
                    except TimeoutError:
                        continue
                    obj = json.loads(text)
                    reader.messages.put(SseMessage(obj.get("id"), obj["event"],
                                                   obj.get("data", obj)))
        except BaseException as e:
            reader.error = e
        finally:
            reader.connected.set()

    return _started(reader, run, "WebSocket")


# The in-process tests' base URL: a loopback host, which the Host check admits.
BASE = "http://127.0.0.1"


def client_for(**overrides: Any) -> TestClient:
    """An in-process client of an app with fake monitors and ``settings(**overrides)``."""
    app = create_app(settings(**overrides), fake_registry(), report=fake_report())
    return TestClient(app, base_url=BASE)


def wait_tracker(agent: Agent, timeout: float = 120) -> None:
    """Until the agent's process tracker has loaded its programs (or failed: none then),
    for tests that compare the programs an agent holds before and after something."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tracker = agent.get("/stats").json().get("processes", {}).get("tracker", {})
        if tracker.get("state", "running") != "starting":
            return
        time.sleep(0.2)
    raise AssertionError("the process tracker did not start")


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, valid one day, made by openssl (make install
    installs it): what api.tls_certfile/tls_keyfile take and a client trusts as its CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
