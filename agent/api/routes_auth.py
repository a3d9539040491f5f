"""Browser sessions, stream tickets and the audit log."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from agent.api.deps import ContextDep, SettingsDep
from agent.api.gate import AUDIT_KEY, COOKIE, client_host, principal_of
from agent.api.models import ERROR_RESPONSES, ErrorBody, errors

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


class TicketRequest(BaseModel):
    """The stream filters the ticket is fixed to (absent: every event)."""

    model_config = ConfigDict(extra="forbid")
    monitor: list[Annotated[str, Field(max_length=64)]] = Field(default_factory=list,
                                                                max_length=64)
    pid: list[Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=list, max_length=1024)
    uid: list[Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=list, max_length=1024)
    comm: list[Annotated[str, Field(min_length=1, max_length=15)]] = Field(
        default_factory=list, max_length=256)


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
                        422: {"model": ErrorBody, "description": "malformed or oversize"}},
             summary="log in: sets an HttpOnly session cookie (not the token)")
async def login(body: Login, request: Request, response: Response, ctx: ContextDep) \
        -> dict[str, Any]:
    api = ctx.settings.api
    if ctx.open:
        return {"name": "anonymous", "scope": "control", "via": "open", "auth": "none"}
    address = client_host(request.scope)
    delay = ctx.logins.delay(address)
    if delay:
        await asyncio.sleep(delay)  # a burst of failures is slowed down, never sped up
    who = ctx.tokens.verify(body.token)
    if who is None:
        ctx.logins.failed(address)
        ctx.auth_failed("login")
        raise HTTPException(401, "wrong token", headers={"WWW-Authenticate": "Bearer"})
    request.scope[AUDIT_KEY]["token"] = who.name
    session_id = ctx.sessions.create(who)
    response.set_cookie(
        COOKIE, session_id, max_age=int(api.session_ttl_s), path="/", httponly=True,
        samesite="strict", secure=api.tls_certfile is not None,
    )
    return {"name": who.name, "scope": who.scope, "via": "session", "auth": "token",
            "expires_s": api.session_ttl_s}


@router.get("/auth/session", response_model=Session, response_model_exclude_none=True,
            summary="who am I: the caller's token name and scope")
async def whoami(request: Request, ctx: ContextDep) -> dict[str, Any]:
    who = principal_of(request.scope)
    assert who is not None  # the gate let it in
    return {"name": who.name, "scope": who.scope, "via": who.via,
            "auth": "none" if ctx.open else "token"}


@router.delete("/auth/session", status_code=204, response_class=Response,
               summary="log out: ends the session of the cookie")
async def logout(request: Request, ctx: ContextDep, settings: SettingsDep) -> Response:
    who = principal_of(request.scope)
    if who is not None and who.session_id is not None:
        ctx.sessions.end(who.session_id)
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict",
                           secure=settings.api.tls_certfile is not None)
    return response


@router.post("/events/tickets", response_model=Ticket, tags=["events"],
             responses=errors(422),
             summary="a single-use ticket for one /events or /events/ws connection")
async def create_ticket(request: Request, ctx: ContextDep,
                        body: TicketRequest | None = None) -> dict[str, Any]:
    who = principal_of(request.scope)
    assert who is not None
    req = body or TicketRequest()
    filters = {k: [str(v) for v in getattr(req, k)] for k in ("monitor", "pid", "uid", "comm")
               if getattr(req, k)}
    ticket = ctx.tickets.create(who, filters)
    return {"ticket": ticket, "expires_s": ctx.settings.api.ticket_ttl_s}


@router.get("/audit", response_model=AuditLogBody, responses={
    403: {"model": ErrorBody, "description": "needs a control token"}},
    summary="the latest state-changing requests (control scope)")
async def audit(ctx: ContextDep, limit: Annotated[int | None, Query(
        ge=1, le=1_000_000, description="the newest N entries")] = None) -> dict[str, Any]:
    # The control scope is enforced by the gate (CONTROL_READS).
    return {"entries": ctx.audit.entries(limit)}
