"""End-to-end stream throughput: kernel -> agent -> SSE / WebSocket clients.

Starts `ebpf-agent serve`, a generator that produces more events than the pipeline can
take (the syscall monitor with slow_threshold_us=0 on a getppid() loop, or the exec
monitor on a fork+exec loop), targets the generator's pids so background activity on
the host is filtered out in the kernel, and prints per scenario:

  produced  = events the kernel programs offered to the ring buffer (submitted + dropped)
  delivered = events each client received
  drops     = dropped in the kernel + dropped in userspace queues + this client's drops
              (in-band `dropped` messages), and checks produced == delivered + drops.

No assertions: it prints figures. Usage: .venv/bin/python bench/stream.py [--duration 8]
[--clients 50] [--source auto|syscall|exec]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support: the helpers tests use too

from tests.support.api import free_port  # noqa: E402
from tests.support.kernel import compile_c  # noqa: E402

AGENT = REPO / ".venv" / "bin" / "ebpf-agent"

# Both generators wait for a byte on stdin (so their pids can be targeted first), then
# run for argv[1] seconds. Strings live on the stack: a fresh child may not have the
# file-backed .rodata page mapped, and BPF cannot fault it in to read exec arguments.
SOURCES = {
    "syscall": r"""
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char c; if (read(0, &c, 1) != 1) return 1;
    struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
    double secs = atof(argv[1]);
    for (;;) {
        for (int i = 0; i < 4096; i++) syscall(SYS_getppid);
        clock_gettime(CLOCK_MONOTONIC, &t);  /* vDSO: not a system call */
        if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > secs) return 0;
    }
}
""",
    "exec": r"""
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char c; if (read(0, &c, 1) != 1) return 1;
    char path[] = "/bin/true", arg[] = "bench-stream";
    struct timespec t0, t; clock_gettime(CLOCK_MONOTONIC, &t0);
    double secs = atof(argv[1]);
    for (;;) {
        pid_t pid = fork();
        if (pid == 0) { execl(path, path, arg, (char *)0); _exit(127); }
        waitpid(pid, 0, 0);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > secs) return 0;
    }
}
""",
}
MONITOR_OPTIONS = {"syscall": {"slow_threshold_us": 0, "histogram": False}, "exec": {}}


# -- clients (in a child process, asyncio) --------------------------------------------------
@dataclass
class ClientResult:
    received: int = 0
    missed: int = 0
    first: float = 0.0
    last: float = 0.0

    def rate(self) -> float:
        span = self.last - self.first
        return self.received / span if span > 0 else 0.0


def _count_sse(buf: bytes, r: ClientResult) -> bytes:
    frames = buf.split(b"\n\n")
    for f in frames[:-1]:
        if f.startswith(b"id:"):
            r.received += 1
        elif f.startswith(b"event: dropped"):
            r.missed += json.loads(f.split(b"data: ", 1)[1])["missed"]
    return frames[-1]


async def sse_client(url: str, r: ClientResult, progress: Any) -> None:
    async with httpx.AsyncClient(timeout=None) as c, c.stream("GET", url) as resp:
        buf = b""
        async for chunk in resp.aiter_bytes():
            now = time.monotonic()
            before = r.received
            buf = _count_sse(buf + chunk, r)
            if r.received != before:
                r.first = r.first or now
                r.last = now
            progress.value = r.received + r.missed


async def ws_client(url: str, r: ClientResult, progress: Any) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, max_size=None, max_queue=None) as ws:
        async for msg in ws:
            now = time.monotonic()
            if msg.startswith('{"event":"dropped"'):
                r.missed += json.loads(msg)["missed"]
            else:
                r.received += 1
                r.first = r.first or now
                r.last = now
            progress.value = r.received + r.missed


def client_process(kind: str, url: str, n: int, stop: Any, connected: Any,
                   progress: list[Any], out: Any) -> None:
    async def main() -> list[ClientResult]:
        results = [ClientResult() for _ in range(n)]
        run = sse_client if kind == "sse" else ws_client
        tasks = [asyncio.create_task(run(url, results[i], progress[i])) for i in range(n)]
        await asyncio.sleep(1.0)  # all connected (checked through /stats by the parent)
        connected.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return results

    out.put([r.__dict__ for r in asyncio.run(main())])


# -- the agent --------------------------------------------------------------------------
def start_agent(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "agent.yaml"
    config.write_text(json.dumps({
        # Loopback only: measured without authentication (explicit since the secure
        # default generates a token).
        "api": {"port": port, "auth": "none", "runtime_dir": str(workdir / "run")},
        "output": {"directory": str(workdir / "out"), "formats": []},
        "stream": {"replay_buffer": 65536, "max_subscribers": 256},
        "logging": {"level": "WARNING"},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    log = open(workdir / "agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(AGENT), "--config", str(config), "serve"], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"the agent did not start:\n{(workdir / 'agent.log').read_text()}")


def pick_source(url: str, wanted: str) -> str:
    monitors = {m["name"]: m for m in httpx.get(f"{url}/monitors").json()}
    if wanted != "auto":
        return wanted
    syscall = monitors.get("syscall")
    ok = syscall is not None and syscall["state"] != "unsupported"
    return "syscall" if ok else "exec"


def compile_generator(workdir: Path, source: str) -> Path:
    text = SOURCES[source].replace("#include <unistd.h>",
                                   "#include <unistd.h>\n#include <stdlib.h>")
    return compile_c(workdir, f"{source}_storm", text, "-O2")


# -- one scenario -----------------------------------------------------------------------
def run_scenario(url: str, source: str, binary: Path, kind: str, n_clients: int,
                 duration: float, generators: int) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    stop, connected, out = ctx.Event(), ctx.Event(), ctx.Queue()
    progress = [ctx.Value("q", 0, lock=False) for _ in range(n_clients)]
    gens = [subprocess.Popen([str(binary), str(duration)], stdin=subprocess.PIPE)
            for _ in range(generators)]
    stream_url = f"{url}/events?monitor={source}"
    if kind == "ws":
        stream_url = url.replace("http", "ws") + f"/events/ws?monitor={source}"
    client = ctx.Process(target=client_process,
                         args=(kind, stream_url, n_clients, stop, connected, progress, out))
    before = httpx.get(f"{url}/stats", timeout=60).json()["streams"]
    try:
        httpx.put(f"{url}/targets/pids", json=[g.pid for g in gens]).raise_for_status()
        client.start()
        connected.wait(30)
        r = httpx.post(f"{url}/monitors/{source}/start", json=MONITOR_OPTIONS[source],
                       timeout=120)
        r.raise_for_status()
        t0 = time.monotonic()
        for g in gens:
            g.stdin.write(b"g")  # type: ignore[union-attr]
            g.stdin.close()  # type: ignore[union-attr]
        for g in gens:
            g.wait()
        gen_time = time.monotonic() - t0
        _wait_drained(progress)
        mon = httpx.get(f"{url}/monitors/{source}/stats", timeout=60).json()
        streams = httpx.get(f"{url}/stats", timeout=60).json()["streams"]
        stop.set()
        results = [ClientResult(**d) for d in out.get(timeout=60)]
        client.join(30)
    finally:
        stop.set()
        for g in gens:
            if g.poll() is None:
                g.kill()
        httpx.post(f"{url}/monitors/{source}/stop", timeout=60)
        httpx.put(f"{url}/targets/pids", json=[])
    return {"kind": kind, "clients": n_clients, "gen_time": gen_time, "monitor": mon,
            "streams": streams, "before": before, "results": results}


def _wait_drained(progress: list[Any], quiet_s: float = 1.5, limit_s: float = 60) -> None:
    """Until no client received anything for quiet_s."""
    last, since, deadline = -1, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        total = sum(p.value for p in progress)
        if total != last:
            last, since = total, time.monotonic()
        elif time.monotonic() - since > quiet_s:
            return
        time.sleep(0.1)


# -- report -----------------------------------------------------------------------------
def report(source: str, s: dict[str, Any]) -> None:
    mon, results = s["monitor"], s["results"]
    k = mon.get("kernel", {})
    produced = k.get("submitted", 0) + k.get("dropped", 0)
    dk, du = mon.get("events_dropped_kernel", 0), mon.get("events_dropped_userspace", 0)
    parse = k.get("parse_errors", 0)
    title = f"{source} -> {s['kind'].upper()} x{s['clients']}"
    print(f"\n== {title} (generator ran {s['gen_time']:.1f}s)")
    print(f"  kernel: seen {k.get('seen', 0)}  produced (submitted+dropped) {produced}  "
          f"dropped in kernel {dk}  delivered to userspace {mon.get('events_delivered')}  "
          f"dropped in userspace queues {du}  parse errors {parse}")
    balanced = 0
    for r in results:
        if produced == r.received + dk + du + parse + r.missed:
            balanced += 1
    rates = sorted(r.rate() for r in results)
    total = sum(r.received for r in results)
    first = min((r.first for r in results if r.first), default=0.0)
    last = max((r.last for r in results), default=0.0)
    agg = total / (last - first) if last > first else 0.0
    r0 = results[0]
    print(f"  client 1: delivered {r0.received}  subscriber dropped {r0.missed}  "
          f"rate {r0.rate():,.0f} ev/s")
    if len(results) > 1:
        print(f"  {len(results)} clients: delivered total {total}  aggregate {agg:,.0f} ev/s  "
              f"per client min/median/max {rates[0]:,.0f}/{rates[len(rates) // 2]:,.0f}/"
              f"{rates[-1]:,.0f} ev/s  dropped total {sum(r.missed for r in results)}")
    print(f"  accounting produced == delivered + kernel + userspace + parse + subscriber "
          f"drops: {balanced}/{len(results)} clients balanced"
          + ("" if balanced == len(results) else "  <-- MISMATCH"))
    if balanced != len(results):
        bad = [r for r in results
               if produced != r.received + dk + du + parse + r.missed][:3]
        for r in bad:
            print(f"    e.g. {produced} != {r.received} + {dk} + {du} + {parse} + {r.missed}")
    now, before, kind = s["streams"], s["before"], s["kind"]

    def delta(key: str) -> int:
        return int(now["totals"][f"{kind}_{key}"] - before["totals"][f"{kind}_{key}"])

    print(f"  hub: published {now['published'] - before['published']}  server-side "
          f"subscribers: delivered {delta('delivered')} dropped {delta('dropped')}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per scenario")
    p.add_argument("--clients", type=int, default=50, help="clients in the fan-out scenario")
    p.add_argument("--source", choices=["auto", "syscall", "exec"], default="auto")
    p.add_argument("--generators", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = p.parse_args()
    if os.geteuid() != 0 or shutil.which("gcc") is None:
        print("bench/stream.py needs root and gcc", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    agent, url = start_agent(workdir)
    try:
        source = pick_source(url, args.source)
        binary = compile_generator(workdir, source)
        print(f"source: {source} monitor {MONITOR_OPTIONS[source]}, {args.generators} "
              f"generator process(es), {args.duration:.0f}s per scenario, "
              f"{os.cpu_count()} CPUs")
        for kind, n in (("sse", 1), ("ws", 1), ("sse", args.clients)):
            report(source, run_scenario(url, source, binary, kind, n, args.duration,
                                        args.generators))
    finally:
        agent.terminate()
        code = agent.wait(30)
        print(f"\nagent exit code after SIGTERM: {code}")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
