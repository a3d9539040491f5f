"""Chunks written straight to the connection (agent/api/chunked.py) and the SSE route's
use of them (agent/api/routes_events.py SubscriberStream), with a fake uvicorn
connection: the bytes on the wire, flow control, a closed connection, and the
subscriber's accounting; and a large replay through the real server, plain and TLS (the
rest of the real server path: tests/api/test_streams.py)."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.api.access.connguard import CONN_KEY
from agent.api.app import context_of, create_app
from agent.api.chunked import JOIN_BELOW, ChunkedBody
from agent.api.routes_events import SubscriberStream
from agent.stream.hub import Batch, EventHub, Filters
from agent.stream.wire import HEARTBEAT, sse_chunk, sse_parts
from tests.support.api import (
    fake_registry,
    fake_report,
    self_signed_cert,
    settings,
    thread_server,
)


class FakeTransport:
    def __init__(self, closing: bool = False) -> None:
        self.writes: list[bytes] = []
        self.closing = closing

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing


class FakeFlow:
    def __init__(self, paused: bool = False) -> None:
        self.write_paused = paused
        self.drained = 0

    async def drain(self) -> None:
        self.drained += 1
        self.write_paused = False


class FakeCycle:
    def __init__(self, chunked: bool = True, started: bool = True) -> None:
        self.chunked_encoding = chunked
        self.response_started = started
        self.disconnected = False


class FakeConn:
    def __init__(self, **cycle: bool) -> None:
        self.transport = FakeTransport()
        self.flow = FakeFlow()
        self.cycle = FakeCycle(**cycle)


def unchunk(wire: bytes) -> list[bytes]:
    """The chunks of a chunked body (each must be well framed)."""
    out, pos = [], 0
    while pos < len(wire):
        eol = wire.index(b"\r\n", pos)
        size = int(wire[pos:eol], 16)
        body = wire[eol + 2:eol + 2 + size]
        assert len(body) == size and wire[eol + 2 + size:eol + 4 + size] == b"\r\n"
        out.append(body)
        pos = eol + 4 + size
    return out


@pytest.mark.parametrize(("head", "body", "writes"), [
    (b"", b"id: 1\nevent: e\ndata: {}\n\n", 1),  # small: one write
    (b'event: dropped\ndata: {"missed":3}\n\n', b"id: 4\n\n", 1),
    (b"", b"x" * JOIN_BELOW, 3),  # large: header, the body itself, trailer
    (b'event: dropped\ndata: {"missed":3}\n\n', b"y" * (JOIN_BELOW + 7), 3),
    (b"", HEARTBEAT, 1),
])
def test_a_chunk_carries_head_then_body(head: bytes, body: bytes, writes: int) -> None:
    conn = FakeConn()
    writer = ChunkedBody(conn)
    assert asyncio.run(writer.write(head, body)) is True
    t = conn.transport
    assert len(t.writes) == writes
    assert unchunk(b"".join(t.writes)) == [head + body]
    if writes == 3:
        assert t.writes[1] == body  # the body written as it is, not joined
    assert writer.chunks == 1


def test_an_empty_chunk_writes_nothing() -> None:
    # A zero-size chunk would end the response body.
    conn = FakeConn()
    assert asyncio.run(ChunkedBody(conn).write(b"", b"")) is True
    assert conn.transport.writes == []


@pytest.mark.parametrize("how", ["transport closing", "client disconnected"])
def test_nothing_is_written_to_a_closed_connection(how: str) -> None:
    conn = FakeConn()
    if how == "transport closing":
        conn.transport.closing = True
    else:
        conn.cycle.disconnected = True
    writer = ChunkedBody(conn)
    assert asyncio.run(writer.write(b"", b"id: 1\n\n")) is False
    assert conn.transport.writes == [] and writer.chunks == 0


def test_a_paused_transport_is_drained_before_writing() -> None:
    conn = FakeConn()
    conn.flow.write_paused = True
    assert asyncio.run(ChunkedBody(conn).write(b"", b"id: 1\n\n")) is True
    assert conn.flow.drained == 1 and len(conn.transport.writes) == 1


@pytest.mark.parametrize(("scope", "expected"), [
    ({}, False),  # not the agent's server (a test transport)
    ({CONN_KEY: object()}, False),  # a connection without a request cycle
    ({CONN_KEY: FakeConn(chunked=False)}, False),  # a response with content-length
    ({CONN_KEY: FakeConn(started=False)}, False),  # before http.response.start
    ({CONN_KEY: FakeConn()}, True),
])
def test_the_writer_exists_only_for_a_started_chunked_response(scope: dict[str, Any],
                                                              expected: bool) -> None:
    assert (ChunkedBody.of(scope) is not None) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("batch", "parts"), [
    (Batch(frames=b"id: 1\n\n", count=1), (b"", b"id: 1\n\n")),
    (Batch(frames=b"id: 9\n\n", count=1, missed=8),
     (b'event: dropped\ndata: {"missed":8}\n\n', b"id: 9\n\n")),
    (Batch(missed=5), (b'event: dropped\ndata: {"missed":5}\n\n', b"")),
    (Batch(), (b"", HEARTBEAT)),  # an idle stream's ping
])
def test_sse_parts_and_chunk(batch: Batch, parts: tuple[bytes, bytes]) -> None:
    assert sse_parts(batch) == parts
    assert sse_chunk(batch) == b"".join(parts)


# -- the SSE route over a fake connection -------------------------------------------
def run_stream(hub: EventHub, conn: FakeConn, events: int) -> list[Any]:
    """Streams ``events`` events to one subscriber that resumes from the start, then
    shuts the hub down (or the route ends by itself). Returns the ASGI messages sent."""
    sent: list[Any] = []

    async def main() -> None:
        hub.attach_loop(asyncio.get_running_loop())
        for i in range(events):
            hub.publish({"monitor": "exec", "pid": i, "argv": ["x" * 100]})
        sub = hub.subscribe("sse", Filters(), "test", last_event_id=0)
        stream = SubscriberStream(hub, sub, heartbeat_s=60, stall_timeout_s=60)
        forever = asyncio.Event()

        async def receive() -> Any:
            await forever.wait()

        async def send(message: Any) -> None:
            sent.append(message)

        task = asyncio.create_task(stream({"type": "http", CONN_KEY: conn}, receive, send))
        for _ in range(1000):
            await asyncio.sleep(0.001)
            if task.done() or ids_on_the_wire(conn)[-1:] == [events]:
                break
        hub.close()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    return sent


def ids_on_the_wire(conn: FakeConn) -> list[int]:
    frames = b"".join(unchunk(b"".join(conn.transport.writes)))
    return [int(i) for i in re.findall(rb"(?:^|\n\n)id: ([0-9]+)\n", frames)]


def test_the_route_writes_every_event_once_and_counts_it_delivered() -> None:
    hub, conn = EventHub(capacity=4096), FakeConn()
    sent = run_stream(hub, conn, 3000)
    assert ids_on_the_wire(conn) == list(range(1, 3001))
    totals = hub.totals()
    assert (totals["sse_delivered"], totals["sse_dropped"]) == (3000, 0)
    # Start and end of the response went through ASGI send, no body in between.
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1]["more_body"] is False


def test_events_read_for_a_client_that_is_gone_count_as_dropped() -> None:
    hub, conn = EventHub(capacity=4096), FakeConn()
    conn.transport.closing = True  # the client went away before the first chunk
    run_stream(hub, conn, 3000)
    assert conn.transport.writes == []
    totals = hub.totals()
    # Every event is accounted for: none delivered, all dropped for this subscriber.
    assert (totals["sse_delivered"], totals["sse_dropped"]) == (0, 3000)
    assert hub.stats()["closed"] == {"disconnected": 1}


def test_a_subscriber_that_fell_behind_gets_the_missed_count_in_band() -> None:
    hub, conn = EventHub(capacity=64), FakeConn()
    run_stream(hub, conn, 1000)  # resumes at 1: 936 evicted
    frames = b"".join(unchunk(b"".join(conn.transport.writes)))
    assert frames.startswith(b'event: dropped\ndata: {"missed":936}\n\n')
    assert ids_on_the_wire(conn) == list(range(937, 1001))
    totals = hub.totals()
    assert (totals["sse_delivered"], totals["sse_dropped"]) == (64, 936)


# -- the real server ------------------------------------------------------------------
@pytest.mark.parametrize("tls", [False, True])
def test_a_large_replay_arrives_whole_over_http_and_tls(tmp_path: Path, tls: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # 3,000 events of ~700 bytes resumed from the start: chunks far above the size the
    # route joins (agent/api/chunked.py), so the frames go to the transport as they are.
    # The writers the route gets are kept: the real server's connection must be one
    # ChunkedBody writes to (else the route falls back to ASGI send and this test would
    # not cover the direct writes).
    writers: list[ChunkedBody | None] = []
    real_of = ChunkedBody.of
    monkeypatch.setattr(ChunkedBody, "of", classmethod(
        lambda cls, scope: writers.append(real_of(scope)) or writers[-1]))
    api: dict[str, Any] = {}
    verify: Any = True
    if tls:
        cert, key = self_signed_cert(tmp_path)
        api = {"tls_certfile": str(cert), "tls_keyfile": str(key)}
        verify = ssl.create_default_context(cafile=str(cert))
    s = settings(api=api, stream={"replay_buffer": 4096})
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv:
        url = srv.url.replace("http://", "https://") if tls else srv.url
        httpx.post(f"{url}/monitors/fake/start", json={}, verify=verify).raise_for_status()
        inbox = context_of(srv.app).registry.get("fake").inbox  # type: ignore[attr-defined]
        for i in range(3000):
            inbox.put({"pid": i, "argv": ["é" * 300, f"n{i}"]})
        hub = context_of(srv.app).hub
        assert hub is not None
        deadline = time.monotonic() + 10
        while hub.next_seq <= 3000:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        got: list[tuple[int, dict[str, Any]]] = []
        with httpx.Client(verify=verify, timeout=30) as c, \
                c.stream("GET", f"{url}/events?last_event_id=0") as r:
            assert r.status_code == 200
            seq = 0
            for line in r.iter_lines():
                if line.startswith("id: "):
                    seq = int(line[4:])
                elif line.startswith("data: "):
                    got.append((seq, json.loads(line[6:])))
                if len(got) == 3000:
                    break
    assert [g[0] for g in got] == list(range(1, 3001))
    assert [g[1]["argv"] for g in got] == [["é" * 300, f"n{i}"] for i in range(3000)]
    assert len(writers) == 1 and writers[0] is not None and writers[0].chunks >= 2
