"""Connection limits uvicorn does not have: a deadline and a size cap for request headers,
and a cap on open connections that evicts the oldest half-sent request first.

Without them 1,100 sockets that never finish their headers hold 1,100 file descriptors
forever, the process hits RLIMIT_NOFILE, and even /health cannot be accepted. uvicorn's
keep-alive timer only runs *between* requests, and its ``limit_concurrency`` answers 503
to new requests while the idle sockets keep their fds.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)
FD_RESERVE = 128  # BPF maps and programs, perf buffers, log and output files


class GuardState:
    """Shared by the connections of one server: those still sending headers, oldest
    first, and counters for /stats."""

    def __init__(self, max_connections: int, header_timeout_s: float,
                 max_header_bytes: int) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.pending: OrderedDict[int, GuardedHttp] = OrderedDict()
        self.evicted = 0
        self.timed_out = 0
        self.oversize = 0
        self.refused = 0


def _response(status: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")


class GuardedHttp(HttpToolsProtocol):
    guard: GuardState  # set on the per-server subclass made by protocol_class()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._rejected = False
        self._header_bytes = 0
        self._in_callbacks = 0
        self._timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.guard.max_connections and not self._make_room():
            self.guard.refused += 1
            self._reject(b"503 Service Unavailable")
            return
        self._await_headers()

    def _make_room(self) -> bool:
        """Close the oldest connection still sending its headers (a slow or stuck client)
        so that a new one gets in; False when every open connection is busy."""
        for key, conn in self.guard.pending.items():
            if conn is not self:
                del self.guard.pending[key]
                self.guard.evicted += 1
                conn._reject(b"408 Request Timeout")
                return True
        return False

    def _await_headers(self) -> None:
        self._header_bytes = 0
        self.guard.pending[id(self)] = self
        if self._timer is None:
            self._timer = self.loop.call_later(self.guard.header_timeout_s, self._too_slow)

    def _headers_done(self) -> None:
        self.guard.pending.pop(id(self), None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        if id(self) in self.guard.pending:
            self.guard.timed_out += 1
            self._reject(b"408 Request Timeout")

    def _reject(self, status: bytes) -> None:
        self._rejected = True
        self._headers_done()
        if not self.transport.is_closing():
            self.transport.write(_response(status))
            self.transport.close()

    def _count(self, n: int) -> bool:
        self._header_bytes += n
        if self._header_bytes > self.guard.max_header_bytes:
            self.guard.oversize += 1
            self._reject(b"431 Request Header Fields Too Large")
            return False
        return True

    # -- uvicorn's parser callbacks --------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        self._in_callbacks = 0
        super().data_received(data)
        # The URL and headers httptools reported are counted by their callbacks; the
        # rest of a chunk that leaves the headers unfinished is counted here (httptools
        # reports a header only once the next one starts). A chunk that completes the
        # headers and carries a body is not counted.
        if not self._rejected and id(self) in self.guard.pending:
            self._count(max(0, len(data) - self._in_callbacks))

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        if self._rejected:
            return
        super().on_message_begin()
        self._await_headers()  # a keep-alive connection's next request

    def on_url(self, url: bytes) -> None:
        self._in_callbacks += len(url)
        if not self._rejected and self._count(len(url)):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._in_callbacks += len(name) + len(value) + 4
        if not self._rejected and self._count(len(name) + len(value) + 4):
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._rejected:
            return
        self._headers_done()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._rejected:
            super().on_message_complete()


def fd_budget(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (systemd's default soft limit is
    1024) and return how many connections fit below it with FD_RESERVE to spare."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise RLIMIT_NOFILE to %s: %s", target, e)
    allowed = max(8, soft - FD_RESERVE)
    if wanted > allowed:
        log.warning("api.max_connections %d lowered to %d (RLIMIT_NOFILE %d)",
                    wanted, allowed, soft)
    return min(wanted, allowed)


def protocol_class(guard: GuardState) -> type[Any]:
    """A subclass bound to one server's GuardState (two servers in one process, as in
    tests, never share their counts)."""
    return type("GuardedHttpForServer", (GuardedHttp,), {"guard": guard})
