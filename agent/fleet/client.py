"""Talking to many agents at once: one async HTTP client, a bound on concurrent hosts, and
a deadline per host, so a few hundred hosts work and one slow host holds nobody up.

``Fleet.each(op)`` runs ``op(AgentClient)`` on every host and returns one ``HostResult``
per host, in inventory order: a value, or an error that says why (unreachable, timeout,
401, 409 with the agent's reason, an answer that is not what the API promises, ...).

Whatever a host sends is bounded: an answer body larger than ``MAX_BODY_BYTES`` is cut
off with a per-host error (a hostile or broken host cannot make the controller hold
gigabytes), and answers are checked for the shape the API promises (``BadAnswer``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
import orjson

from agent.fleet.inventory import Host

T = TypeVar("T")
DEFAULT_PARALLEL = 32
DEFAULT_TIMEOUT_S = 10.0
# The largest answer read from a host. Real answers are far smaller (a /stats with the
# per-process syscall table is a few hundred kB); the cap only stops a host that sends
# without end.
MAX_BODY_BYTES = 16 << 20


class AgentError(Exception):
    """One host's failure, phrased for the operator."""

    def __init__(self, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class BadAnswer(AgentError):
    """An answer that is not what the agent's API promises (not JSON, a missing field, a
    list where an object belongs, too large): the message says what was wrong."""


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def expect(value: Any, kind: type, what: str) -> Any:
    """``value`` when it is a ``kind`` (dict: a JSON object, list, str, ...), else a
    BadAnswer naming ``what`` (e.g. "GET /monitors: [0]")."""
    number = kind is float and isinstance(value, int)  # JSON does not tell 1 from 1.0
    if not (isinstance(value, kind) or number) or (kind in (int, float)
                                                  and isinstance(value, bool)):
        raise BadAnswer(f"bad answer: {what} is {_json_type(value)}, expected "
                        f"{_json_type(kind())}")
    return value


def member(obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    """``obj[key]``, which must be present and a ``kind``."""
    if key not in obj:
        raise BadAnswer(f"bad answer: {what} has no {key!r}")
    return expect(obj[key], kind, f"{what}.{key}")


def loads(body: bytes | str) -> Any:
    """JSON as the agent writes it: orjson, or the standard library for what orjson
    refuses, the \\udcXX escapes of bytes that are not UTF-8 (comms, argv). Raises
    ValueError."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse_json(body: bytes, what: str) -> Any:
    try:
        return loads(body)
    except (ValueError, RecursionError):
        raise BadAnswer(f"bad answer: {what} is not JSON ({len(body)} bytes)") from None


@dataclass
class Answer:
    """A host's answer, read whole (at most MAX_BODY_BYTES)."""

    what: str  # "GET /state": for error messages
    status_code: int
    reason_phrase: str
    headers: httpx.Headers
    content: bytes

    def json(self) -> Any:
        return parse_json(self.content, f"the answer to {self.what}")


async def read_body(r: httpx.Response, what: str, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body of ``r`` (a streamed response), refused beyond ``limit`` bytes (after
    decompression) without holding more than that."""
    declared = r.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadAnswer(f"bad answer: {what} announces {int(declared)} bytes, more than "
                        f"the {limit} allowed")
    buf = bytearray()
    async for chunk in r.aiter_bytes():
        buf += chunk
        if len(buf) > limit:
            raise BadAnswer(f"bad answer: {what} is larger than {limit} bytes")
    return bytes(buf)


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


def error_of(response: Answer) -> AgentError:
    try:
        doc = loads(response.content)
        detail = doc.get("detail") if isinstance(doc, dict) else None
    except (ValueError, RecursionError):
        detail = None
    reason = response.reason_phrase or ""
    text = _detail_text(detail)[:300] if detail is not None else reason
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
    if isinstance(e, httpx.RemoteProtocolError) and "illegal" in str(e):
        # h11's message quotes what it got (a bytearray of up to kilobytes)
        return "bad answer: not valid HTTP"
    if isinstance(e, httpx.HTTPError):
        return f"unreachable ({type(e).__name__}: {str(e)[:200]})"
    # Shapes a check in ops did not cover: never a traceback-like dump.
    if isinstance(e, KeyError):
        return f"bad answer: a field is missing ({str(e)[:80]})"
    if isinstance(e, TypeError | AttributeError | ValueError):
        return "bad answer: a value has the wrong type"
    return f"{type(e).__name__}: {str(e)[:200]}"


class AgentClient:
    """One agent, through the fleet's shared HTTP client."""

    def __init__(self, http: httpx.AsyncClient, host: Host) -> None:
        self.http = http
        self.host = host
        self.headers = {"Authorization": f"Bearer {host.token}"} if host.token else {}

    async def request(self, method: str, path: str, *, expect: tuple[int, ...] = (200,),
                      **kw: Any) -> Answer:
        headers = {**self.headers, **kw.pop("headers", {})}
        if "json" in kw:
            # ASCII JSON: a comm holding a byte that is not UTF-8 is a lone surrogate
            # (\udcXX), which httpx's own encoder (UTF-8) refuses.
            kw["content"] = json.dumps(kw.pop("json"), ensure_ascii=True).encode()
            headers["Content-Type"] = "application/json"
        what = f"{method} {path}"
        async with self.http.stream(method, self.host.url + path, headers=headers,
                                    **kw) as r:
            body = await read_body(r, f"the answer to {what}")
            answer = Answer(what, r.status_code, r.reason_phrase, r.headers, body)
        if answer.status_code not in expect:
            raise error_of(answer)
        return answer

    async def get_object(self, path: str, **kw: Any) -> dict[str, Any]:
        """GET ``path``, whose answer must be a JSON object."""
        value: dict[str, Any] = expect(await self.get(path, **kw), dict,
                                       f"the answer to GET {path}")
        return value

    async def get_list(self, path: str, **kw: Any) -> list[Any]:
        value: list[Any] = expect(await self.get(path, **kw), list, f"the answer to GET {path}")
        return value

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
