"""A bounded queue and a writer thread per monitor, so slow disks or terminals never
stall the thread that drains the kernel buffer; what does not fit is dropped and counted.
"""

from __future__ import annotations

import csv
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from agent.model.events import Event, encode_event

log = logging.getLogger(__name__)

FORMATS = ("console", "csv", "jsonl")
DRAIN_INTERVAL_S = 0.05


class OutputPathError(ValueError):
    """A path that would leave the configured output directory."""


def safe_path(directory: Path, relative: str) -> Path:
    """``directory/relative``, refusing anything that resolves outside ``directory``."""
    base = directory.resolve()
    candidate = (base / relative).resolve()
    if candidate == base or base not in candidate.parents:
        raise OutputPathError(f"{relative!r} escapes the output directory {base}")
    return candidate


class _Format:
    def write(self, event: Event) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class ConsoleFormat(_Format):
    def __init__(self, line: Callable[[Event], str], stream: IO[str] | None = None) -> None:
        self._line, self._stream = line, stream or sys.stdout

    def write(self, event: Event) -> None:
        self._stream.write(self._line(event) + "\n")

    def flush(self) -> None:
        self._stream.flush()


class CsvFormat(_Format):
    """RFC 4180 CSV (csv.QUOTE_MINIMAL with \\r\\n line ends); bytes that are not UTF-8
    are written back as the original bytes (surrogateescape)."""

    def __init__(self, path: Path, header: Sequence[str], row: Callable[[Event], list]) -> None:
        new = not path.exists() or path.stat().st_size == 0
        self._file = open(path, "a", newline="", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
        self._csv = csv.writer(self._file)
        self._row = row
        if new:
            self._csv.writerow(header)

    def write(self, event: Event) -> None:
        self._csv.writerow(self._row(event))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class JsonlFormat(_Format):
    def __init__(self, path: Path) -> None:
        self._file = open(path, "ab")  # noqa: SIM115

    def write(self, event: Event) -> None:
        self._file.write(encode_event(event) + b"\n")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _pick(fields: Sequence[str], row: dict[str, Any]) -> list[Any]:
    return [row.get(f) for f in fields]


class SnapshotRows(list):  # type: ignore[type-arg]
    """A batch of snapshot rows travelling through the queue next to events."""


class OutputWriter:
    """Writes one monitor's events in the chosen formats from its own thread."""

    def __init__(
        self,
        name: str,
        formats: Sequence[str],
        directory: Path,
        monitor: Any,
        queue_size: int = 65536,
        flush_interval_s: float = 1.0,
        console: IO[str] | None = None,
    ) -> None:
        self.name = name
        self.dropped = 0
        self.written = 0
        # Filled by the monitor's poller thread only; drained by the writer on a timer:
        # waking a thread per event costs more than writing the event.
        self._pending: deque[Any] = deque()
        self._capacity = queue_size
        self._stopping = threading.Event()
        self._flush_interval = flush_interval_s
        self._formats: list[_Format] = []
        self._snapshots: CsvFormat | None = None
        if any(f != "console" for f in formats):
            directory.mkdir(parents=True, exist_ok=True)
        for fmt in dict.fromkeys(formats):
            if fmt == "console":
                self._formats.append(ConsoleFormat(monitor.console_line, console))
            elif fmt == "csv":
                path = safe_path(directory, f"{name}.csv")
                self._formats.append(CsvFormat(path, monitor.CSV_FIELDS, monitor.csv_row))
                fields = getattr(monitor, "SNAPSHOT_FIELDS", ())
                if fields:
                    self._snapshots = CsvFormat(
                        safe_path(directory, f"{name}-snapshot.csv"), fields,
                        functools.partial(_pick, fields),
                    )
            elif fmt == "jsonl":
                self._formats.append(JsonlFormat(safe_path(directory, f"{name}.jsonl")))
            else:
                raise ValueError(f"unknown output format {fmt!r}")
        self._thread = threading.Thread(target=self._run, name=f"output-{name}", daemon=True)
        self._thread.start()

    def offer(self, event: Event) -> None:
        """Never blocks: a full queue drops the event and counts it. One producer (the
        poller thread), so checking the length before appending bounds the queue."""
        if len(self._pending) >= self._capacity:
            self.dropped += 1
        else:
            self._pending.append(event)

    @property
    def wants_snapshots(self) -> bool:
        return self._snapshots is not None

    def offer_snapshot(self, rows: list[dict[str, Any]]) -> None:
        if len(self._pending) >= self._capacity:
            self.dropped += len(rows)
        else:
            self._pending.append(SnapshotRows(rows))

    def _run(self) -> None:
        last_flush = time.monotonic()
        while not self._stopping.wait(DRAIN_INTERVAL_S):
            self._drain()
            now = time.monotonic()
            if now - last_flush >= self._flush_interval:
                self._flush()
                last_flush = now
        self._drain()
        self._flush()
        for f in self._all_formats():
            f.close()

    def _drain(self) -> None:
        pending = self._pending
        while pending:
            item = pending.popleft()
            if isinstance(item, SnapshotRows):
                self._write_snapshot(item)
            else:
                self._write(item)

    def _write(self, event: Event) -> None:
        for f in self._formats:
            try:
                f.write(event)
            except Exception:
                log.exception("output %s: write failed", self.name)
        self.written += 1

    def _write_snapshot(self, rows: SnapshotRows) -> None:
        assert self._snapshots is not None
        for row in rows:
            self._snapshots.write(row)

    def _all_formats(self) -> list[_Format]:
        return self._formats + ([self._snapshots] if self._snapshots else [])

    def _flush(self) -> None:
        for f in self._all_formats():
            try:
                f.flush()
            except Exception:
                log.exception("output %s: flush failed", self.name)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, flush and close the files."""
        self._stopping.set()
        self._thread.join(timeout)
