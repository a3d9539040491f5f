"""Browser sessions and single-use stream tickets: random ids that grant what the token
that made them grants, each with an expiry.

Both stores are bounded twice: a quota per token (``api.max_sessions_per_token``,
``api.max_tickets_per_token``) and a total. A full store refuses the new entry (429 for a
token over its quota, 503 for the store) instead of evicting an older one: evicting the
oldest let a read token end an admin's session or cancel a control ticket by making many
of its own.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from agent.api.access.principal import Principal
from agent.model.filters import StreamFilters


class StoreFull(Exception):
    """No room for a new entry: ``status`` 429 (the token's quota) or 503 (the store)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class _Held:
    principal: Principal
    expires: float
    filters: StreamFilters | None = None


class _Expiring:
    """A bounded map of random ids to what they grant. Every entry of a store lives the
    same ``ttl_s``, so insertion order is expiry order: expiring looks at the front."""

    what = "entry"
    setting = ""

    def __init__(self, ttl_s: float, capacity: int, clock: Callable[[], float],
                 per_token: int | None = None) -> None:
        self.ttl_s, self.capacity, self.clock = ttl_s, capacity, clock
        self.per_token = per_token if per_token is not None else capacity
        self._items: OrderedDict[str, _Held] = OrderedDict()
        self._held_by: dict[str, int] = {}  # token name -> live entries
        self._lock = threading.Lock()
        self.refused = 0  # entries refused because of a quota or a full store

    def _add(self, held: _Held) -> str:
        key = secrets.token_urlsafe(32)
        name = held.principal.name
        with self._lock:
            self._expire()
            mine = self._held_by.get(name, 0)
            if mine >= self.per_token:
                self.refused += 1
                raise StoreFull(429, f"token {name!r} already holds {mine} {self.what}s "
                                     f"(api.{self.setting}_per_token); end one or wait "
                                     f"until one expires")
            if len(self._items) >= self.capacity:
                self.refused += 1
                raise StoreFull(503, f"the {self.what} store is full (api.{self.setting}: "
                                     f"{self.capacity}); try again when one expires")
            self._items[key] = held
            self._held_by[name] = mine + 1
        return key

    def _drop(self, key: str) -> _Held | None:
        held = self._items.pop(key, None)
        if held is not None:
            name = held.principal.name
            left = self._held_by.get(name, 1) - 1
            if left > 0:
                self._held_by[name] = left
            else:
                self._held_by.pop(name, None)
        return held

    def _expire(self) -> None:
        now = self.clock()
        while self._items:
            key, held = next(iter(self._items.items()))
            if held.expires > now:
                break
            self._drop(key)

    def _get(self, key: str | None, pop: bool) -> _Held | None:
        if not key or len(key) > 128:
            return None
        with self._lock:
            held = self._drop(key) if pop else self._items.get(key)
            if held is None:
                return None
            if held.expires <= self.clock():
                self._drop(key)
                return None
            return held

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)


class SessionStore(_Expiring):
    what, setting = "session", "max_sessions"

    def create(self, who: Principal) -> str:
        """A new session id; StoreFull when there is no room."""
        return self._add(_Held(who, self.clock() + self.ttl_s))

    def lookup(self, session_id: str | None) -> Principal | None:
        held = self._get(session_id, pop=False)
        if held is None:
            return None
        p = held.principal
        return Principal(p.name, p.scope, "session", session_id)

    def end(self, session_id: str | None) -> bool:
        return self._get(session_id, pop=True) is not None


class TicketStore(_Expiring):
    what, setting = "ticket", "max_tickets"

    def create(self, who: Principal, filters: StreamFilters) -> str:
        """A new ticket; StoreFull when there is no room."""
        return self._add(_Held(who, self.clock() + self.ttl_s, filters))

    def redeem(self, ticket: str | None) -> Principal | None:
        """Single use: the ticket is gone after this call, whatever happens next. The
        principal carries the ticket's filters: the one stream it may open."""
        held = self._get(ticket, pop=True)
        if held is None:
            return None
        p = held.principal
        return Principal(p.name, p.scope, "ticket", filters=held.filters or StreamFilters())
