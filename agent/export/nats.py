"""Events to NATS JetStream (``export.nats``), without ever blocking the event path.

Poller threads call ``offer`` with the event's JSON, encoded once for every consumer of
the pipeline (agent/core/pipeline.py; the same bytes as the JSONL output);
it prepends a ``host`` field and appends to a bounded buffer, or counts a drop when the
buffer is full. A publisher thread runs its own asyncio loop: it takes batches from the
buffer, publishes them with JetStream acknowledgements and keeps a batch until every
message of it is acknowledged, re-sending after a reconnect (with back-off). Every
message carries ``Nats-Msg-Id: <host>:<epoch>:<seq>`` so JetStream drops a re-send whose
first copy was stored but whose acknowledgement was lost; ``epoch`` (the exporter's start
time) keeps a restarted agent's sequence numbers from colliding with the previous run's.

Accounting: ``produced = published + dropped + buffered`` at every moment; on shutdown
whatever is still buffered after a short flush is counted as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

import orjson

from agent.config import NatsExportSettings
from agent.model.events import Event

log = logging.getLogger(__name__)
FLUSH_ON_STOP_S = 3.0
MAX_ATTEMPTS = 5  # per message, for errors the server gives (not connection losses)


def subject_token(value: str) -> str:
    """A subject token: dots split subjects, and wildcards/whitespace are not allowed."""
    out = "".join("_" if c in ".*> \t\r\n" else c for c in value)
    return out or "_"


class Pending:
    __slots__ = ("seq", "subject", "payload", "attempts")

    def __init__(self, seq: int, subject: str, payload: bytes) -> None:
        self.seq, self.subject, self.payload, self.attempts = seq, subject, payload, 0


class NatsExporter:
    def __init__(self, cfg: NatsExportSettings, host: str) -> None:
        self.cfg = cfg
        self.host = host
        self.epoch = time.time_ns() // 1_000_000
        self._host_json = orjson.dumps(host)
        self._subjects: dict[str, str | None] = {}
        self._buf: deque[Pending] = deque()
        self._inflight: list[Pending] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._wake_pending = False
        self._stopping = threading.Event()
        self._lost = asyncio.Event()  # replaced per connection (on the publisher's loop)
        self._thread: threading.Thread | None = None
        self.produced = 0
        self.published = 0
        self.duplicates = 0  # acknowledged as duplicates: an earlier copy was stored
        self.dropped_buffer_full = 0
        self.dropped_publish_failed = 0
        self.dropped_shutdown = 0
        self.connected = False
        self.connects = 0
        self.batches = 0
        self.last_error: str | None = None
        self._warned = False

    # -- the event path (poller threads): never blocks ----------------------------------
    def subject_for(self, monitor: str) -> str | None:
        subject = self._subjects.get(monitor, "")
        if subject == "":
            subject = None
            if self.cfg.monitors.get(monitor, True):
                subject = self.cfg.subject.format(host=subject_token(self.host),
                                                  monitor=subject_token(monitor))
            self._subjects[monitor] = subject
        return subject

    def offer(self, event: Event, data: bytes) -> None:
        """A consumer of the pipeline (agent/core/pipeline.py), on a poller thread:
        ``data`` is the event's JSON (encode_event)."""
        monitor = event.get("monitor", "")
        subject = self.subject_for(monitor if type(monitor) is str else str(monitor))
        if subject is None:
            return
        # data is one JSON object: '{"monitor":...}' -> '{"host":"h","monitor":...}'
        payload = b'{"host":' + self._host_json + (b"," if len(data) > 2 else b"") + data[1:]
        with self._lock:
            self.produced += 1
            # The batch in flight counts too: it is still held (and "buffered" in stats).
            if len(self._buf) + len(self._inflight) >= self.cfg.buffer:
                self.dropped_buffer_full += 1
                return
            self._buf.append(Pending(self.produced, subject, payload))
            wake = not self._wake_pending and self._loop is not None
            if wake:
                self._wake_pending = True
        if wake:
            with contextlib.suppress(RuntimeError):  # loop closed: stopping
                self._loop.call_soon_threadsafe(self._wakeup)  # type: ignore[union-attr]

    def _wakeup(self) -> None:
        self._wake_pending = False
        if self._wake is not None:
            self._wake.set()

    # -- figures ----------------------------------------------------------------------
    @property
    def dropped(self) -> int:
        return self.dropped_buffer_full + self.dropped_publish_failed + self.dropped_shutdown

    def stats(self) -> dict[str, Any]:
        with self._lock:
            buffered = len(self._buf) + len(self._inflight)
            produced = self.produced
            published = self.published
            dropped = self.dropped
        return {
            "servers": self.cfg.servers(),
            "stream": self.cfg.stream,
            "host": self.host,
            "connected": self.connected,
            "connects": self.connects,
            "produced": produced,
            "published": published,
            "dropped": dropped,
            "dropped_buffer_full": self.dropped_buffer_full,
            "dropped_publish_failed": self.dropped_publish_failed,
            "dropped_shutdown": self.dropped_shutdown,
            "buffered": buffered,
            "capacity": self.cfg.buffer,
            "duplicates": self.duplicates,
            "batches": self.batches,
            "last_error": self.last_error,
        }

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="nats-export",
                                        daemon=True)
        self._thread.start()
        ready.wait(5)

    def stop(self, timeout: float = FLUSH_ON_STOP_S + 5) -> None:
        """Flush for a few seconds, then count whatever is left as dropped."""
        self._stopping.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wakeup)
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            left = len(self._buf) + len(self._inflight)
            self._buf.clear()
            self._inflight.clear()
            self.dropped_shutdown += left
        if left:
            log.warning("NATS export: %d events not published at shutdown (counted)", left)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._wake = asyncio.Event()
        ready.set()
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("NATS export stopped")
        finally:
            self._loop = None
            loop.close()

    # -- the publisher (its own event loop) ---------------------------------------------
    async def _main(self) -> None:
        delay = self.cfg.reconnect_min_s
        stop_deadline: float | None = None
        while True:
            if self._stopping.is_set():
                stop_deadline = stop_deadline or time.monotonic() + FLUSH_ON_STOP_S
                if self._empty() or time.monotonic() > stop_deadline:
                    return
            nc = None
            try:
                nc = await self._connect()
                js = nc.jetstream(timeout=self.cfg.publish_timeout_s)
                await self._ensure_stream(js)
                self.connected, delay = True, self.cfg.reconnect_min_s
                self._warned = False
                self.last_error = None  # the error of the outage that just ended
                self.connects += 1
                log.info("NATS export: connected (%s)", ", ".join(self.cfg.servers()))
                await self._pump(nc, js)
                if self._stopping.is_set():
                    return
            except Exception as e:
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                if self.connected:
                    log.warning("NATS export: connection lost (%s); reconnecting", self.last_error)
                elif not self._warned:  # once per outage: back-off retries are not news
                    log.warning("NATS export: cannot connect (%s); retrying, events wait in "
                                "the buffer", self.last_error)
                    self._warned = True
            finally:
                self.connected = False
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(nc.close(), 2)
            if self._stopping.is_set() and stop_deadline and time.monotonic() > stop_deadline:
                return
            await self._sleep(delay)
            delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _empty(self) -> bool:
        with self._lock:
            return not self._buf and not self._inflight

    async def _sleep(self, seconds: float) -> None:
        # A stop ends the back-off early; new events do not (they wait for the connection).
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not self._stopping.is_set():
            await asyncio.sleep(min(0.05, left))

    async def _connect(self) -> Any:
        import nats

        cfg = self.cfg
        kw: dict[str, Any] = {}
        if cfg.token is not None:
            kw["token"] = cfg.token.get_secret_value()
        if cfg.user is not None:
            kw["user"] = cfg.user
            kw["password"] = cfg.password.get_secret_value() if cfg.password else ""
        if cfg.creds_file is not None:
            kw["user_credentials"] = str(cfg.creds_file)

        async def quiet(e: Exception) -> None:
            self.last_error = f"{type(e).__name__}: {e}"[:300]

        lost = self._lost = asyncio.Event()

        async def closed() -> None:
            lost.set()  # ends a wait for acknowledgements at once (see _publish)

        # Our own reconnect loop (allow_reconnect=False): the client's would buffer
        # publishes out of our sight and break the accounting.
        return await nats.connect(
            servers=cfg.servers(), allow_reconnect=False, connect_timeout=2,
            max_reconnect_attempts=0, error_cb=quiet, disconnected_cb=closed, closed_cb=closed,
            name=f"ebpf-agent@{self.host}", **kw)

    async def _ensure_stream(self, js: Any) -> None:
        from nats.js.errors import NotFoundError

        cfg = self.cfg
        try:
            await js.stream_info(cfg.stream)
        except NotFoundError:
            await js.add_stream(name=cfg.stream, subjects=list(cfg.stream_subjects),
                                max_bytes=cfg.stream_max_bytes, max_age=cfg.stream_max_age_s,
                                duplicate_window=cfg.duplicate_window_s)
            log.info("NATS export: created stream %s (%s)", cfg.stream,
                     ", ".join(cfg.stream_subjects))

    async def _pump(self, nc: Any, js: Any) -> None:
        assert self._wake is not None
        while True:
            with self._lock:
                if not self._inflight:
                    n = min(self.cfg.batch, len(self._buf))
                    self._inflight = [self._buf.popleft() for _ in range(n)]
                batch = list(self._inflight)
            if not batch:
                if self._stopping.is_set():
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                if nc.is_closed or self._lost.is_set():
                    raise ConnectionError("connection closed")
                continue
            await self._publish(js, batch)

    async def _publish(self, js: Any, batch: list[Pending]) -> None:
        """Publishes the batch and waits for every acknowledgement; what failed stays in
        _inflight (re-sent next round or after a reconnect)."""
        futures = []
        for p in batch:
            p.attempts += 1
            headers = {"Nats-Msg-Id": f"{self.host}:{self.epoch}:{p.seq}"}
            futures.append(await js.publish_async(p.subject, p.payload, headers=headers))
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
        acks: asyncio.Future[Any] = asyncio.gather(*futures, return_exceptions=True)
        try:
            await asyncio.wait([acks, lost], timeout=self.cfg.publish_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        done = {f for f in futures if f.done()}
        pending = [f for f in futures if not f.done()]
        for f in pending:
            f.cancel()
        acked = failed = 0
        keep: list[Pending] = []
        server_errors: list[str] = []
        for p, f in zip(batch, futures, strict=True):
            if f in done and not f.cancelled() and f.exception() is None:
                acked += 1
                if getattr(f.result(), "duplicate", False):
                    self.duplicates += 1
                continue
            if f in done and not f.cancelled():
                server_errors.append(str(f.exception()))
                if p.attempts >= MAX_ATTEMPTS:
                    failed += 1
                    continue
            keep.append(p)
        with self._lock:
            self.published += acked
            self.dropped_publish_failed += failed
            self._inflight = keep
        self.batches += 1
        if failed:
            log.warning("NATS export: %d events dropped after %d attempts: %s", failed,
                        MAX_ATTEMPTS, server_errors[-1] if server_errors else "")
        if pending:
            why = "connection lost" if self._lost.is_set() else \
                f"no answer in {self.cfg.publish_timeout_s}s"
            raise ConnectionError(f"{len(pending)} acknowledgements missing ({why})")
        if server_errors:
            self.last_error = server_errors[-1][:300]
            await asyncio.sleep(0.2)  # e.g. the stream is being re-created: not a hot loop
