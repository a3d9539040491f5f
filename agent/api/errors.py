"""Manager refusals as HTTP errors (the statuses: agent/core/failures.py), and JSON
responses that survive what the kernel hands us."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.core.failures import (
    ManagerClosed,
    OptionsInvalid,
    PreconditionFailed,
    StateRejected,
    UnknownMonitor,
    failure_of,
)


class SafeJSONResponse(JSONResponse):
    """JSON that survives what the kernel hands us: strings holding bytes that are not
    UTF-8 (decoded with surrogateescape: comms, symbol names, argv) are written as
    \\udcXX escapes, as the event streams do, instead of failing the response (500)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, ensure_ascii=True, allow_nan=False,
                              separators=(",", ":")).encode("ascii")


def _finite(value: Any) -> Any:
    """NaN and infinities (which JSON cannot carry) as their text; the rest as is."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


async def request_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, able to echo NaN, Infinity or 1e400 (a float overflowing to
    inf) from a JSON body: the default handler fails on them with a 500."""
    assert isinstance(exc, RequestValidationError)
    return SafeJSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, 422)


# What FastAPI answers (400) when parsing a JSON body fails with something other than a
# JSONDecodeError: bytes that are not UTF-8, or nesting deeper than the recursion limit.
_BODY_PARSE_FAILED = "There was an error parsing the body"


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's handler, except that a body it could not parse is a 422 like every other
    bad body (the OpenAPI document lists 422, not 400)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.detail == _BODY_PARSE_FAILED:
        cause = exc.__cause__
        if isinstance(cause, UnicodeDecodeError):
            msg = "invalid JSON: the body is not UTF-8"
        elif isinstance(cause, RecursionError):
            msg = "invalid JSON: the body nests too deep"
        else:
            msg = f"invalid JSON: {type(cause).__name__ if cause else 'unreadable'}"
        return SafeJSONResponse({"detail": validation_detail(msg)}, 422)
    return await http_exception_handler(request, exc)


def validation_detail(msg: str, loc: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    """422 details in FastAPI's own shape, so every 422 of the API reads the same."""
    return [{"loc": list(loc), "msg": msg, "type": "value_error"}]


def options_detail(e: OptionsInvalid) -> list[dict[str, Any]]:
    out = []
    for err in e.errors:
        msg = str(err.get("msg", ""))
        out.append({
            "loc": [e.where, *e.loc, *err.get("loc", ())],
            "msg": f"{msg} (monitor {e.monitor})" if e.monitor else msg,
            "type": str(err.get("type", "value_error")),
        })
    return out or validation_detail(str(e))


@contextlib.contextmanager
def http_errors(checks_input: bool = False) -> Iterator[None]:
    """Refusals of the manager (and of the input checks before a command) as HTTP
    errors, by the table in agent/core/failures.py; anything else propagates (500).
    ``checks_input``: a ValueError is bad input (422), see Command.checks_input."""
    try:
        yield
    except Exception as e:
        failure = failure_of(e, checks_input)
        if failure is None:
            raise
        raise HTTPException(failure.status, _detail(e), headers=_headers(e)) from None


def _detail(e: Exception) -> Any:
    """The body's ``detail``: 422s in FastAPI's shape, the rest as text."""
    if isinstance(e, OptionsInvalid):
        return options_detail(e)
    if isinstance(e, UnknownMonitor):
        return f"unknown monitor {e.args[0]!r}"
    if isinstance(e, StateRejected):
        return {"message": str(e), "monitor": e.monitor, "rolled_back": e.rolled_back}
    if isinstance(e, ManagerClosed):
        return "the agent is shutting down"
    if isinstance(e, ValueError):
        return validation_detail(str(e))
    return str(e)


def _headers(e: Exception) -> dict[str, str] | None:
    if isinstance(e, PreconditionFailed):
        return {"ETag": e.current_etag}
    return None
