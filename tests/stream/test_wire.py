"""WebSocket messages made from SSE frames (agent/stream/wire.py): compiled
(agent/stream/ringstore.c) and Python, equal to each other and to the messages of the
same events read one by one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.stream import ring, wire
from agent.stream.hub import Batch, EventHub, Filters

pytestmark = pytest.mark.skipif(not ring.compiled_available(),
                                reason=f"the compiled ring store is not built: "
                                       f"{ring.IMPORT_ERROR}")

NAMES = ["exec", 'we"ird\\', "tab\there", "ctl\x01\x1f", "café", "ünï-ç✓de"]


def published(names: list[str], n: int, **filters: Any) -> tuple[EventHub, Any, Any]:
    hub = EventHub(capacity=1024)
    f = Filters(**filters)
    by_frames = hub.subscribe("ws", f, last_event_id=0)
    by_events = hub.subscribe("ws", f, last_event_id=0)
    for i in range(n):
        hub.publish({"monitor": names[i % len(names)], "pid": i, "uid": 0, "comm": "sh",
                     "argv": ["a\nb", "\"q\"", "ü"], "i": i})
    return hub, by_frames, by_events


@pytest.mark.parametrize("names", [["exec"], NAMES])
@pytest.mark.parametrize("filters", [{}, {"pids": frozenset({3, 4, 5})},
                                     {"comms": frozenset({"sh"})}])
def test_messages_from_frames_equal_those_from_events(names: list[str],
                                                      filters: dict[str, Any]) -> None:
    _, by_frames, by_events = published(names, 40, **filters)
    frames, events = by_frames.read_sse(limit=512), by_events.read(limit=512)
    assert frames.count == events.count > 0
    assert wire.ws_array_of(frames) == wire.py_ws_array_of(frames) == wire.ws_array(events)
    assert (wire.ws_messages_of(frames) == wire.py_ws_messages_of(frames)
            == wire.ws_messages(events))
    assert [json.loads(m)["data"]["i"] for m in wire.ws_messages_of(frames)] == [
        json.loads(e.data)["i"] for e in events.events]


def test_missed_count_comes_first_and_empty_batches_are_empty_arrays() -> None:
    hub = EventHub(capacity=4)
    sub = hub.subscribe("ws", Filters(), last_event_id=0)
    for i in range(10):
        hub.publish({"monitor": "exec", "i": i})
    batch = sub.read_sse()
    assert batch.missed == 6 and batch.count == 4
    for make in (wire.ws_array_of, wire.py_ws_array_of):
        got = json.loads(make(batch))
        assert got[0] == {"event": "dropped", "missed": 6}
        assert [m["id"] for m in got[1:]] == [7, 8, 9, 10]
    assert wire.ws_messages_of(batch) == wire.py_ws_messages_of(batch)
    empty = Batch()
    assert wire.ws_array_of(empty) == wire.py_ws_array_of(empty) == b"[]"
    assert wire.ws_messages_of(empty) == wire.py_ws_messages_of(empty) == []
    only_missed = Batch(missed=3)
    assert wire.ws_array_of(only_missed) == b'[{"event":"dropped","missed":3}]'
    assert wire.ws_messages_of(only_missed) == [b'{"event":"dropped","missed":3}']


@pytest.mark.parametrize("frames", [
    b"garbage\n\n",
    b"id: x\nevent: e\ndata: {}\n\n",
    b"id: 1\nevent: e\ndata: {}\n",  # cut short
    b"id: 1\ndata: {}\n\n",
    b"id: 1\nevent: e\ndata: {}\n\nid: 2",
])
def test_frames_that_are_not_event_frames_are_refused(frames: bytes) -> None:
    with pytest.raises(ValueError):
        wire.ws_array_of(Batch(frames=frames, count=1))
    with pytest.raises(ValueError):
        wire.ws_messages_of(Batch(frames=frames, count=1))
