"""Manager exceptions as HTTP errors, and blocking manager calls off the event loop."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from agent.core.manager import MonitorUnsupported, OptionsInvalid, UnknownMonitor
from agent.model.targets import TargetError

T = TypeVar("T")


def validation_detail(msg: str, loc: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    """422 details in FastAPI's own shape, so every 422 of the API reads the same."""
    return [{"loc": list(loc), "msg": msg, "type": "value_error"}]


def options_detail(e: OptionsInvalid) -> list[dict[str, Any]]:
    out = []
    for err in e.errors:
        out.append({
            "loc": ["body", *err.get("loc", ())],
            "msg": str(err.get("msg", "")),
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
