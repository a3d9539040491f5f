"""A full disk: failed writes are counted, logged once per burst, and the file resumes at
a line boundary once space returns. Files are private to the agent (or one group)."""

from __future__ import annotations

import errno
import grp
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.output import writer as writer_mod
from agent.output.writer import OutputWriter
from tests.support.monitors import RowMonitor


def event(i: int, tag: str) -> dict:
    return {"pid": i, "argv": [tag, "x" * 80]}


def wait_done(w: OutputWriter, offered: int) -> None:
    deadline = time.monotonic() + 20
    while w.written + w.write_failed < offered:
        assert time.monotonic() < deadline, (w.written, w.write_failed, offered)
        time.sleep(0.02)


def lines_of(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.splitlines()]  # a fragment would not parse


def failure_logs(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    records = [r.getMessage() for r in caplog.records if r.name == writer_mod.__name__]
    return (sum("write failed" in m for m in records),
            sum("works again" in m for m in records))


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs this test mounts and removes."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_filesystem(tiny_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=writer_mod.__name__)
    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * 32 * 1024)  # freed later: the space that "returns"
    out = tiny_fs / "out"
    w = OutputWriter("m", ["jsonl"], out, RowMonitor(), flush_interval_s=0.01)
    try:
        for i in range(1000):  # ~100 KB into ~28 KB of room
            w.offer(event(i, "before"))
        wait_done(w, 1000)
        assert w.write_failed > 0 and w.written > 0
        assert w.written + w.write_failed == 1000 and w.dropped == w.write_failed
        assert failure_logs(caplog) == (1, 0)  # one line for the burst, not one per event
        kept = lines_of(out / "m.jsonl")
        assert len(kept) < 1000

        filler.unlink()
        failed = w.write_failed
        for i in range(100):
            w.offer(event(i, "after"))
        wait_done(w, 1100)
        assert w.write_failed == failed
    finally:
        w.close()
    assert failure_logs(caplog) == (1, 1)
    events = lines_of(out / "m.jsonl")  # every line whole: the file resumed at a boundary
    assert [e["argv"][0] for e in events].count("after") == 100
    assert events[: len(kept)] == kept


class FailingWrites:
    """os.write that writes part of what it is given and then fails with ENOSPC, for
    ``failures`` calls: the partial line a full disk leaves behind."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.real = os.write

    def __call__(self, fd: int, data: bytes) -> int:
        if self.failures <= 0:
            return self.real(fd, data)
        self.failures -= 1
        if self.failures % 2:
            return self.real(fd, bytes(data)[: max(1, len(data) // 3)])
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_partial_writes_are_cut_back_to_a_line_boundary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, fmt: str) -> None:
    caplog.set_level(logging.INFO, logger=writer_mod.__name__)
    fault = FailingWrites(4)  # two flushes write a third of their lines, then fail
    monkeypatch.setattr(writer_mod.os, "write", fault)
    w = OutputWriter("m", [fmt], tmp_path, RowMonitor(), flush_interval_s=0.01)
    try:
        for round_ in range(5):
            for i in range(10):
                w.offer(event(i, f"r{round_}"))
            wait_done(w, 10 * (round_ + 1))
    finally:
        w.close()
    assert fault.failures == 0
    assert 0 < w.write_failed < 50 and w.dropped == w.write_failed
    if fmt == "jsonl":
        kept = len(lines_of(tmp_path / "m.jsonl"))
    else:
        with open(tmp_path / "m.csv", newline="") as f:
            data = f.read()
        rows = data.split("\r\n")
        assert rows[0] == "pid,argv" and rows[-1] == ""  # ends at a line boundary
        assert all(r.count('"') % 2 == 0 for r in rows)  # no cut quoted cell
        kept = len(rows) - 2
    assert kept + w.write_failed == 50
    assert failure_logs(caplog) == (1, 1)


@pytest.mark.parametrize("per_round", [10, 300, 1000])
def test_runs_of_encoded_lines_are_cut_back_whole_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_round: int) -> None:
    """A JSONL-only writer given the hub's bytes appends them in runs: a failed write
    keeps whole lines only, and every line is either in the file or counted lost."""
    fault = FailingWrites(4)
    monkeypatch.setattr(writer_mod.os, "write", fault)
    w = OutputWriter("m", ["jsonl"], tmp_path, RowMonitor(), queue_size=1 << 16,
                     flush_interval_s=0.01)
    total = 5 * per_round
    try:
        for round_ in range(5):
            for i in range(per_round):
                n = round_ * per_round + i
                w.offer(event(n, "b"), json.dumps({"n": n, "pad": "x" * 80}).encode())
            wait_done(w, per_round * (round_ + 1))
    finally:
        w.close()
    assert fault.failures == 0
    kept = [e["n"] for e in lines_of(tmp_path / "m.jsonl")]
    assert 0 < w.write_failed < total and w.dropped == w.write_failed
    assert len(kept) + w.write_failed == total
    assert kept == sorted(kept) and kept[-1] == total - 1


def test_files_are_private_and_the_directory_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = os.umask(0)
    try:
        OutputWriter("a", ["jsonl", "csv"], out, RowMonitor()).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("a.jsonl", "a.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    # An existing file that others could read is narrowed when it is opened.
    (out / "b.jsonl").write_text("")
    os.chmod(out / "b.jsonl", 0o644)
    OutputWriter("b", ["jsonl"], out, RowMonitor()).close()
    assert stat.S_IMODE((out / "b.jsonl").stat().st_mode) == 0o600


def test_a_configured_group_reads(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another group needs root")
    gid = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != os.getegid())
    out = tmp_path / "out"
    OutputWriter("a", ["jsonl"], out, RowMonitor(), group=gid).close()
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and out.stat().st_gid == gid
    f = (out / "a.jsonl").stat()
    assert stat.S_IMODE(f.st_mode) == 0o640 and f.st_gid == gid
