"""The authentication gate: a pure ASGI middleware in front of every route, doing only what
must happen before a byte of the body is read.

It decides who is asking (bearer token, session cookie, or a stream ticket) from the
headers alone, so an unauthenticated 200 MB upload is answered 401 and never buffered;
then it reads the body up to ``api.max_body_bytes`` (413 past it) within
``api.body_timeout_s`` (408 past it; an unauthenticated login also within
``api.header_timeout_s`` of its first byte). The scope a route needs and the CSRF rule are
the route's own (scopes.py); audit.py records the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.api.access.audit import AUDIT_KEY
from agent.api.access.connguard import CONN_KEY
from agent.api.access.origin import SAFE_METHODS, deny
from agent.api.access.principal import (
    LOGIN_PATH,
    OPEN,
    PRINCIPAL_KEY,
    Principal,
    bearer_from_header,
)
from agent.model.filters import FILTER_KEYS

if TYPE_CHECKING:
    from agent.api.deps import AppContext

log = logging.getLogger(__name__)
COOKIE = "ebpf_agent_session"
LOGIN_MAX_BODY = 16 * 1024


def is_public(method: str, path: str, websocket: bool) -> bool:
    if websocket:
        return False
    if path == "/health" or method == "OPTIONS":  # OPTIONS: CORS preflights
        return True
    if method in ("GET", "HEAD") and (path == "/ui" or path.startswith("/ui/")):
        return True
    return method == "POST" and path == LOGIN_PATH


class Denied(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class AuthGate:
    def __init__(self, app: ASGIApp, ctx: AppContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        websocket = scope["type"] == "websocket"
        method = "GET" if websocket else scope["method"]
        path = scope["path"]
        note: dict[str, Any] | None = scope.get(AUDIT_KEY)
        try:
            principal = self._admit(scope, method, path, websocket)
            if principal is not None:
                scope[PRINCIPAL_KEY] = principal
                if note is not None:
                    note["token"] = principal.name
                if (conn := scope.get(CONN_KEY)) is not None and principal is not OPEN:
                    conn.trust()  # no longer shed to make room for others
            if method not in SAFE_METHODS and not websocket:
                body = await self._read_body(scope, receive, path, principal is None)
                if body is None:
                    return  # the client went away
                if note is not None:
                    note["body"] = body
                receive = _replay(body, receive)
        except Denied as e:
            await deny(scope, send, e.status, e.detail)
            return
        await self.app(scope, receive, send)

    def _admit(self, scope: Scope, method: str, path: str, websocket: bool) \
            -> Principal | None:
        if self.ctx.open:
            return OPEN
        public = is_public(method, path, websocket)
        try:
            return self._authenticate(scope, path, websocket)
        except Denied:
            if public:  # e.g. a stale cookie must not lock anyone out of the login
                return None
            raise

    def _authenticate(self, scope: Scope, path: str, websocket: bool) -> Principal:
        headers = Headers(scope=scope)
        ctx = self.ctx
        authorization = headers.get("authorization")
        if authorization is not None:
            principal = ctx.tokens.verify(bearer_from_header(authorization))
            if principal is None:
                ctx.auth_failed("bearer")
                raise Denied(401, "missing or invalid bearer token")
            return principal
        cookie = cookie_parser(headers.get("cookie", "")).get(COOKIE)
        if cookie:
            principal = ctx.sessions.lookup(cookie)
            if principal is None:
                ctx.auth_failed("session")
                raise Denied(401, "the session has ended or is unknown: log in again")
            return principal
        ticket_path = path == "/events/ws" if websocket else path == "/events"
        if ticket_path:
            query = parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                              keep_blank_values=True)
            tickets = [v for k, v in query if k == "ticket"]
            if tickets:
                return self._redeem(tickets, query)
        raise Denied(401, "missing or invalid bearer token")

    def _redeem(self, tickets: list[str], query: list[tuple[str, str]]) -> Principal:
        principal = self.ctx.tickets.redeem(tickets[0]) if len(tickets) == 1 else None
        if principal is None or principal.filters is None:
            self.ctx.auth_failed("ticket")
            raise Denied(401, "invalid, used or expired ticket")
        fixed = principal.filters
        for key in FILTER_KEYS:
            asked = sorted(v for k, v in query if k == key)
            if asked and asked != sorted(str(v) for v in getattr(fixed, key)):
                self.ctx.auth_failed("ticket")
                raise Denied(401, f"the ticket was made for other filters ({key})")
        # The stream gets the ticket's filters, whatever the URL says (principal.filters:
        # the events routes' filter dependency).
        return principal

    async def _read_body(self, scope: Scope, receive: Receive, path: str,
                         unauthenticated: bool) -> bytes | None:
        api = self.ctx.settings.api
        login = path == LOGIN_PATH
        limit = min(LOGIN_MAX_BODY, api.max_body_bytes) if login else api.max_body_bytes

        def too_large() -> Denied:
            if login:  # the login's own validation error shape
                return Denied(422, "the login body is too large")
            return Denied(413, f"request body larger than api.max_body_bytes ({limit})")

        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large()
        timeout = api.body_timeout_s
        conn = scope.get(CONN_KEY)
        if unauthenticated and conn is not None:
            # The whole request (headers and body) of a caller without credentials gets
            # api.header_timeout_s, counted from its first byte.
            timeout = min(timeout, conn.request_started + api.header_timeout_s
                          - time.monotonic())
        body = bytearray()
        try:
            async with asyncio.timeout(max(0.0, timeout)):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    body += message.get("body", b"")
                    if len(body) > limit:
                        raise too_large()
                    if not message.get("more_body", False):
                        return bytes(body)
        except TimeoutError:
            if conn is not None:
                conn.guard.body_timeouts += 1
            raise Denied(408, "the request body did not arrive in time "
                              "(api.body_timeout_s)") from None


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then the original receive (for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
