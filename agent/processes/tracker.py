"""ProcessTracker: the agent's own BPF program (tracker.c) and the thread that applies
its records to the ProcessTable.

Not a monitor: it has no targets, no lease and no output; the agent starts it with
itself (``processes.enabled``). One thread, ``proc-tracker``, owns its BPF object from
load to close (the control thread never sees it), seeds the table from /proc once the
programs are attached (so no process falls between the scan and the first record),
then drains the ring buffer. A full ring buffer is a counted drop (``ring_dropped``).

Two kernel facts it works around:
- exit_notify() reparents a dying process's children right *after* the exit
  tracepoint fires, so the children's new parent (the nearest subreaper or init,
  prctl(2) PR_SET_CHILD_SUBREAPER) is read from /proc shortly after (``REPARENT_AFTER_S``),
  and from any later record of the child.
- A cgroup may be created, get its first process and be removed before the agent
  resolves its id. cgroup:cgroup_mkdir keeps every new cgroup v2's path in a bounded BPF
  map, which the shared CgroupResolver asks (``cgroup_path``) before the file handle.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from agent.config import ProcessSettings
from agent.kernel.cgroups import CgroupError, CgroupResolver, normalize
from agent.kernel.identity import ProcessIdentity, stat_start_ticks
from agent.model.events import MonotonicClock, decode_c_string
from agent.model.workload import Workload, workload_of
from agent.monitors.bcc import COMPILE_LOCK, build_bpf
from agent.monitors.ringbuf import RingReader, ringbuf_supported
from agent.processes import procscan
from agent.processes.process import Process, StartClock
from agent.processes.records import (
    COUNTERS,
    FILENAME_SIZE,
    PROC_EXEC,
    PROC_EXIT,
    PROC_F_ARGS_CUT,
    PROC_FORK,
    CgroupPath,
    exit_status,
    split_argv,
)
from agent.processes.table import ProcessTable

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "tracker.c"
REQUIRED_FEATURES = ("root", "bcc", "tracefs", "btf", "kernel_headers")
# struct proc_record up to filename (tracker.h): ts_ns .. comm.
HEAD = struct.Struct("=QQQQIIIIIiII16s")
FILENAME_AT = HEAD.size
ARGS_AT = FILENAME_AT + FILENAME_SIZE
POLL_MS = 100
# The pause between two batches of records (RingReader's linger), at any rate: whoever
# needs the table current asks for it (catch_up: the ancestors stage, the API), and a
# wake-up per few records cost the tracker more than the records themselves
# (bench/RESULTS.md, exec_storm serve).
BATCH_LINGER_S = 0.02
# How long an event's ancestors stage waits at most for the tracker to apply the records
# produced before the event (catch_up).
CATCH_UP_S = 0.1
HOUSEKEEPING_S = 1.0  # counters read, exited entries pruned
REPARENT_AFTER_S = 0.05
REPARENT_TRIES = 4


class ProcessTracker:
    def __init__(self, settings: ProcessSettings, table: ProcessTable,
                 kernel_offsets: dict[str, int], resolver: CgroupResolver,
                 identity: ProcessIdentity) -> None:
        self.settings = settings
        self.table = table
        self.offsets = kernel_offsets
        self.resolver = resolver
        self.identity = identity
        self.start_clock = StartClock.local()
        self.mono = MonotonicClock()
        self.state = "stopped"
        self.error: str | None = None
        self.ready = threading.Event()  # attached and seeded (or failed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bpf: Any = None
        self._cgroup_fd = -1
        self._reader: RingReader | None = None
        self._reparent: deque[tuple[float, int, str, int]] = deque()  # due, tries, id, old ppid
        self.records = {"fork": 0, "exec": 0, "exit": 0}
        self.kernel = dict.fromkeys(COUNTERS, 0)
        self.parse_errors = 0
        self.seeded = 0
        self.reparented = 0
        self._applied = threading.Condition()  # notified after each batch while waited on
        self._waiting = 0
        self.catch_ups = 0  # waits for the tracker (catch_up), and those that timed out
        self.catch_up_timeouts = 0

    # -- life -----------------------------------------------------------------------
    def start(self) -> None:
        self.state = "starting"
        self._thread = threading.Thread(target=self._run, name="proc-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def fail(self, reason: str) -> None:
        """Not started (a missing kernel feature): the table stays empty."""
        self.state, self.error = "unavailable", reason
        self.ready.set()

    def _run(self) -> None:
        try:
            self._load()
            self.seeded = self.table.seed(procscan.scan(
                self.identity, self.start_clock, self.settings.argv_bytes, self._cgroup_of))
            self.state = "running"
            log.info("process tracker running: %d processes from /proc", self.seeded)
        except Exception as e:
            self.state, self.error = "failed", str(e)
            log.error("process tracker did not start: %s", e)
            self._close()
            return
        finally:
            self.ready.set()
        try:
            self._loop()
        except Exception as e:  # the table stops being current: say so
            self.state, self.error = "failed", str(e)
            log.exception("process tracker failed")
        finally:
            self._close()
            if self.state == "running":
                self.state = "stopped"

    def cflags(self) -> list[str]:
        defines = {**self.offsets, "ARGS_AREA": self.settings.argv_bytes,
                   "RINGBUF_PAGES": self.settings.ringbuf_pages,
                   "MAX_CGROUP_PATHS": self.settings.cgroup_paths}
        return [f"-I{SOURCE.parent}", *(f"-D{k}={v}" for k, v in defines.items())]

    def _load(self) -> None:
        self._bpf = build_bpf(SOURCE.read_text(), self.cflags())
        ring = self._bpf[b"records"]
        if ringbuf_supported():
            self._reader = RingReader(ring.map_fd, ring.max_entries, self._on_record,
                                      BATCH_LINGER_S, busy_rate=0)
        else:
            self._reader = None
            ring.open_ring_buffer(lambda _ctx, data, size: self._on_record(
                ctypes.string_at(data, size)))
        # Our own descriptor of the map: the resolver may ask from any thread, and
        # this fd stays valid until _close() has taken the source away.
        self._cgroup_fd = os.dup(self._bpf[b"cgroup_paths"].map_fd)
        self.resolver.sources.append(self.cgroup_path)

    def _close(self) -> None:
        if self.cgroup_path in self.resolver.sources:
            self.resolver.sources.remove(self.cgroup_path)
        if self._cgroup_fd >= 0:
            os.close(self._cgroup_fd)
            self._cgroup_fd = -1
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            with COMPILE_LOCK:
                bpf.cleanup()

    def _loop(self) -> None:
        next_housekeeping = 0.0
        while not self._stop.is_set():
            if self._reader is not None:
                self._reader.poll(POLL_MS)
            else:
                self._bpf.ring_buffer_poll(POLL_MS)
            if self._waiting:
                with self._applied:
                    self._applied.notify_all()
            now = time.monotonic()
            self._check_reparented(now)
            if now >= next_housekeeping:
                next_housekeeping = now + HOUSEKEEPING_S
                self._read_counters()
                self.table.prune()

    # -- any other thread ---------------------------------------------------------------
    def behind(self) -> bool:
        """Records the kernel produced that are not applied yet (any thread)."""
        reader = self._reader
        if reader is None:
            return False
        try:
            consumed, produced = reader.positions()
        except (ValueError, AttributeError):  # closed meanwhile (RingReader.close)
            return False
        return consumed < produced

    def catch_up(self, timeout: float = CATCH_UP_S) -> bool:
        """Waits until every record the kernel produced before this call is applied to
        the table (at most ``timeout``): an event's process may have forked a moment
        before its event, and its records travel through another ring buffer. False
        when it could not (not running, the BCC reader, or the timeout: counted)."""
        reader = self._reader
        if reader is None or threading.current_thread() is self._thread:
            return False
        try:
            consumed, target = reader.positions()
        except (ValueError, AttributeError):  # closed meanwhile (RingReader.close)
            return False
        if consumed >= target:
            return True
        self.catch_ups += 1

        def applied() -> bool:
            try:
                return reader.positions()[0] >= target
            except (ValueError, AttributeError):
                return True  # closed: nothing more will be applied

        with self._applied:
            self._waiting += 1
            try:
                reader.nudge()
                done = self._applied.wait_for(applied, timeout)
            finally:
                self._waiting -= 1
        if not done:
            self.catch_up_timeouts += 1
        return done

    def _read_counters(self) -> None:
        counters = self._bpf[b"counters"]
        for i, name in enumerate(COUNTERS):
            self.kernel[name] = sum(counters[ctypes.c_int(i)])

    # -- records (this thread) ---------------------------------------------------------
    def _on_record(self, raw: bytes) -> int:
        try:
            self._apply(raw)
        except Exception:  # a bad record must not end the tracker; it is counted
            self.parse_errors += 1
            log.exception("process tracker: cannot apply a record")
        return 0

    def _apply(self, raw: bytes) -> None:
        (ts_ns, start_ns, parent_start_ns, cgroup_id, kind, pid, ppid, uid, gid, status,
         flags, args_size, comm) = HEAD.unpack_from(raw)
        ident = self.identity
        process_id = ident.from_ns(pid, start_ns)
        if process_id is None:
            return
        parent_id = ident.from_ns(ppid, parent_start_ns)
        if kind == PROC_EXIT:
            self.records["exit"] += 1
            exit_time, status_fields = self.mono.iso(ts_ns), exit_status(status)
            if self.table.exited_known(process_id, ppid, parent_id, exit_time,
                                       *status_fields) is None:
                self.table.exited(self._process(process_id, pid, start_ns, ppid, parent_id,
                                                uid, gid, comm, cgroup_id),
                                  exit_time, *status_fields)
            children = self.table.children_ids(process_id)
            if children:
                due = time.monotonic() + REPARENT_AFTER_S
                for child in children:
                    self._reparent.append((due, 0, child, pid))
            return
        p = self._process(process_id, pid, start_ns, ppid, parent_id, uid, gid, comm,
                          cgroup_id)
        if kind == PROC_FORK:
            self.records["fork"] += 1
            self.table.forked(p)
        elif kind == PROC_EXEC:
            self.records["exec"] += 1
            p.exe = decode_c_string(raw[FILENAME_AT:ARGS_AT])
            p.argv, p.argv_truncated = split_argv(raw[ARGS_AT:ARGS_AT + args_size],
                                                  bool(flags & PROC_F_ARGS_CUT))
            self.table.execed(p)

    def _process(self, process_id: str, pid: int, start_ns: int, ppid: int,
                 parent_id: str | None, uid: int, gid: int, comm: bytes,
                 cgroup_id: int) -> Process:
        ticks = start_ns // self.identity.ns_per_tick
        return Process(process_id=process_id, pid=pid, start_ticks=ticks, ppid=ppid,
                       parent_process_id=parent_id, uid=uid, gid=gid,
                       comm=decode_c_string(comm), start_time=self.start_clock.iso(ticks),
                       cgroup_id=cgroup_id or None,
                       workload=self.resolver.resolve(cgroup_id) if cgroup_id else None)

    def _check_reparented(self, now: float) -> None:
        """Children of exited processes: their new parent, from /proc (proc(5) stat
        field 4), once the kernel has moved them."""
        while self._reparent and self._reparent[0][0] <= now:
            _, tries, child_id, old_ppid = self._reparent.popleft()
            child = self.table.get(child_id)
            if child is None or not child.alive:
                continue
            raw = procscan.read_file(f"/proc/{child.pid}/stat")
            if not raw:
                continue
            _, ppid, ticks = procscan.stat_fields(raw)
            if ticks != child.start_ticks:
                continue  # gone, and its pid reused
            if ppid == old_ppid and tries < REPARENT_TRIES:  # exit_notify() still to come
                self._reparent.append((now + REPARENT_AFTER_S * 4 ** (tries + 1), tries + 1,
                                       child_id, old_ppid))
                continue
            parent_ticks = stat_start_ticks(ppid) if ppid else None
            parent_id = ident_of(self.identity, ppid, parent_ticks)
            if self.table.reparented(child_id, ppid, parent_id):
                self.reparented += 1

    # -- the cgroup source (any thread) ------------------------------------------------
    def cgroup_path(self, cgroup_id: int) -> str | None:
        """The path of a cgroup v2 created while the tracker ran, from the BPF map;
        None when it is not there."""
        fd = self._cgroup_fd
        if fd < 0 or not cgroup_id:
            return None
        from bcc.libbcc import lib

        key = ctypes.c_uint64(cgroup_id)
        value = CgroupPath()
        if lib.bpf_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) != 0:
            return None
        return decode_c_string(value.path) or None

    def _cgroup_of(self, path: str) -> tuple[int | None, Workload | None]:
        """A cgroup path of /proc/<pid>/cgroup -> its id and workload (the seed)."""
        cgroups = self.resolver.cgroups
        try:
            path = normalize(path)
            cgroup_id = cgroups.id_of(path) if cgroups is not None else None
        except CgroupError:
            return None, workload_of(path) if path.startswith("/") else None
        if cgroup_id is not None:
            self.resolver.learn(cgroup_id, path)
        return cgroup_id, workload_of(path)

    # -- figures ---------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"state": self.state, "error": self.error, "seeded": self.seeded,
                "records": dict(self.records), "ring_dropped": self.kernel["dropped"],
                "cgroups_created": self.kernel["cgroups_created"],
                "parse_errors": self.parse_errors, "reparented": self.reparented,
                "catch_ups": self.catch_ups, "catch_up_timeouts": self.catch_up_timeouts}


def ident_of(identity: ProcessIdentity, pid: int, ticks: int | None) -> str | None:
    return identity.from_ticks(pid, ticks) if pid and ticks is not None else None
