"""A logging filter that keeps credentials out of every log line, at every level.

uvicorn and websockets log request lines and, at DEBUG, whole handshakes: an
``Authorization: Bearer ...`` header, a session cookie or a ``?ticket=`` would land in the
log. The filter sits on the root handlers, so it sees the records of every library that
propagates there (uvicorn is configured with log_config=None for that reason), and it
rewrites the formatted message before any handler writes it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

REDACTED = "<redacted>"
PATTERNS = (
    # Authorization: Bearer xyz / ("authorization", "Bearer xyz") / b'Bearer xyz'
    re.compile(r"(?i)(bearer\s+)[^\s'\",;)\]}]+"),
    re.compile(r"(?i)(ebpf_agent_session=)[^\s'\",;)\]}]+"),
    re.compile(r"(?i)([?&]ticket=)[^\s&'\"#]+"),
    re.compile(r"(?i)(\"token\"\s*:\s*\")[^\"]*"),
)


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__("")
        self.secrets = [s for s in secrets if s]

    def add(self, secret: str) -> None:
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def redact(self, text: str) -> str:
        for pattern in PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        clean = self.redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True


def install(secrets: Iterable[str] = ()) -> RedactSecrets:
    """Adds one filter to every handler of the root logger (and to the root logger's
    last-resort path by adding it to the root logger too)."""
    flt = RedactSecrets(secrets)
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(flt)
    return flt


def uninstall(flt: RedactSecrets) -> None:
    for handler in logging.getLogger().handlers:
        handler.removeFilter(flt)
