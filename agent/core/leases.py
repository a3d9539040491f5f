"""Leases: a monitor that stops by itself unless a controller renews it, so a
controller that dies does not leave kernel programs running on every host it drove.

``LeaseBook`` is a plain record owned by the manager and used on its control thread
only; the control thread's tick (MonitorManager._tick) asks it which leases ran out
(``due``) and stops those monitors. No timer of its own, no reference to the manager.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_LEASE_S = 7 * 86400.0


@dataclass
class Lease:
    lease_s: float
    deadline: float  # time.monotonic()
    expires_at: datetime
    run: object  # the run it belongs to (identity): a later start is not leased

    def as_dict(self) -> dict[str, Any]:
        return {
            "lease_s": self.lease_s,
            "expires_at": iso(self.expires_at),
            "remaining_s": round(max(0.0, self.deadline - time.monotonic()), 3),
        }


def check_lease_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("lease_s: expected a number of seconds")
    if not 1 <= value <= MAX_LEASE_S:
        raise ValueError(f"lease_s: {value} is outside 1..{int(MAX_LEASE_S)} seconds")
    return float(value)


class LeaseBook:
    """Leases by monitor name. A lease belongs to one run of its monitor: once that run
    is gone (stopped, restarted) the lease is dropped the next time it is looked at."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self.expired: Counter[str] = Counter()  # per monitor since start (Prometheus)
        self._notes: dict[str, str] = {}  # "lease expired at ...", until the next start

    def current(self, name: str, run: object | None) -> Lease | None:
        """The lease of ``run`` (the monitor's current run, None when stopped)."""
        lease = self._leases.get(name)
        if lease is None:
            return None
        if lease.run is not run:
            del self._leases[name]
            return None
        return lease

    def grant(self, name: str, run: object, lease_s: float) -> None:
        self._leases[name] = Lease(lease_s, time.monotonic() + lease_s,
                                   datetime.now(UTC) + timedelta(seconds=lease_s), run)

    def revoke(self, name: str) -> None:
        self._leases.pop(name, None)

    def held(self, running: Mapping[str, object]) -> dict[str, Lease]:
        """The leases of the current runs (stale ones dropped)."""
        return {name: lease for name in list(self._leases)
                if (lease := self.current(name, running.get(name))) is not None}

    def carry_over(self, leases: Mapping[str, Lease], running: Mapping[str, object]) -> None:
        """Leases move to the new run of a monitor reloaded with new options."""
        for name, lease in leases.items():
            run = running.get(name)
            if run is not None:
                lease.run = run
                self._leases[name] = lease

    def due(self, now: float, running: Mapping[str, object]) -> list[tuple[str, Lease]]:
        """The leases that ran out by ``now``, removed from the book, counted and noted."""
        out = []
        for name, lease in self.held(running).items():
            if lease.deadline > now:
                continue
            del self._leases[name]
            self.expired[name] += 1
            self._notes[name] = f"lease expired at {iso(lease.expires_at)}"
            out.append((name, lease))
        return out

    def note(self, name: str) -> str | None:
        return self._notes.get(name)

    def forget_note(self, name: str) -> None:
        self._notes.pop(name, None)


def iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
