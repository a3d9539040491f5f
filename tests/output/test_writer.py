"""Output files stay inside the output directory; queues are bounded and count drops."""

from __future__ import annotations

import csv
import io
import json
import threading
from pathlib import Path

import pytest

from agent.output.writer import OutputPathError, OutputWriter, safe_path
from tests.support.monitors import RowMonitor


@pytest.mark.parametrize("name", ["../x.csv", "/etc/passwd", "a/../../x", ".", ""])
def test_paths_escaping_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(OutputPathError):
        safe_path(tmp_path / "out", name)


def test_symlink_escape_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path)
    with pytest.raises(OutputPathError):
        safe_path(out, "link/x.csv")
    assert safe_path(out, "exec.csv") == (out / "exec.csv").resolve()


class _Blocking(io.StringIO):
    """A console that blocks until released: the writer thread stalls on it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(10)
        return super().write(s)


def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    console = _Blocking()
    w = OutputWriter("t", ["console"], tmp_path, RowMonitor(), queue_size=16, console=console)
    for i in range(100):
        w.offer({"pid": i, "argv": []})
    # One event may be in the writer's hands; the queue holds 16; the rest are dropped.
    assert w.dropped in (100 - 16, 100 - 17)
    console.release.set()
    w.close()
    assert console.getvalue().count("pid=") == 100 - w.dropped


def test_files_written_and_flushed_on_close(tmp_path: Path) -> None:
    w = OutputWriter("m", ["csv", "jsonl"], tmp_path, RowMonitor())
    for i in range(3):
        w.offer({"pid": i, "argv": ["a,b", 'q"', "n\nl"]})
    w.close()
    with open(tmp_path / "m.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["pid", "argv"]
    assert [json.loads(r[1]) for r in rows[1:]] == [["a,b", 'q"', "n\nl"]] * 3
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert [json.loads(x)["pid"] for x in lines] == [0, 1, 2]


def test_jsonl_writes_the_bytes_it_is_given_in_order(tmp_path: Path) -> None:
    """With the hub's encoded bytes, a JSONL-only writer queues and writes just those
    (no second encoding); events without bytes are encoded; order is kept."""
    w = OutputWriter("j", ["jsonl"], tmp_path, RowMonitor())
    w.offer({"pid": 0, "argv": []}, b'{"pid":0,"from":"hub"}')
    w.offer({"pid": 1, "argv": []})
    for i in range(2, 5000):
        w.offer({"pid": i, "argv": []}, b'{"pid":%d}' % i)
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    assert lines[0] == {"pid": 0, "from": "hub"}
    assert [x["pid"] for x in lines] == list(range(5000))
    assert w.dropped == 0


class _SnapshotMonitor(RowMonitor):
    SNAPSHOT_FIELDS = ("name", "count")


def test_snapshots_survive_a_full_event_queue(tmp_path: Path) -> None:
    """Under a flood the event queue is full; the periodic totals still get written (their
    own small queue), and only snapshots beyond SNAPSHOT_BACKLOG are dropped, counted."""
    from agent.output.writer import SNAPSHOT_BACKLOG

    console = _Blocking()
    w = OutputWriter("s", ["console", "csv"], tmp_path, _SnapshotMonitor(), queue_size=8,
                     console=console)
    for i in range(100):
        w.offer({"pid": i, "argv": []})
    assert w.queue_dropped > 0
    for n in range(SNAPSHOT_BACKLOG + 2):  # the writer is stuck: two are pushed out
        w.offer_snapshot([{"name": "getppid", "count": n}])
    console.release.set()
    w.close()
    with open(tmp_path / "s-snapshot.csv", newline="") as f:
        counts = [int(r["count"]) for r in csv.DictReader(f)]
    assert counts == list(range(2, SNAPSHOT_BACKLOG + 2))
    assert w.snapshot_rows_dropped == 2
