"""Logging never blocks the agent (agent/logsetup.py): a bounded queue written by one
thread; lines that do not fit are dropped, counted, and reported when writing resumes.
Unit tests with a handler that blocks, and a real `ebpf-agent serve` whose stderr is a
pipe nobody reads."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx

from agent.logsetup import LogPump
from tests.support.api import AGENT_BIN, free_port, write_config


class BlockingHandler(logging.Handler):
    """Writes into ``lines``, but the first write waits until ``unblock`` is set (an
    output nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.unblock = threading.Event()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entered.set()
        self.unblock.wait(60)
        self.lines.append(record.getMessage())


def test_a_blocked_output_drops_and_counts_lines_and_reports_them_when_it_resumes() -> None:
    handler = BlockingHandler()
    pump = LogPump(handler, capacity=100)
    pump.start()
    logger = logging.Logger("pump-test")  # not attached to the root logger
    logger.addHandler(pump.front)
    logger.warning("line 0")
    assert handler.entered.wait(30)  # the writer holds line 0, blocked
    for n in range(1, 1001):
        logger.warning("line %d", n)  # returns at once: 100 queued, 900 dropped
    assert pump.dropped == 900
    handler.unblock.set()
    pump.stop(timeout=30)
    assert handler.lines[0] == "line 0"
    assert handler.lines[1] == ("900 log lines were dropped: the log output did not take "
                                "them (blocked or too slow); 900 dropped since start")
    assert handler.lines[2:] == [f"line {n}" for n in range(1, 101)]


def test_the_queue_keeps_order_and_loses_nothing_when_the_output_keeps_up() -> None:
    handler = BlockingHandler()
    handler.unblock.set()
    pump = LogPump(handler, capacity=10_000)
    pump.start()
    logger = logging.Logger("pump-test-2")
    logger.addHandler(pump.front)
    for n in range(5000):
        logger.info("n=%d", n)
    pump.stop(timeout=30)
    assert pump.dropped == 0
    assert handler.lines == [f"n={n}" for n in range(5000)]


def test_serve_with_stderr_nobody_reads_keeps_answering(tmp_path: Path) -> None:
    """The access log of 6,000 requests is ~600 kB: far more than a pipe (64 kB) and the
    queue (4,096 lines) hold. Logged synchronously, the agent stopped answering after
    ~600 requests. SIGTERM still ends it (no flush waits on the pipe)."""
    port = free_port()
    config = write_config(tmp_path, {"api": {"auth": "none"},
                                     "monitors": {"exec": {"enabled": False}}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    proc = subprocess.Popen([str(AGENT_BIN), "--config", str(config), "serve", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=tmp_path)
    assert proc.stderr is not None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "not ready"
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            for n in range(6000):
                r = client.get("/health")
                assert r.status_code == 200, (n, r.text)
            metrics = client.get("/metrics").text
            dropped = float(re.search(r"^ebpf_agent_log_lines_dropped_total (\S+)$", metrics,
                                      re.M).group(1))  # type: ignore[union-attr]
            assert dropped > 0
            # Reading the pipe lets the writer resume: it reports what it dropped.
            seen: list[str] = []
            reader = threading.Thread(target=lambda: seen.extend(
                line.decode(errors="replace") for line in proc.stderr), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while not any("log lines were dropped" in line for line in seen):
                assert time.monotonic() < deadline, seen[-5:]
                client.get("/health")
                time.sleep(0.1)
            notice = next(line for line in seen if "log lines were dropped" in line)
            count = int(re.search(r"(\d+) log lines were dropped", notice).group(1))  # type: ignore[union-attr]
            assert count >= dropped  # (more may have been dropped after /metrics)
        proc.terminate()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
