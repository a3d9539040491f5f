"""Several real `ebpf-agent serve` processes, each in its own network namespace with its
own address (token required: non-loopback binds), driven by ebpf-agentctl from another
namespace: start on all, targets edited on all, the same exec seen once per host in the
merged stream; one agent killed (the others keep streaming, status says so, exit 1); the
agent restarted and the stream resumed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fleet import Background, agentctl
from tests.support.netns import FleetNet, NetAgent, fleet_network, inventory, wait_ready

TOKEN = "multihost-token-0123456789"
NAMES = ["h1", "h2", "h3"]
# A start compiles the monitor's BPF program (BCC); three agents compiling at once on a
# loaded machine take longer than agentctl's default 10 s per host. The test checks
# what the start did, not how fast.
START_TIMEOUT = ("--timeout", "90")


@pytest.fixture
def fleet(tmp_path: Path, kernel: None) -> Iterator[tuple[FleetNet, list[NetAgent], Path]]:
    with fleet_network(NAMES) as net:
        agents = [NetAgent(h, TOKEN, tmp_path / h.name).start() for h in net.hosts]
        try:
            wait_ready(net, agents)
            yield net, agents, inventory(tmp_path, agents)
        finally:
            for a in agents:
                a.stop()


def exec_events(lines: list[str], marker: str) -> list[dict]:
    out = []
    for line in lines:
        ev = json.loads(line)
        if ev.get("monitor") == "exec" and marker in (ev.get("argv") or []):
            out.append(ev)
    return out


def wait_per_host(ev: Background, marker: str, hosts: list[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while {e["host"] for e in exec_events(list(ev.out), marker)} != set(hosts):
        assert time.monotonic() < deadline, (
            f"{marker}: got {[e['host'] for e in exec_events(list(ev.out), marker)]}, "
            f"stderr {ev.err[-10:]}")
        time.sleep(0.1)


def test_controller_drives_agents_in_namespaces(
        fleet: tuple[FleetNet, list[NetAgent], Path], tmp_path: Path) -> None:
    net, agents, inv = fleet
    ctl = net.controller.prefix
    base = ("-i", str(inv))
    print(f"fleet test network: {net.mode}")

    # A program with a name of our own: the comm target keeps everyone else's execs out.
    comm = f"mk{os.getpid() % 100000}"
    marker_bin = tmp_path / comm
    shutil.copy("/bin/echo", marker_bin)

    r = agentctl(*base, *START_TIMEOUT, "start", "exec", "--lease", "600", prefix=ctl)
    assert r.returncode == 0, r.stdout + r.stderr
    r = agentctl(*base, "targets", "set", "comms", comm, "-o", "json", prefix=ctl)
    assert r.returncode == 0, r.stderr
    assert {n: h["result"]["comms"] for n, h in json.loads(r.stdout)["hosts"].items()} == {
        n: [comm] for n in NAMES}

    ev = Background(*base, "events", "-o", "json", "--monitor", "exec", prefix=ctl)
    try:
        for n in NAMES:
            ev.wait_line(ev.err, lambda s, n=n: s == f"ebpf-agentctl: {n}: streaming")

        def run_marker(marker: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run([str(marker_bin), marker], capture_output=True, check=True)

        # 1. The same exec, once per host, tagged with each host.
        m1 = f"marker-1-{time.time_ns()}"
        proc = run_marker(m1)
        wait_per_host(ev, m1, NAMES)
        time.sleep(0.5)  # a duplicate would arrive by now
        events = exec_events(list(ev.out), m1)
        assert sorted(e["host"] for e in events) == NAMES
        for e in events:
            assert e["argv"] == [str(marker_bin), m1] and e["comm"] == comm
            assert e["uid"] == os.getuid() and e["ppid"] == os.getpid() and e["ret"] == 0
        assert proc.stdout == f"{m1}\n".encode()
        r = agentctl(*base, "stats", "exec", "-o", "json", prefix=ctl)
        assert r.returncode == 0, r.stderr
        for n, h in json.loads(r.stdout)["hosts"].items():
            exec_stats = h["result"]["exec"]
            assert exec_stats["state"] == "running" and exec_stats["events_delivered"] >= 1, n

        # 2. One agent killed: the others keep streaming; status reports it down.
        agents[1].kill()
        ev.wait_line(ev.err, lambda s: s.startswith("ebpf-agentctl: h2: down"))
        m2 = f"marker-2-{time.time_ns()}"
        run_marker(m2)
        wait_per_host(ev, m2, ["h1", "h3"])
        r = agentctl(*base, "status", "--timeout", "5", prefix=ctl)
        assert r.returncode == 1
        assert r.stderr.startswith("ebpf-agentctl: h2: unreachable")
        rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
        assert " DOWN " in rows["h2"] and " up " in rows["h1"] and " up " in rows["h3"]
        assert "exec:running" in rows["h1"] and "exec:running" in rows["h3"]

        # 3. The agent restarted (its monitors start afresh): events resumes it.
        agents[1].start()
        wait_ready(net, [agents[1]])
        ev.wait_line(ev.err, lambda s: s.startswith("ebpf-agentctl: h2: back, resuming"))
        sel = ("--select", "name=h2")
        assert agentctl(*base, *sel, *START_TIMEOUT, "start", "exec", prefix=ctl).returncode == 0
        assert agentctl(*base, *sel, "targets", "set", "comms", comm, prefix=ctl).returncode == 0
        m3 = f"marker-3-{time.time_ns()}"
        run_marker(m3)
        wait_per_host(ev, m3, NAMES)
        assert agentctl(*base, "status", prefix=ctl).returncode == 0
    finally:
        code = ev.stop()
    assert code == 0, ev.err
    for m in (m1, m2, m3):  # never twice from one host
        hosts = [e["host"] for e in exec_events(ev.out, m)]
        assert len(hosts) == len(set(hosts)), (m, hosts)
    r = agentctl(*base, "stop", "exec", prefix=ctl)
    assert r.returncode == 0
