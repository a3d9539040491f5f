"""The event hub: one bounded ring of encoded events shared by every stream subscriber.

Monitor poller threads call ``offer`` (the hub is a consumer of the pipeline,
agent/core/pipeline.py) with the event and its JSON, encoded once for every consumer (the
same bytes as the JSONL output); it copies the event's SSE frame
(``id: N\\nevent: M\\ndata: <json>\\n\\n``) into one preallocated byte ring. The ring is
bounded twice: in events (``capacity``, the replay_buffer setting) and in bytes
(``replay_bytes``); whichever fills first evicts the oldest events. Per event the hub
keeps no Python object, only a few numbers in flat arrays (where its frame starts, its
length, and the fields filters look at), so its memory is the byte ring plus ~64 bytes
per slot whatever the number of subscribers. A subscriber only keeps its read position;
one that falls behind the oldest buffered event counts what it missed and is told
in-band (the ``missed`` count of its next batch).

A live subscriber is also bounded in time (``max_lag_ms``, the stream.max_lag_ms
setting or the route's query parameter): when the oldest event it has not read was
stored longer ago than that, it skips ahead to the events stored since, and counts the
ones skipped exactly as evicted ones (in-band ``missed``, its ``dropped``). Without it a
client slower than the intake reads a whole replay buffer behind (seconds under load).
A subscriber that resumes (Last-Event-ID) is exempt until it has caught up with the
head once: a resume replays what the ring holds.

Frames lie back to back in sequence order (a frame that does not fit before the end of
the buffer starts again at offset 0), so an unfiltered subscriber's batch is one slice of
the ring: one memcpy and one socket write for hundreds of events, the same bytes for
every subscriber, no per-event work on the event loop.

The store itself (``offer``: frame, eviction, filter keys) is agent/stream/ring.py: compiled
(agent/stream/ringstore.c) or its Python reference.

Threading: ``offer`` runs on poller threads (one per monitor), one store at a time (the
compiled store is one step under the GIL, the Python one takes a lock); everything else
runs on the event loop, without the lock, except the figures
(``stats``, ``totals``): the API reads them on the event loop and the Prometheus scrape
on a pool thread; they copy what they iterate, so a concurrent change costs at most a
figure one update old. Readers copy first and check
afterwards: the publisher advances ``_first`` (the oldest live sequence number) *before*
it overwrites bytes, and the GIL makes both threads see each other's writes in program
order, so an event whose number is still >= ``_first`` after the copy was intact while it
was copied; older ones count as missed.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from agent.model.events import Event, encode_event
from agent.model.filters import StreamFilters, workload_matches
from agent.stream.ring import NONE, RingArrays, make_store

# How many sequence numbers one read scans at most: bounds the time a subscriber holds the
# event loop and the size of one SSE chunk / burst of WebSocket frames.
DEFAULT_BATCH = 512
# An unfiltered SSE read takes up to this many events / bytes at once: one slice copy,
# so large batches cost the loop nothing per event and save socket writes under load.
SSE_BATCH_EVENTS = 8192
SSE_BATCH_BYTES = 512 * 1024
DEFAULT_REPLAY_BYTES = 16 * 1024 * 1024
MIN_REPLAY_BYTES = 64 * 1024
# Per-slot index memory: offset (8) + frame length (4) + header length (2) + monitor id
# (2) + pid (8) + uid (8) + comm hash (8) + cgroup id (8) + process_id hash (8) +
# arrival time (8).
SLOT_BYTES = 64
# A subscriber with workload filters remembers the verdict per cgroup id (the cgroup's
# path, container and unit never change for one id): at most this many, then it starts
# over.
WORKLOAD_MEMO = 4096


class HubFull(Exception):
    """max_subscribers reached (503)."""


@dataclass(frozen=True, slots=True)
class HubEvent:
    """One event as a subscriber reads it (WebSocket, tests): a copy of its JSON."""

    seq: int
    monitor: str
    data: bytes  # encode_event(event): one JSON object


@dataclass(frozen=True)
class Filters:
    """Each non-empty set must contain the event's value; empty sets match everything."""

    monitors: frozenset[str] = frozenset()
    pids: frozenset[int] = frozenset()
    uids: frozenset[int] = frozenset()
    comms: frozenset[str] = frozenset()
    process_ids: frozenset[str] = frozenset()
    container_ids: frozenset[str] = frozenset()  # prefixes
    cgroups: frozenset[str] = frozenset()  # path prefixes (component-wise)
    units: frozenset[str] = frozenset()
    # cgroup id -> whether its events pass the workload filters (read side only)
    memo: dict[int, bool] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def of(cls, f: StreamFilters) -> Filters:
        """The matcher of validated stream filters (agent/model/filters.py)."""
        return cls(frozenset(f.monitor), frozenset(f.pid), frozenset(f.uid),
                   frozenset(f.comm), frozenset(f.process_id), frozenset(f.container_id),
                   frozenset(f.cgroup), frozenset(f.unit))

    @property
    def workload(self) -> bool:
        """Whether a workload filter (container id, cgroup, unit) is set."""
        return bool(self.container_ids or self.cgroups or self.units)

    @property
    def empty(self) -> bool:
        return not (self.monitors or self.pids or self.uids or self.comms
                    or self.process_ids or self.workload)

    @property
    def monitors_only(self) -> bool:
        return bool(self.monitors) and not (self.pids or self.uids or self.comms
                                            or self.process_ids or self.workload)

    def as_dict(self) -> dict[str, list[Any]]:
        return {
            "monitor": sorted(self.monitors),
            "pid": sorted(self.pids),
            "uid": sorted(self.uids),
            "comm": sorted(self.comms),
            "process_id": sorted(self.process_ids),
            "container_id": sorted(self.container_ids),
            "cgroup": sorted(self.cgroups),
            "unit": sorted(self.units),
        }

    def passes_workload(self, cgroup_id: int, event: dict[str, Any]) -> bool:
        """The workload filters against ``event`` (decoded), remembered per cgroup id;
        an event whose cgroup was not resolved (path null) is not remembered."""
        verdict = self.memo.get(cgroup_id)
        if verdict is None:
            verdict = workload_matches(self.container_ids, self.cgroups, self.units, event)
            if event.get("cgroup") is not None and cgroup_id != NONE:
                if len(self.memo) >= WORKLOAD_MEMO:
                    self.memo.clear()
                self.memo[cgroup_id] = verdict
        return verdict


@dataclass
class Batch:
    """What one read returns: either the SSE frames of ``count`` events back to back
    (``frames``, read_sse) or the events one by one (``events``, read_events)."""

    events: list[HubEvent] = field(default_factory=list)
    missed: int = 0
    frames: bytes = b""
    count: int = 0


@dataclass(eq=False)
class Subscriber:
    hub: EventHub
    id: int
    kind: str  # "sse" | "ws"
    filters: Filters
    client: str
    position: int  # the next sequence number to read
    delivered: int = 0
    dropped: int = 0  # evicted before it read them, skipped (max_lag), never sent
    skipped: int = 0  # of dropped: skipped ahead over because they were older than max_lag
    inflight: int = 0  # handed to the socket, not yet confirmed sent
    max_lag_ns: int = 0  # 0: never skip
    replaying: bool = False  # resumed: exempt from max_lag until it reaches the head once
    connected_at: str = field(default_factory=lambda: _now_iso())
    closed_reason: str | None = None
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _ping: bool = False

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def read(self, limit: int = DEFAULT_BATCH) -> Batch:
        """What is new for this subscriber, one event at a time (never blocks)."""
        return self.hub.read_events(self, limit)

    def read_sse(self, limit: int = SSE_BATCH_EVENTS) -> Batch:
        """What is new for this subscriber as SSE frames (never blocks)."""
        return self.hub.read_sse(self, limit)

    async def next_batch(self, limit: int = DEFAULT_BATCH, sse: bool = False) -> Batch | None:
        """Waits for events (or a missed count); None once this subscriber is closed. An
        empty batch when ping() was called meanwhile (an idle stream's heartbeat)."""
        while not self.closed:
            batch = self.read_sse(limit) if sse else self.read(limit)
            if batch.count or batch.missed:
                self._ping = False
                return batch
            if self._ping:
                self._ping = False
                return batch
            if self.hub.has_after(self.position):
                await asyncio.sleep(0)  # filtered out a full scan: let others run
                continue
            self._wakeup.clear()
            self.hub.waiting.add(self)
            # Re-arm the publishers' wake-up (see EventHub._wake), then look once more:
            # an event published before the re-arm scheduled nothing but is seen here.
            self.hub.arm()
            if self.hub.has_after(self.position) or self._ping:
                self.hub.waiting.discard(self)
                continue
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

    def ping(self) -> None:
        """Makes next_batch() return, with an empty batch if nothing is new."""
        self._ping = True
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
            "skipped": self.skipped,
            "lag": self.lag(),
            "max_lag_ms": self.max_lag_ns // 1_000_000,
            "replaying": self.replaying,
        }


class EventHub:
    def __init__(self, capacity: int = 65536, max_subscribers: int = 256,
                 replay_bytes: int = DEFAULT_REPLAY_BYTES, store: str = "auto",
                 max_lag_ms: int = 0, clock: Callable[[], int] | None = None) -> None:
        """``store``: the ring store (agent/stream/ring.py), "auto" (compiled when
        built), "compiled" or "python". ``max_lag_ms``: the subscribers' default (see
        the module docstring; 0: never skip). ``clock``: monotonic ns, the arrival
        times' and the readers' (time.monotonic_ns, CLOCK_MONOTONIC; tests fake it)."""
        if capacity < 1:
            raise ValueError("capacity must be positive")
        if replay_bytes < MIN_REPLAY_BYTES:
            raise ValueError(f"replay_bytes must be at least {MIN_REPLAY_BYTES}")
        if max_lag_ms < 0:
            raise ValueError("max_lag_ms must be 0 (never skip) or positive")
        self.max_lag_ms = max_lag_ms
        self._clock = clock or time.monotonic_ns
        self.capacity = capacity
        self.replay_bytes = replay_bytes
        self.max_subscribers = max_subscribers
        self._arrays = a = RingArrays.allocate(capacity, replay_bytes)
        # The readers' views of the ring (the store writes through the same objects).
        self._buf, self._mv = a.buf, memoryview(a.buf)
        self._off, self._len, self._hdr, self._mon = a.off, a.len, a.hdr, a.mon
        self._pid, self._uid, self._comm, self._cgid, self._procid = (
            a.pid, a.uid, a.comm, a.cgid, a.procid)
        self._at = a.at
        self._monitor_ids: dict[str, int] = {}
        self._monitor_names: list[str] = []
        self._monitor_heads: list[bytes] = []  # b"\nevent: <name>\ndata: "
        self._register_lock = threading.Lock()
        # The ring store (agent/stream/ring.py): compiled or the Python reference.
        self._ring = make_store(store, a, self._monitor_ids, self._monitor_heads,
                                self._monitor_id, self._schedule, clock)
        # The pipeline calls offer once per event: straight into the store.
        self.offer = self._ring.offer  # type: ignore[method-assign]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self.subscribers: dict[int, Subscriber] = {}
        self.waiting: set[Subscriber] = set()
        self.closed = False
        # Totals of subscribers that are gone, so counters never go backwards.
        self._past = Counter[str]()
        self.wakeups = 0
        # The last SSE run read (first seq, end seq, frames): shared by subscribers at
        # the same position. One run (<= SSE_BATCH_BYTES) at most.
        self._chunk: tuple[int, int, bytes] | None = None

    # -- the publishing side (poller threads) ----------------------------------------
    def attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ring.arm()

    def _monitor_id(self, name: str) -> int:
        """The store's ``register``: a monitor's id, added on its first event."""
        with self._register_lock:  # two pollers' first events at once
            mid = self._monitor_ids.get(name)
            if mid is None:  # monitor names come from the registry: a handful
                self._monitor_heads.append(b"\nevent: " + name.encode("utf-8", "replace")
                                           + b"\ndata: ")
                self._monitor_names.append(name)
                mid = self._monitor_ids[name] = len(self._monitor_names) - 1
            return mid

    def publish(self, event: Event) -> bytes:
        """Encodes ``event`` and offers it; returns the bytes (tests and benches: in the
        agent, the pipeline encodes once for every consumer and calls offer)."""
        data = encode_event(event)
        self.offer(event, data)
        return data

    def offer(self, event: Event, data: bytes) -> None:
        """A consumer of the pipeline (agent/core/pipeline.py), on a poller thread:
        thread-safe, non-blocking, O(1) in the number of subscribers. ``data``: the
        event's JSON (encode_event). Replaced in __init__ by the store's own offer (no
        Python frame per event); this is its contract."""
        self._ring.offer(event, data)

    def _schedule(self) -> None:
        """The store found no wake-up pending (poller thread): one callback in flight at
        a time, so a burst of events costs one wake-up, and a busy loop coalesces
        everything published until it gets to the callback. Without a loop (yet) the
        flag stays set: attach_loop and waiting subscribers re-arm it."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: shutting down
            self._ring.arm()

    def _wake(self) -> None:
        # With nobody waiting (every subscriber busy sending) the flag stays set: the
        # publishers then schedule no more callbacks, so a busy loop is not woken (and
        # the poller not made to hand over the GIL) once per batch for nothing. A
        # subscriber re-arms it before it waits (arm()).
        self.wakeups += 1
        if not self.waiting:
            return
        # Cleared before waking: an event published from now on schedules a new wake-up,
        # and one published before it is visible to the subscribers woken below.
        self._ring.arm()
        for sub in list(self.waiting):
            sub.wake()

    def arm(self) -> None:
        """The next publish schedules a wake-up (a subscriber is about to wait)."""
        self._ring.arm()

    # -- the store's counters ----------------------------------------------------------
    @property
    def _next(self) -> int:
        return self._ring.next

    @property
    def _first(self) -> int:
        return self._ring.first

    @property
    def oversized(self) -> int:
        """Events larger than the whole byte ring: published, not kept."""
        return self._ring.oversized

    # -- the reading side (event loop) ----------------------------------------------
    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def first_seq(self) -> int:
        """The oldest sequence number still in the ring."""
        return self._first

    def has_after(self, position: int) -> bool:
        return self._next > position

    def _start(self, sub: Subscriber) -> tuple[int, int, int]:
        """(position to read from, events missed before it, of which skipped over as
        older than the subscriber's max_lag). Changes nothing: a read that races a
        publisher calls it again."""
        first, pos = self._first, sub.position
        missed = 0
        if pos < first:
            pos, missed = first, first - pos
        if not sub.max_lag_ns or sub.replaying:
            return pos, missed, 0
        new = self._younger(pos, self._clock() - sub.max_lag_ns)
        return new, missed + new - pos, new - pos

    def _younger(self, pos: int, bound: int) -> int:
        """The first sequence number from ``pos`` stored at or after ``bound`` (the
        next one when none is): a binary search, arrival times never decrease in
        sequence order. A publisher evicting meanwhile can only make the answer early
        (an overwritten slot holds a later time); the read then counts the rest as
        evicted."""
        cap, at, end = self.capacity, self._at, self._next
        if pos >= end or at[pos % cap] >= bound:
            return pos
        lo, hi = pos + 1, end  # at[s] < bound for s < lo; the answer is in [lo, hi]
        while lo < hi:
            m = (lo + hi) // 2
            if at[m % cap] < bound:
                lo = m + 1
            else:
                hi = m
        return lo

    def _moved(self, sub: Subscriber, position: int, missed: int, skipped: int) -> None:
        """A read's outcome: the new position and what it lost on the way."""
        sub.position = position
        sub.dropped += missed
        sub.skipped += skipped
        if sub.replaying and position >= self._next:
            sub.replaying = False  # caught up with the head once: max_lag applies

    def read_sse(self, sub: Subscriber, limit: int = SSE_BATCH_EVENTS) -> Batch:
        """The subscriber's next events as SSE frames back to back."""
        f = sub.filters
        if not f.empty and not (f.monitors_only
                                and self._all_from(f.monitors, sub.position, limit)):
            return self._read_filtered(sub, limit, sse=True)
        chunk = self._chunk
        if chunk is not None and chunk[0] == sub.position and chunk[1] - chunk[0] <= limit \
                and self._start(sub)[0] == sub.position:
            # Another subscriber at the same position just read this run: the same bytes
            # object, no copy (subscribers that keep up move in step, so under fan-out
            # most reads are this).
            self._moved(sub, chunk[1], 0, 0)
            return Batch(frames=chunk[2], count=chunk[1] - chunk[0])
        cap, off, ln = self.capacity, self._off, self._len
        while True:
            pos, missed, skipped = self._start(sub)
            end = min(self._next, pos + limit)
            if pos >= end:
                frames = b""
                break
            lo = off[pos % cap]
            end = self._contiguous_end(pos, end, lo)
            hi = off[(end - 1) % cap] + ln[(end - 1) % cap]
            frames = bytes(self._mv[lo:hi])
            if self._first <= pos:  # after the copy: everything copied was intact
                break
            # A publisher evicted the start of the run meanwhile (a thread switch in the
            # middle of this read): read again from the new oldest event.
        self._moved(sub, max(end, pos), missed, skipped)
        if frames:
            self._chunk = (pos, end, frames)  # events never change: valid while kept
        return Batch(missed=missed, frames=frames, count=max(0, end - pos))

    def _all_from(self, monitors: frozenset[str], position: int, limit: int) -> bool:
        """Whether every event from ``position`` (up to ``limit``) comes from one of
        ``monitors``: counted at C speed in the monitor-id array, so a subscriber that
        filters on the only monitor running still reads one slice. A false answer (or
        a race with a publisher) only sends the read down the per-event path."""
        cap = self.capacity
        start, end = max(position, self._first), min(self._next, position + limit)
        if start >= end:
            return True
        a, b = start % cap, (end - 1) % cap + 1
        runs = [self._mon[a:b]] if a < b else [self._mon[a:], self._mon[:b]]
        ids = [self._monitor_ids[m] for m in monitors if m in self._monitor_ids]
        matching = sum(run.count(m) for run in runs for m in ids)
        return matching == end - start

    def _contiguous_end(self, pos: int, end: int, lo: int) -> int:
        """The end of the run of frames from ``pos`` that lie in one slice (and within
        SSE_BATCH_BYTES): frames after a wrap start below ``lo``."""
        cap, off = self.capacity, self._off
        limit_hi = lo + SSE_BATCH_BYTES
        last = off[(end - 1) % cap]
        if lo <= last < limit_hi:
            return end
        a, b = pos + 1, end  # off[s] in [lo, limit_hi) for s < answer
        while a < b:
            m = (a + b) // 2
            if lo <= off[m % cap] < limit_hi:
                a = m + 1
            else:
                b = m
        return a

    def read_events(self, sub: Subscriber, limit: int = DEFAULT_BATCH) -> Batch:
        """The subscriber's next events one by one (WebSocket)."""
        return self._read_filtered(sub, limit, sse=False)

    def _read_filtered(self, sub: Subscriber, limit: int, sse: bool) -> Batch:
        pos, missed, skipped = self._start(sub)
        end = min(self._next, pos + limit)
        cap, off, ln, hdr, mv = self.capacity, self._off, self._len, self._hdr, self._mv
        f = sub.filters
        mons = {self._monitor_ids.get(m, -1) for m in f.monitors}
        pids, uids = f.pids, f.uids
        comm_hashes = {hash(c) for c in f.comms}
        procid_hashes = {hash(p) for p in f.process_ids}
        monarr, pidarr, uidarr, commarr = self._mon, self._pid, self._uid, self._comm
        cgidarr, procidarr, memo = self._cgid, self._procid, f.memo
        workload = f.workload
        exact = bool(f.comms or f.process_ids)
        checks: set[int] = set()  # hash hits and cgroups not judged yet
        picked: list[tuple[int, bytes]] = []
        for seq in range(pos, end):
            i = seq % cap
            if mons and monarr[i] not in mons:
                continue
            if pids and (pidarr[i] not in pids or pidarr[i] == NONE):
                continue
            if uids and (uidarr[i] not in uids or uidarr[i] == NONE):
                continue
            if comm_hashes and commarr[i] not in comm_hashes:
                continue
            if procid_hashes and procidarr[i] not in procid_hashes:
                continue
            check = exact
            if workload:
                verdict = memo.get(cgidarr[i])
                if verdict is False or cgidarr[i] == NONE:
                    continue
                check = check or verdict is None
            if check:
                checks.add(seq)
            o = off[i]
            if sse:
                picked.append((seq, bytes(mv[o:o + ln[i]])))
            else:
                picked.append((seq, bytes(mv[o + hdr[i]:o + ln[i] - 2])))
        first = self._first  # after the copies: see the module docstring
        if first > pos:
            lost = min(first, end) - pos
            missed += lost
            picked = [p for p in picked if p[0] >= first]
        if checks and picked:
            # A hash hit (or a cgroup not yet judged) is checked against the event itself.
            picked = [p for p in picked if p[0] not in checks or self._exact(f, p[1], sse)]
        self._moved(sub, max(end, pos), missed, skipped)
        if sse:
            return Batch(missed=missed, frames=b"".join(p[1] for p in picked),
                         count=len(picked))
        names = self._monitor_names
        events = [HubEvent(s, names[self._mon[s % cap]], d) for s, d in picked]
        return Batch(events=events, missed=missed, count=len(events))

    @staticmethod
    def _exact(f: Filters, item: bytes, sse: bool) -> bool:
        data = item[item.index(b"\ndata: ") + 7:-2] if sse else item
        event = orjson.loads(data)
        if f.comms and event.get("comm") not in f.comms:
            return False
        if f.process_ids and event.get("process_id") not in f.process_ids:
            return False
        if f.workload:
            cgid = event.get("cgroup_id")
            return f.passes_workload(cgid if type(cgid) is int else NONE, event)
        return True

    def subscribe(
        self, kind: str, filters: Filters, client: str = "", last_event_id: int | None = None,
        max_lag_ms: int | None = None,
    ) -> Subscriber:
        """A new subscriber reading live events, or resuming after ``last_event_id``
        (exempt from max_lag until it has caught up with the head once). ``max_lag_ms``:
        this subscriber's bound (None: the hub's; 0: never skip)."""
        if self.closed:
            raise HubFull("the agent is shutting down")
        if len(self.subscribers) >= self.max_subscribers:
            raise HubFull(f"max_subscribers ({self.max_subscribers}) reached")
        position = self._next
        if last_event_id is not None and last_event_id >= 0:
            # An id from the future (e.g. from before an agent restart) resumes live.
            position = min(last_event_id + 1, self._next)
        lag = self.max_lag_ms if max_lag_ms is None else max_lag_ms
        if lag < 0:
            raise ValueError("max_lag_ms must be 0 (never skip) or positive")
        sub = Subscriber(self, next(self._ids), kind, filters, client, position,
                         max_lag_ns=lag * 1_000_000, replaying=position < self._next)
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

    def buffered_bytes(self) -> int:
        """Bytes the buffered events' frames take in the ring."""
        first, nxt, cap = self._first, self._next, self.capacity
        if first >= nxt:
            return 0
        lo = self._off[first % cap]
        hi = self._ring.head
        return hi - lo if hi > lo else self.replay_bytes - lo + hi  # approx. after a wrap

    def stats(self) -> dict[str, Any]:
        return {
            "published": self._next - 1,
            "buffered": self._next - self._first,
            "buffered_bytes": self.buffered_bytes(),
            "capacity": self.capacity,
            "replay_bytes": self.replay_bytes,
            "memory_bytes": self.replay_bytes + SLOT_BYTES * self.capacity,
            "oversized": self.oversized,
            "first_id": self.first_seq if self._next > self._first else None,
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

