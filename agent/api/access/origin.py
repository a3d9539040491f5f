"""Where a request may come from: a Host allow-list and an Origin check.

The agent loads kernel programs as root, so a web page in the operator's browser must
not be able to reach it: browsers send Origin on cross-site requests and on every
WebSocket handshake, and a DNS-rebinding page sends a foreign Host header. Both are
refused here before any route runs. Authentication itself happens in
gate.py (before any body is read), the scope each route needs in scopes.py; tokens never
reach a log (redact.py).
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_allowed(host_header: str | None, allowed: list[str]) -> bool:
    if "*" in allowed:
        return True
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8765
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    for pattern in allowed:
        pattern = pattern.lower()
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class RequestGuard:
    """Pure ASGI middleware (streams pass through untouched): Host allow-list (DNS
    rebinding) and, for state-changing methods and WebSockets, an Origin allow-list."""

    def __init__(self, app: ASGIApp, trusted_hosts: list[str], origins: list[str]) -> None:
        self.app = app
        self.trusted_hosts = trusted_hosts
        self.origins = set(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not host_allowed(headers.get("host"), self.trusted_hosts):
            await deny(scope, send, 400, "invalid Host header")
            return
        origin = headers.get("origin")
        changes_state = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        if origin is not None and changes_state and origin not in self.origins \
                and not same_origin(scope, origin, headers.get("host")):
            await deny(scope, send, 403, f"origin {origin} is not allowed (api.cors_origins)")
            return
        await self.app(scope, receive, send)


def same_origin(scope: Scope, origin: str, host: str | None) -> bool:
    """The page the agent serves itself (/ui): Origin is this very scheme://host."""
    if not host:
        return False
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"),
                                                 scope.get("scheme", "http"))
    return origin.lower() == f"{scheme}://{host}".lower()


async def deny(scope: Scope, send: Send, status: int, detail: str) -> None:
    """A JSON error; for a WebSocket handshake an HTTP denial response when the server
    supports it, else a close before accept (uvicorn answers that with 403)."""
    import orjson

    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if status == 408:  # the rest of the body may still come: end the connection
        headers.append((b"connection", b"close"))
    prefix = ""
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008 if status < 500 else 1013})
            return
        prefix = "websocket."
    start: dict[str, Any] = {"type": f"{prefix}http.response.start", "status": status,
                             "headers": headers}
    await send(start)
    await send({"type": f"{prefix}http.response.body", "body": body})
