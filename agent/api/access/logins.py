"""A slow-down for repeated failed logins, and a cap on one client's logins in flight.

An attempt is counted *before* it waits: with the count taken after the wait, 100
parallel wrong logins all saw the same (empty) history and were answered at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class LoginLimiter:
    """Failed logins per client address over the last minute. Past the allowance each
    further attempt waits longer before it is answered (up to MAX_DELAY_S), so a burst
    is slowed down, never answered faster. An attempt counts as a failure from the moment
    it starts (``begin``) until it turns out right (``succeeded``). At most
    ``max_in_flight`` logins of one address are handled at once (``begin`` returns None
    past it: 429). Bounded: at most ``max_addresses`` tracked."""

    WINDOW_S = 60.0
    MAX_DELAY_S = 5.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 4096, max_in_flight: int = 4) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.max_addresses = max_addresses
        self.max_in_flight = max_in_flight
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        self.too_many = 0  # logins refused (429) for being over max_in_flight

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

    def _delay_for(self, failures: int) -> float:
        over = failures - self.per_minute
        if over <= 0:
            return 0.0
        return min(self.MAX_DELAY_S, 0.25 * 2 ** min(over - 1, 8))

    def begin(self, address: str) -> tuple[float, float] | None:
        """Start an attempt: None when the address has ``max_in_flight`` logins in
        progress already; else (seconds to wait, the attempt's mark for ``succeeded``).
        The attempt is recorded as a failure now, before the wait."""
        with self._lock:
            busy = self._in_flight.get(address, 0)
            if busy >= self.max_in_flight:
                self.too_many += 1
                return None
            self._in_flight[address] = busy + 1
            q = self._recent(address)
            mark = self.clock()
            q.append(mark)
            return self._delay_for(len(q)), mark

    def end(self, address: str) -> None:
        with self._lock:
            left = self._in_flight.get(address, 1) - 1
            if left > 0:
                self._in_flight[address] = left
            else:
                self._in_flight.pop(address, None)

    def succeeded(self, address: str, mark: float) -> None:
        """The right token after all: this attempt is not a failure."""
        with self._lock:
            q = self._failures.get(address)
            if q is not None:
                with contextlib.suppress(ValueError):
                    q.remove(mark)

    def delay(self, address: str) -> float:
        """Seconds the next attempt of this address would wait (its failures so far plus
        that attempt itself)."""
        with self._lock:
            return self._delay_for(len(self._recent(address)) + 1)

    def failed(self, address: str) -> None:
        """Record a failure (an attempt not made through ``begin``)."""
        with self._lock:
            self._recent(address).append(self.clock())
