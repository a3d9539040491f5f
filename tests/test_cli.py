"""The ebpf-agent command line, run as a user would run it."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI = str(REPO / ".venv" / "bin" / "ebpf-agent")


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, **kw)


def wait_for_line(path: Path, needle: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "nosuch"], 2, "unknown monitor 'nosuch'"),
        (["run", "exec", "--pid", "-1"], 2, "targets.pids.0"),
        (["run", "exec", "--comm", "x" * 16], 2, "targets.comms.0"),
        (["run", "exec", "--cgroup", "relative"], 2, "targets.cgroups.0"),
        (["run", "exec", "--container", "XYZ"], 2, "targets.containers.0"),
        (["run", "exec", "--cgroup", "/ebpf-agent-no-such-cgroup"], 2,
         "targets.cgroups: /ebpf-agent-no-such-cgroup: no such cgroup"),
        (["run", "exec", "--option", "exec.max_args=0"], 2, "max_args"),
        (["run", "exec", "--option", "nope"], 2, "MONITOR.KEY=VALUE"),
    ],
)
def test_bad_input_is_one_line_and_exit_code(args, code, message) -> None:
    proc = run_cli(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_broken_config_file_names_file_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("output:\n  queue_size: -5\n")
    proc = run_cli("--config", str(cfg), "run", "exec")
    assert proc.returncode == 2
    assert f"{cfg}: output.queue_size" in proc.stderr and "Traceback" not in proc.stderr


def test_non_root_gets_one_clear_line() -> None:
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", CLI,
                           "run", "exec", "--duration", "1"], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "needs root" in proc.stderr and "Traceback" not in proc.stderr


def test_run_writes_jsonl_and_stops_on_duration(kernel, tmp_path: Path) -> None:
    # --pid of this test (children followed): the files hold this test's execs only, not
    # whatever else the machine runs (another process's argv need not even be UTF-8).
    agent = subprocess.Popen([CLI, "run", "exec", "--format", "jsonl", "--format", "csv",
                              "--output-dir", str(tmp_path), "--duration", "4",
                              "--pid", str(os.getpid())],
                             stderr=subprocess.PIPE, text=True)
    assert agent.stderr is not None
    assert "running exec" in agent.stderr.readline() + agent.stderr.readline()
    marker = subprocess.Popen(["/bin/echo", "cli-duration-marker"], stdout=subprocess.DEVNULL)
    marker.wait()
    assert agent.wait(timeout=20) == 0
    events = [json.loads(x) for x in (tmp_path / "exec.jsonl").read_text().splitlines()]
    assert [(e["argv"], e["pid"], e["ppid"], e["ret"]) for e in events] == [
        (["/bin/echo", "cli-duration-marker"], marker.pid, os.getpid(), 0)]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "exec.csv").read_text())))
    assert [(json.loads(r["argv"]), int(r["pid"])) for r in rows] == [
        (["/bin/echo", "cli-duration-marker"], marker.pid)]


def test_run_export_nats_publishes_each_event_once(kernel, tmp_path: Path) -> None:
    """`run --export nats` builds the same pipeline as serve: the exec of this test reaches
    JetStream once, with the host, as the same JSON the JSONL file holds."""
    import asyncio

    from tests.support.fleet import nats_server, stream_messages

    with nats_server(tmp_path) as server:
        config = tmp_path / "agent.yaml"  # export.nats without enabled: the flag enables it
        config.write_text(json.dumps({"export": {"host_name": "cli-host",
                                                 "nats": {"url": server.url}}}))
        agent = subprocess.Popen([CLI, "--config", str(config), "run", "exec", "--export",
                                  "nats", "--format", "jsonl", "--output-dir",
                                  str(tmp_path / "out"), "--duration", "4",
                                  "--pid", str(os.getpid())],
                                 stderr=subprocess.PIPE, text=True)
        assert agent.stderr is not None
        lines = [agent.stderr.readline()]
        while lines[-1] and "running exec" not in lines[-1]:  # after the exporter's lines
            lines.append(agent.stderr.readline())
        assert "running exec" in lines[-1], lines
        marker = subprocess.Popen(["/bin/echo", "cli-nats-marker"], stdout=subprocess.DEVNULL)
        marker.wait()
        assert agent.wait(timeout=30) == 0  # the exporter flushes before run exits
        messages = asyncio.run(stream_messages(server.url))
    bodies = [json.loads(m.data) for m in messages]
    assert [(b["host"], b["argv"], b["pid"], b["ppid"], b["ret"]) for b in bodies] == [
        ("cli-host", ["/bin/echo", "cli-nats-marker"], marker.pid, os.getpid(), 0)]
    assert [m.subject for m in messages] == ["ebpf.cli-host.exec"]
    jsonl = (tmp_path / "out" / "exec.jsonl").read_bytes().splitlines()
    assert [b'{"host":"cli-host",' + line[1:] for line in jsonl] == [m.data for m in messages]


def test_run_export_takes_only_known_exporters() -> None:
    proc = run_cli("run", "exec", "--export", "kafka")
    assert proc.returncode == 2 and "invalid choice: 'kafka'" in proc.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_flushes(kernel, tmp_path: Path, sig) -> None:
    agent = subprocess.Popen([CLI, "run", "exec", "--format", "jsonl", "--format", "console",
                              "--output-dir", str(tmp_path), "--pid", str(os.getpid())],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    console: list[str] = []
    reader = threading.Thread(target=lambda: console.extend(agent.stdout or ()), daemon=True)
    reader.start()
    try:
        assert agent.stderr is not None
        assert "running exec" in agent.stderr.readline() + agent.stderr.readline()
        subprocess.run(["/bin/echo", "cli-signal-marker"], stdout=subprocess.DEVNULL,
                       check=True)
        # Until the agent's writer had the event (its console line; the JSON line is
        # written by the same thread), not a fixed 0.5 s: the signal must find it there.
        deadline = time.monotonic() + 30
        while not any("cli-signal-marker" in line for line in list(console)):
            assert time.monotonic() < deadline, "the exec event was not written"
            time.sleep(0.05)
        agent.send_signal(sig)
        assert agent.wait(timeout=20) == 0
    finally:  # a failed assertion must not leave an agent running with its probes
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    lines = (tmp_path / "exec.jsonl").read_text().splitlines()
    assert any(json.loads(x)["argv"] == ["/bin/echo", "cli-signal-marker"] for x in lines)
    # --pid of this test: every event is this process or its descendants.
    assert all(json.loads(x)["ppid"] == os.getpid() for x in lines)


def test_syscall_snapshots_go_to_csv(kernel, tmp_path: Path) -> None:
    """Aggregating monitors write their tables as periodic CSV snapshot rows."""
    target = subprocess.Popen(["/bin/sh", "-c", "while :; do cat /nonexistent 2>/dev/null; "
                               "sleep 0.05; done"])
    try:
        proc = subprocess.run(
            [CLI, "run", "syscall", "--pid", str(target.pid), "--format", "csv",
             "--output-dir", str(tmp_path), "--duration", "3"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        target.kill()
    assert proc.returncode == 0, proc.stderr
    import csv

    with open(tmp_path / "syscall-snapshot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) >= {"timestamp", "name", "nr", "count", "errors"}
    openat = [r for r in rows if r["name"] == "openat"]
    assert openat and int(openat[-1]["errors"]) >= 1 and int(openat[-1]["count"]) >= 1


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_flag_before_or_after_the_subcommand(tmp_path: Path, where: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("api:\n  port: -1\n")
    args = ["--config", str(cfg), "serve"] if where == "before" else ["serve", "--config",
                                                                        str(cfg)]
    proc = run_cli(*args)
    assert proc.returncode == 2 and f"{cfg}: api.port" in proc.stderr


def test_make_run_command_line_starts_the_agent(kernel, tmp_path: Path) -> None:
    """What `make run` executes, with the default config (on another port)."""
    import re

    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe is not None
    cmd = recipe.group(1).replace("$(VENV)", str(REPO / ".venv")).replace(
        "$(CONFIG)", str(REPO / "config" / "agent.yaml")).split()
    port = "18999"
    # No token in the default config: the agent generates one (here into tmp_path/run).
    env = {**os.environ, "EBPF_AGENT_API__PORT": port, "EBPF_AGENT_OUTPUT__DIRECTORY":
           str(tmp_path), "EBPF_AGENT_API__RUNTIME_DIR": str(tmp_path / "run")}
    agent = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        from agent.auth_files import default_token_header

        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and agent.poll() is None:
            auth = default_token_header(tmp_path / "run")
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2, headers=auth)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert ready is not None and ready.status_code == 200, agent.stderr
        monitors = httpx.get(f"http://127.0.0.1:{port}/monitors", timeout=5,
                             headers=auth).json()
        assert {m["name"]: m["state"] for m in monitors}["exec"] == "running"
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=20) == 0


# -- issue 7: start-up problems are one line and exit 2 ------------------------------------
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def serve_problems(tmp_path: Path) -> list[tuple[dict[str, str], list[str] | None, str]]:
    """(environment, extra serve flags, expected message) for each refused start-up."""
    (tmp_path / "adir").mkdir()
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o1777)
    cert, key = self_signed(tmp_path)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    missing = tmp_path / "missing" / "x"
    return [
        ({"EBPF_AGENT_LOGGING__FILE": str(missing)}, [], "logging.file"),
        ({"EBPF_AGENT_LOGGING__FILE": str(tmp_path / "adir")}, [], "Is a directory"),
        ({}, ["--pid-file", str(missing)], "No such file or directory"),
        ({}, ["--pid-file", str(tmp_path / "adir")], "Is a directory"),
        ({}, ["--pid-file", str(world / "a.pid")], "writable by group or others"),
        ({"EBPF_AGENT_API__TLS_CERTFILE": str(missing), "EBPF_AGENT_API__TLS_KEYFILE": str(key)},
         [], "api.tls_certfile"),
        ({"EBPF_AGENT_API__TLS_CERTFILE": str(cert), "EBPF_AGENT_API__TLS_KEYFILE": str(not_pem)},
         [], "not a certificate and its private key"),
        ({"EBPF_AGENT_API__HOST": "no-such-host.invalid", "EBPF_AGENT_TOKEN": "t" * 20}, [],
         "cannot resolve"),
        ({"EBPF_AGENT_TARGETS__PIDS": "1,2,3", "EBPF_AGENT_TARGETS__MAX_PIDS": "2"}, [],
         "3 pids exceed max_pids=2"),
        ({"EBPF_AGENT_API__PORT": "abc"}, None, "environment EBPF_AGENT_API__PORT: api.port"),
        ({"EBPF_AGENT_TARGETS__COMMS": "abcdefghijklmnop"}, [], "is 16 bytes"),
    ]


def test_serve_start_up_problems_are_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("monitors: {}\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    for env, flags, message in serve_problems(tmp_path):
        # None: no --port flag, which would override the environment's port.
        cmd = ["--config", str(cfg), "serve", *(["--port", "0", *flags] if flags is not None
                                                else [])]
        proc = run_cli(*cmd, env={**base, **env})
        assert proc.returncode == 2, (env, flags, proc.stderr[-2000:])
        assert message in proc.stderr, (env, flags, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_pid_file_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "p.pid").symlink_to(victim)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("monitors: {}\n")
    proc = run_cli("--config", str(cfg), "serve", "--port", "0", "--pid-file",
                   str(tmp_path / "p.pid"))
    assert proc.returncode == 2 and "is a symbolic link" in proc.stderr, proc.stderr
    assert victim.read_text() == "precious\n"


def test_daemon_resolves_relative_paths_before_detaching(kernel, tmp_path: Path) -> None:
    """A relative output.directory and --pid-file are the caller's, not /'s (the daemon
    chdirs to /), and the relative pid file is removed on exit."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("output:\n  directory: rel-out\n  formats: [jsonl]\n"
                   "monitors:\n  exec:\n    enabled: true\nlogging:\n  file: rel.log\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    proc = run_cli("--config", "agent.yaml", "serve", "--port", str(port), "--daemon",
                   "--pid-file", "agent.pid", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    pid = int((tmp_path / "agent.pid").read_text())
    try:
        marker = f"daemon-{os.getpid()}"
        subprocess.run(["/bin/echo", marker], stdout=subprocess.DEVNULL, check=True)
        assert wait_for_line(tmp_path / "rel-out" / "exec.jsonl", marker, timeout=20), \
            (tmp_path / "rel.log").read_text()
        assert not Path("/rel-out").exists() and not Path("/agent.pid").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while (tmp_path / "agent.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (tmp_path / "agent.pid").exists()
    assert "ebpf-agent stopped" in (tmp_path / "rel.log").read_text()


def test_run_refusals_are_one_line(kernel, tmp_path: Path) -> None:
    """A pattern that matches nothing, an output file linking out of the directory."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "exec.jsonl").symlink_to(tmp_path / "victim")
    for args, message in [
        (["run", "func", "--option", 'func.patterns=["c:no_such_fn_zz"]', "--duration", "1"],
         "matches no function"),
        (["run", "exec", "--output-dir", str(out), "--format", "jsonl", "--duration", "1"],
         "escapes the output directory"),
    ]:
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "victim").exists()


NATS_WARNING = ("export.nats.url is set but export.nats.enabled is not: nothing is exported "
                "to NATS (set enabled: true; enabled: false silences this)")


@pytest.mark.parametrize(("nats", "warned"), [
    ("url: nats://10.0.0.1:4222", True),
    ("url: nats://10.0.0.1:4222\n    enabled: false", False),
    ("stream: OTHER", False),
])
def test_a_nats_url_without_enabled_warns_in_check_and_at_start(
        tmp_path: Path, nats: str, warned: bool) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"export:\n  nats:\n    {nats}\n")
    check = run_cli("--config", str(cfg), "check")
    assert check.returncode in (0, 3), check.stderr  # 3: no monitor supported here
    assert (f"ebpf-agent: config warning: {NATS_WARNING}\n" in check.stderr) is warned
    # At start (logged, then `run` refuses the unknown monitor).
    start = run_cli("--config", str(cfg), "run", "nosuch")
    assert start.returncode == 2
    assert (f"WARNING agent.config: {NATS_WARNING}" in start.stderr) is warned


def test_check_refuses_an_invalid_config(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("api:\n  port: -1\n")
    proc = run_cli("--config", str(cfg), "check")
    assert proc.returncode == 2 and f"{cfg}: api.port" in proc.stderr


def test_run_cgroup_and_container_flags_reach_the_targets() -> None:
    from agent.cli import _parser, _settings
    from agent.monitors.registry import discover_monitors

    args = _parser().parse_args(["run", "exec", "--cgroup", "/a", "--cgroup", "/b/c/",
                                 "--container", "4f3c4f3c4f3c", "--config", "/dev/null"])
    targets = _settings(args, discover_monitors()).targets
    assert (targets.cgroups, targets.containers) == (["/a", "/b/c"], ["4f3c4f3c4f3c"])
