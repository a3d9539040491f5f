"""SSE and WebSocket streams through a real uvicorn server (in a thread) with a fake
monitor: framing, filters, Last-Event-ID resume, in-band drops, prompt shutdown."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agent.api.app import context_of, create_app
from tests.support.api import (
    ThreadServer,
    fake_registry,
    fake_report,
    read_sse,
    read_ws,
    settings,
    thread_server,
)


@pytest.fixture
def server() -> Iterator[ThreadServer]:
    s = settings(stream={"replay_buffer": 32, "heartbeat_s": 0.5})
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv:
        httpx.post(f"{srv.url}/monitors/fake/start", json={}).raise_for_status()
        yield srv


def emit(srv: ThreadServer, *events: dict[str, Any]) -> None:
    inbox = context_of(srv.app).registry.get("fake").inbox  # type: ignore[attr-defined]
    for e in events:
        inbox.put(e)


def published(srv: ThreadServer) -> int:
    hub = context_of(srv.app).hub
    assert hub is not None
    return hub.next_seq - 1


def wait_published(srv: ThreadServer, n: int) -> None:
    deadline = time.monotonic() + 10
    while published(srv) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sse_frames_carry_id_monitor_and_the_jsonl_bytes(server: ThreadServer) -> None:
    reader = read_sse(f"{server.url}/events")
    try:
        emit(server, {"pid": 5, "n": 1})
        msg = reader.wait_for(lambda m: m.event == "fake")
        assert msg.id == 1 and msg.data == {"monitor": "fake", "pid": 5, "n": 1}
    finally:
        reader.stop()


def test_sse_heartbeat_comments_on_idle_streams(server: ThreadServer) -> None:
    with httpx.Client(timeout=5) as c, c.stream("GET", f"{server.url}/events") as r:
        start = time.monotonic()
        for line in r.iter_lines():
            if line.startswith(":"):
                assert line == ": heartbeat"
                break
            assert time.monotonic() - start < 3


def test_ws_messages_and_filters(server: ThreadServer) -> None:
    url = server.url.replace("http", "ws") + "/events/ws?pid=7&monitor=fake"
    reader = read_ws(url)
    try:
        emit(server, {"pid": 6, "n": 1}, {"pid": 7, "n": 2})
        msg = reader.wait_for(lambda m: m.event == "fake")
        assert msg.data == {"monitor": "fake", "pid": 7, "n": 2} and msg.id == 2
    finally:
        reader.stop()


def test_sse_filters_are_repeatable(server: ThreadServer) -> None:
    reader = read_sse(f"{server.url}/events", params=[("pid", 1), ("pid", 3), ("monitor", "fake")])
    try:
        emit(server, *({"pid": p, "n": p} for p in (1, 2, 3, 4)), {"pid": 9, "n": 99})
        wait_published(server, 5)
        reader.wait_for(lambda m: m.data.get("n") == 3)
        time.sleep(0.2)
        assert [m.data["n"] for m in reader.drain()] == []  # nothing but 1 and 3
    finally:
        reader.stop()


def test_last_event_id_resume_header_and_query(server: ThreadServer) -> None:
    emit(server, *({"pid": 1, "n": i} for i in range(5)))
    wait_published(server, 5)
    reader = read_sse(f"{server.url}/events", headers={"Last-Event-ID": "2"})
    try:
        assert [reader.wait_for(lambda m: True).id for _ in range(3)] == [3, 4, 5]
    finally:
        reader.stop()
    reader = read_sse(f"{server.url}/events", params={"last_event_id": 4})
    try:
        assert reader.wait_for(lambda m: True).id == 5
    finally:
        reader.stop()
    ws = read_ws(server.url.replace("http", "ws") + "/events/ws?last_event_id=3")
    try:
        assert [ws.wait_for(lambda m: True).id for _ in range(2)] == [4, 5]
    finally:
        ws.stop()


@pytest.mark.parametrize("header", ["²".encode("latin-1"), b"\xb9\xb2", b"1" * 5000, b"-3"])
def test_a_last_event_id_that_is_not_a_number_is_ignored(server: ThreadServer,
                                                         header: bytes) -> None:
    """Superscript digits pass str.isdigit() but not int(): that was a 500."""
    emit(server, {"pid": 1})
    wait_published(server, 1)
    reader = read_sse(f"{server.url}/events", headers={"Last-Event-ID": header})  # type: ignore[dict-item]
    try:
        reader.connected.wait(10)
        assert reader.error is None, reader.error
        emit(server, {"pid": 2})
        msg = reader.wait_for(lambda m: True)  # live from now on, as without a header
        assert msg.id == 2 and msg.data["pid"] == 2
    finally:
        reader.stop()


def test_resume_after_the_ring_moved_on_reports_missed(server: ThreadServer) -> None:
    emit(server, *({"pid": 1, "n": i} for i in range(50)))  # replay_buffer is 32
    wait_published(server, 50)
    for reader in (read_sse(f"{server.url}/events", headers={"Last-Event-ID": "0"}),
                   read_ws(server.url.replace("http", "ws") + "/events/ws?last_event_id=0")):
        try:
            first = reader.wait_for(lambda m: True)
            assert first.event == "dropped" and first.data["missed"] == 18
            assert reader.wait_for(lambda m: True).id == 19
        finally:
            reader.stop()
    subs = httpx.get(f"{server.url}/stats").json()["streams"]
    assert subs["totals"]["sse_dropped"] + subs["totals"]["ws_dropped"] >= 36


def test_stats_list_connected_subscribers(server: ThreadServer) -> None:
    reader = read_sse(f"{server.url}/events", params={"monitor": "fake"})
    try:
        emit(server, {"pid": 1})
        reader.wait_for(lambda m: True)
        (sub,) = httpx.get(f"{server.url}/stats").json()["streams"]["subscribers"]
        assert sub["kind"] == "sse" and sub["filters"]["monitor"] == ["fake"]
        assert sub["delivered"] == 1 and sub["dropped"] == 0
        assert sub["client"].startswith("127.0.0.1:") and sub["connected_at"]
    finally:
        reader.stop()


def test_shutdown_with_open_streams_is_prompt() -> None:
    s = settings(api={"shutdown_timeout_s": 10})
    app = create_app(s, fake_registry(), report=fake_report())
    srv = ThreadServer(app, s).start()
    httpx.post(f"{srv.url}/monitors/fake/start", json={}).raise_for_status()
    sse = read_sse(f"{srv.url}/events")
    ws = read_ws(srv.url.replace("http", "ws") + "/events/ws")
    took = srv.stop()
    assert took < 3, f"shutdown took {took:.1f}s with open streams"
    manager = context_of(app).manager
    assert manager is not None and manager._running == {}
    for reader in (sse, ws):
        reader.stop()
        assert reader.thread is not None and not reader.thread.is_alive()


def test_ws_batch_mode_sends_json_arrays_of_the_usual_objects(server: ThreadServer) -> None:
    import json

    from websockets.sync.client import connect

    url = server.url.replace("http", "ws") + "/events/ws?batch=true&last_event_id=0"
    emit(server, *({"pid": 5, "n": i} for i in range(20)))  # within replay_buffer (32)
    wait_published(server, 20)
    got: list[dict[str, Any]] = []
    with connect(url, open_timeout=15) as ws:
        while len(got) < 20:
            frame = json.loads(ws.recv(timeout=10))
            assert isinstance(frame, list) and frame  # one array per batch
            got += frame
    assert [m["id"] for m in got] == list(range(1, 21))
    assert got[0] == {"id": 1, "event": "fake", "data": {"monitor": "fake", "pid": 5, "n": 0}}
