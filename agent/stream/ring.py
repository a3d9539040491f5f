"""The hub's ring store: what ``EventHub.offer`` does with each event, on a poller thread.

``RingArrays`` is the memory (allocated once): the byte ring of SSE frames and, per slot,
a few numbers in flat arrays (where its frame starts, its length, the keys filters
look at, and when it was stored: a subscriber's max_lag is measured against it). The
store appends an event's frame (``id: N\\nevent: M\\ndata: <json>\\n\\n``) and its keys,
evicting the oldest events in the way first (agent/stream/hub.py explains
the bounds and why readers copy first and check afterwards).

Two implementations of one contract: ``RingStore`` of the extension
``agent.stream._ringstore`` (agent/stream/ringstore.c, built at install like the compiled
per-event path), and ``PyRingStore`` here: the reference, and the fallback when the
extension is missing or ``transport.decoder`` is ``python``. tests/stream/test_ring.py
offers the same events to both and compares every byte and slot.
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.model.events import Event

# pid/uid of events that carry none (or not an int): never equal to a filter value.
NONE = -(2**63)

try:
    from agent.stream import _ringstore  # type: ignore[attr-defined]
except ImportError as e:  # not built (an install without gcc): the Python store
    _ringstore = None
    IMPORT_ERROR: str | None = str(e)
else:
    IMPORT_ERROR = None


@dataclass(eq=False)
class RingArrays:
    """The ring's memory; the names are ringstore.c's A_NAMES."""

    buf: bytearray
    off: array[int]  # frame start in buf, per slot
    len: array[int]  # frame length
    hdr: array[int]  # length of "id: ..data: " before the JSON
    mon: array[int]  # monitor id (the hub's monitor table)
    pid: array[int]
    uid: array[int]
    comm: array[int]  # hash(comm): the reader checks exactly on a hit
    cgid: array[int]  # cgroup_id (NONE: none)
    procid: array[int]  # hash(process_id): checked on a hit
    at: array[int]  # when the store took it: CLOCK_MONOTONIC ns (the store's clock)

    @classmethod
    def allocate(cls, capacity: int, replay_bytes: int) -> RingArrays:
        # bytearray(n) is calloc'ed: pages become resident as the ring first fills.
        def slots(code: str) -> array[int]:
            return array(code, bytes(array(code).itemsize * capacity))

        return cls(bytearray(replay_bytes), slots("q"), slots("I"), slots("H"), slots("H"),
                   slots("q"), slots("q"), slots("q"), slots("q"), slots("q"), slots("q"))


class Store(Protocol):
    """What the hub reads of a store (both implementations)."""

    head: int
    next: int
    first: int
    oversized: int
    wake_pending: int

    def offer(self, event: Event, data: bytes) -> None: ...

    def arm(self) -> None: ...


class PyRingStore:
    """The reference store. ``register(name) -> id`` adds a monitor to ``monitor_ids``
    and ``monitor_heads`` (b"\\nevent: <name>\\ndata: "); ``schedule()`` is called when
    an offer finds no wake-up pending (one per burst: ``arm()`` re-enables it).
    ``clock``: the arrival time of each event in ns (``at``), time.monotonic_ns when
    None (the compiled store reads CLOCK_MONOTONIC itself); read in the same step as
    the store, so arrival times never decrease in sequence order."""

    def __init__(self, arrays: RingArrays, monitor_ids: dict[str, int],
                 monitor_heads: list[bytes], register: Callable[[str], int],
                 schedule: Callable[[], None],
                 clock: Callable[[], int] | None = None) -> None:
        self.arrays = arrays
        self.capacity = len(arrays.off)
        self.replay_bytes = len(arrays.buf)
        self._mv = memoryview(arrays.buf)
        self._ids, self._heads = monitor_ids, monitor_heads
        self._register, self._schedule = register, schedule
        self._clock = clock or time.monotonic_ns
        self.head = 0  # where the next frame goes in buf
        self.next = 1  # sequence number of the next event; ids start at 1
        self.first = 1  # oldest sequence number still buffered
        self.oversized = 0  # events larger than the whole byte ring: published, not kept
        self.wake_pending = 0
        self._lock = threading.Lock()  # orders publishers (one poller thread per monitor)

    def offer(self, event: Event, data: bytes) -> None:
        get = event.get
        monitor = get("monitor", "")
        monitor = monitor if type(monitor) is str else str(monitor)
        mid = self._ids.get(monitor)
        if mid is None:
            mid = self._register(monitor)
        pid, uid, comm = get("pid"), get("uid"), get("comm")
        cgroup_id, process_id = get("cgroup_id"), get("process_id")
        with self._lock:
            self._store(data, mid, pid, uid, comm, cgroup_id, process_id)
            schedule = not self.wake_pending
            self.wake_pending = 1
        if schedule:
            self._schedule()

    def arm(self) -> None:
        self.wake_pending = 0

    def _store(self, data: bytes, mid: int, pid: Any, uid: Any, comm: Any,
               cgroup_id: Any, process_id: Any) -> None:
        """Append one frame (caller holds the lock)."""
        seq = self.next
        frame = b"id: %d%s%s\n\n" % (seq, self._heads[mid], data)
        size = len(frame)
        cap, buf_size = self.capacity, self.replay_bytes
        if size > buf_size:
            # Cannot be kept: it is published (counted, numbered) but born evicted, so
            # every subscriber counts it as missed.
            self.oversized += 1
            self.next = self.first = seq + 1
            self.head = 0
            return
        start = tail = self.head
        wrapped = start + size > buf_size
        if wrapped:
            start = 0  # the tail of the buffer is given up this round
        end = start + size
        # Evict (advance first) before overwriting: see agent/stream/hub.py. Frames lie
        # in sequence order, so the ones in the way are the oldest ones.
        a = self.arrays
        first, off, ln = self.first, a.off, a.len
        if seq - first >= cap:
            first = seq - cap + 1
        while first < seq:
            i = first % cap
            o = off[i]
            # Wrapped: [0, end) plus the abandoned tail [tail, buf_size) are in the way.
            in_the_way = (o < end or o + ln[i] > tail) if wrapped else (
                o < end and o + ln[i] > start)
            if not in_the_way:
                break
            first += 1
        self.first = first
        self._mv[start:end] = frame
        i = seq % cap
        off[i] = start
        ln[i] = size
        a.hdr[i] = size - len(data) - 2
        a.mon[i] = mid
        a.pid[i] = pid if type(pid) is int and NONE < pid < -NONE else NONE
        a.uid[i] = uid if type(uid) is int and NONE < uid < -NONE else NONE
        a.comm[i] = hash(comm) if type(comm) is str else NONE
        # cgroup ids are u64: the ones above the signed range (never seen: kernfs ids
        # count up from 1) are kept as NONE and pass no workload filter.
        a.cgid[i] = cgroup_id if type(cgroup_id) is int and 0 <= cgroup_id < -NONE \
            else NONE
        a.procid[i] = hash(process_id) if type(process_id) is str else NONE
        a.at[i] = self._clock()
        self.head = end
        self.next = seq + 1  # last: readers trust seq < next


def compiled_available() -> bool:
    return _ringstore is not None


def make_store(mode: str, arrays: RingArrays, monitor_ids: dict[str, int],
               monitor_heads: list[bytes], register: Callable[[str], int],
               schedule: Callable[[], None],
               clock: Callable[[], int] | None = None) -> Store:
    """``mode``: "python" (the reference), "compiled" (RuntimeError without the
    extension) or "auto" (compiled when built). ``clock``: see PyRingStore (tests
    pass a fake one to both)."""
    if mode == "python" or (mode == "auto" and _ringstore is None):
        return PyRingStore(arrays, monitor_ids, monitor_heads, register, schedule, clock)
    if _ringstore is None:
        raise RuntimeError(f"the compiled ring store is not built: {IMPORT_ERROR}")
    store: Store = _ringstore.RingStore(arrays, monitor_ids, monitor_heads, register,
                                        schedule, clock)
    return store
