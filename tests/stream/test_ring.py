"""The hub's ring store: the compiled one (agent/stream/ringstore.c) against the Python
reference (agent/stream/ring.py), byte for byte and slot for slot, on the same events:
wrap-arounds, evictions by count and by bytes, an event larger than the ring, keys of
odd types and extreme values, arrival times; and the hub on each store, with a fake
clock for max_lag (a live subscriber skips ahead over events older than it)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from agent.model.events import encode_event
from agent.stream import ring
from agent.stream.hub import EventHub, Filters
from agent.stream.ring import NONE, PyRingStore, RingArrays, make_store

pytestmark = pytest.mark.skipif(not ring.compiled_available(),
                                reason=f"the compiled ring store is not built: "
                                       f"{ring.IMPORT_ERROR}")

BIG = 2**63


class Pair:
    """One store of each kind, each with its own arrays and monitor table; one fake
    clock (``now``, ns) for both."""

    def __init__(self, capacity: int, replay_bytes: int) -> None:
        self.now = 0
        self.stores: list[Any] = []
        self.arrays: list[RingArrays] = []
        self.schedules = [0, 0]
        self.names: list[list[str]] = [[], []]
        for k, mode in enumerate(("python", "compiled")):
            a = RingArrays.allocate(capacity, replay_bytes)
            ids: dict[str, int] = {}
            heads: list[bytes] = []

            def register(name: str, ids: dict[str, int] = ids, heads: list[bytes] = heads,
                         k: int = k) -> int:
                heads.append(b"\nevent: " + name.encode("utf-8", "replace") + b"\ndata: ")
                self.names[k].append(name)
                ids[name] = len(heads) - 1
                return ids[name]

            def schedule(k: int = k) -> None:
                self.schedules[k] += 1

            self.arrays.append(a)
            self.stores.append(make_store(mode, a, ids, heads, register, schedule,
                                          lambda: self.now))

    def offer(self, event: dict[str, Any], data: bytes | None = None) -> None:
        data = encode_event(event) if data is None else data
        for s in self.stores:
            s.offer(event, data)

    def assert_same(self) -> None:
        py, c = self.stores
        assert type(py) is PyRingStore and type(c).__name__ == "RingStore"
        for name in ("head", "next", "first", "oversized", "wake_pending"):
            assert getattr(py, name) == getattr(c, name), name
        a, b = self.arrays
        assert a.buf == b.buf
        for name in ("off", "len", "hdr", "mon", "pid", "uid", "comm", "cgid", "procid",
                     "at"):
            assert getattr(a, name) == getattr(b, name), name
        assert self.names[0] == self.names[1]
        assert self.schedules[0] == self.schedules[1]


def ev(i: int, **kw: Any) -> dict[str, Any]:
    return {"monitor": "exec", "pid": 100 + i, "uid": 1000, "comm": "sh", "i": i,
            "cgroup_id": 7, "process_id": f"b-1-{100 + i}", **kw}


# Keys of odd types and extreme values: each is stored as the reference stores it.
ODD = [
    {},  # nothing but the JSON
    {"monitor": None},
    {"monitor": 17},
    {"monitor": "exé\udcff"},  # not encodable as UTF-8: the head is written with "replace"
    {"pid": True, "uid": False},  # bools are not ints here
    {"pid": -(2**63), "uid": 2**63 - 1},
    {"pid": BIG, "uid": -BIG - 1},
    {"pid": 1.5, "uid": "0"},
    {"comm": b"sh", "process_id": 5},
    {"comm": "", "process_id": ""},
    {"comm": "caf\udcc3", "process_id": "x" * 300},
    {"cgroup_id": -1},
    {"cgroup_id": 0},
    {"cgroup_id": 2**63 - 1},
    {"cgroup_id": 2**63},
    {"cgroup_id": 2**64 - 1},
    {"cgroup_id": None},
]


@pytest.mark.parametrize("extra", ODD)
def test_odd_keys_are_stored_as_the_reference_stores_them(extra: dict[str, Any]) -> None:
    p = Pair(8, 64 * 1024)
    event = {**{k: v for k, v in ev(1).items() if k not in extra}, **extra}
    if extra == {}:
        event = {"i": 1}
    p.offer(event, b'{"i":1}')
    p.assert_same()


@pytest.mark.parametrize(("capacity", "replay_bytes", "sizes"), [
    (16, 64 * 1024, [0] * 100),  # evicted by count
    (100_000, 64 * 1024, [1000] * 300),  # evicted by bytes
    (64, 64 * 1024, [i * 37 % 3000 for i in range(3000)]),  # odd sizes, many wraps
    (4096, 64 * 1024, [i * 7919 % 20000 for i in range(2000)]),  # large frames, wraps
    (8, 64 * 1024, [10, 100_000, 10, 70_000, 65_000, 10]),  # larger than the ring
])
def test_the_compiled_store_writes_what_the_reference_writes(
        capacity: int, replay_bytes: int, sizes: list[int]) -> None:
    p = Pair(capacity, replay_bytes)
    for i, size in enumerate(sizes):
        p.now = 1_000 * i + 5
        monitor = ("exec", "syscall", "func")[i % 3]
        p.offer(ev(i, monitor=monitor, pad="p" * size))
        if i % 97 == 0:
            p.assert_same()
        if i % 50 == 0:  # a subscriber re-arms the wake-up now and then
            for s in p.stores:
                s.arm()
    p.assert_same()


def test_frames_and_keys_are_where_readers_look() -> None:
    p = Pair(4, 64 * 1024)
    p.offer(ev(1), b'{"a":1}')
    a = p.arrays[1]
    frame = bytes(a.buf[a.off[1]:a.off[1] + a.len[1]])
    assert frame == b'id: 1\nevent: exec\ndata: {"a":1}\n\n'
    assert frame[a.hdr[1]:-2] == b'{"a":1}'
    assert (a.mon[1], a.pid[1], a.uid[1], a.cgid[1]) == (0, 101, 1000, 7)
    assert (a.comm[1], a.procid[1]) == (hash("sh"), hash("b-1-101"))
    p.offer({"monitor": "exec", "pid": "x"}, b"{}")
    assert p.arrays[1].pid[2] == NONE


@pytest.mark.parametrize("mode", ["python", "compiled"])
def test_arrival_times_are_the_monotonic_clock_without_a_fake_one(mode: str) -> None:
    a = RingArrays.allocate(8, 64 * 1024)
    store = make_store(mode, a, {}, [b"\nevent: x\ndata: "], lambda n: 0, lambda: None)
    before = time.monotonic_ns()
    for _ in range(3):
        store.offer({"monitor": "x"}, b"{}")
    after = time.monotonic_ns()
    assert before <= a.at[1] <= a.at[2] <= a.at[3] <= after


def test_a_failing_clock_stores_nothing() -> None:
    def clock() -> int:
        raise RuntimeError("no time")

    store = make_store("compiled", RingArrays.allocate(4, 64 * 1024), {},
                       [b"\nevent: x\ndata: "], lambda n: 0, lambda: None, clock)
    with pytest.raises(RuntimeError, match="no time"):
        store.offer({"monitor": "x"}, b"{}")
    assert (store.next, store.first, store.head) == (1, 1, 0)


def test_wake_up_is_scheduled_once_per_burst() -> None:
    p = Pair(64, 64 * 1024)
    for i in range(10):
        p.offer(ev(i))
    assert p.schedules == [1, 1]
    for s in p.stores:
        s.arm()
    p.offer(ev(10))
    assert p.schedules == [2, 2]


@pytest.mark.parametrize("bad", [None, "text", bytearray(b"{}")])
def test_data_must_be_bytes(bad: Any) -> None:
    store = Pair(4, 64 * 1024).stores[1]
    with pytest.raises(TypeError):
        store.offer(ev(1), bad)
    assert store.next == 1  # nothing stored


class Broken:
    """Not a dict: read through __getitem__ (as a compiled Record is), which fails."""

    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("boom")


def test_an_error_reading_the_event_stores_nothing() -> None:
    c = Pair(4, 64 * 1024).stores[1]
    with pytest.raises(RuntimeError, match="boom"):
        c.offer(Broken(), b"{}")
    assert (c.next, c.first, c.head) == (1, 1, 0)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize(("event", "register", "heads", "error"), [
    ({"monitor": Unprintable()}, lambda n: 0, [b"h"], RuntimeError),  # str(monitor) fails
    ({"monitor": "m"}, lambda n: 5, [b"h"], ValueError),  # an id without a head
    ({"monitor": "m"}, lambda n: -1, [b"h"], ValueError),
    ({"monitor": "m"}, lambda n: "0", [b"h"], TypeError),  # not an int
    ({"monitor": "m"}, lambda n: 0, ["not bytes"], TypeError),
])
def test_a_failed_store_raises_and_leaves_the_ring_as_it_was(
        event: dict[str, Any], register: Any, heads: list[Any], error: type) -> None:
    store = make_store("compiled", RingArrays.allocate(4, 64 * 1024), {}, heads, register,
                       lambda: None)
    for _ in range(3):  # references are not lost or freed twice on the error paths
        with pytest.raises(error):
            store.offer(event, b"{}")
    assert (store.next, store.first, store.head) == (1, 1, 0)


class Keyed:
    """A mapping that is not a dict, missing keys raising KeyError."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d

    def __getitem__(self, key: str) -> Any:
        return self.d[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)


def test_a_mapping_that_is_not_a_dict_is_read_like_one() -> None:
    p = Pair(4, 64 * 1024)
    p.offer(Keyed({"monitor": "exec", "pid": 5}), b"{}")  # type: ignore[arg-type]
    p.assert_same()
    assert p.arrays[1].pid[1] == 5 and p.arrays[1].uid[1] == NONE


@pytest.mark.parametrize(("capacity", "replay_bytes"), [(0, 64 * 1024), (4, 0)])
def test_the_arrays_must_have_room(capacity: int, replay_bytes: int) -> None:
    a = RingArrays.allocate(capacity, replay_bytes)
    if replay_bytes:
        with pytest.raises(ValueError):
            make_store("compiled", a, {}, [], lambda n: 0, lambda: None)
    else:
        store = make_store("compiled", a, {}, [b"\nevent: x\ndata: "], lambda n: 0,
                           lambda: None)
        store.offer({"monitor": "x"}, b"{}")  # larger than a ring of 0 bytes
        assert (store.oversized, store.next) == (1, 2)


def test_without_the_extension_auto_is_python_and_compiled_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ring, "_ringstore", None)
    monkeypatch.setattr(ring, "IMPORT_ERROR", "not built")
    a = RingArrays.allocate(4, 64 * 1024)
    assert type(make_store("auto", a, {}, [], lambda n: 0, lambda: None)) is PyRingStore
    with pytest.raises(RuntimeError, match="not built"):
        make_store("compiled", a, {}, [], lambda n: 0, lambda: None)


@pytest.mark.parametrize("store", ["python", "compiled"])
def test_hub_on_each_store_delivers_every_event_in_order_from_threads(store: str) -> None:
    async def scenario() -> tuple[list[int], set[str], int]:
        hub = EventHub(capacity=100_000, store=store)
        hub.attach_loop(asyncio.get_running_loop())
        sub = hub.subscribe("ws", Filters())
        n_threads, per_thread = 3, 5000

        def produce(t: int) -> None:
            for i in range(per_thread):
                hub.publish(ev(i, monitor=f"m{t}", pid=t))

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        seqs: list[int] = []
        monitors: set[str] = set()
        while len(seqs) < n_threads * per_thread:
            batch = await asyncio.wait_for(sub.next_batch(), 10)
            assert batch is not None and batch.missed == 0
            seqs += [e.seq for e in batch.events]
            monitors |= {e.monitor for e in batch.events}
        for t in threads:
            t.join()
        return seqs, monitors, hub.wakeups

    seqs, monitors, wakeups = asyncio.run(scenario())
    assert seqs == list(range(1, 15_001))
    assert monitors == {"m0", "m1", "m2"}
    assert wakeups < 15_000 / 4


# -- max_lag: a live subscriber skips ahead (fake clock, both stores) ----------------------
MS = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


def lagging_hub(store: str, max_lag_ms: int, capacity: int = 1000) -> tuple[EventHub, Clock]:
    clock = Clock()
    return EventHub(capacity=capacity, store=store, max_lag_ms=max_lag_ms, clock=clock), clock


def publish_at(hub: EventHub, clock: Clock, times_ms: list[int]) -> None:
    for t in times_ms:
        clock.now = t * MS
        hub.publish(ev(t))


def read_ids(sub: Any, sse: bool, filtered: bool) -> tuple[list[int], int]:
    """One read: the ids delivered and the in-band missed count."""
    if sse:
        batch = sub.read_sse()
        ids = [int(line[4:]) for line in batch.frames.split(b"\n") if line.startswith(b"id: ")]
    else:
        batch = sub.read()
        ids = [e.seq for e in batch.events]
    return ids, batch.missed


# (hub max_lag, the subscriber's own, published at (ms), read at (ms), resume after id,
#  ids delivered, missed/skipped)
LAG_CASES = [
    # 200 ms bound, read at 1000: events stored before 800 are skipped, counted.
    (200, None, [0, 100, 700, 800, 900, 1000], 1000, None, [4, 5, 6], 3),
    # Nothing older than the bound: nothing skipped.
    (200, None, [900, 950, 1000], 1000, None, [1, 2, 3], 0),
    # Every unread event older than the bound: all skipped, none delivered.
    (200, None, [0, 100, 200], 1000, None, [], 3),
    # 0 disables: the old behaviour, everything delivered however old.
    (0, None, [0, 100, 700, 800], 1000, None, [1, 2, 3, 4], 0),
    # The subscriber's own bound (the query parameter) overrides the hub's, both ways.
    (0, 150, [0, 100, 700, 900], 1000, None, [4], 3),
    (200, 0, [0, 100, 700, 900], 1000, None, [1, 2, 3, 4], 0),
    (200, 500, [0, 100, 700, 900], 1000, None, [3, 4], 2),
    # A resume replays what the ring holds, however old (exempt until caught up).
    (200, None, [0, 100, 700, 800, 900], 1000, 1, [2, 3, 4, 5], 0),
    (200, None, [0, 100, 700, 800, 900], 1000, 0, [1, 2, 3, 4, 5], 0),
    # A resume from the head (nothing to replay) is live at once.
    (200, None, [0, 100, 700], 1000, 3, [], 0),
]


@pytest.mark.parametrize("store", ["python", "compiled"])
@pytest.mark.parametrize(("sse", "filtered"), [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize(("hub_lag", "sub_lag", "times", "read_at", "resume", "ids", "skipped"),
                         LAG_CASES)
def test_a_live_subscriber_skips_events_older_than_max_lag_and_counts_them(
        store: str, sse: bool, filtered: bool, hub_lag: int, sub_lag: int | None,
        times: list[int], read_at: int, resume: int | None, ids: list[int],
        skipped: int) -> None:
    hub, clock = lagging_hub(store, hub_lag)
    f = Filters(pids=frozenset(range(100_000))) if filtered else Filters()
    kind = "sse" if sse else "ws"
    if resume is None:  # live: subscribed before the events
        sub = hub.subscribe(kind, f, max_lag_ms=sub_lag)
        publish_at(hub, clock, times)
    else:  # resuming after the events
        publish_at(hub, clock, times)
        sub = hub.subscribe(kind, f, last_event_id=resume, max_lag_ms=sub_lag)
    clock.now = read_at * MS
    got, missed = read_ids(sub, sse, filtered)
    assert got == ids
    assert missed == skipped == sub.skipped == sub.dropped
    stats = sub.as_dict()
    assert stats["dropped"] == skipped and stats["skipped"] == skipped
    # The accounting balances: every event published is delivered or counted dropped.
    assert len(got) + sub.dropped == hub.next_seq - sub_start(resume)
    assert read_ids(sub, sse, filtered) == ([], 0)  # nothing read twice, nothing lost


def sub_start(resume: int | None) -> int:
    return 1 if resume is None else resume + 1


@pytest.mark.parametrize("store", ["python", "compiled"])
def test_a_resume_is_exempt_until_it_caught_up_once_then_skips(store: str) -> None:
    hub, clock = lagging_hub(store, 200)
    publish_at(hub, clock, [0, 10, 20, 30])
    sub = hub.subscribe("sse", Filters(), last_event_id=0)
    assert sub.replaying and sub.as_dict()["replaying"]
    clock.now = 5000 * MS  # every event long older than the bound
    batch = hub.read_sse(sub, limit=2)  # a partial read: still replaying
    assert (batch.count, batch.missed, sub.replaying) == (2, 0, True)
    batch = hub.read_sse(sub, limit=2)
    assert (batch.count, batch.missed, sub.replaying) == (2, 0, False)  # at the head
    # From now on it is live: old events are skipped.
    publish_at(hub, clock, [5000, 5100])
    clock.now = 5400 * MS
    assert read_ids(sub, True, False) == ([], 2)
    assert (sub.skipped, sub.dropped) == (2, 2)


@pytest.mark.parametrize("store", ["python", "compiled"])
def test_skipped_and_evicted_add_up_in_one_notice(store: str) -> None:
    hub, clock = lagging_hub(store, 200, capacity=16)
    sub = hub.subscribe("sse", Filters())
    publish_at(hub, clock, list(range(0, 2000, 50)))  # 40 events: 24 evicted, 16 kept
    clock.now = 2000 * MS  # kept: stored at 1200..1950; younger than 1800: 1800..1950
    got, missed = read_ids(sub, True, False)
    assert got == [37, 38, 39, 40]
    assert (missed, sub.dropped, sub.skipped) == (36, 36, 12)
    assert hub.totals()["sse_dropped"] == 36 and hub.totals()["sse_delivered"] == 0


@pytest.mark.parametrize("store", ["python", "compiled"])
def test_shared_chunks_do_not_carry_a_lagging_subscriber_past_its_bound(store: str) -> None:
    hub, clock = lagging_hub(store, 200)
    fast = hub.subscribe("sse", Filters(), max_lag_ms=0)
    slow = hub.subscribe("sse", Filters())
    publish_at(hub, clock, [0, 100, 900])
    clock.now = 1000 * MS
    assert read_ids(fast, True, False) == ([1, 2, 3], 0)  # the run is now the shared chunk
    assert read_ids(slow, True, False) == ([3], 2)


@pytest.mark.parametrize("bad", [-1, -200])
def test_a_negative_max_lag_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="max_lag_ms"):
        EventHub(capacity=16, max_lag_ms=bad)
    hub = EventHub(capacity=16)
    with pytest.raises(ValueError, match="max_lag_ms"):
        hub.subscribe("sse", Filters(), max_lag_ms=bad)
    assert hub.subscribers == {}
