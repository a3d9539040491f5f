"""A bounded queue and a writer thread per monitor, so slow disks or terminals never
stall the thread that drains the kernel buffer; what does not fit is dropped and counted.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import functools
import io
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from agent.config import OutputSettings, group_id
from agent.model.events import Event, encode_event

log = logging.getLogger(__name__)

FORMATS = ("console", "csv", "jsonl")
DRAIN_INTERVAL_S = 0.05
SNAPSHOT_BACKLOG = 4  # snapshots waiting for the writer at most (see offer_snapshot)
FLUSH_BYTES = 1 << 20  # a file's buffer is written out at least at this size
# Encoded events joined into one append (JSONL-only writers): a failed write loses at
# most the lines of the run it cut through, each counted.
LINES_PER_APPEND = 256
# Event files hold every process's argv: owner only, or owner and one group.
FILE_MODE, GROUP_FILE_MODE = 0o600, 0o640
DIR_MODE, GROUP_DIR_MODE = 0o700, 0o750


class OutputPathError(ValueError):
    """A path that would leave the configured output directory."""


def safe_path(directory: Path, relative: str) -> Path:
    """``directory/relative``, refusing anything that resolves outside ``directory``."""
    base = directory.resolve()
    candidate = (base / relative).resolve()
    if candidate == base or base not in candidate.parents:
        raise OutputPathError(f"{relative!r} escapes the output directory {base}")
    return candidate


def check_output(name: str, formats: Sequence[str], directory: Path) -> None:
    """What OutputWriter would refuse, checked without creating anything: OutputPathError
    (a file that escapes the directory, e.g. a symlink out of it), NotADirectoryError."""
    files = [f"{name}.{fmt}" for fmt in formats if fmt != "console"]
    if not files:
        return
    for parent in (directory, *directory.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "" if parent == directory else f": {parent}"
                raise NotADirectoryError(f"output directory {directory}{where} is not a "
                                         "directory")
            break
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}")
    for relative in (*files, f"{name}-snapshot.csv"):
        safe_path(directory, relative)


class WriteFailed(Exception):
    """A flush that could not write everything: ``lost`` events did not reach the file."""

    def __init__(self, error: OSError, lost: int) -> None:
        super().__init__(str(error))
        self.error, self.lost = error, lost


class _Format:
    """One output. write() buffers, flush() delivers; flush() raises WriteFailed (or, for
    the console, the stream's own exception) when events did not make it."""

    pending = 0  # events written since the last flush

    def write(self, event: Event, data: bytes | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class ConsoleFormat(_Format):
    def __init__(self, line: Callable[[Event], str], stream: IO[str] | None = None) -> None:
        self._line, self._stream = line, stream or sys.stdout

    def write(self, event: Event, data: bytes | None = None) -> None:
        self._stream.write(self._line(event) + "\n")

    def flush(self) -> None:
        self._stream.flush()


class _FileFormat(_Format):
    """Whole lines appended to a file, never a fragment.

    Lines collect in memory and go out with write(2) at each flush. When a write fails
    (a full disk: ENOSPC, EDQUOT; EIO), the file is truncated back to the end of the
    last line that was written completely: once space returns, the file continues at a
    line boundary. The file is created with ``mode`` (and group ``gid``), which is also
    applied to a file that exists: event files hold every process's argv."""

    def __init__(self, path: Path, mode: int = FILE_MODE, gid: int | None = None) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self._fd = os.open(path, flags, mode)
        try:
            if gid is not None:
                os.fchown(self._fd, -1, gid)
            os.fchmod(self._fd, mode)
            self._size = os.fstat(self._fd).st_size  # the end of the last complete line
        except BaseException:
            os.close(self._fd)
            raise
        self._buf = bytearray()
        # (end offset in _buf, events up to there) after each line: where a failed
        # write may be cut back to, and how many events that keeps.
        self._ends: list[tuple[int, int]] = []
        self.pending = 0

    @property
    def empty(self) -> bool:
        return self._size == 0 and not self._buf

    def append(self, data: bytes, events: int = 1) -> None:
        self._buf += data
        self.pending += events
        self._ends.append((len(self._buf), self.pending))

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def flush(self) -> None:
        data, ends, pending = self._buf, self._ends, self.pending
        self._buf, self._ends, self.pending = bytearray(), [], 0
        if not data:
            return
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, memoryview(data)[done:])
        except OSError as e:
            i = bisect.bisect_right(ends, (done, pending + 1)) - 1
            keep, kept = ends[i] if i >= 0 else (0, 0)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size + keep)  # cut a partly written line
            self._size += keep
            raise WriteFailed(e, pending - kept) from e
        self._size += len(data)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self._fd)


class CsvFormat(_FileFormat):
    """RFC 4180 CSV (csv.QUOTE_MINIMAL with \\r\\n line ends); bytes that are not UTF-8
    are written back as the original bytes (surrogateescape)."""

    def __init__(self, path: Path, header: Sequence[str], row: Callable[[Event], list],
                 mode: int = FILE_MODE, gid: int | None = None) -> None:
        super().__init__(path, mode, gid)
        self._text = io.StringIO()
        self._csv = csv.writer(self._text)
        self._row = row
        self._header = list(header)

    def _line(self, row: Sequence[Any]) -> bytes:
        self._text.seek(0)
        self._text.truncate()
        self._csv.writerow(row)
        return self._text.getvalue().encode("utf-8", "surrogateescape")

    def write(self, event: Event, data: bytes | None = None) -> None:
        if self.empty:  # a new (or emptied) file starts with the header
            self.append(self._line(self._header), events=0)
        self.append(self._line(self._row(event)))


class JsonlFormat(_FileFormat):
    def write(self, event: Event, data: bytes | None = None) -> None:
        # ``data``: the bytes the stream hub encoded (encoded once per event).
        self.append((encode_event(event) if data is None else data) + b"\n")


def _pick(fields: Sequence[str], row: dict[str, Any]) -> list[Any]:
    return [row.get(f) for f in fields]


class SnapshotRows(list):  # type: ignore[type-arg]
    """One periodic snapshot: the aggregate tables as rows (its own small queue)."""


def make_directory(directory: Path, mode: int = DIR_MODE, gid: int | None = None) -> None:
    """Create the output directory with ``mode`` (umask aside). An existing directory is
    left as the operator made it."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True, mode=mode)
    if gid is not None:
        os.chown(directory, -1, gid)
    os.chmod(directory, mode)


class OutputWriter:
    """Writes one monitor's events in the chosen formats from its own thread.

    Lost events are counted in ``dropped``: those a full queue refused (poller thread),
    snapshot rows a full queue refused (control thread) and those a failed write lost
    (writer thread), each in its own counter so that no two threads add to one."""

    def __init__(
        self,
        name: str,
        formats: Sequence[str],
        directory: Path,
        monitor: Any,
        queue_size: int = 65536,
        flush_interval_s: float = 1.0,
        console: IO[str] | None = None,
        group: int | None = None,
    ) -> None:
        self.name = name
        self.queue_dropped = 0
        self.snapshot_rows_dropped = 0
        self.write_failed = 0
        self.written = 0  # events every format took (files: written to the file)
        self._unflushed = 0
        self._failing: str | None = None  # the error of the current burst of failures
        self._failed_in_burst = 0
        # Filled by the monitor's poller thread (and snapshots by the control thread);
        # drained by the writer on a timer: waking a thread per event costs more than
        # writing the event.
        self._pending: deque[Any] = deque()
        self._capacity = queue_size
        # Snapshots have a queue of their own: under a flood the event queue is full, and
        # the periodic totals are then what matters most. At most SNAPSHOT_BACKLOG wait
        # (a writer that far behind is stuck); an older one pushed out is counted.
        self._pending_snapshots: deque[SnapshotRows] = deque()
        self._snapshots_lock = threading.Lock()  # control thread vs writer thread
        self._stopping = threading.Event()
        self._flush_interval = flush_interval_s
        self._formats: list[_Format] = []
        self._snapshots: CsvFormat | None = None
        mode = FILE_MODE if group is None else GROUP_FILE_MODE
        try:
            if any(f != "console" for f in formats):
                make_directory(directory, DIR_MODE if group is None else GROUP_DIR_MODE, group)
            for fmt in dict.fromkeys(formats):
                if fmt == "console":
                    self._formats.append(ConsoleFormat(monitor.console_line, console))
                elif fmt == "csv":
                    path = safe_path(directory, f"{name}.csv")
                    self._formats.append(
                        CsvFormat(path, monitor.CSV_FIELDS, monitor.csv_row, mode, group))
                    fields = getattr(monitor, "SNAPSHOT_FIELDS", ())
                    if fields:
                        self._snapshots = CsvFormat(
                            safe_path(directory, f"{name}-snapshot.csv"), fields,
                            functools.partial(_pick, fields), mode, group,
                        )
                elif fmt == "jsonl":
                    self._formats.append(
                        JsonlFormat(safe_path(directory, f"{name}.jsonl"), mode, group))
                else:
                    raise ValueError(f"unknown output format {fmt!r}")
        except BaseException:
            for f in self._all_formats():
                with contextlib.suppress(OSError):
                    f.close()
            raise
        self._bytes_only = all(isinstance(f, JsonlFormat) for f in self._formats)
        self._thread = threading.Thread(target=self._run, name=f"output-{name}", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Every event (and snapshot row) that did not reach the output."""
        return self.queue_dropped + self.snapshot_rows_dropped + self.write_failed

    def offer(self, event: Event, data: bytes | None = None) -> None:
        """A consumer of the pipeline (agent/core/pipeline.py), on the monitor's poller
        thread. Never blocks: a full queue drops the event and counts it. Checking the
        length before appending bounds the queue (to one more item per extra producer).
        ``data``: the event already encoded (encode_event; None in tests of the writer
        alone: encoded here); JSONL-only writers queue just
        those bytes, not the event's dict and the Python objects it holds."""
        if len(self._pending) >= self._capacity:
            self.queue_dropped += 1
        elif data is None:
            self._pending.append(event)
        else:
            self._pending.append(data if self._bytes_only else (event, data))

    @property
    def wants_snapshots(self) -> bool:
        return self._snapshots is not None

    def offer_snapshot(self, rows: list[dict[str, Any]]) -> None:
        """Control thread."""
        with self._snapshots_lock:
            backlog = self._pending_snapshots
            if len(backlog) >= SNAPSHOT_BACKLOG:
                self.snapshot_rows_dropped += len(backlog.popleft())
            backlog.append(SnapshotRows(rows))

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
            try:
                f.close()  # flushed just before: nothing left to lose
            except OSError as e:
                self._report(e)

    def _drain(self) -> None:
        with self._snapshots_lock:
            snapshots = list(self._pending_snapshots)
            self._pending_snapshots.clear()
        for rows in snapshots:
            self._write_snapshot(rows)
        # At most what was queued when the pass began: under a flood the poller refills
        # the queue as fast as this empties it, and an endless pass would never return
        # to the flush below it (snapshot rows and files unwritten until the flood ends).
        pending = self._pending
        # One JSONL file and the hub's bytes (the flood's case): lines are appended in
        # runs of up to LINES_PER_APPEND, one join each, not one _write per event.
        only = self._formats[0] if len(self._formats) == 1 else None
        jsonl = only if isinstance(only, JsonlFormat) else None
        lines: list[bytes] = []
        for _ in range(len(pending)):
            item = pending.popleft()
            if type(item) is bytes:
                if jsonl is not None:
                    lines.append(item)
                    if len(lines) >= LINES_PER_APPEND:
                        self._write_lines(jsonl, lines)
                        lines = []
                else:
                    self._write({}, item)
                continue
            if lines:
                self._write_lines(jsonl, lines)  # type: ignore[arg-type]
                lines = []
            if type(item) is tuple:
                self._write(*item)
            else:
                self._write(item)
        if lines:
            self._write_lines(jsonl, lines)  # type: ignore[arg-type]

    def _write_lines(self, f: _FileFormat, lines: list[bytes]) -> None:
        """Encoded events as one append: a write that fails cuts the file back to the
        end of the last whole run (_FileFormat.flush), the lines
        of the run it cut counted as lost."""
        f.append(b"\n".join(lines) + b"\n", len(lines))
        self._unflushed += len(lines)
        if f.buffered_bytes >= FLUSH_BYTES:
            self._flush_events()

    def _write(self, event: Event, data: bytes | None = None) -> None:
        lost = False
        for f in self._formats:
            try:
                f.write(event, data)
            except Exception as e:  # a console that failed; an event that cannot encode
                lost = True
                self._report(e)
        self.write_failed += lost
        self._failed_in_burst += lost
        self._unflushed += not lost
        if any(isinstance(f, _FileFormat) and f.buffered_bytes >= FLUSH_BYTES
               for f in self._formats):
            self._flush_events()

    def _write_snapshot(self, rows: SnapshotRows) -> None:
        assert self._snapshots is not None
        for row in rows:
            self._snapshots.write(row)

    def _all_formats(self) -> list[_Format]:
        return self._formats + ([self._snapshots] if self._snapshots else [])

    def _flush(self) -> None:
        self._flush_events()
        if self._snapshots is not None:
            self.snapshot_rows_dropped += self._flush_one(self._snapshots)

    def _flush_events(self) -> None:
        # An event lost by two files (csv and jsonl on one full disk) is one event.
        lost = min(max((self._flush_one(f) for f in self._formats), default=0),
                   self._unflushed)
        self.write_failed += lost
        self.written += self._unflushed - lost
        self._unflushed = 0

    def _flush_one(self, f: _Format) -> int:
        """Flushes ``f``; returns how many of its events were lost."""
        pending = f.pending
        try:
            f.flush()
        except WriteFailed as e:
            self._failed_in_burst += e.lost
            self._report(e)
            return e.lost
        except Exception as e:  # the console's stream
            self._report(e)
            return pending
        if pending and self._failing is not None:
            log.warning("output %s: writing works again; %d events were lost meanwhile",
                        self.name, self._failed_in_burst)
            self._failing, self._failed_in_burst = None, 0
        return 0

    def _report(self, error: BaseException) -> None:
        """Once per burst of failures (a full disk fails every write until space
        returns), not once per event."""
        if self._failing is None:
            self._failing = str(error)
            log.error("output %s: write failed (%s); events are dropped and counted in "
                      "events_dropped_userspace until writes succeed again", self.name, error)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, flush and close the files."""
        self._stopping.set()
        self._thread.join(timeout)


class WriterFactory:
    """Each started monitor's output, as the manager asks for it: check() before a
    running monitor is touched (what would be refused), open() once it is to start."""

    def __init__(self, output: OutputSettings, formats: Sequence[str] | None = None) -> None:
        """``formats``: instead of the configured ones (the CLI's --format)."""
        self.output = output
        self.formats = tuple(output.formats if formats is None else formats)
        # Resolved once, at start-up: an unknown group is a configuration error.
        self.group = None if output.group is None else group_id(output.group)

    def check(self, name: str) -> None:
        """OutputPathError (422) or OSError for paths that would fail; creates nothing."""
        check_output(name, self.formats, self.output.directory)

    def open(self, name: str, monitor: Any) -> OutputWriter | None:
        """The monitor's writer; None when no format is chosen. Raises OSError."""
        if not self.formats:
            return None
        o = self.output
        return OutputWriter(name, self.formats, o.directory, monitor, o.queue_size,
                            o.flush_interval_s, group=self.group)
