"""ebpf-agentctl against many agents on this machine.

Starts N `ebpf-agent serve` processes on 127.0.0.1 (one port each, a token, no monitor
running at start), writes an inventory, and prints:

  status   wall time of `ebpf-agentctl status` over all N (per --parallel value)
  start    wall time of `ebpf-agentctl start exec` on all N (each agent compiles and loads
           the exec programs with BCC: on a 2-core VM that is the agents' cost, not the
           controller's), and of `targets set comms` on all N
  events   the merged rate `ebpf-agentctl events` sustains: an exec storm of K processes
           with a comm of ours (targeted on every agent) gives N events per exec, and the
           controller prints them as JSON lines to a pipe this script counts; produced is
           the sum of the agents' delivered exec events (from `stats -o json`)

No assertions: it prints figures. Usage (root, repository root):
  .venv/bin/python bench/fleet.py [--agents 50] [--storm 2000] [--parallel 8,32,64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
AGENT = REPO / ".venv" / "bin" / "ebpf-agent"
CTL = REPO / ".venv" / "bin" / "ebpf-agentctl"
TOKEN = "bench-fleet-token-0123456789"
COMM = "fleetnoop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_env() -> dict[str, str]:
    from agent.config import ApiSettings

    key = "EBPF_AGENT_API__TOKEN" if "token" in ApiSettings.model_fields else "EBPF_AGENT_TOKEN"
    return {key: TOKEN}


def launch(d: Path, env: dict[str, str], used: set[int]) -> tuple[int, subprocess.Popen]:
    port = free_port()
    while port in used:  # the kernel may hand out a port again before its agent binds it
        port = free_port()
    used.add(port)
    cfg = {"api": {"host": "127.0.0.1", "port": port}, "stream": {"heartbeat_s": 5},
           "output": {"directory": str(d / "out"), "formats": []},
           "logging": {"level": "WARNING"}}
    (d / "agent.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "agent.log", "ab") as log:
        proc = subprocess.Popen([str(AGENT), "--config", str(d / "agent.yaml"), "serve"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=d)
    return port, proc


def start_agents(n: int, work: Path) -> list[tuple[str, str, subprocess.Popen]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT")}
    env.update(token_env())
    used: set[int] = set()
    started = []
    for i in range(n):
        d = work / f"a{i:03d}"
        d.mkdir()
        started.append((f"a{i:03d}", d, *launch(d, env, used)))
    agents: list[tuple[str, str, subprocess.Popen]] = []
    try:
        wait_ready(started, agents, env, used)
    except BaseException:
        for *_, proc in started + agents:  # never leave agents behind
            proc.terminate()
        raise
    return agents


def wait_ready(started: list[tuple[str, Path, int, subprocess.Popen]],
               agents: list[tuple[str, str, subprocess.Popen]], env: dict[str, str],
               used: set[int]) -> None:
    deadline = time.monotonic() + 600
    with httpx.Client(timeout=2, trust_env=False) as c:
        for i, (name, d, port, proc) in enumerate(started):
            while True:
                if proc.poll() is not None:
                    log = (d / "agent.log").read_text()
                    if "Address already in use" not in log or time.monotonic() > deadline:
                        raise SystemExit(f"{name} exited: {log}")
                    port, proc = launch(d, env, used)  # someone else took the port: again
                    started[i] = (name, d, port, proc)
                try:
                    if c.get(f"http://127.0.0.1:{port}/ready",
                             headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} not ready")
                time.sleep(0.2)
            agents.append((name, f"http://127.0.0.1:{port}", proc))


def ctl(inv: Path, *args: str, timeout: float = 1800) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    r = subprocess.run([str(CTL), "-i", str(inv), *args], capture_output=True, text=True,
                       timeout=timeout)
    return time.monotonic() - t0, r


def ok_hosts(r: subprocess.CompletedProcess) -> str:
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        return f"exit {r.returncode}"
    ok = sum(1 for h in doc["hosts"].values() if h["ok"])
    return f"{ok}/{len(doc['hosts'])} ok, exit {r.returncode}"


def delivered(inv: Path) -> int:
    """Exec events the agents delivered so far, summed."""
    _, r = ctl(inv, "stats", "exec", "-o", "json")
    return sum(h["result"]["exec"].get("events_delivered", 0)
               for h in json.loads(r.stdout)["hosts"].values() if h["ok"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def build_storm(work: Path) -> Path:
    storm = work / "storm"
    subprocess.run(["gcc", "-O2", "-o", str(storm), str(REPO / "bench" / "storm.c")],
                   check=True)
    return storm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--storm", type=int, default=2000, help="execs in the storm")
    ap.add_argument("--parallel", default="8,32,64")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
          f"{os.uname().release}, {os.cpu_count()} CPUs, {args.agents} agents")
    t0 = time.monotonic()
    agents = start_agents(args.agents, work)
    print(f"agents up in {time.monotonic() - t0:.1f} s (each a full `ebpf-agent serve`)")
    inv = work / "inventory.yaml"
    inv.write_text(yaml.safe_dump({"defaults": {"token": TOKEN},
                                   "hosts": [{"name": n, "url": u} for n, u, _ in agents]}))
    events_proc = None
    try:
        for p in args.parallel.split(","):
            times = []
            for _ in range(args.repeat):
                dt, r = ctl(inv, "--parallel", p, "status", "-o", "json")
                times.append(dt)
            print(f"status   --parallel {p:>3}: median {statistics.median(times):.2f} s "
                  f"(runs {', '.join(f'{t:.2f}' for t in times)}; {ok_hosts(r)})")

        dt, r = ctl(inv, "--parallel", "8", "--timeout", "600", "start", "exec", "-o", "json")
        print(f"start exec --parallel 8: {dt:.1f} s ({ok_hosts(r)}; BCC compiles per agent)")
        dt, r = ctl(inv, "targets", "set", "comms", COMM, "-o", "json")
        print(f"targets set comms: {dt:.2f} s ({ok_hosts(r)})")

        noop = work / COMM
        shutil.copy("/bin/true", noop)
        storm = build_storm(work)
        events_proc = subprocess.Popen(
            [str(CTL), "-i", str(inv), "events", "-o", "json", "--monitor", "exec",
             "--no-renew"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        streaming = threading.Event()
        counts = {"lines": 0, "first": 0.0, "last": 0.0, "streams": 0}

        def read_err() -> None:
            assert events_proc is not None and events_proc.stderr is not None
            for line in events_proc.stderr:
                if line.rstrip().endswith(b": streaming"):
                    counts["streams"] += 1
                    if counts["streams"] == args.agents:
                        streaming.set()

        def read_out() -> None:
            assert events_proc is not None and events_proc.stdout is not None
            for _ in events_proc.stdout:
                now = time.monotonic()
                if not counts["lines"]:
                    counts["first"] = now
                counts["lines"] += 1
                counts["last"] = now

        threading.Thread(target=read_err, daemon=True).start()
        threading.Thread(target=read_out, daemon=True).start()
        if not streaming.wait(120):
            print(f"only {counts['streams']} streams connected")
        before = delivered(inv)
        cpu0 = cpu_seconds(events_proc.pid)
        out = subprocess.run([str(storm), str(noop), str(args.storm), "2"], capture_output=True,
                             text=True, check=True)
        expected = args.storm * args.agents
        quiet_since = time.monotonic()
        seen = counts["lines"]
        while counts["lines"] < expected and time.monotonic() - quiet_since < 10:
            time.sleep(0.2)
            if counts["lines"] != seen:
                seen, quiet_since = counts["lines"], time.monotonic()
        cpu = cpu_seconds(events_proc.pid) - cpu0
        produced = delivered(inv) - before
        span = max(counts["last"] - counts["first"], 1e-9)
        print(f"storm: {out.stdout.strip()}")
        print(f"events: received {counts['lines']} of {expected} expected "
              f"({args.storm} execs x {args.agents} agents); the agents delivered {produced} "
              f"meanwhile; merged rate {counts['lines'] / span:,.0f} events/s over "
              f"{span:.1f} s; controller CPU {cpu:.1f} s = "
              f"{1e6 * cpu / max(counts['lines'], 1):.0f} us/event "
              f"(~{counts['lines'] / max(cpu, 1e-9):,.0f} events per CPU-second)")
        ctl(inv, "stop", "exec")
    finally:
        if events_proc is not None:
            events_proc.send_signal(signal.SIGINT)
            try:
                events_proc.wait(20)
            except subprocess.TimeoutExpired:
                events_proc.kill()
        for _, _, proc in agents:
            proc.terminate()
        for _, _, proc in agents:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
