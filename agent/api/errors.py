"""Manager exceptions as HTTP errors, and blocking manager calls off the event loop."""

from __future__ import annotations

import concurrent.futures
import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.core.manager import MonitorUnsupported, OptionsInvalid, UnknownMonitor
from agent.model.targets import TargetError

T = TypeVar("T")


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


async def call(fn: Callable[..., T], *args: Any, value_error_is_422: bool = False,
               **kwargs: Any) -> T:
    """Runs a blocking MonitorManager method in the thread pool (it waits on the control
    thread's Future) and maps its exceptions to status codes."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except UnknownMonitor as e:
        raise HTTPException(404, f"unknown monitor {e.args[0]!r}") from None
    except MonitorUnsupported as e:
        raise HTTPException(409, str(e)) from None
    except OptionsInvalid as e:
        raise HTTPException(422, options_detail(e)) from None
    except TargetError as e:
        raise HTTPException(422, validation_detail(str(e))) from None
    except ValueError as e:
        # Monitors raise their own ValueError subclasses for bad options or queries
        # (e.g. func's FuncPatternError); elsewhere a ValueError is a bug: 500.
        if value_error_is_422:
            raise HTTPException(422, validation_detail(str(e))) from None
        raise
    except concurrent.futures.TimeoutError:
        raise HTTPException(503, "the monitor control thread did not answer in time") from None
    except RuntimeError as e:
        if "shut down" in str(e):
            raise HTTPException(503, "the agent is shutting down") from None
        raise
