"""The audit log: every state-changing request (who, from where, what, the outcome) in
bounded in-memory rings (GET /audit) and, when ``logging.audit_file`` is set, appended to
a JSON-lines file. A token's name is recorded, never a secret: bodies are summarised with
credential fields replaced, paths cut at PATH_CHARS.

Refused requests (no valid credentials, or a scope the token lacks) have a ring of their
own (``api.audit_refused_entries``): a flood of them cannot evict the accepted state
changes. In the file they are limited to ``REFUSED_LINES_PER_MINUTE``; the file is rotated
at ``logging.audit_file_max_bytes`` (one previous file kept, ``<name>.1``). What was not
written is counted (/metrics ``ebpf_agent_audit_not_written_total``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.api.access.origin import SAFE_METHODS
from agent.api.access.principal import LOGIN_PATH, client_address

log = logging.getLogger(__name__)
SUMMARY_CHARS = 200
PATH_CHARS = 256  # of a recorded path; the rest is replaced by "..."
REFUSED_LINES_PER_MINUTE = 600  # refused requests written to the audit file
AUDIT_KEY = "ebpf_agent.audit"  # the request's audit note in its ASGI scope
SECRET_KEYS = frozenset({"token", "password", "secret", "ticket", "authorization"})


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "<redacted>" if str(k).lower() in SECRET_KEYS else _redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def summarize_body(body: bytes) -> str | None:
    """A short JSON summary of a request body with credential fields replaced; the
    first bytes of a body that is not JSON are not shown (they may hold a secret)."""
    if not body:
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"<{len(body)} bytes, not JSON>"
    text = orjson.dumps(_redact(parsed)).decode()
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 3] + "..."


def is_refused(token: str | None, status: int) -> bool:
    """Refused: no valid credentials, or a token without the scope."""
    return token is None or status in (401, 403)


def cut_path(path: str) -> str:
    return path if len(path) <= PATH_CHARS else path[: PATH_CHARS - 3] + "..."


class AuditLog:
    def __init__(self, capacity: int, path: Path | None = None, *,
                 refused_capacity: int | None = None, max_file_bytes: int = 64 * 1024**2,
                 clock: Any = time.monotonic) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._refused: deque[dict[str, Any]] = deque(maxlen=refused_capacity or capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self.path = path
        self.max_file_bytes = max_file_bytes
        self.clock = clock
        self.write_errors = 0
        self.rate_limited = 0  # refused entries not written: over REFUSED_LINES_PER_MINUTE
        self.rotations = 0
        self._fd: int | None = None
        self._size = 0
        self._minute = -1
        self._refused_lines = 0

    def open(self) -> None:
        """Opened once at start-up: a missing directory is reported then, not per entry."""
        if self.path is not None and self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                               | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            self._size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def not_written(self) -> dict[str, int]:
        return {"write_error": self.write_errors, "rate_limited": self.rate_limited}

    def record(self, *, token: str | None, client: str, method: str, path: str,
               body: str | None, status: int) -> dict[str, Any]:
        refused = is_refused(token, status)
        with self._lock:
            self._seq += 1
            entry = {
                "id": self._seq,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                + f".{int(time.time() * 1000) % 1000:03d}Z",
                "token": token,
                "client": client,
                "method": method,
                "path": cut_path(path),
                "body": body,
                "status": status,
            }
            (self._refused if refused else self._ring).append(entry)
            if self._fd is not None and self._may_write(refused):
                self._write(orjson.dumps(entry) + b"\n")
        return entry

    def _may_write(self, refused: bool) -> bool:
        if not refused:
            return True
        minute = int(self.clock() // 60)
        if minute != self._minute:
            self._minute, self._refused_lines = minute, 0
        if self._refused_lines >= REFUSED_LINES_PER_MINUTE:
            self.rate_limited += 1
            return False
        self._refused_lines += 1
        return True

    def _write(self, line: bytes) -> None:
        assert self._fd is not None and self.path is not None
        try:
            if self._size + len(line) > self.max_file_bytes and self._size > 0:
                self._rotate()
            # One write(2) of a whole line on an O_APPEND file: lines never
            # interleave, even with another writer.
            os.write(self._fd, line)
            self._size += len(line)
        except OSError as e:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                log.warning("audit file %s: %s (%d entries not written)",
                            self.path, e.strerror, self.write_errors)

    def _rotate(self) -> None:
        """<name> becomes <name>.1 (replacing the previous one); a new file is opened."""
        assert self._fd is not None and self.path is not None
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        os.close(self._fd)
        self._fd = None
        self.open()
        self.rotations += 1

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Accepted and refused entries in the order they happened."""
        with self._lock:
            items = sorted([*self._ring, *self._refused], key=lambda e: e["id"])
        return items[-limit:] if limit else items


class AuditTrail:
    """ASGI middleware around the gate: records every state-changing request with its
    outcome. The gate fills the note with the principal's name and the body it read."""

    def __init__(self, app: ASGIApp, audit: AuditLog) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        note: dict[str, Any] = {"token": None, "body": b""}
        scope[AUDIT_KEY] = note
        status = {"code": 499}  # no response at all: the client went away (nginx's 499)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path, body, code = scope["path"], note["body"], status["code"]
            if path == LOGIN_PATH:
                summary = "{\"token\":\"<redacted>\"}" if body else None
            elif is_refused(note["token"], code):
                summary = None  # a refused caller's body is not kept
            else:
                summary = summarize_body(body)
            self.audit.record(token=note["token"], client=client_address(scope),
                              method=scope["method"], path=path, body=summary, status=code)
