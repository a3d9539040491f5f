"""The event hub: bounded ring, per-subscriber positions, drop counting, resume, filters,
thread-safe publishing with coalesced wake-ups."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from agent.model.events import encode_event
from agent.stream.hub import EventHub, Filters, HubFull
from agent.stream.wire import sse_chunk, ws_array, ws_messages


def ev(i: int, monitor: str = "exec", pid: int = 100, uid: int = 0, comm: str = "sh") -> dict:
    return {"monitor": monitor, "pid": pid, "uid": uid, "comm": comm, "i": i}


def test_ring_is_bounded_and_sequence_numbers_continue() -> None:
    hub = EventHub(capacity=16)
    for i in range(100):
        hub.publish(ev(i))
    assert hub.stats()["published"] == 100
    assert hub.stats()["buffered"] == 16
    assert len(hub._off) == 16  # memory does not grow with events
    assert (hub.first_seq, hub.next_seq) == (85, 101)


def test_memory_is_shared_by_subscribers() -> None:
    hub = EventHub(capacity=16, max_subscribers=1000)
    subs = [hub.subscribe("sse", Filters(), last_event_id=0) for _ in range(500)]
    for i in range(10):
        hub.publish(ev(i))
    assert len(hub._off) == 16
    assert all([e.seq for e in s.read().events] == list(range(1, 11)) for s in subs)


def test_event_bytes_are_encoded_once_like_jsonl() -> None:
    hub = EventHub(capacity=4)
    sub = hub.subscribe("sse", Filters())
    event = ev(1, comm="caf\udcc3")  # surrogate-escaped bytes: the stdlib path
    hub.publish(event)
    (got,) = sub.read().events
    assert got.data == encode_event(event)
    assert got.seq == 1 and got.monitor == "exec"


def test_slow_subscriber_counts_its_own_drops_and_is_told_in_band() -> None:
    hub = EventHub(capacity=8)
    slow = hub.subscribe("sse", Filters())
    fast = hub.subscribe("ws", Filters())
    got_fast = []
    for i in range(30):
        hub.publish(ev(i))
        got_fast += fast.read().events
    assert [e.seq for e in got_fast] == list(range(1, 31))  # the fast one gets everything
    assert slow.as_dict()["dropped"] == 22  # visible in /stats before it reads again
    batch = slow.read()
    assert batch.missed == 22
    assert [e.seq for e in batch.events] == list(range(23, 31))
    assert (slow.dropped, fast.dropped) == (22, 0)
    chunk = sse_chunk(batch).decode()
    assert chunk.startswith('event: dropped\ndata: {"missed":22}\n\n')
    assert "id: 23\nevent: exec\ndata: {" in chunk
    assert json.loads(ws_messages(batch)[0]) == {"event": "dropped", "missed": 22}


def test_last_event_id_resumes_from_the_ring() -> None:
    hub = EventHub(capacity=8)
    for i in range(6):
        hub.publish(ev(i))
    sub = hub.subscribe("sse", Filters(), last_event_id=3)
    batch = sub.read()
    assert batch.missed == 0
    assert [e.seq for e in batch.events] == [4, 5, 6]


def test_resume_from_a_position_that_fell_out_reports_the_gap() -> None:
    hub = EventHub(capacity=8)
    for i in range(20):
        hub.publish(ev(i))
    sub = hub.subscribe("sse", Filters(), last_event_id=2)  # ring holds 13..20
    batch = sub.read()
    assert batch.missed == 10  # 3..12
    assert [e.seq for e in batch.events] == list(range(13, 21))


def test_ids_from_the_future_resume_live() -> None:
    hub = EventHub(capacity=8)
    hub.publish(ev(0))
    sub = hub.subscribe("sse", Filters(), last_event_id=10_000)
    assert sub.read().events == []
    hub.publish(ev(1))
    assert [e.seq for e in sub.read().events] == [2]


def test_no_last_event_id_starts_live() -> None:
    hub = EventHub(capacity=8)
    hub.publish(ev(0))
    sub = hub.subscribe("sse", Filters())
    hub.publish(ev(1))
    assert [e.seq for e in sub.read().events] == [2]


def test_filters_combine_with_and_and_repeat_with_or() -> None:
    hub = EventHub(capacity=64)
    sub = hub.subscribe("sse", Filters(monitors=frozenset({"exec"}), pids=frozenset({1, 2}),
                                       comms=frozenset({"sh"})))
    hub.publish(ev(0, pid=1))
    hub.publish(ev(1, pid=2))
    hub.publish(ev(2, pid=3))
    hub.publish(ev(3, pid=1, monitor="syscall"))
    hub.publish(ev(4, pid=2, comm="bash"))
    uid_sub = hub.subscribe("ws", Filters(uids=frozenset({1000})), last_event_id=0)
    hub.publish(ev(5, uid=1000))
    assert [json.loads(e.data)["i"] for e in sub.read().events] == [0, 1]
    assert [json.loads(e.data)["i"] for e in uid_sub.read().events] == [5]


def test_max_subscribers_and_unsubscribe() -> None:
    hub = EventHub(capacity=8, max_subscribers=2)
    a = hub.subscribe("sse", Filters())
    hub.subscribe("ws", Filters())
    with pytest.raises(HubFull):
        hub.subscribe("sse", Filters())
    hub.unsubscribe(a)
    hub.unsubscribe(a)  # idempotent
    hub.subscribe("sse", Filters())
    assert len(hub.subscribers) == 2


def test_totals_survive_disconnects() -> None:
    hub = EventHub(capacity=4)
    sub = hub.subscribe("sse", Filters())
    for i in range(10):
        hub.publish(ev(i))
    batch = sub.read()
    sub.inflight = len(batch.events)
    sub.confirm()
    hub.unsubscribe(sub)
    assert hub.totals()["sse_delivered"] == 4
    assert hub.totals()["sse_dropped"] == 6
    assert hub.stats()["closed"] == {"disconnected": 1}


def test_threaded_publishers_wake_waiting_subscribers_with_coalesced_callbacks() -> None:
    async def scenario() -> tuple[list[int], int, EventHub]:
        hub = EventHub(capacity=200_000)
        hub.attach_loop(asyncio.get_running_loop())
        sub = hub.subscribe("sse", Filters())
        n_threads, per_thread = 4, 20_000

        def produce(t: int) -> None:
            for i in range(per_thread):
                hub.publish(ev(i, pid=t))

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        seqs: list[int] = []
        while len(seqs) < n_threads * per_thread:
            batch = await asyncio.wait_for(sub.next_batch(), 10)
            assert batch is not None and batch.missed == 0
            seqs += [e.seq for e in batch.events]
        for t in threads:
            t.join()
        return seqs, hub.wakeups, hub

    seqs, wakeups, hub = asyncio.run(scenario())
    assert seqs == list(range(1, 80_001))  # every event, in order, once
    assert wakeups < 80_000 / 4  # far fewer loop callbacks than events


def test_close_ends_waiting_subscribers() -> None:
    async def scenario() -> object:
        hub = EventHub(capacity=8)
        hub.attach_loop(asyncio.get_running_loop())
        sub = hub.subscribe("ws", Filters())
        waiter = asyncio.create_task(sub.next_batch())
        await asyncio.sleep(0.01)
        threading.Thread(target=hub.close_threadsafe).start()
        result = await asyncio.wait_for(waiter, 2)
        with pytest.raises(HubFull):
            hub.subscribe("sse", Filters())
        return result

    assert asyncio.run(scenario()) is None


def test_filtered_subscriber_skips_non_matching_floods_without_blocking_the_loop() -> None:
    async def scenario() -> list[int]:
        hub = EventHub(capacity=10_000)
        hub.attach_loop(asyncio.get_running_loop())
        sub = hub.subscribe("sse", Filters(pids=frozenset({7})))
        for i in range(5000):
            hub.publish(ev(i, pid=1))
        hub.publish(ev(5000, pid=7))
        batch = await asyncio.wait_for(sub.next_batch(limit=64), 2)
        assert batch is not None
        return [json.loads(e.data)["i"] for e in batch.events]

    assert asyncio.run(scenario()) == [5000]


def test_replay_is_bounded_in_bytes_too() -> None:
    hub = EventHub(capacity=100_000, replay_bytes=64 * 1024)
    sub = hub.subscribe("sse", Filters(), last_event_id=0)
    big = "x" * 1000
    for i in range(1000):
        hub.publish({**ev(i), "pad": big})
    stats = hub.stats()
    assert stats["published"] == 1000
    # ~1.1 KB frames: at most 64 KiB of them are kept, the oldest are evicted.
    assert 50 <= stats["buffered"] <= 60
    assert stats["buffered_bytes"] <= 64 * 1024
    batch = sub.read_sse()
    assert batch.missed == 1000 - stats["buffered"]
    frames = batch.frames.split(b"\n\n")[:-1]
    count = batch.count
    while (batch := sub.read_sse()).count:  # a read stops where the ring wrapped
        frames += batch.frames.split(b"\n\n")[:-1]
        count += batch.count
    assert len(frames) == count == stats["buffered"]
    assert frames[-1].startswith(b"id: 1000\nevent: exec\ndata: {")
    assert json.loads(frames[-1].split(b"data: ", 1)[1])["i"] == 999


def test_sse_frames_survive_wrap_arounds_in_order() -> None:
    """Odd-sized frames wrap around the byte ring many times; every read returns whole
    frames in sequence order and counts the rest as missed."""
    hub = EventHub(capacity=64, replay_bytes=64 * 1024)
    fast = hub.subscribe("sse", Filters(), last_event_id=0)
    got: list[int] = []
    missed = 0
    for i in range(5000):
        hub.publish({**ev(i), "pad": "y" * (i * 37 % 3000)})
        if i % 7 == 0:
            batch = fast.read_sse(limit=50)
            missed += batch.missed
            for f in batch.frames.split(b"\n\n")[:-1]:
                head, data = f.split(b"\ndata: ")
                seq = int(head.split(b"\n")[0][4:])
                assert json.loads(data)["i"] == seq - 1
                got.append(seq)
    while (batch := fast.read_sse()).count or batch.missed:
        missed += batch.missed
        got += [int(f.split(b"\n")[0][4:]) for f in batch.frames.split(b"\n\n")[:-1]]
    assert got == sorted(got) and len(set(got)) == len(got)
    assert len(got) + missed == 5000 and got[-1] == 5000


def test_event_larger_than_the_ring_is_counted_missed() -> None:
    hub = EventHub(capacity=8, replay_bytes=64 * 1024)
    sub = hub.subscribe("sse", Filters())
    hub.publish({**ev(0), "pad": "z" * 100_000})
    hub.publish(ev(1))
    batch = sub.read_sse()
    assert (batch.missed, batch.count, hub.oversized) == (1, 1, 1)
    assert batch.frames.startswith(b"id: 2\n")


def test_comm_filter_is_exact() -> None:
    hub = EventHub(capacity=64)
    sub = hub.subscribe("sse", Filters(comms=frozenset({"bash"})))
    for comm in ("sh", "bash", "zsh", "bash"):
        hub.publish(ev(0, comm=comm))
    batch = sub.read_sse()
    assert batch.count == 2
    assert all(b'"comm":"bash"' in f for f in batch.frames.split(b"\n\n")[:-1])


def test_websocket_array_mode_carries_the_same_objects() -> None:
    hub = EventHub(capacity=8)
    sub = hub.subscribe("ws", Filters())
    for i in range(3):
        hub.publish(ev(i))
    batch = sub.read()
    assert json.loads(ws_array(batch)) == [json.loads(m) for m in ws_messages(batch)]
    assert [m["id"] for m in json.loads(ws_array(batch))] == [1, 2, 3]


def test_monitor_filter_reads_the_matching_runs_only() -> None:
    hub = EventHub(capacity=64)
    sub = hub.subscribe("sse", Filters(monitors=frozenset({"exec"})))
    for i in range(5):
        hub.publish(ev(i))
    hub.publish(ev(5, monitor="syscall"))
    hub.publish(ev(6))
    batch = sub.read_sse()
    ids = [int(f.split(b"\n")[0][4:]) for f in batch.frames.split(b"\n\n")[:-1]]
    assert ids == [1, 2, 3, 4, 5, 7] and batch.count == 6
    for i in range(3):
        hub.publish(ev(i))
    assert sub.read_sse().count == 3  # all from exec: the one-slice path


def test_memory_is_the_preallocated_ring_not_per_event_objects() -> None:
    import tracemalloc

    hub = EventHub(capacity=1000, replay_bytes=256 * 1024)
    for i in range(2000):  # ring full in events and in bytes
        hub.publish({**ev(i), "pad": "p" * (i % 300)})
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5000):
            hub.publish({**ev(i), "pad": "p" * (i % 300)})
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 * 1024  # nothing kept per event: ~1 KB each would be ~5 MB
    assert hub.stats()["memory_bytes"] == 256 * 1024 + 64 * 1000


# -- workload filters (container_id prefix, cgroup subtree, unit, process_id) -------------
DOCKER = "d0" * 32
PODMAN = "e1" * 32
WORKLOAD_EVENTS = [
    # (cgroup_id, cgroup, container_id, unit, process_id)
    (11, f"/system.slice/docker-{DOCKER}.scope", DOCKER, f"docker-{DOCKER}.scope", "p-1"),
    (12, f"/machine.slice/libpod-{PODMAN}.scope", PODMAN, f"libpod-{PODMAN}.scope", "p-2"),
    (13, "/system.slice/nginx.service", None, "nginx.service", "p-3"),
    (14, "/system.slice/nginx.service/worker", None, "nginx.service", "p-4"),
    (15, "/system.slice/nginx.servicex", None, None, "p-5"),
    (16, None, None, None, "p-6"),  # a cgroup that could not be resolved
]


def workload_ev(i: int, row: tuple) -> dict:
    cgid, cgroup, cid, unit, procid = row
    return {**ev(i), "cgroup_id": cgid, "cgroup": cgroup, "container_id": cid, "unit": unit,
            "process_id": procid}


@pytest.mark.parametrize(("filters", "expected"), [
    (Filters(container_ids=frozenset({"d0d0"})), [11]),
    (Filters(container_ids=frozenset({DOCKER})), [11]),
    (Filters(container_ids=frozenset({"d0", "e1"})), [11, 12]),
    (Filters(container_ids=frozenset({"ff"})), []),
    (Filters(cgroups=frozenset({"/system.slice/nginx.service"})), [13, 14]),  # not .servicex
    (Filters(cgroups=frozenset({"/system.slice"})), [11, 13, 14, 15]),
    (Filters(cgroups=frozenset({"/"})), [11, 12, 13, 14, 15]),  # resolved ones
    (Filters(units=frozenset({"nginx.service"})), [13, 14]),
    (Filters(units=frozenset({"nginx"})), []),
    (Filters(process_ids=frozenset({"p-3", "p-6"})), [13, 16]),
    (Filters(cgroups=frozenset({"/system.slice"}), units=frozenset({"nginx.service"}),
             process_ids=frozenset({"p-4"})), [14]),
    (Filters(monitors=frozenset({"exec"}), container_ids=frozenset({"e1"})), [12]),
])
@pytest.mark.parametrize("kind", ["sse", "ws"])
def test_workload_filters_pick_exactly_their_events(filters: Filters, expected: list[int],
                                                    kind: str) -> None:
    hub = EventHub(capacity=64)
    sub = hub.subscribe(kind, filters, last_event_id=0)
    for rnd in range(2):  # the second round is judged from the per-cgroup memo
        for i, row in enumerate(WORKLOAD_EVENTS):
            hub.publish(workload_ev(rnd * 10 + i, row))
    if kind == "sse":
        batch = sub.read_sse()
        datas = [json.loads(f.split("data: ", 1)[1])
                 for f in batch.frames.decode().split("\n\n") if f]
    else:
        datas = [json.loads(e.data) for e in sub.read().events]
    assert [d["cgroup_id"] for d in datas] == expected * 2


def test_an_unresolved_cgroup_is_not_remembered_against_its_later_events() -> None:
    hub = EventHub(capacity=16)
    sub = hub.subscribe("ws", Filters(units=frozenset({"nginx.service"})), last_event_id=0)
    hub.publish({**ev(1), "cgroup_id": 13, "cgroup": None, "unit": None})
    hub.publish({**ev(2), "cgroup_id": 13, "cgroup": "/system.slice/nginx.service",
                 "unit": "nginx.service"})
    assert [json.loads(e.data)["i"] for e in sub.read().events] == [2]
