"""Connection limits uvicorn does not have: a deadline and a size cap for request headers,
and a cap on open connections that sheds the oldest unauthenticated connection first.

Without them 1,100 sockets that never finish their headers (or that send complete login
headers and then stall in the body) hold 1,100 file descriptors forever, the process hits
RLIMIT_NOFILE, and even /health cannot be accepted. uvicorn's keep-alive timer only runs
*between* requests, and its ``limit_concurrency`` answers 503 to new requests while the
idle sockets keep their fds.

A connection is *untrusted* from its first byte until the gate authenticates its request
(``trust()``), and again from the first byte of its next request. Untrusted connections
may hold at most ``max_connections - reserve``: the rest is kept for authenticated callers
(streams, dashboards). A new connection over either limit sheds the oldest untrusted one,
whatever it is doing (sending headers, a body, waiting for its login's slow-down).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, Metric
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)
FD_RESERVE = 128  # BPF maps and programs, perf buffers, log and output files
CONN_KEY = "ebpf_agent.connection"  # the GuardedHttp of a request, in its ASGI scope
SHED_LOG_EVERY_S = 10.0  # at most one "shed" warning per this many seconds


class GuardState:
    """Shared by the connections of one server: those still sending headers and those
    not yet authenticated, oldest first, and counters for /metrics (GuardCollector)."""

    def __init__(self, max_connections: int, header_timeout_s: float,
                 max_header_bytes: int, reserve: int | None = None) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        # Kept for authenticated connections: a tenth of the cap, at least one.
        self.reserve = reserve if reserve is not None else max(1, max_connections // 10)
        self.pending: OrderedDict[int, GuardedHttp] = OrderedDict()
        self.untrusted: OrderedDict[int, GuardedHttp] = OrderedDict()
        self.evicted = 0  # shed to make room (oldest untrusted first)
        self.timed_out = 0
        self.body_timeouts = 0  # bodies that did not arrive in time (gate.py)
        self.oversize = 0
        self.refused = 0
        self._shed_unlogged = 0
        self._shed_logged_at = -SHED_LOG_EVERY_S

    def shed_logged(self, now: float) -> None:
        """A warning per SHED_LOG_EVERY_S at most, with the count since the last one."""
        self._shed_unlogged += 1
        if now - self._shed_logged_at >= SHED_LOG_EVERY_S:
            log.warning("connection limit reached: shed %d unauthenticated connection(s) "
                        "(oldest first; api.max_connections %d, %d kept for "
                        "authenticated callers)", self._shed_unlogged,
                        self.max_connections, self.reserve)
            self._shed_unlogged = 0
            self._shed_logged_at = now


class GuardCollector:
    """/metrics: connections the guard closed or refused, by reason."""

    def __init__(self, guard: GuardState) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        g = self.guard
        family = CounterMetricFamily(
            "ebpf_agent_api_connections_closed", "connections closed or refused by the "
            "connection guard: shed (the oldest unauthenticated one, to make room), "
            "header_timeout, body_timeout (408), oversize_headers (431), full (503: every "
            "other connection authenticated)", labels=["reason"])
        for reason, n in (("shed", g.evicted), ("header_timeout", g.timed_out),
                          ("body_timeout", g.body_timeouts), ("oversize_headers", g.oversize),
                          ("full", g.refused)):
            family.add_metric([reason], float(n))
        yield family


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
        guard = self.guard
        guard.untrusted[id(self)] = self
        untrusted_cap = max(1, guard.max_connections - guard.reserve)
        while len(self.connections) > guard.max_connections or \
                len(guard.untrusted) > untrusted_cap:
            if not self._make_room():
                guard.refused += 1
                self._reject(b"503 Service Unavailable")
                return
        self._await_headers()

    def _make_room(self) -> bool:
        """Close the oldest untrusted connection (slow headers, a stalled body, a login
        waiting) so that a new one gets in; False when every other open connection is
        authenticated."""
        for key, conn in self.guard.untrusted.items():
            if conn is not self:
                del self.guard.untrusted[key]
                self.guard.evicted += 1
                self.guard.shed_logged(self.loop.time())
                conn._reject(b"408 Request Timeout")
                return True
        return False

    def trust(self) -> None:
        """The gate authenticated this connection's request: it is no longer shed to make
        room, until its next request starts."""
        self.guard.untrusted.pop(id(self), None)

    def _await_headers(self) -> None:
        self.request_started = time.monotonic()  # the unauthenticated deadline's start
        self._header_bytes = 0
        self.guard.pending[id(self)] = self
        if id(self) not in self.guard.untrusted:
            self.guard.untrusted[id(self)] = self
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
        self.guard.untrusted.pop(id(self), None)
        if not self.transport.is_closing():
            # A request whose response already started (a body being sent) is only cut.
            if not getattr(getattr(self, "cycle", None), "response_started", False):
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

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes the transport over: this object is done with it.
        self._headers_done()
        self.guard.untrusted.pop(id(self), None)
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_done()
        self.guard.untrusted.pop(id(self), None)
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
        # The request's ASGI task has not run yet: the gate finds this connection here.
        self.scope[CONN_KEY] = self  # type: ignore[literal-required]

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
