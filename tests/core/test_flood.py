"""Stop and SIGTERM of a real `ebpf-agent serve` under a steady event flood.

libbpf's ring_buffer__poll/consume (and BCC's perf reader) keep consuming while records
arrive; the old manager waited 5 s for a poller that never returned, then freed the BPF
object under it: SIGSEGV. The rate and the CSV snapshots stopped too, as they ran on the
poller. Here a getppid(2) loop is the target of the syscall monitor with
slow_threshold_us=0: one event per call, far more than the agent can consume.
"""

from __future__ import annotations

import csv
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.api import Agent, start_agent, wait_tracker
from tests.support.kernel import REPO, compile_c, loaded_prog_ids, prog_ids_held_by

# How long the flood may take to build up: a fixed sleep (4 s) could end before it did
# on a loaded machine. The tests wait for the state, not for a time.
FLOOD_TIMEOUT_S = 60.0
T = TypeVar("T")


@pytest.fixture
def busy_loop(tmp_path: Path, kernel: None) -> Iterator[subprocess.Popen]:
    binary = compile_c(tmp_path, "getppid_loop", (REPO / "bench" / "getppid_loop.c").read_text())
    proc = subprocess.Popen([str(binary), str(10**12)])
    yield proc
    proc.kill()
    proc.wait()


def flood_agent(tmp_path: Path, loop: subprocess.Popen, transport: str) -> Agent:
    return start_agent(tmp_path, {
        "monitors": {},
        "transport": {"kind": transport},
        "targets": {"pids": [loop.pid]},
        "output": {"formats": ["csv"], "snapshot_interval_s": 1.0, "queue_size": 4096},
    })


def wait_for(probe: Callable[[], T], done: Callable[[T], bool]) -> T:
    """Until ``done(probe())``; fails with the last value after FLOOD_TIMEOUT_S."""
    deadline = time.monotonic() + FLOOD_TIMEOUT_S
    while not done(value := probe()):
        assert time.monotonic() < deadline, value
        time.sleep(0.2)
    return value


def flooded(stats: dict) -> bool:
    # The rate is computed on the control thread: it no longer reads 0.0 under load.
    return stats["events_delivered"] > 10_000 and stats["events_per_second"] > 1000


def start_flood(a: Agent) -> dict:
    """Starts the flood; returns once it is on (over 10,000 events delivered and a
    measured rate above 1,000/s)."""
    r = a.request("POST", "/monitors/syscall/start", json={"slow_threshold_us": 0})
    assert r.status_code == 200, r.text
    return wait_for(lambda: a.get("/monitors/syscall/stats").json(), flooded)


def snapshot_times(out: Path) -> set[str]:
    path = out / "syscall-snapshot.csv"
    if not path.exists():  # before the writer's first flush
        return set()
    with open(path, newline="") as f:
        return {row["timestamp"] for row in csv.DictReader(f) if row["name"] == "getppid"}


def wait_unloaded(held: set[int]) -> set[int]:
    deadline = time.monotonic() + 5  # programs are freed asynchronously (RCU)
    while held & loaded_prog_ids() and time.monotonic() < deadline:
        time.sleep(0.2)
    return held & loaded_prog_ids()


@pytest.mark.parametrize("transport", ["ringbuf", "perf"])
def test_stop_and_sigterm_under_a_flood(tmp_path: Path, busy_loop: subprocess.Popen,
                                        transport: str) -> None:
    a = flood_agent(tmp_path, busy_loop, transport)
    try:
        wait_tracker(a)  # the process table's programs, loaded on their own thread
        baseline = prog_ids_held_by(a.proc.pid)
        start_flood(a)
        # Periodic snapshots keep coming under load (at least 2 while flooded).
        wait_for(lambda: snapshot_times(tmp_path / "out"), lambda times: len(times) >= 2)

        t0 = time.monotonic()
        r = a.request("POST", "/monitors/syscall/stop")
        took = time.monotonic() - t0
        assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
        assert a.proc.poll() is None, f"agent died ({a.proc.returncode}):\n{a.log_text()}"
        assert prog_ids_held_by(a.proc.pid) == baseline
        assert took < 5, f"stop took {took:.1f}s"  # measured ~0.1 s; generous when loaded

        # Again, ended by SIGTERM while flooded: exit 0, every program released.
        start_flood(a)
        held = prog_ids_held_by(a.proc.pid)
        code, took = a.sigterm(30)
    finally:
        a.stop()
    log = a.log_text()
    assert code == 0, log[-3000:]
    assert not wait_unloaded(held)
    assert "did not return" not in log and "Traceback" not in log, log[-3000:]
    assert took < 10, f"SIGTERM took {took:.1f}s"
