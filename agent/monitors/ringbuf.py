"""A BPF ring buffer consumer in Python: the map mmap()ed, records read in a loop.

Why not BCC's open_ring_buffer: libbpf calls a ctypes callback per record, and every
callback takes and gives back the GIL. Under load the event loop thread (stream writers)
grabs the GIL between two records and the poller waits for it again, once per record:
fan-out starved the intake (issue 12). Here the poller keeps the GIL for a batch of
records (Python's switch interval still lets the loop in), and a record costs a slice of
the mapping instead of a foreign call.

The layout is the kernel's (BPF_MAP_TYPE_RINGBUF, bpf(2) and the bpf UAPI): page 0 holds
consumer_pos (written by us), page 1 producer_pos, then the data pages mapped twice in a
row so a record that wraps around is contiguous. Each record starts with an 8-byte header
(u32 length with BUSY and DISCARD flag bits, u32 page offset) and is padded to 8 bytes.

Memory ordering: x86-64 only (TSO). The kernel writes a record's header before it
publishes producer_pos, and clears the BUSY bit after the data is written; on x86 plain
loads in that order see them in that order. Weakly ordered CPUs would need acquire loads
that Python cannot issue, so elsewhere the BCC consumer stays (ringbuf_supported()).
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import select
import threading
import time
from collections.abc import Callable

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
# Records per poll() at most: bounds the time between two returns to the poller loop.
MAX_RECORDS = 4096  # = bcc.CONSUME_BUDGET
# Store consumer_pos this often within a batch so producers get room back early.
RELEASE_EVERY = 256
# Batching only under load: when the last interval delivered more than BUSY_RATE events/s,
# sleep LINGER_S after a batch instead of waiting for the next wake-up, so a busy but
# not saturated producer costs one consumer cycle per LINGER_S, not one per event.
BUSY_RATE = 2000
LINGER_S = 0.001
# The interval: short, so that a burst is seen as load within its first 10 ms. Until
# then the reader waits for a wake-up after each batch, and a reader that keeps up is
# woken per event, each wake-up an irq_work the producing program pays (a burst of
# connections that started after an idle 100 ms window paid one per event for its
# first 100 ms: bench/net_cost.py).
RATE_WINDOW_S = 0.01
# Below BUSY_RATE a reader given a max_delay (transport.max_delay_ms) pauses that long
# after a batch instead: at 100 events/s a wake-up per event (epoll return, a loop
# callback, one socket write per client) cost more than the events themselves; with the
# pause one wake-up carries the events of max_delay. An event that finds the reader
# idle (nothing arrived during the last pause) is delivered at once: the reader waits in
# epoll, which the kernel wakes for the first record in an empty buffer (flags 0 of
# bpf_ringbuf_output: adaptive notification, see agent/bpf/common.h). So the added
# latency is max_delay at most, and a reader with nothing to read costs nothing. A burst
# that starts during a pause waits for its end (then the reader is busy): the ring must
# hold max_delay of the burst, or the kernel drops (counted) what does not fit.


def ringbuf_supported() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def linger_for(byte_rate: float, room: int, longest: float) -> float:
    """The pause after a batch: ``longest``, shortened so that ``room`` bytes are not
    filled meanwhile at ``byte_rate``; never under LINGER_S."""
    fill_s = room / byte_rate if byte_rate > 0 else longest
    return max(LINGER_S, min(longest, fill_s))


class RingReader:
    def __init__(self, map_fd: int, data_size: int, handle: Callable[[bytes], int | None],
                 linger_s: float = LINGER_S, busy_rate: float = BUSY_RATE,
                 max_delay_s: float = 0.0) -> None:
        """``linger_s``: the pause after a batch under load, i.e. above ``busy_rate``
        records/s. A consumer that need not see each record at once (the process
        tracker) takes a longer one, at any rate: fewer, larger batches. The pause is
        shortened so that at the rate of the last window the buffer fills to a quarter
        at most meanwhile. ``max_delay_s``: the pause after a batch below
        ``busy_rate`` (0: none, each record is handed on at once; the comment below
        BUSY_RATE says why and what it costs in latency)."""
        if data_size & (data_size - 1):
            raise ValueError("a ring buffer's size is a power of two")
        page = mmap.PAGESIZE
        self._cons_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        self._cons = ctypes.c_uint64.from_buffer(self._cons_map)
        view = memoryview(self._data_map)
        self._prod = view[:8].cast("Q")
        self._u32 = view.cast("I")
        self._base = page  # data pages start after the producer page
        self._mask = data_size - 1
        self._handle = handle
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self._window_start = time.monotonic()
        self._window_count = 0
        self._window_bytes = 0
        self._busy = False
        self._busy_rate = busy_rate
        self._linger_max = linger_s
        self._linger = LINGER_S
        self._max_delay = max_delay_s
        self._quarter = data_size // 4
        self._consumed_bytes = 0  # by the last consume()
        self._nudged = threading.Event()  # cuts a linger short (nudge())
        self.records = 0

    def consume(self, limit: int = MAX_RECORDS) -> int:
        """Hands every committed record (at most ``limit``) to the handler."""
        cons = start = self._cons.value
        prod = self._prod[0]
        if cons >= prod:
            self._consumed_bytes = 0
            return 0
        base, mask, u32, data, handle = (self._base, self._mask, self._u32, self._data_map,
                                         self._handle)
        n = 0
        busy = False
        while True:
            while cons < prod:
                off = base + (cons & mask)
                hdr = u32[off >> 2]
                if hdr & BUSY_BIT:
                    # Reserved, not committed yet: records after it must wait for it, so
                    # this call ends here (as libbpf's does) instead of spinning on it; the
                    # producer's commit wakes the reader again.
                    busy = True
                    break
                length = hdr & ~(BUSY_BIT | DISCARD_BIT)
                stop = False
                if not hdr & DISCARD_BIT:
                    # Like libbpf: a negative return ends this consume call (the record
                    # is consumed).
                    stop = (handle(data[off + HDR_SIZE:off + HDR_SIZE + length]) or 0) < 0
                cons += (length + HDR_SIZE + 7) & ~7
                n += 1
                if stop:
                    limit = n
                if n % RELEASE_EVERY == 0:
                    self._cons.value = cons
                if n >= limit:
                    break
            self._cons.value = cons
            if n >= limit or busy:
                break
            new_prod = self._prod[0]
            if new_prod == prod or cons >= new_prod:
                break
            prod = new_prod
        self.records += n
        self._consumed_bytes = cons - start
        return n

    def poll(self, timeout_ms: int, limit: int = MAX_RECORDS) -> int:
        n = self.consume(limit)
        if n == 0:
            self._epoll.poll(timeout_ms / 1000)  # releases the GIL while it waits
            n = self.consume(limit)
        self._account(n)
        # Under load, let a batch build up instead of a wake-up per event; below it, for
        # max_delay if given (nudge() ends either wait early).
        if 0 < n < limit:
            pause = self._linger if self._busy else self._max_delay
            if pause and self._nudged.wait(pause):
                self._nudged.clear()
        return n

    def _account(self, n: int) -> None:
        self._window_count += n
        self._window_bytes += self._consumed_bytes
        now = time.monotonic()
        span = now - self._window_start
        if span >= RATE_WINDOW_S:
            self._busy = self._window_count / span > self._busy_rate
            if self._linger_max > LINGER_S:
                self._linger = linger_for(self._window_bytes / span, self._quarter,
                                          self._linger_max)
            self._window_start, self._window_count, self._window_bytes = now, 0, 0

    # -- any thread -------------------------------------------------------------------
    def positions(self) -> tuple[int, int]:
        """(consumer, producer) positions: the records before the producer position are
        handled once the consumer position has reached it (it is stored after the
        handler has run)."""
        return self._cons.value, self._prod[0]

    def nudge(self) -> None:
        """Ends the current linger: a reader on another thread wants the records now."""
        self._nudged.set()

    def close(self) -> None:
        self._epoll.close()
        self._prod.release()
        self._u32.release()
        del self._cons
        self._cons_map.close()
        self._data_map.close()
