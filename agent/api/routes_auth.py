"""Browser sessions, stream tickets and the audit log."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from agent.api.access.audit import AUDIT_KEY
from agent.api.access.gate import COOKIE
from agent.api.access.principal import Principal, client_host
from agent.api.access.scopes import needs
from agent.api.access.sessions import StoreFull
from agent.api.deps import ContextDep, SettingsDep
from agent.api.models import ERROR_RESPONSES, ErrorBody, errors
from agent.model.filters import StreamFilters

public = APIRouter(tags=["auth"])
router = APIRouter(tags=["auth"], responses=ERROR_RESPONSES)


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: StrictStr = Field(min_length=1, max_length=4096)


class Session(BaseModel):
    name: str = Field(description="the token's name (never the token)")
    scope: str = Field(description="read or control")
    via: str = Field(description="how this request authenticated: bearer, session, "
                     "ticket or open (api.auth: none)")
    auth: str = Field(description="api.auth: token or none")
    expires_s: float | None = Field(None, description="seconds until the session expires")


ReadPrincipal = Annotated[Principal, Depends(needs("read"))]
FULL: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorBody, "description": "this token holds its quota already"},
    503: {"model": ErrorBody, "description": "the store is full"}}


class Ticket(BaseModel):
    ticket: str = Field(description="use once as ?ticket=... on /events or /events/ws")
    expires_s: float


class AuditEntry(BaseModel):
    id: int
    time: str
    token: str | None = Field(description="the token's name; null when unauthenticated")
    client: str
    method: str
    path: str
    body: str | None = Field(description="a summary with credential fields redacted")
    status: int


class AuditLogBody(BaseModel):
    entries: list[AuditEntry]


@public.post("/auth/session", response_model=Session,
             responses={401: {"model": ErrorBody, "description": "wrong token"},
                        422: {"model": ErrorBody, "description": "malformed or oversize"},
                        429: {"model": ErrorBody, "description": "this address has "
                              "api.logins_in_flight_per_client logins in progress, or the "
                              "token holds api.max_sessions_per_token sessions"},
                        503: {"model": ErrorBody, "description": "the session store is full"}},
             summary="log in: sets an HttpOnly session cookie (not the token)")
async def login(body: Login, request: Request, response: Response, ctx: ContextDep) \
        -> dict[str, Any]:
    api = ctx.settings.api
    if ctx.open:
        return {"name": "anonymous", "scope": "control", "via": "open", "auth": "none"}
    address = client_host(request.scope)
    attempt = ctx.logins.begin(address)  # counted as a failure before any wait
    if attempt is None:
        raise HTTPException(429, "too many logins in progress from this address "
                                 "(api.logins_in_flight_per_client)")
    delay, mark = attempt
    try:
        if delay:
            await asyncio.sleep(delay)  # a burst of failures is slowed down, never sped up
        who = ctx.tokens.verify(body.token)
    finally:
        ctx.logins.end(address)
    if who is None:
        ctx.auth_failed("login")
        raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})
    ctx.logins.succeeded(address, mark)
    request.scope[AUDIT_KEY]["token"] = who.name
    try:
        session_id = ctx.sessions.create(who)
    except StoreFull as e:
        raise HTTPException(e.status, e.detail) from None
    response.set_cookie(
        COOKIE, session_id, max_age=int(api.session_ttl_s), path="/", httponly=True,
        samesite="strict", secure=api.tls_certfile is not None,
    )
    return {"name": who.name, "scope": who.scope, "via": "session", "auth": "token",
            "expires_s": api.session_ttl_s}


@router.get("/auth/session", response_model=Session, response_model_exclude_none=True,
            summary="who am I: the caller's token name and scope")
async def whoami(who: ReadPrincipal, ctx: ContextDep) -> dict[str, Any]:
    return {"name": who.name, "scope": who.scope, "via": who.via,
            "auth": "none" if ctx.open else "token"}


@router.delete("/auth/session", status_code=204, response_class=Response,
               summary="log out: ends the session of the cookie")
async def logout(who: ReadPrincipal, ctx: ContextDep, settings: SettingsDep) -> Response:
    if who.session_id is not None:
        ctx.sessions.end(who.session_id)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=settings.api.tls_certfile is not None)
    return response


@router.post("/events/tickets", response_model=Ticket, tags=["events"],
             responses={**errors(422), **FULL},
             summary="a single-use ticket for one /events or /events/ws connection")
async def create_ticket(who: ReadPrincipal, ctx: ContextDep,
                        body: StreamFilters | None = None) -> dict[str, Any]:
    """The body: the stream filters the ticket is fixed to (absent: every event)."""
    try:
        ticket = ctx.tickets.create(who, body or StreamFilters())
    except StoreFull as e:
        raise HTTPException(e.status, e.detail) from None
    return {"ticket": ticket, "expires_s": ctx.settings.api.ticket_ttl_s}


@router.get("/audit", response_model=AuditLogBody, responses={
    403: {"model": ErrorBody, "description": "needs a control token"}},
    dependencies=[Depends(needs("control"))],
    summary="the latest state-changing requests (control scope)")
async def audit(ctx: ContextDep, limit: Annotated[int | None, Query(
        ge=1, le=1_000_000, description="the newest N entries")] = None) -> dict[str, Any]:
    return {"entries": ctx.audit.entries(limit)}
