"""Logging that never blocks the agent: records go into a bounded queue that one thread
writes out.

A write to stderr blocks when nobody reads the pipe (or the terminal is paused), and a
write to a file blocks on a slow disk. Logged synchronously, that stalls whoever logs:
the event loop (every access-log line), the control thread, the pollers; and the others
then wait on the handler's lock. Here a log call only formats the message and puts it
into the queue (``put_nowait``); when the queue is full the line is dropped and counted.
The writer thread says how many lines were dropped as soon as it writes again, and
``dropped`` is exported as ``ebpf_agent_log_lines_dropped_total``.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import queue
import sys
import threading
from collections.abc import Callable
from pathlib import Path

QUEUE_LINES = 4096  # records waiting to be written; more are dropped and counted
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger(__name__)


class _Front(logging.handlers.QueueHandler):
    """The handler every logger reaches: formats the record in the caller's thread
    (QueueHandler.prepare) and queues it without waiting."""

    def __init__(self, pump: LogPump) -> None:
        super().__init__(pump.queue)
        self.pump = pump

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.pump.count_drop()


class FdHandler(logging.Handler):
    """Writes each line with os.write on a file descriptor (stderr): no Python buffer
    and no handler lock stays held while a write blocks, so neither the exit's flush of
    sys.stderr nor logging.shutdown() waits behind a writer stuck on a full pipe. Only
    the pump's thread calls it. A failed write (EPIPE: the reader went away) counts as a
    dropped line instead of printing a traceback to that same stderr."""

    def __init__(self, fd: int, on_error: Callable[[], None]) -> None:
        super().__init__()
        self.fd = fd
        self.on_error = on_error

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if self.filter(record):
            self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self.fd, data):]
        except Exception:
            self.on_error()


class LogPump:
    """A bounded queue in front of ``handler``, drained by one thread."""

    def __init__(self, handler: logging.Handler, capacity: int = QUEUE_LINES) -> None:
        self.handler = handler
        self.capacity = capacity
        self.queue: queue.Queue[logging.LogRecord | None] = queue.Queue(capacity)
        self.front = _Front(self)
        self.dropped = 0  # lines not queued since start
        self._reported = 0  # of those, how many the log already mentions
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def count_drop(self) -> None:
        with self._lock:
            self.dropped += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Writes what is queued (for at most ``timeout`` s: a blocked output must not
        hold up the exit)."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        if self._thread is not None:
            self._thread.join(timeout)

    def after_fork_in_child(self) -> None:
        """Threads do not survive fork (serve --daemon): a new queue and writer. The old
        queue's lock may have been held by the writer at the fork."""
        self.queue = queue.Queue(self.capacity)
        self.front.queue = self.queue
        self._lock = threading.Lock()
        self.start()

    def _drain(self) -> None:
        while (record := self.queue.get()) is not None:
            missed = self.dropped - self._reported
            if missed:
                self._reported += missed
                self.handler.handle(self._notice(missed))
            self.handler.handle(record)

    def _notice(self, missed: int) -> logging.LogRecord:
        return log.makeRecord(
            log.name, logging.WARNING, __file__, 0,
            "%d log lines were dropped: the log output did not take them (blocked or too "
            "slow); %d dropped since start", (missed, self.dropped), None)


_pump: LogPump | None = None


def configure(level: str, filename: Path | None = None) -> LogPump:
    """The agent's logging: ``filename`` or stderr, behind a LogPump. Raises OSError when
    the file cannot be opened."""
    global _pump
    handler: logging.Handler
    if filename is not None:
        handler = logging.FileHandler(filename)
    else:
        handler = FdHandler(sys.stderr.fileno(), lambda: pump.count_drop())
    handler.setFormatter(logging.Formatter(FORMAT))
    pump = LogPump(handler)
    root = logging.getLogger()
    root.addHandler(pump.front)
    root.setLevel(level)
    pump.start()
    if _pump is None:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        atexit.register(_at_exit)
    _pump = pump
    return pump


def _after_fork_in_child() -> None:
    if _pump is not None:
        _pump.after_fork_in_child()


def _at_exit() -> None:
    if _pump is not None:
        _pump.stop()


def dropped_lines() -> int:
    """Log lines dropped since start (0 when configure() was not called: tests)."""
    return _pump.dropped if _pump is not None else 0
