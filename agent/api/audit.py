"""The audit log: every state-changing request (who, from where, what, the outcome) in a
bounded in-memory ring (GET /audit) and, when ``logging.audit_file`` is set, appended to
a JSON-lines file. A token's name is recorded, never a secret: bodies are summarised with
credential fields replaced."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger(__name__)
SUMMARY_CHARS = 200
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


class AuditLog:
    def __init__(self, capacity: int, path: Path | None = None) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = 0
        self.path = path
        self.write_errors = 0
        self._fd: int | None = None

    def open(self) -> None:
        """Opened once at start-up: a missing directory is reported then, not per entry."""
        if self.path is not None and self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                               | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def record(self, *, token: str | None, client: str, method: str, path: str,
               body: str | None, status: int) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            entry = {
                "id": self._seq,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                + f".{int(time.time() * 1000) % 1000:03d}Z",
                "token": token,
                "client": client,
                "method": method,
                "path": path,
                "body": body,
                "status": status,
            }
            self._ring.append(entry)
            if self._fd is not None:
                try:
                    # One write(2) of a whole line on an O_APPEND file: lines never
                    # interleave, even with another writer.
                    os.write(self._fd, orjson.dumps(entry) + b"\n")
                except OSError as e:
                    self.write_errors += 1
                    if self.write_errors == 1 or self.write_errors % 1000 == 0:
                        log.warning("audit file %s: %s (%d entries not written)",
                                    self.path, e.strerror, self.write_errors)
        return entry

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self._ring)
        return items[-limit:] if limit else items
