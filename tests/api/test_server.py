"""The API's listening sockets (agent/api/server.py)."""

from __future__ import annotations

import socket

import pytest

from agent.api.server import NOTSENT_LOWAT, StartupRefused, tcp_socket


def test_connections_keep_at_most_notsent_lowat_unsent() -> None:
    """A slow stream client's backlog waits in the hub's ring (where stream.max_lag_ms
    sees it), not in megabytes of socket buffer: every accepted connection inherits
    TCP_NOTSENT_LOWAT from the listener."""
    listener = tcp_socket("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP,
                                       socket.TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0


def test_a_socket_that_cannot_listen_is_refused_with_the_reason() -> None:
    # TEST-NET-1 (RFC 5737): not an address of this host, refused by bind() locally.
    with pytest.raises(StartupRefused, match="cannot listen on 192.0.2.1"):
        tcp_socket("192.0.2.1", 0)
