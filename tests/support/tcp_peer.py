"""A TCP server or client for the net monitor's tests, run as its own process (its own
pid and comm, possibly in a network namespace the test made):

    python tcp_peer.py server COMM HOST CONNECTIONS REPLY_BYTES [reset]
        prints its port, then per accepted connection the bytes it received (until EOF)
        after replying REPLY_BYTES and closing; with `reset`, closes each accepted
        connection at once with a reset (SO_LINGER 0).
    python tcp_peer.py client COMM HOST PORT SEND_BYTES [wait]
        connects, prints its local port, sends SEND_BYTES, shuts its side down, reads
        until EOF and prints the bytes received; a refused connect prints "refused", a
        reset "reset". With `wait` it does not shut its side down but waits for the
        peer to end the connection, so the peer closes first whatever the scheduling
        (a reset test: a FIN of ours racing the peer's RST makes us the first closer).

Payloads are a known pattern; only loopback or namespace addresses are used.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from pathlib import Path

CHUNK = 1 << 16


def set_comm(comm: str) -> None:
    Path("/proc/self/comm").write_text(comm)


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pattern(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


def receive_all(s: socket.socket) -> int:
    got = 0
    while True:
        b = s.recv(CHUNK)
        if not b:
            return got
        got += len(b)


def server(host: str, connections: int, reply: int, reset: bool) -> None:
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(64)
    print(s.getsockname()[1], flush=True)
    for _ in range(connections):
        c, _ = s.accept()
        if reset:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            print(0, flush=True)
            continue
        got = receive_all(c)
        c.sendall(pattern(reply))
        c.close()
        print(got, flush=True)
    s.close()


def client(host: str, port: int, send: int, wait: bool) -> None:
    c = socket.socket(family(host), socket.SOCK_STREAM)
    try:
        c.connect((host, port))
    except ConnectionRefusedError:
        print("refused", flush=True)
        return
    print(c.getsockname()[1], flush=True)
    try:
        c.sendall(pattern(send))
        if not wait:
            c.shutdown(socket.SHUT_WR)
        print(receive_all(c), flush=True)
    except OSError as e:  # the reset may come before shutdown(2): ENOTCONN then
        if e.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            raise
        print("reset", flush=True)
    c.close()


def main(argv: list[str]) -> None:
    role, comm, host = argv[:3]
    set_comm(comm)
    if role == "server":
        server(host, int(argv[3]), int(argv[4]), len(argv) > 5 and argv[5] == "reset")
    else:
        client(host, int(argv[3]), int(argv[4]), len(argv) > 5 and argv[5] == "wait")


if __name__ == "__main__":
    main(sys.argv[1:])
