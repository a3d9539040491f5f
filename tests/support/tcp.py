"""Drive tests/support/tcp_peer.py: a TCP server and clients as processes of their own
(own pids and comms, optionally in a network namespace), for the net monitor's tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PEER = Path(__file__).resolve().parent / "tcp_peer.py"
SERVER_COMM, CLIENT_COMM = "net_srv", "net_cli"


@dataclass
class Server:
    proc: subprocess.Popen
    port: int

    def received(self) -> list[int]:
        out, _ = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, out
        return [int(x) for x in out.split()]


@contextlib.contextmanager
def server(host: str, connections: int, reply: int, netns: str | None = None,
           reset: bool = False) -> Iterator[Server]:
    cmd = [*ns_prefix(netns), sys.executable, str(PEER), "server", SERVER_COMM, host,
           str(connections), str(reply), *(["reset"] if reset else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield Server(proc, int(proc.stdout.readline()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@dataclass
class Client:
    pid: int
    sport: int | None  # None: refused
    received: int | str


def start_client(host: str, port: int, send: int, netns: str | None = None,
                 wait: bool = False) -> Client:
    """Run a client to its end; its pid, local port and what it received. With `wait`
    the client never ends its side: it waits for the peer to close (or reset) first."""
    proc = subprocess.Popen(
        [*ns_prefix(netns), sys.executable, str(PEER), "client", CLIENT_COMM, host,
         str(port), str(send), *(["wait"] if wait else [])],
        stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    lines = out.split()
    if lines == ["refused"]:
        return Client(proc.pid, None, "refused")
    return Client(proc.pid, int(lines[0]), lines[1] if lines[1] == "reset" else int(lines[1]))


def ns_prefix(netns: str | None) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
