"""The authentication gate: a pure ASGI middleware in front of every route.

It decides who is asking (bearer token, session cookie, or a stream ticket) from the
headers alone, *before* a byte of the body is read: an unauthenticated 200 MB upload is
answered 401 and never buffered. Then it checks the scope (``read`` tokens may not change
state), the CSRF rule for cookies, reads the body up to ``api.max_body_bytes`` (413 past
it) and records every state-changing request in the audit log.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.api.audit import summarize_body
from agent.api.auth import OPEN, Principal
from agent.api.auth import Scope as TokenScope
from agent.api.security import SAFE_METHODS, bearer_from_header, deny

if TYPE_CHECKING:
    from agent.api.deps import AppContext

log = logging.getLogger(__name__)
COOKIE = "ebpf_agent_session"
PRINCIPAL_KEY = "ebpf_agent.principal"
AUDIT_KEY = "ebpf_agent.audit"
LOGIN_PATH = "/auth/session"
LOGIN_MAX_BODY = 16 * 1024
FILTER_KEYS = ("monitor", "pid", "uid", "comm")
# State-changing requests a read-scope caller may make (they change only its own access).
READ_WRITES = frozenset({("DELETE", LOGIN_PATH), ("POST", "/events/tickets")})
CONTROL_READS = frozenset({"/audit"})


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unix"


def client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unix"


def principal_of(scope: Scope) -> Principal | None:
    p: Principal | None = scope.get(PRINCIPAL_KEY)
    return p


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
        changes = not websocket and method not in SAFE_METHODS
        note: dict[str, Any] = {"token": None, "body": b""}
        scope[AUDIT_KEY] = note
        if not changes:
            await self._handle(scope, receive, send, method, websocket, note)
            return
        status = {"code": 499}  # no response at all: the client went away (nginx's 499)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_status, method, websocket, note)
        finally:
            path = scope["path"]
            body = note["body"]
            summary = ("{\"token\":\"<redacted>\"}" if body else None) if path == LOGIN_PATH \
                else summarize_body(body)
            self.ctx.audit.record(token=note["token"], client=client_address(scope),
                                  method=method, path=path, body=summary,
                                  status=status["code"])

    async def _handle(self, scope: Scope, receive: Receive, send: Send, method: str,
                      websocket: bool, note: dict[str, Any]) -> None:
        path = scope["path"]
        try:
            principal = self._admit(scope, method, path, websocket, note)
            if principal is not None:
                scope[PRINCIPAL_KEY] = principal
                note["token"] = principal.name
            if method not in SAFE_METHODS and not websocket:
                body = await self._read_body(scope, receive, path)
                if body is None:
                    return  # the client went away
                note["body"] = body
                receive = _replay(body, receive)
        except Denied as e:
            _label_route(scope)
            await deny(scope, send, e.status, e.detail)
            return
        await self.app(scope, receive, send)

    def _admit(self, scope: Scope, method: str, path: str, websocket: bool,
               note: dict[str, Any]) -> Principal | None:
        if self.ctx.open:
            return OPEN
        public = is_public(method, path, websocket)
        try:
            principal = self._authenticate(scope, path, websocket)
        except Denied:
            if public:  # e.g. a stale cookie must not lock anyone out of the login
                return None
            raise
        if public:
            return principal
        note["token"] = principal.name  # audited by name, also when refused below
        changes = websocket or method not in SAFE_METHODS
        needed: TokenScope = "control" if (changes and not websocket and (method, path) not in
                               READ_WRITES) or path in CONTROL_READS else "read"
        if not principal.allows(needed):
            raise Denied(403, f"token {principal.name!r} has scope {principal.scope}: "
                              f"{method} {path} needs scope {needed}")
        if principal.via == "session" and changes and \
                Headers(scope=scope).get("origin") is None:
            # SameSite=Strict keeps other sites' requests from carrying the cookie; the
            # Origin check (RequestGuard) covers the rest, so it must be present.
            raise Denied(403, "a request authenticated by a session cookie must carry "
                              "an Origin header")
        return principal

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
                return self._redeem(scope, tickets, query)
        raise Denied(401, "missing or invalid bearer token")

    def _redeem(self, scope: Scope, tickets: list[str], query: list[tuple[str, str]]) \
            -> Principal:
        redeemed = self.ctx.tickets.redeem(tickets[0]) if len(tickets) == 1 else None
        if redeemed is None:
            self.ctx.auth_failed("ticket")
            raise Denied(401, "invalid, used or expired ticket")
        principal, fixed = redeemed
        for key in FILTER_KEYS:
            asked = sorted(v for k, v in query if k == key)
            if asked and asked != sorted(fixed.get(key, [])):
                self.ctx.auth_failed("ticket")
                raise Denied(401, f"the ticket was made for other filters ({key})")
        # The stream gets the ticket's filters, whatever the URL says.
        rest = [(k, v) for k, v in query if k not in FILTER_KEYS and k != "ticket"]
        pairs = [(k, v) for k in FILTER_KEYS for v in fixed.get(k, [])] + rest
        scope["query_string"] = urlencode(pairs).encode()
        return principal

    async def _read_body(self, scope: Scope, receive: Receive, path: str) -> bytes | None:
        login = path == LOGIN_PATH
        limit = min(LOGIN_MAX_BODY, self.ctx.settings.api.max_body_bytes) if login \
            else self.ctx.settings.api.max_body_bytes

        def too_large() -> Denied:
            if login:  # the login's own validation error shape
                return Denied(422, "the login body is too large")
            return Denied(413, f"request body larger than api.max_body_bytes ({limit})")

        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large()
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                raise too_large()
            if not message.get("more_body", False):
                return bytes(body)


def _label_route(scope: Scope) -> None:
    """A refusal never reaches the router: find the route it would have gone to, so the
    request-duration metric labels it by its template like any other request."""
    app = scope.get("app")
    route = _find_route(getattr(getattr(app, "router", None), "routes", ()), scope)
    if route is not None:
        scope["route"] = route


def _find_route(routes: Any, scope: Scope) -> Any:
    for route in routes:
        # FastAPI wraps an included router (all ours are included without a prefix).
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            if (found := _find_route(inner, scope)) is not None:
                return found
            continue
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route type that cannot match this scope
            continue
        if match is Match.FULL:
            return route
    return None


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
