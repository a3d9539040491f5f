"""The event hub: one bounded ring of encoded events shared by every stream subscriber.

Monitor poller threads call ``publish``; it encodes the event once (the same bytes as the
JSONL output), stores it with a sequence number in a fixed-size ring and wakes the asyncio
side. Memory is bounded by ``capacity`` whatever the number of subscribers: each
subscriber only keeps its read position. A subscriber that falls more than ``capacity``
events behind loses the overwritten ones; it counts them and is told in-band (the
``missed`` count of its next batch).

Threading: ``publish`` runs on poller threads; everything else runs on the event loop.
Reads are lock-free: a slot is checked against the expected sequence number, so a slot
overwritten while being read counts as missed instead of delivering the wrong event.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent.model.events import Event, encode_event

# How many sequence numbers one read scans at most: bounds the time a subscriber holds the
# event loop and the size of one SSE chunk / burst of WebSocket frames.
DEFAULT_BATCH = 512


class HubFull(Exception):
    """max_subscribers reached (503)."""


@dataclass(frozen=True, slots=True)
class HubEvent:
    seq: int
    monitor: str
    pid: int | None
    uid: int | None
    comm: str | None
    data: bytes  # encode_event(event): one JSON object


@dataclass(frozen=True)
class Filters:
    """Each non-empty set must contain the event's value; empty sets match everything."""

    monitors: frozenset[str] = frozenset()
    pids: frozenset[int] = frozenset()
    uids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()

    def matches(self, ev: HubEvent) -> bool:
        return (
            (not self.monitors or ev.monitor in self.monitors)
            and (not self.pids or ev.pid in self.pids)
            and (not self.uids or ev.uid in self.uids)
            and (not self.comms or ev.comm in self.comms)
        )

    def as_dict(self) -> dict[str, list[Any]]:
        return {
            "monitor": sorted(self.monitors),
            "pid": sorted(self.pids),
            "uid": sorted(self.uids),
            "comm": sorted(self.comms),
        }


@dataclass
class Batch:
    events: list[HubEvent]
    missed: int = 0


@dataclass(eq=False)
class Subscriber:
    hub: EventHub
    id: int
    kind: str  # "sse" | "ws"
    filters: Filters
    client: str
    position: int  # the next sequence number to read
    delivered: int = 0
    dropped: int = 0
    inflight: int = 0  # handed to the socket, not yet confirmed sent
    connected_at: str = field(default_factory=lambda: _now_iso())
    closed_reason: str | None = None
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def read(self, limit: int = DEFAULT_BATCH) -> Batch:
        """What is new for this subscriber (never blocks)."""
        return self.hub.read(self, limit)

    async def next_batch(self, limit: int = DEFAULT_BATCH) -> Batch | None:
        """Waits for events (or a missed count); None once this subscriber is closed."""
        while not self.closed:
            batch = self.hub.read(self, limit)
            if batch.events or batch.missed:
                return batch
            if self.hub.has_after(self.position):
                await asyncio.sleep(0)  # filtered out a full scan: let others run
                continue
            self._wakeup.clear()
            self.hub.waiting.add(self)
            try:
                await self._wakeup.wait()
            finally:
                self.hub.waiting.discard(self)
        return None

    def confirm(self) -> None:
        """The in-flight messages reached the socket."""
        self.delivered += self.inflight
        self.inflight = 0

    def close(self, reason: str) -> None:
        """Ends next_batch(); call on the event loop."""
        if self.closed_reason is None:
            self.closed_reason = reason
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    def lag(self) -> int:
        return self.hub.next_seq - self.position

    def as_dict(self) -> dict[str, Any]:
        # Events already overwritten but not yet read count as dropped now, so /stats
        # shows the loss of a subscriber that is stuck in a blocked send.
        pending_loss = max(0, self.hub.first_seq - self.position)
        return {
            "id": self.id,
            "kind": self.kind,
            "filters": self.filters.as_dict(),
            "client": self.client,
            "connected_at": self.connected_at,
            "delivered": self.delivered,
            "dropped": self.dropped + pending_loss,
            "lag": self.lag(),
        }


class EventHub:
    def __init__(self, capacity: int = 65536, max_subscribers: int = 256) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.max_subscribers = max_subscribers
        self._ring: list[HubEvent | None] = [None] * capacity
        self._next = 1  # sequence number of the next event; ids start at 1
        self._lock = threading.Lock()  # orders publishers (one poller thread per monitor)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_pending = False
        self._ids = itertools.count(1)
        self.subscribers: dict[int, Subscriber] = {}
        self.waiting: set[Subscriber] = set()
        self.closed = False
        # Totals of subscribers that are gone, so counters never go backwards.
        self._past = Counter[str]()
        self.wakeups = 0

    # -- the publishing side (poller threads) ----------------------------------------
    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, event: Event) -> bytes:
        """Thread-safe, non-blocking, O(1) in the number of subscribers. Returns the
        encoded event (other consumers, e.g. the NATS exporter, reuse the bytes)."""
        data = encode_event(event)
        pid, uid, comm = event.get("pid"), event.get("uid"), event.get("comm")
        with self._lock:
            seq = self._next
            self._ring[seq % self.capacity] = HubEvent(
                seq, str(event.get("monitor", "")), pid, uid, comm, data
            )
            self._next = seq + 1  # after the slot is written: readers trust seq < _next
            schedule = not self._wake_pending and self._loop is not None
            if schedule:
                self._wake_pending = True
        if schedule:
            # One callback in flight at a time: a burst of events costs one wake-up, and a
            # busy loop coalesces everything published until it gets to the callback.
            try:
                self._loop.call_soon_threadsafe(self._wake)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed: shutting down
                self._wake_pending = False
        return data

    def _wake(self) -> None:
        # Cleared before waking: an event published from now on schedules a new wake-up,
        # and one published before it is visible to the subscribers woken below.
        self._wake_pending = False
        self.wakeups += 1
        for sub in list(self.waiting):
            sub.wake()

    # -- the reading side (event loop) ----------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still in the ring."""
        return max(1, self._next - self.capacity)

    def has_after(self, position: int) -> bool:
        return self._next > position

    def read(self, sub: Subscriber, limit: int) -> Batch:
        end_seq = self._next
        first = max(1, end_seq - self.capacity)
        pos, missed = sub.position, 0
        if pos < first:
            missed, pos = first - pos, first
        end = min(end_seq, pos + limit)
        events: list[HubEvent] = []
        ring, cap, matches = self._ring, self.capacity, sub.filters.matches
        for seq in range(pos, end):
            ev = ring[seq % cap]
            if ev is None or ev.seq != seq:  # overwritten by a publisher meanwhile
                missed += 1
            elif matches(ev):
                events.append(ev)
        sub.position = end
        sub.dropped += missed
        return Batch(events, missed)

    def subscribe(
        self, kind: str, filters: Filters, client: str = "", last_event_id: int | None = None
    ) -> Subscriber:
        """A new subscriber reading live events, or resuming after ``last_event_id``."""
        if self.closed:
            raise HubFull("the agent is shutting down")
        if len(self.subscribers) >= self.max_subscribers:
            raise HubFull(f"max_subscribers ({self.max_subscribers}) reached")
        position = self._next
        if last_event_id is not None and last_event_id >= 0:
            # An id from the future (e.g. from before an agent restart) resumes live.
            position = min(last_event_id + 1, self._next)
        sub = Subscriber(self, next(self._ids), kind, filters, client, position)
        self.subscribers[sub.id] = sub
        return sub

    def unsubscribe(self, sub: Subscriber, reason: str = "disconnected") -> None:
        """Idempotent."""
        sub.close(reason)
        if self.subscribers.pop(sub.id, None) is not None:
            pending_loss = max(0, self.first_seq - sub.position)
            self._past[f"{sub.kind}_delivered"] += sub.delivered
            self._past[f"{sub.kind}_dropped"] += sub.dropped + pending_loss
            self._past[f"closed_{reason}"] += 1

    def close(self) -> None:
        """Ends every subscriber's stream (server shutdown). Call on the event loop."""
        self.closed = True
        for sub in list(self.subscribers.values()):
            sub.close("shutdown")

    def close_threadsafe(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self.close()
        else:
            loop.call_soon_threadsafe(self.close)

    # -- figures ---------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        """Delivered and dropped per kind over every subscriber ever connected."""
        out = {f"{k}_{m}": self._past[f"{k}_{m}"] for k in ("sse", "ws")
               for m in ("delivered", "dropped")}
        for sub in list(self.subscribers.values()):  # may run on a scrape thread
            d = sub.as_dict()
            out[f"{sub.kind}_delivered"] = out.get(f"{sub.kind}_delivered", 0) + d["delivered"]
            out[f"{sub.kind}_dropped"] = out.get(f"{sub.kind}_dropped", 0) + d["dropped"]
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "published": self._next - 1,
            "buffered": min(self._next - 1, self.capacity),
            "capacity": self.capacity,
            "first_id": self.first_seq if self._next > 1 else None,
            "last_id": self._next - 1 if self._next > 1 else None,
            "max_subscribers": self.max_subscribers,
            "wakeups": self.wakeups,
            "totals": self.totals(),
            "closed": {k[len("closed_"):]: v for k, v in list(self._past.items())
                       if k.startswith("closed_")},
            "subscribers": [s.as_dict() for s in list(self.subscribers.values())],
        }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
