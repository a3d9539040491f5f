"""``ebpf-agentctl events``: the SSE streams of every selected host merged into one.

Each host has its own task: it reads the agent's ``/events`` stream, tags each event with
``host`` (the inventory name) and hands it to the output. When a stream breaks, the task
says so on stderr, retries with back-off, and resumes with ``Last-Event-ID`` (the agent
replays what it still holds); the other hosts never wait for it. While it runs, it also
renews the leases the agents hold (``start --lease``), so monitors stop by themselves
once no controller watches them any more.

``--from nats://...`` reads the fleet stream from NATS instead (see agent/export/nats.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
from pydantic import ValidationError

from agent.fleet.client import (
    AgentClient,
    Answer,
    BadAnswer,
    Fleet,
    describe_exception,
    error_of,
    loads,
    read_body,
)
from agent.fleet.inventory import Host
from agent.fleet.ops import renew_leases
from agent.model.filters import StreamFilters

Emit = Callable[[dict[str, Any]], None]
Notice = Callable[[str], None]
IDLE_TIMEOUT_S = 60.0  # agents send heartbeats (stream.heartbeat_s, 15 s by default)
# What one host's stream may make the controller hold: one line, and the fields of one
# event together. The largest real event (exec: 64 arguments of 1 KiB, JSON-escaped) is
# well below; a host sending without a newline gets a per-host error instead of memory.
MAX_LINE_BYTES = 1 << 20
MAX_EVENT_BYTES = 1 << 20
EVENTS = "GET /events"


async def sse_lines(r: httpx.Response, max_line: int = MAX_LINE_BYTES
                    ) -> AsyncIterator[str]:
    """The lines of an SSE stream (LF or CRLF ends), none longer than ``max_line``
    bytes: httpx's own line reader buffers a line without bound."""
    buf = bytearray()
    too_long = f"bad answer: {EVENTS} sent a line longer than {max_line} bytes"
    async for chunk in r.aiter_bytes():
        buf += chunk
        if b"\n" in chunk:
            *lines, rest = buf.split(b"\n")
            buf = bytearray(rest)
            for line in lines:
                if len(line) > max_line:
                    raise BadAnswer(too_long)
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if len(buf) > max_line:
            raise BadAnswer(too_long)


def _event_json(data: str, what: str) -> dict[str, Any]:
    try:
        ev = loads(data)
    except (ValueError, RecursionError):
        raise BadAnswer(f"bad answer: {EVENTS} sent {what} that is not JSON") from None
    if not isinstance(ev, dict):
        raise BadAnswer(f"bad answer: {EVENTS} sent {what} that is not a JSON object")
    return ev


# The option of each stream filter whose name differs from it.
OPTION_OF = {"container_id": "--container", "process_id": "--process-id"}


def filters_of(monitor: list[str], pid: list[int], uid: list[int], comm: list[str],
               **workload: list[str]) -> StreamFilters:
    """The --monitor/--pid/--uid/--comm options and the workload ones (``process_id``,
    ``container_id``, ``cgroup``, ``unit``), checked against the agent's limits
    (agent/model/filters.py) before any host is asked: ValueError with one line."""
    try:
        return StreamFilters(monitor=monitor, pid=pid, uid=uid, comm=comm, **workload)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        where = OPTION_OF.get(key, "--" + key) if key else "filters"
        raise ValueError(f"{where}: {err['msg'].removeprefix('Value error, ')}") from None


@dataclass
class HostStream:
    host: Host
    up: bool = False
    ever_up: bool = False
    last_id: int | None = None
    events: int = 0
    missed: int = 0
    reconnects: int = 0
    error: str | None = None


class MergedEvents:
    def __init__(self, fleet: Fleet, filters: StreamFilters, emit: Emit, notice: Notice,
                 renew: bool = True, idle_timeout: float = IDLE_TIMEOUT_S,
                 max_events: int | None = None, max_lag_ms: int | None = None) -> None:
        """``max_lag_ms``: asked of every host's stream (the agents' max_lag_ms query
        parameter; None: each agent's stream.max_lag_ms)."""
        self.fleet = fleet
        self.max_lag_ms = max_lag_ms
        self.filters = filters
        self.emit = emit
        self.notice = notice
        self.renew = renew
        self.idle_timeout = idle_timeout
        self.max_events = max_events
        self.total = 0
        self.streams = {h.name: HostStream(h) for h in fleet.hosts}
        self._done = asyncio.Event()

    async def run(self, duration: float | None = None) -> dict[str, HostStream]:
        async with self.fleet.http_client(read_timeout=self.idle_timeout,
                                          streams=len(self.streams)) as http:
            tasks = [asyncio.create_task(self._host(http, s)) for s in self.streams.values()]
            self._renewing = asyncio.Semaphore(self.fleet.parallel)  # like Fleet.each
            if self.renew:
                tasks += [asyncio.create_task(self._renewer(http, h)) for h in self.fleet.hosts]
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), duration)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return self.streams

    def stop(self) -> None:
        self._done.set()

    def _deliver(self, s: HostStream, ev: dict[str, Any]) -> None:
        s.events += 1
        self.total += 1
        self.emit(ev)
        if self.max_events is not None and self.total >= self.max_events:
            self._done.set()

    async def _host(self, http: httpx.AsyncClient, s: HostStream) -> None:
        client = AgentClient(http, s.host)
        delay = 0.2
        while True:
            delivered = s.events
            try:
                await self._stream(client, s)
                reason = "the agent closed the stream"
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = describe_exception(e, self.idle_timeout)
            s.error = reason
            if s.up or not s.ever_up and s.reconnects == 0:
                self.notice(f"{s.host.name}: down ({reason})")
            # Only a stream that delivered events resets the back-off: a host that
            # answers 200 and closes, or sends garbage, is retried ever more slowly.
            if s.events > delivered:
                delay = 0.2
            s.up = False
            s.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _stream(self, c: AgentClient, s: HostStream) -> None:
        headers = dict(c.headers)
        if s.last_id is not None:
            headers["Last-Event-ID"] = str(s.last_id)
        params = tuple(self.filters.params())
        if self.max_lag_ms is not None:
            params += (("max_lag_ms", str(self.max_lag_ms)),)
        async with c.http.stream("GET", s.host.url + "/events", params=params,
                                 headers=headers) as r:
            if r.status_code != 200:
                body = await read_body(r, f"the answer to {EVENTS}")
                raise error_of(Answer(EVENTS, r.status_code, r.reason_phrase, r.headers,
                                      body))
            ctype = r.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "text/event-stream":
                raise BadAnswer(f"bad answer: {EVENTS} is {ctype or 'untyped'}, not "
                                "text/event-stream")
            if s.ever_up:
                after = f" after id {s.last_id}" if s.last_id is not None else ""
                self.notice(f"{s.host.name}: back, resuming{after}")
            else:
                self.notice(f"{s.host.name}: streaming")
            s.up = s.ever_up = True
            s.error = None
            fields: dict[str, str] = {}
            size = 0
            async for line in sse_lines(r):
                if line:
                    if not line.startswith(":"):
                        key, _, value = line.partition(":")
                        fields[key] = value[1:] if value.startswith(" ") else value
                        size += len(line)
                        if size > MAX_EVENT_BYTES:
                            raise BadAnswer(f"bad answer: {EVENTS} sent an event larger "
                                            f"than {MAX_EVENT_BYTES} bytes")
                    continue
                current, fields, size = fields, {}, 0
                if "data" not in current:
                    continue
                if current.get("event") == "dropped":
                    missed = _event_json(current["data"], "a dropped notice").get("missed", 0)
                    if isinstance(missed, bool) or not isinstance(missed, int):
                        raise BadAnswer(f"bad answer: {EVENTS} sent a dropped notice "
                                        "without a count")
                    s.missed += missed
                    self.notice(f"{s.host.name}: {missed} events missed (fell out of the "
                                "agent's replay buffer)")
                    continue
                event_id = current.get("id")
                if event_id is not None and not (event_id.isascii() and event_id.isdigit()):
                    raise BadAnswer(f"bad answer: {EVENTS} sent an id that is not a "
                                    f"number ({event_id[:20]!r})")
                ev = _event_json(current["data"], "an event")
                if event_id is not None:
                    s.last_id = int(event_id)
                self._deliver(s, {"host": s.host.name, **ev})

    async def _renewer(self, http: httpx.AsyncClient, host: Host) -> None:
        """Renews the host's leases at a third of their length (at least every 60 s)."""
        client = AgentClient(http, host)
        while True:
            wait = 30.0
            with contextlib.suppress(Exception):
                async with self._renewing, asyncio.timeout(self.fleet.timeout):
                    renewed = await renew_leases(client)
                if renewed:
                    wait = max(0.5, min(60.0, min(renewed.values()) / 3))
            await asyncio.sleep(wait)


async def nats_events(url: str, subject: str, filters: StreamFilters, emit: Emit,
                      notice: Notice, duration: float | None = None,
                      max_events: int | None = None, hosts: set[str] | None = None,
                      token: str | None = None, creds: str | None = None) -> int:
    """The fleet stream from NATS: every agent exporting there, one subscription."""
    import nats

    done = asyncio.Event()
    count = 0

    async def on_msg(msg: Any) -> None:
        nonlocal count
        try:
            ev = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(ev, dict) or not filters.matches(ev):
            return
        if hosts and ev.get("host") not in hosts:
            return
        count += 1
        emit(ev)
        if max_events is not None and count >= max_events:
            done.set()

    async def disconnected() -> None:
        notice(f"{url}: disconnected; reconnecting")

    async def reconnected() -> None:
        notice(f"{url}: reconnected")

    async def error(e: Exception) -> None:
        notice(f"{url}: {e}")

    kw: dict[str, Any] = {}
    if token:
        kw["token"] = token
    if creds:
        kw["user_credentials"] = creds
    nc = await nats.connect(url, disconnected_cb=disconnected, reconnected_cb=reconnected,
                            error_cb=error, max_reconnect_attempts=-1, connect_timeout=5,
                            name="ebpf-agentctl", **kw)
    try:
        await nc.subscribe(subject, cb=on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()
        notice(f"{url}: subscribed to {subject}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), duration)
    finally:
        await nc.drain()
    return count


def event_line(ev: dict[str, Any]) -> str:
    """One readable line per event (the table output of ``events``)."""
    t = str(ev.get("timestamp", ""))[11:23]
    head = f"{t} {ev.get('host', '-'):<12} {ev.get('monitor', '-'):<8}"
    who = f"pid={ev.get('pid')} uid={ev.get('uid')} {ev.get('comm', '')}"
    where = workload_label(ev)
    if where:
        who = f"{who} [{where}]"
    if ev.get("monitor") == "exec":
        argv = " ".join(str(a) for a in ev.get("argv") or [])
        return f"{head} {who} ret={ev.get('ret')} {argv}"
    rest = {k: v for k, v in ev.items() if k not in _SHOWN}
    return f"{head} {who} {orjson.dumps(rest).decode()}"


# Fields the readable line shows (or leaves out as noise: the ids a user reads in -o json).
_SHOWN = frozenset((
    "host", "monitor", "timestamp", "ts_ns", "pid", "uid", "comm", "tid", "gid", "ppid",
    "process_id", "parent_process_id", "cgroup_id", "cgroup", "container_id", "pod_uid",
    "unit"))
SHORT_ID = 12  # a container id as docker ps and crictl ps show it


def workload_label(ev: dict[str, Any]) -> str:
    """Where an event ran, briefly: ``ctr=<12 hex>`` in a container, else ``unit=<unit>``,
    else nothing."""
    cid = ev.get("container_id")
    if isinstance(cid, str) and cid:
        return f"ctr={cid[:SHORT_ID]}"
    unit = ev.get("unit")
    return f"unit={unit}" if isinstance(unit, str) and unit else ""
