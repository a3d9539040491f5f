"""The body of a long chunked HTTP/1.1 response written straight to its connection.

An event stream sends one chunk per batch, to every client, for as long as it lasts. Through
the ASGI ``send`` each chunk went through four middleware wrappers and uvicorn, which joins
``<size>\\r\\n``, the body and ``\\r\\n`` into a new bytes object: a copy of up to
512 KiB of frames per client per batch, and the SSE route had already copied the same
bytes once more to put a ``dropped`` frame in front of them. Under fan-out those copies
were most of the event loop's time (bench/RESULTS.md). Here a large body goes to the
transport as it is (``transport.write`` hands it to ``send(2)``; only what the socket
does not take is copied into the transport's buffer), with its chunk header and trailer
as separate small writes; a small one is joined (one system call instead of three).

Only where the connection is uvicorn's (the GuardedHttp object the agent's server puts
in the scope, agent/api/access/connguard.py) and its response is chunked; otherwise
``ChunkedBody.of`` returns None and the route keeps the ASGI ``send``. The response
start and end still go through ``send`` (status line, headers, access log, the final
``0\\r\\n\\r\\n``); both run on the event loop, so the writes stay in order.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Scope

from agent.api.access.connguard import CONN_KEY

# Bodies smaller than this are joined with their chunk header and trailer (one copy of
# a small body is cheaper than two more system calls); larger ones are written as they are.
JOIN_BELOW = 64 * 1024


class ChunkedBody:
    """Writes the chunks of one response; call after its ``http.response.start``."""

    def __init__(self, conn: Any) -> None:
        self._transport = conn.transport
        self._flow = conn.flow
        self._cycle = conn.cycle
        self.chunks = 0  # chunks written (figures and tests)

    @classmethod
    def of(cls, scope: Scope) -> ChunkedBody | None:
        """The writer of this request's response, or None where the connection is not
        one this module knows how to write to (another server, a test transport, a
        response that is not chunked)."""
        conn = scope.get(CONN_KEY)
        cycle = getattr(conn, "cycle", None)
        if cycle is None or not getattr(cycle, "chunked_encoding", False) \
                or not getattr(cycle, "response_started", False) \
                or getattr(conn, "flow", None) is None:
            return None
        return cls(conn)

    @property
    def closed(self) -> bool:
        return bool(self._cycle.disconnected) or self._transport.is_closing()

    async def write(self, head: bytes, body: bytes) -> bool:
        """One chunk carrying ``head + body`` (``head``: a few bytes sent before the
        body, e.g. a ``dropped`` frame). Waits while the transport's buffer is above its
        high-water mark, as uvicorn's ``send`` does. False, and nothing written, once
        the connection is closed; an empty chunk writes nothing (it would end the body)."""
        if self._flow.write_paused:
            await self._flow.drain()
        if self.closed:
            return False
        size = len(head) + len(body)
        if size == 0:
            return True
        t = self._transport
        if len(body) < JOIN_BELOW:
            t.write(b"".join((b"%x\r\n" % size, head, body, b"\r\n")))
        else:
            t.write(b"%x\r\n%s" % (size, head))
            t.write(body)
            t.write(b"\r\n")
        self.chunks += 1
        return True
