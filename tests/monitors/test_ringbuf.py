"""The mmap ring buffer reader against a real BPF ring buffer: every committed record
once, in order, with its exact bytes; discarded records skipped; a negative handler
return ends the call with the rest left for the next one."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from agent.monitors.ringbuf import LINGER_S, RingReader, linger_for, ringbuf_supported

# On getppid() of this process: N records of 8 + (i % 5) * 8 bytes carrying the counter,
# every third one reserved and then discarded.
PROG = r"""
BPF_RINGBUF_OUTPUT(rb, 4);
BPF_ARRAY(n, u64, 1);
RAW_TRACEPOINT_PROBE(sys_enter) {
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET || ctx->args[1] != NR_GETPPID)
        return 0;
    u32 z = 0;
    u64 *c = n.lookup(&z);
    if (!c)
        return 0;
    u64 i = *c;
    *c = i + 1;
    u64 *r = rb.ringbuf_reserve(sizeof(u64));
    if (!r)
        return 0;
    *r = i;
    if (i % 3 == 2)
        rb.ringbuf_discard(r, 0);
    else
        rb.ringbuf_submit(r, 0);
    return 0;
}
"""
NR_GETPPID = {"x86_64": 110, "aarch64": 173}


@pytest.fixture
def ring_program(kernel: Any) -> Iterator[Any]:
    """PROG loaded for this process: its BPF object (the ring is ``b[b"rb"]``)."""
    if not ringbuf_supported():
        pytest.skip("the mmap reader runs on x86-64 only (memory ordering)")
    from bcc import BPF

    b = BPF(text=PROG, cflags=[f"-DTARGET={os.getpid()}",
                               f"-DNR_GETPPID={NR_GETPPID[os.uname().machine]}"])
    try:
        yield b
    finally:
        b.cleanup()


def test_reads_every_committed_record_once_and_skips_discarded_ones(ring_program: Any) -> None:
    table = ring_program[b"rb"]
    got: list[int] = []

    def handle(raw: bytes) -> int:
        assert len(raw) == 8
        got.append(struct.unpack("<Q", raw)[0])
        return -1 if len(got) == 10 else 0  # stop once, after the tenth record

    reader = RingReader(table.map_fd, table.max_entries, handle)
    try:
        for _ in range(300):
            os.getppid()
        # Stopped by the handler at the tenth delivered record; the four discarded
        # ones before it count as consumed records too.
        assert reader.poll(100) == 14 and len(got) == 10
        while reader.poll(10):
            pass
        for _ in range(300):  # a second round after the reader caught up
            os.getppid()
        while reader.poll(10):
            pass
    finally:
        reader.close()
    assert int(ring_program[b"n"][ctypes.c_int(0)].value) == 600
    assert got == [i for i in range(600) if i % 3 != 2]


@pytest.mark.parametrize(("byte_rate", "room", "longest", "pause"), [
    (0.0, 65536, 0.02, 0.02),             # nothing measured yet: the longest pause
    (1_000_000.0, 65536, 0.02, 0.02),     # 1 MB/s fills 64 KiB in 65 ms: no shortening
    (6_553_600.0, 65536, 0.02, 0.01),     # 6.5 MB/s fills it in 10 ms
    (1e9, 65536, 0.02, LINGER_S),         # never under the monitors' pause
    (1_000_000.0, 65536, LINGER_S, LINGER_S),
])
def test_linger_leaves_room_at_the_last_rate(byte_rate: float, room: int, longest: float,
                                             pause: float) -> None:
    assert linger_for(byte_rate, room, longest) == pytest.approx(pause)


class Pauses:
    """Stands in for the reader's nudge event: records each pause instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return False

    def set(self) -> None: ...

    def clear(self) -> None: ...


@pytest.mark.parametrize(("max_delay", "busy", "pauses"), [
    (0.04, False, [0.04]),  # below the busy rate: a batch is followed by max_delay
    (0.0, False, []),  # 0: every record at once, no pause
    (0.04, True, [LINGER_S]),  # under load: the usual short linger, not max_delay
    (0.0, True, [LINGER_S]),
])
def test_after_a_batch_the_reader_pauses_max_delay_below_the_busy_rate(
        ring_program: Any, max_delay: float, busy: bool, pauses: list[float]) -> None:
    table = ring_program[b"rb"]
    got: list[int] = []
    reader = RingReader(table.map_fd, table.max_entries,
                        lambda raw: got.append(struct.unpack("<Q", raw)[0]),
                        max_delay_s=max_delay)
    fake = Pauses()
    reader._nudged = fake  # type: ignore[assignment]
    reader._busy = busy
    reader._window_start = float("inf")  # the rate window never closes: busy stays
    try:
        assert reader.poll(0) == 0 and fake.waits == []  # nothing read: no pause
        for _ in range(4):
            os.getppid()  # records 0, 1, 3 (2 is discarded)
        assert reader.poll(100) == 4 and got == [0, 1, 3]
        assert fake.waits == pauses
    finally:
        reader.close()
