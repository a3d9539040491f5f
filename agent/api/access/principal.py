"""Who is asking: the principal (a token's name and scope, and how it authenticated),
where the gate leaves it for the routes, and the configured tokens.

Secrets are kept only as SHA-256 digests and compared in constant time against every
token; a session id or ticket (sessions.py) is a random value unrelated to the token that
made it, and carries that token's name and scope.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from starlette.types import Scope as AsgiScope

from agent.config import ConfigError, Settings, read_token_file
from agent.model.filters import StreamFilters

Scope = Literal["read", "control"]
MAX_TOKEN_CHARS = 4096  # longer presented secrets are refused without hashing
PRINCIPAL_KEY = "ebpf_agent.principal"  # where the gate leaves the principal in the scope
LOGIN_PATH = "/auth/session"  # POST: the public login


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``via``: bearer, session, ticket or open (auth: none)."""

    name: str
    scope: Scope
    via: str
    session_id: str | None = None
    filters: StreamFilters | None = None  # a ticket's: the only stream it opens

    def allows(self, needed: Scope) -> bool:
        return self.scope == "control" or needed == "read"


OPEN = Principal("anonymous", "control", "open")


def principal_of(scope: AsgiScope) -> Principal | None:
    p: Principal | None = scope.get(PRINCIPAL_KEY)
    return p


def client_address(scope: AsgiScope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unix"


def client_host(scope: AsgiScope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unix"


def bearer_from_header(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, credentials = value.partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


@dataclass(frozen=True)
class _Entry:
    name: str
    scope: Scope
    digest: bytes


class TokenStore:
    """The configured tokens: the legacy single ``token``/``token_file`` (control,
    "default"), each of ``tokens:``, and a generated one (control, "generated")."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries

    @classmethod
    def from_settings(cls, settings: Settings, generated: str | None = None) -> TokenStore:
        entries: list[_Entry] = []
        legacy = settings.resolve_token()
        if legacy is not None:
            entries.append(_Entry("default", "control", _digest(legacy)))
        for t in settings.tokens:
            if t.sha256 is not None:
                digest = bytes.fromhex(t.sha256)
            elif t.token is not None:
                digest = _digest(t.token.get_secret_value())
            else:
                assert t.token_file is not None
                try:  # the same checks as the single token_file (mode 0600, UTF-8, size)
                    value = read_token_file(t.token_file)
                except ConfigError as e:
                    raise ConfigError(f"tokens.{t.name}.{e}") from None
                digest = _digest(value)
            entries.append(_Entry(t.name, t.scope, digest))
        if generated is not None:
            entries.append(_Entry("generated", "control", _digest(generated)))
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ConfigError(f"tokens: names must be unique (got {', '.join(names)})")
        return cls(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def verify(self, presented: str | None) -> Principal | None:
        if not presented or len(presented) > MAX_TOKEN_CHARS:
            return None
        digest = _digest(presented)
        found = None
        for e in self.entries:  # all of them: the time does not tell which one matched
            if hmac.compare_digest(e.digest, digest) and found is None:
                found = e
        return Principal(found.name, found.scope, "bearer") if found else None


