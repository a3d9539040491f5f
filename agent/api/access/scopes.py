"""The scope each route needs, declared on the route: ``dependencies=[Depends(needs(
"control"))]``. The rule then sits next to the route and shows in the OpenAPI document
(the operation's security requirement names the scope).

The gate (gate.py) has already authenticated the caller from the headers; this checks
that the principal's scope allows the route, and the CSRF rule for session cookies.
"""


import functools
from collections.abc import Callable
from typing import Annotated

from fastapi import HTTPException, Security, WebSocketException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from agent.api.access.origin import SAFE_METHODS
from agent.api.access.principal import Principal, principal_of
from agent.api.access.principal import Scope as TokenScope

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A token from the config (`token`, `token_file`, `tokens:`) or the one "
    "generated into api.runtime_dir, or the session cookie `ebpf_agent_session` of "
    "`POST /auth/session`, or (streams only) a ticket. An operation's security "
    "requirement names the scope it needs: `read` (every token) or `control`. With "
    "`api.auth: none` (loopback only) nothing is required.",
)


def _refuse(conn: HTTPConnection, status: int, detail: str) -> Exception:
    if conn.scope["type"] == "websocket":  # before accept: uvicorn answers it with 403
        return WebSocketException(1008, detail)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return HTTPException(status, detail, headers=headers)


@functools.cache
def needs(scope: TokenScope) -> Callable[..., Principal]:
    """The dependency of a route that needs ``scope``; it returns the principal."""

    def check(conn: HTTPConnection, _bearer: Annotated[
            HTTPAuthorizationCredentials | None,
            Security(bearer_scheme, scopes=[scope])]) -> Principal:
        who = principal_of(conn.scope)
        if who is None:  # a request that somehow bypassed the gate
            raise _refuse(conn, 401, "missing or invalid bearer token")
        websocket = conn.scope["type"] == "websocket"
        method = "GET" if websocket else conn.scope["method"]
        if not who.allows(scope):
            raise _refuse(conn, 403, f"token {who.name!r} has scope {who.scope}: "
                                     f"{method} {conn.scope['path']} needs scope {scope}")
        changes = websocket or method not in SAFE_METHODS
        if who.via == "session" and changes and conn.headers.get("origin") is None:
            # SameSite=Strict keeps other sites' requests from carrying the cookie; the
            # Origin check (RequestGuard) covers the rest, so it must be present.
            raise _refuse(conn, 403, "a request authenticated by a session cookie must "
                                     "carry an Origin header")
        return who

    check.__name__ = f"needs_{scope}"
    return check
