"""Talking to many agents at once: one async HTTP client, a bound on concurrent hosts, and
a deadline per host, so a few hundred hosts work and one slow host holds nobody up.

``Fleet.each(op)`` runs ``op(AgentClient)`` on every host and returns one ``HostResult``
per host, in inventory order: a value, or an error that says why (unreachable, timeout,
401, 409 with the agent's reason, ...).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from agent.fleet.inventory import Host

T = TypeVar("T")
DEFAULT_PARALLEL = 32
DEFAULT_TIMEOUT_S = 10.0


class AgentError(Exception):
    """One host's failure, phrased for the operator."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):  # FastAPI 422: [{loc, msg, type}]
        parts = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(p) for p in d.get("loc", []) if p != "body")
                parts.append(f"{loc}: {d.get('msg')}" if loc else str(d.get("msg")))
            else:
                parts.append(str(d))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return str(detail.get("message") or detail)
    return str(detail)


def error_of(response: httpx.Response) -> AgentError:
    try:
        detail = response.json().get("detail")
    except Exception:
        detail = response.text[:200]
    reason = response.reason_phrase or ""
    text = _detail_text(detail) if detail is not None else reason
    if response.status_code == 401:
        text = "missing or wrong token"
    return AgentError(f"{response.status_code} {text}".rstrip(), response.status_code, detail)


def describe_exception(e: BaseException, timeout: float) -> str:
    if isinstance(e, AgentError):
        return str(e)
    if isinstance(e, TimeoutError | httpx.TimeoutException):
        return f"timeout (no answer in {timeout:g}s)"
    if isinstance(e, httpx.ConnectError):
        cause = str(e) or type(e).__name__
        return f"unreachable ({cause})"
    if isinstance(e, httpx.HTTPError):
        return f"unreachable ({type(e).__name__}: {e})"
    return f"{type(e).__name__}: {e}"


class AgentClient:
    """One agent, through the fleet's shared HTTP client."""

    def __init__(self, http: httpx.AsyncClient, host: Host) -> None:
        self.http = http
        self.host = host
        self.headers = {"Authorization": f"Bearer {host.token}"} if host.token else {}

    async def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200,),
                      **kw: Any) -> httpx.Response:
        headers = {**self.headers, **kw.pop("headers", {})}
        r = await self.http.request(method, self.host.url + path, headers=headers, **kw)
        if r.status_code not in expect:
            raise error_of(r)
        return r

    async def get(self, path: str, **kw: Any) -> Any:
        return (await self.request("GET", path, **kw)).json()

    async def post(self, path: str, **kw: Any) -> Any:
        return (await self.request("POST", path, **kw)).json()

    async def put(self, path: str, **kw: Any) -> Any:
        return (await self.request("PUT", path, **kw)).json()

    async def delete(self, path: str, **kw: Any) -> Any:
        return (await self.request("DELETE", path, **kw)).json()


@dataclass
class HostResult(Generic[T]):
    host: Host
    value: Any = None  # a T when ok
    error: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def tls_verify(insecure: bool, cacert: str | None) -> ssl.SSLContext | bool:
    if insecure:
        return False
    if cacert:
        return ssl.create_default_context(cafile=cacert)
    return True


class Fleet:
    def __init__(self, hosts: list[Host], parallel: int = DEFAULT_PARALLEL,
                 timeout: float = DEFAULT_TIMEOUT_S, verify: ssl.SSLContext | bool = True
                 ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.hosts = hosts
        self.parallel = parallel
        self.timeout = timeout
        self.verify = verify

    def http_client(self, read_timeout: float | None = None,
                    streams: int = 0) -> httpx.AsyncClient:
        """``streams``: connections held open for the whole run (events), on top of the
        pool the bounded requests use."""
        t = self.timeout
        pool = max(self.parallel * 4, 16) + streams
        return httpx.AsyncClient(
            timeout=httpx.Timeout(t, read=read_timeout if read_timeout is not None else t),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
            verify=self.verify,
            trust_env=False,  # never send agent traffic (and tokens) through a proxy
        )

    async def each(self, op: Callable[[AgentClient], Awaitable[T]]) -> list[HostResult[T]]:
        """``op`` on every host: at most ``parallel`` at once, each within ``timeout``."""
        sem = asyncio.Semaphore(self.parallel)
        async with self.http_client() as http:

            async def one(host: Host) -> HostResult[T]:
                async with sem:
                    try:
                        async with asyncio.timeout(self.timeout):
                            return HostResult(host, await op(AgentClient(http, host)))
                    except Exception as e:
                        status = e.status if isinstance(e, AgentError) else None
                        return HostResult(host, error=describe_exception(e, self.timeout),
                                          status=status)

            return list(await asyncio.gather(*(one(h) for h in self.hosts)))
