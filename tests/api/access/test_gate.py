"""The gate's body deadline (issue 16, item 1): a body that stops arriving is answered
408 after api.body_timeout_s; a request without credentials (the login) gets
api.header_timeout_s for its headers and body together."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from agent.api.app import context_of, create_app
from tests.support.api import fake_registry, fake_report, settings, thread_server

TOKEN = "gate-token-0123456789"


def stalled_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head)
        reply = b""
        while b"\r\n\r\n" not in reply and (data := s.recv(4096)):
            reply += data
        return reply


@pytest.mark.parametrize(("api", "head", "what"), [
    # Authenticated: api.body_timeout_s, however long header_timeout_s is.
    ({"body_timeout_s": 1, "header_timeout_s": 600},
     b"PUT /targets/pids HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " +
     TOKEN.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[1,",
     "authenticated"),
    # Unauthenticated login: api.header_timeout_s for all of it, however long the body's.
    ({"body_timeout_s": 600, "header_timeout_s": 1},
     b"POST /auth/session HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tok",
     "login"),
])
def test_a_stalled_body_is_answered_408(api: dict[str, Any], head: bytes, what: str) -> None:
    s = settings(token=TOKEN, api=api)
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv:
        reply = stalled_request(srv.url, head)
        assert reply.startswith(b"HTTP/1.1 408"), (what, reply)
        assert b"connection: close" in reply.lower()
        entry = context_of(app).audit.entries()[-1]
        assert entry["status"] == 408
        assert (entry["token"] is None) == (what == "login")
