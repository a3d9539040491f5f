"""The HTTP layer under normal and hostile clients (no monitor running, no kernel needed).

Starts `ebpf-agent serve` (scoped tokens, file-descriptor limit 1024 as systemd's default
would give it) and prints:

  bearer check the gate's token check in-process (us per request, 10 tokens configured)
  requests/s   sequential keep-alive GETs of /targets: open (api.auth: none) agent, then a
               bearer token, a read token, a session cookie (what the gate costs)
  upload RSS   the agent's RSS before and after N unauthenticated 200 MB POST bodies
  slow sockets /health latency (median, max of 20) with 1,100 sockets that never finish
               their headers, and how many of them the agent had closed after
               api.header_timeout_s

No assertions. Usage: .venv/bin/python bench/api_limits.py [--seconds 3] [--uploads 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / ".venv" / "bin" / "ebpf-agent"
ADMIN, VIEWER = "bench-admin-token-0123", "bench-viewer-token-0123"
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(workdir: Path, api: dict, tokens: list | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / f"agent-{port}.yaml"
    body: dict = {"api": {"port": port, "runtime_dir": str(workdir / "run"), **api},
                  "output": {"directory": str(workdir / "out"), "formats": []},
                  "logging": {"level": "WARNING"}, "monitors": {}}
    if tokens:
        body["tokens"] = tokens
    config.write_text(json.dumps(body))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    log = open(workdir / f"agent-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["prlimit", "--nofile=1024:1024", "--", str(AGENT), "--config",
                             str(config), "serve"], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        time.sleep(0.2)
    proc.kill()
    sys.exit("the agent did not start")


def rate(url: str, seconds: float, headers: dict | None = None,
         cookies: dict | None = None) -> float:
    with httpx.Client(base_url=url, headers=headers, cookies=cookies) as c:
        n, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            assert c.get("/targets").status_code == 200
            n += 1
        return n / (time.monotonic() - t0)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def agent_pid(proc: subprocess.Popen) -> int:
    """prlimit execs the agent: same pid."""
    return proc.pid


def upload(url: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    head = (b"POST /targets/pids HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
            % (200 * MB))
    chunk = b"1" * MB
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        with contextlib.suppress(OSError):
            for _ in range(200):
                s.sendall(chunk)
        with contextlib.suppress(OSError):
            s.recv(4096)


def slow_sockets(url: str, count: int) -> tuple[list[float], int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, count + 300)), hard))
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    latencies = []
    for _ in range(20):
        t0 = time.monotonic()
        httpx.get(f"{url}/health", timeout=30)
        latencies.append(time.monotonic() - t0)
    closed = 0
    for s in socks:
        s.settimeout(30)
        try:
            data = s.recv(4096)
            closed += data == b"" or data.startswith(b"HTTP/1.1 408")
        except OSError:  # reset: closed too
            closed += 1
        s.close()
    return latencies, closed


def verify_cost(n: int = 100_000) -> float:
    """Microseconds per bearer check (SHA-256, then a constant-time compare with every
    configured token), in-process: the gate's own cost, free of HTTP and machine noise."""
    sys.path.insert(0, str(REPO))
    from agent.api.access.principal import TokenStore
    from agent.config import Settings

    store = TokenStore.from_settings(Settings(tokens=[
        {"name": f"t{i}", "scope": "read", "token": f"token-{i:04d}-xxxxxxxxxxxx"}
        for i in range(10)]))
    t0 = time.perf_counter()
    for _ in range(n):
        store.verify("token-0009-xxxxxxxxxxxx")
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--uploads", type=int, default=3)
    args = parser.parse_args()
    tokens = [{"name": "admin", "scope": "control", "token": ADMIN},
              {"name": "viewer", "scope": "read", "token": VIEWER}]
    print(f"bearer check with 10 tokens configured: {verify_cost():.2f} us")
    with tempfile.TemporaryDirectory(prefix="bench-api-") as d:
        work = Path(d)
        proc, url = start(work, {"auth": "none"}, None)
        try:
            print(f"requests/s  open (api.auth: none)   {rate(url, args.seconds):8.0f}")
        finally:
            proc.terminate()
            proc.wait(30)
        proc, url = start(work, {"header_timeout_s": 5}, tokens)
        try:
            bearer = {"Authorization": f"Bearer {ADMIN}"}
            print(f"requests/s  control bearer token     {rate(url, args.seconds, bearer):8.0f}")
            read = {"Authorization": f"Bearer {VIEWER}"}
            print(f"requests/s  read bearer token        {rate(url, args.seconds, read):8.0f}")
            sid = httpx.post(f"{url}/auth/session", json={"token": VIEWER}).cookies[
                "ebpf_agent_session"]
            print(f"requests/s  session cookie           "
                  f"{rate(url, args.seconds, cookies={'ebpf_agent_session': sid}):8.0f}")
            before = rss(agent_pid(proc))
            t0 = time.monotonic()
            for _ in range(args.uploads):
                upload(url)
            after = rss(agent_pid(proc))
            print(f"upload RSS  {args.uploads} x 200 MB unauthenticated: {before / MB:.0f} MB"
                  f" -> {after / MB:.0f} MB ({time.monotonic() - t0:.1f} s)")
            latencies, closed = slow_sockets(url, 1100)
            print(f"slow sockets 1100 open: /health median {statistics.median(latencies) * 1e3:.1f}"
                  f" ms, max {max(latencies) * 1e3:.1f} ms; closed by the agent {closed}/1100")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
