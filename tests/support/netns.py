"""Several hosts on one machine for the fleet tests: network namespaces joined by veth
pairs into a bridge, every address in a private test subnet (10.231.N.0/24) that exists
only inside namespaces this fixture creates and removes; the root namespace gets no
address, route or link, so no packet can leave the machine. Where namespaces cannot be
made, hosts fall back to loopback addresses (127.0.0.2, 127.0.0.3, ...) in the root
namespace, and the fixture says so."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.api import AGENT_BIN
from tests.support.fleet import token_env

PORT = 8765


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class NetHost:
    name: str
    address: str
    netns: str | None  # None: root namespace (loopback fallback)

    @property
    def prefix(self) -> tuple[str, ...]:
        # nsenter --net, not `ip netns exec`: the latter also makes a mount namespace with
        # a fresh /sys, where tracefs is not mounted and the agent could not attach.
        return ("nsenter", f"--net=/run/netns/{self.netns}") if self.netns else ()

    @property
    def url(self) -> str:
        return f"http://{self.address}:{PORT}"


@dataclass
class FleetNet:
    controller: NetHost
    hosts: list[NetHost]
    mode: str  # "netns" or "loopback"
    namespaces: list[str] = field(default_factory=list)


def _make_netns(names: list[str]) -> FleetNet:
    tag = f"e10{os.getpid() % 10000:04d}{random.randrange(100):02d}"  # unique per run
    subnet = f"10.231.{random.randrange(1, 255)}"
    bridge_ns = f"{tag}-br"
    net = FleetNet(NetHost("ctl", f"{subnet}.2", f"{tag}-ctl"), [], "netns")
    try:
        _ip("netns", "add", bridge_ns)
        net.namespaces.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        members = [net.controller] + [NetHost(n, f"{subnet}.{10 + i}", f"{tag}-{n}")
                                      for i, n in enumerate(names)]
        for i, h in enumerate(members):
            assert h.netns is not None
            _ip("netns", "add", h.netns)
            net.namespaces.append(h.netns)
            outer, inner = f"{tag}b{i}", f"{tag}h{i}"  # at most 15 characters
            # Both ends are created inside the bridge namespace, then one is moved:
            # the root namespace never holds either.
            _ip("-n", bridge_ns, "link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("-n", bridge_ns, "link", "set", inner, "netns", h.netns)
            _ip("-n", bridge_ns, "link", "set", outer, "master", "br0", "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
            _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", inner)
            _ip("-n", h.netns, "link", "set", inner, "up")
        net.hosts = members[1:]
        return net
    except BaseException:
        remove_namespaces(net)
        raise


def remove_namespaces(net: FleetNet) -> None:
    for ns in reversed(net.namespaces):
        with contextlib.suppress(Exception):
            _ip("netns", "del", ns)
    net.namespaces.clear()


@contextlib.contextmanager
def fleet_network(names: list[str]) -> Iterator[FleetNet]:
    try:
        if os.environ.get("FLEET_TEST_LOOPBACK"):  # exercise the fallback on purpose
            raise OSError("FLEET_TEST_LOOPBACK is set")
        net = _make_netns(names)
    except (subprocess.CalledProcessError, FileNotFoundError, OSError) as e:
        detail = e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) \
            and e.stderr else str(e)
        print(f"\nfleet test: network namespaces unavailable ({detail}); falling back to "
              "loopback addresses 127.0.0.2... in the root namespace", file=sys.stderr)
        net = FleetNet(NetHost("ctl", "127.0.0.1", None),
                      [NetHost(n, f"127.0.0.{2 + i}", None) for i, n in enumerate(names)],
                      "loopback")
    try:
        yield net
    finally:
        remove_namespaces(net)


# -- real agents in those namespaces ----------------------------------------------------------
@dataclass
class NetAgent:
    host: NetHost
    token: str
    workdir: Path
    proc: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "agent.log"

    def start(self) -> NetAgent:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "api": {"host": self.host.address, "port": PORT},
            "stream": {"heartbeat_s": 0.5},
            "output": {"directory": str(self.workdir / "out"), "formats": []},
        }
        path = self.workdir / "agent.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT")}
        env.update(token_env(self.token))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*self.host.prefix, str(AGENT_BIN), "--config", str(path), "serve"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(15)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def inventory(tmp_path: Path, agents: list[NetAgent]) -> Path:
    (tmp_path / "fleet-token").write_text(agents[0].token)
    doc: dict[str, Any] = {
        "defaults": {"token_file": str(tmp_path / "fleet-token"), "labels": {"env": "test"}},
        "hosts": [{"name": a.host.name, "url": a.host.url} for a in agents],
    }
    path = tmp_path / "inventory.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def wait_ready(net: FleetNet, agents: list[NetAgent], timeout: float = 90) -> None:
    """Each agent's /ready, asked from the controller's namespace."""
    deadline = time.monotonic() + timeout
    for a in agents:
        script = ("import httpx,sys;r=httpx.get(sys.argv[1]+'/ready',headers={'Authorization':"
                  "'Bearer '+sys.argv[2]},timeout=2,trust_env=False);sys.exit(r.status_code!=200)")
        while True:
            assert a.proc is not None
            if a.proc.poll() is not None:
                raise AssertionError(f"{a.host.name} exited:\n{a.log_text()}")
            try:
                r = subprocess.run([*net.controller.prefix, sys.executable, "-c", script,
                                    a.host.url, a.token], capture_output=True, timeout=30)
            except subprocess.TimeoutExpired:  # a slow probe on a loaded machine: retry
                r = None
            if r is not None and r.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{a.host.name} not ready:\n{a.log_text()}")
            time.sleep(0.2)


