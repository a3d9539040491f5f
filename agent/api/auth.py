"""Who is asking: named tokens with a scope, browser sessions, single-use stream tickets,
and a slow-down for repeated failed logins.

Secrets are kept only as SHA-256 digests and compared in constant time against every
token; a session id or ticket is a random value unrelated to the token that made it,
and carries that token's name and scope.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.config import ConfigError, Settings, read_token_file

Scope = Literal["read", "control"]
MAX_TOKEN_CHARS = 4096  # longer presented secrets are refused without hashing


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``via``: bearer, session, ticket or open (auth: none)."""

    name: str
    scope: Scope
    via: str
    session_id: str | None = None

    def allows(self, needed: Scope) -> bool:
        return self.scope == "control" or needed == "read"


OPEN = Principal("anonymous", "control", "open")


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


@dataclass
class _Held:
    principal: Principal
    expires: float
    filters: dict[str, list[str]] = field(default_factory=dict)


class _Expiring:
    """A bounded map of random ids to what they grant, each with an expiry."""

    def __init__(self, ttl_s: float, capacity: int, clock: Callable[[], float]) -> None:
        self.ttl_s, self.capacity, self.clock = ttl_s, capacity, clock
        self._items: OrderedDict[str, _Held] = OrderedDict()
        self._lock = threading.Lock()

    def _add(self, held: _Held) -> str:
        key = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            while len(self._items) >= self.capacity:
                self._items.popitem(last=False)  # the oldest goes first
            self._items[key] = held
        return key

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, v in self._items.items() if v.expires <= now]:
            del self._items[key]

    def _get(self, key: str | None, pop: bool) -> _Held | None:
        if not key or len(key) > 128:
            return None
        with self._lock:
            held = self._items.pop(key, None) if pop else self._items.get(key)
            if held is None:
                return None
            if held.expires <= self.clock():
                self._items.pop(key, None)
                return None
            return held

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)


class SessionStore(_Expiring):
    def create(self, who: Principal) -> str:
        expires = self.clock() + self.ttl_s
        # The session id itself is filled in by lookup(); the store key is the id.
        return self._add(_Held(who, expires))

    def lookup(self, session_id: str | None) -> Principal | None:
        held = self._get(session_id, pop=False)
        if held is None:
            return None
        p = held.principal
        return Principal(p.name, p.scope, "session", session_id)

    def end(self, session_id: str | None) -> bool:
        return self._get(session_id, pop=True) is not None


class TicketStore(_Expiring):
    def create(self, who: Principal, filters: dict[str, list[str]]) -> str:
        return self._add(_Held(who, self.clock() + self.ttl_s, filters))

    def redeem(self, ticket: str | None) -> tuple[Principal, dict[str, list[str]]] | None:
        """Single use: the ticket is gone after this call, whatever happens next."""
        held = self._get(ticket, pop=True)
        if held is None:
            return None
        p = held.principal
        return Principal(p.name, p.scope, "ticket"), held.filters


class LoginLimiter:
    """Failed logins per client address over the last minute. Past the allowance each
    further attempt waits longer before it is answered (up to MAX_DELAY_S), so a burst
    is slowed down, never answered faster. Bounded: at most ``max_addresses`` tracked."""

    WINDOW_S = 60.0
    MAX_DELAY_S = 5.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 4096) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, address: str) -> deque[float]:
        now = self.clock()
        q = self._failures.get(address)
        if q is None:
            q = deque(maxlen=self.per_minute + 64)
            self._failures[address] = q
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
        self._failures.move_to_end(address)
        while q and q[0] <= now - self.WINDOW_S:
            q.popleft()
        return q

    def delay(self, address: str) -> float:
        """Seconds to wait before checking this address's next login."""
        with self._lock:
            over = len(self._recent(address)) - self.per_minute
        if over < 0:
            return 0.0
        return min(self.MAX_DELAY_S, 0.25 * 2 ** min(over, 8))

    def failed(self, address: str) -> None:
        with self._lock:
            self._recent(address).append(self.clock())
