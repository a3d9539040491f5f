"""Leases and the desired-state document, as manager methods (a mixin of MonitorManager).

A lease makes a monitor stop by itself unless a controller renews it: a controller that
dies must not leave kernel programs running on every host it drove. Deadlines are
checked by a small timer thread that only *submits* the expiry to the control thread, so
BCC objects are still touched by that one thread alone.

``GET /state`` / ``PUT /state``: the running monitors with their options and the targets
as one document, tagged with a hash (the ETag); a PUT applies a whole document in one
control-thread command, all or nothing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from agent.model.targets import KINDS, TargetSet, check_capacity, validate_values

if TYPE_CHECKING:
    from agent.core.manager import Running
    from agent.monitors.contract import BaseMonitor, MonitorOptions

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_LEASE_S = 7 * 86400.0
TIMER_IDLE_S = 1.0  # the timer's longest sleep; a new lease wakes it at once


class NotRunning(Exception):
    """A lease for a monitor that does not run (409)."""


class PreconditionFailed(Exception):
    """If-Match names a state that is no longer the current one (412)."""

    def __init__(self, current_etag: str) -> None:
        super().__init__(f"the state changed (current ETag {current_etag})")
        self.current_etag = current_etag


class StateRejected(Exception):
    """A desired state that could not be applied; everything was rolled back (409)."""

    def __init__(self, message: str, monitor: str | None, rolled_back: bool) -> None:
        super().__init__(message)
        self.monitor = monitor
        self.rolled_back = rolled_back


@dataclass
class Lease:
    lease_s: float
    deadline: float  # time.monotonic()
    expires_at: datetime
    run: Running  # the run it belongs to: a later start of the monitor is not leased

    def as_dict(self) -> dict[str, Any]:
        return {
            "lease_s": self.lease_s,
            "expires_at": _iso(self.expires_at),
            "remaining_s": round(max(0.0, self.deadline - time.monotonic()), 3),
        }


def etag_of(doc: dict[str, Any]) -> str:
    """A hash of the document. ASCII JSON: a comm holding a byte that is not UTF-8 is a
    lone surrogate (\\udcXX), which orjson and UTF-8 refuse; ``ensure_ascii`` writes it
    as an escape, so hashing never fails after a change was applied."""
    text = json.dumps(doc, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()
    return f'"{digest[:32]}"'


def check_lease_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("lease_s: expected a number of seconds")
    if not 1 <= value <= MAX_LEASE_S:
        raise ValueError(f"lease_s: {value} is outside 1..{int(MAX_LEASE_S)} seconds")
    return float(value)


class LeaseStateMixin:
    """Needs MonitorManager's _running, _targets, _start, _stop, _info, call, submit."""

    if TYPE_CHECKING:
        _running: dict[str, Running]
        _targets: TargetSet
        _closed: bool
        registry: Any
        limits: Any

        def _start(self, name: str, options: MonitorOptions) -> dict[str, Any]: ...
        def _stop(self, name: str) -> dict[str, Any]: ...
        def _info(self, name: str) -> dict[str, Any]: ...
        def _apply_targets(self, updated: TargetSet) -> None: ...
        def call(self, fn: Callable[[], T], timeout: float | None = 120) -> T: ...
        def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]: ...
        def monitor_class(self, name: str) -> type[BaseMonitor]: ...
        def parse_options(self, name: str, options: dict[str, Any] | None,
                          loc: tuple[str | int, ...] = ()) -> MonitorOptions: ...

    # Told of each expiry (monitor name, lease_s, expiry time ISO 8601), on the control
    # thread; the API sets it to record the expiry in its audit log.
    lease_expired_hook: Callable[[str, float, str], None] | None = None
    # The timer thread starts with the first lease.
    _lease_wake_: threading.Event | None = None
    _lease_timer_: threading.Thread | None = None

    def _init_leases(self) -> None:
        """The lease state; called by the manager's __init__."""
        self._leases: dict[str, Lease] = {}
        # Expired leases per monitor since start (a Prometheus counter).
        self.leases_expired: Counter[str] = Counter()
        self._lease_notes: dict[str, str] = {}

    # -- leases (control thread unless said otherwise) ----------------------------------
    def start_leased(self, name: str, options: dict[str, Any] | None,
                     lease_s: float | None = None) -> dict[str, Any]:
        """Start (or re-option) a monitor; with ``lease_s`` it stops by itself after that
        many seconds unless renewed. Without it an existing lease is kept."""
        parsed = self.parse_options(name, options)
        if lease_s is not None:
            lease_s = check_lease_s(lease_s)

        def start() -> dict[str, Any]:
            previous = self._current_lease(name)
            self._start(name, parsed)
            self._lease_notes.pop(name, None)
            run = self._running.get(name)
            if run is not None and lease_s is not None:
                self._set_lease(name, run, lease_s)
            elif run is not None and previous is not None:
                previous.run = run  # a reload with new options keeps the lease
            return self.lease_info(name)

        return self.call(start)

    def renew_lease(self, name: str, lease_s: float | None) -> dict[str, Any]:
        """Renew for ``lease_s`` more seconds; None removes the lease (runs until stopped)."""
        self.monitor_class(name)
        if lease_s is not None:
            lease_s = check_lease_s(lease_s)

        def renew() -> dict[str, Any]:
            run = self._running.get(name)
            if run is None:
                raise NotRunning(f"{name} is not running: nothing to renew")
            if lease_s is None:
                self._leases.pop(name, None)
            else:
                self._set_lease(name, run, lease_s)
            return self.lease_info(name)

        return self.call(renew)

    def lease_info(self, name: str) -> dict[str, Any]:
        """_info plus the lease (control thread)."""
        info = self._info(name)
        lease = self._current_lease(name)
        if lease is not None:
            info["lease"] = lease.as_dict()
        elif info.get("state") == "stopped" and name in self._lease_notes:
            info["reason"] = self._lease_notes[name]
        return info

    def monitors_with_leases(self) -> list[dict[str, Any]]:
        return self.call(lambda: [self.lease_info(c.name) for c in self.registry])

    def monitor_with_lease(self, name: str) -> dict[str, Any]:
        self.monitor_class(name)
        return self.call(lambda: self.lease_info(name))

    def _current_lease(self, name: str) -> Lease | None:
        lease = self._leases.get(name)
        if lease is None:
            return None
        if self._running.get(name) is not lease.run:  # stopped (or restarted) meanwhile
            del self._leases[name]
            return None
        return lease

    def _set_lease(self, name: str, run: Running, lease_s: float) -> None:
        now = time.monotonic()
        self._leases[name] = Lease(lease_s, now + lease_s,
                                   datetime.now(UTC) + timedelta(seconds=lease_s), run)
        self._ensure_lease_timer()
        assert self._lease_wake_ is not None
        self._lease_wake_.set()

    def _expire_leases(self) -> None:
        """Runs on the control thread (submitted by the timer)."""
        now = time.monotonic()
        for name in list(self._leases):
            lease = self._current_lease(name)
            if lease is None or lease.deadline > now:
                continue
            del self._leases[name]
            self.leases_expired[name] += 1
            log.warning("lease of monitor %s expired (%.0f s without renewal, at %s): stopping",
                        name, lease.lease_s, _iso(lease.expires_at))
            try:
                self._stop(name)
            except Exception:
                log.exception("stopping %s after its lease expired failed", name)
            self._lease_notes[name] = f"lease expired at {_iso(lease.expires_at)}"
            if self.lease_expired_hook is not None:
                try:
                    self.lease_expired_hook(name, lease.lease_s, _iso(lease.expires_at))
                except Exception:
                    log.exception("recording the expired lease of %s failed", name)

    def _ensure_lease_timer(self) -> None:
        if self._lease_timer_ is not None:
            return
        self._lease_wake_ = threading.Event()
        self._lease_timer_ = threading.Thread(target=self._lease_timer_loop,
                                              name="lease-timer", daemon=True)
        self._lease_timer_.start()

    def _lease_timer_loop(self) -> None:
        """The manager's timer: sleeps until the earliest deadline, then hands the expiry
        to the control thread. Reads deadlines without a lock: a stale read only makes it
        wake early or late by one idle period, and the control thread re-checks."""
        assert self._lease_wake_ is not None
        while not self._closed:
            deadlines = [lease.deadline for lease in list(self._leases.values())]
            wait = min([TIMER_IDLE_S, *(d - time.monotonic() for d in deadlines)])
            if wait > 0:
                self._lease_wake_.wait(wait)
                self._lease_wake_.clear()
                continue
            try:
                self.submit(self._expire_leases).result(60)
            except Exception:
                if self._closed:
                    return
                log.exception("lease expiry failed")
                time.sleep(TIMER_IDLE_S)

    # -- desired state -------------------------------------------------------------------
    def _state_doc(self) -> dict[str, Any]:
        monitors = {name: run.options.model_dump(mode="json")
                    for name, run in sorted(self._running.items())}
        return {"monitors": monitors, "targets": self._targets.as_dict()}

    def state(self) -> tuple[dict[str, Any], str]:
        """The current state document and its ETag."""

        def read() -> tuple[dict[str, Any], str]:
            doc = self._state_doc()
            return doc, etag_of(doc)

        return self.call(read)

    def put_state(self, desired: dict[str, Any], if_match: str | None = None,
                  dry_run: bool = False) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
        """Make the running monitors and the targets match ``desired``: returns the new
        document, its ETag and the changes made (or, with ``dry_run``, that would be).
        Invalid documents raise before anything changes (422); a failed start rolls
        every change back (StateRejected); a stale ``if_match`` is PreconditionFailed."""
        monitors, targets = self._parse_state(desired)

        def apply() -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
            current = self._state_doc()
            etag = etag_of(current)
            if if_match is not None and if_match.strip() != "*" and \
                    etag not in [t.strip() for t in if_match.split(",")]:
                raise PreconditionFailed(etag)
            changes = self._changes(monitors, targets)
            if dry_run or not changes:
                return current, etag, changes
            self._apply_state(monitors, targets)
            doc = self._state_doc()
            return doc, etag_of(doc), changes

        return self.call(apply)

    def _parse_state(self, desired: dict[str, Any]
                     ) -> tuple[dict[str, MonitorOptions], TargetSet | None]:
        if not isinstance(desired, dict):
            raise ValueError("the state must be an object")
        unknown = set(desired) - {"monitors", "targets"}
        if unknown:
            raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
        raw = desired.get("monitors")
        if not isinstance(raw, dict):
            raise ValueError("monitors: expected an object of monitor name: options")
        monitors: dict[str, MonitorOptions] = {}
        for name, options in raw.items():
            if options is not None and not isinstance(options, dict):
                raise ValueError(f"monitors.{name}: options must be an object")
            monitors[name] = self.parse_options(name, options,  # 404 / 422
                                                loc=("monitors", name))
        targets = None
        if desired.get("targets") is not None:
            t = desired["targets"]
            if not isinstance(t, dict):
                raise ValueError("targets: expected an object")
            extra = set(t) - {*KINDS, "follow_children"}
            if extra:
                raise ValueError(f"targets: unknown keys: {', '.join(sorted(extra))}")
            follow = t.get("follow_children", True)
            if not isinstance(follow, bool):
                raise ValueError("targets.follow_children: expected true or false")
            values = {kind: validate_values(kind, t.get(kind) or []) for kind in KINDS}
            targets = TargetSet(values["pids"], values["uids"], values["comms"], follow)
            check_capacity(targets, self.limits)
        return monitors, targets

    def _changes(self, monitors: dict[str, MonitorOptions],
                 targets: TargetSet | None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in sorted(set(self._running) - set(monitors)):
            out.append({"action": "stop", "monitor": name})
        for name, options in sorted(monitors.items()):
            run = self._running.get(name)
            new = options.model_dump(mode="json")
            if run is None:
                out.append({"action": "start", "monitor": name, "options": new})
            elif run.options != options:
                old = run.options.model_dump(mode="json")
                diff = {k: {"from": old.get(k), "to": v} for k, v in new.items()
                        if old.get(k) != v}
                out.append({"action": "options", "monitor": name, "changes": diff})
        if targets is not None:
            for kind in KINDS:
                old_v, new_v = self._targets.get(kind), targets.get(kind)
                if old_v != new_v:
                    out.append({"action": "targets", "kind": kind,
                                "add": sorted(new_v - old_v), "remove": sorted(old_v - new_v)})
            if targets.follow_children != self._targets.follow_children:
                out.append({"action": "targets", "kind": "follow_children",
                            "from": self._targets.follow_children,
                            "to": targets.follow_children})
        return out

    def _apply_state(self, monitors: dict[str, MonitorOptions],
                     targets: TargetSet | None) -> None:
        """Control thread. Undo log: every step records how to reverse it."""
        old_targets = self._targets
        old_options = {name: run.options for name, run in self._running.items()}
        old_leases = {n: lease for n in list(self._leases)
                      if (lease := self._current_lease(n)) is not None}  # no stale ones
        undo: list[Callable[[], None]] = []
        failed: str | None = None
        try:
            if targets is not None and targets != old_targets:
                self._apply_targets(targets)
                undo.append(lambda: self._apply_targets(old_targets))
            for name in sorted(set(self._running) - set(monitors)):
                failed = name
                undo.append(_restart(self, name, old_options[name]))
                self._stop(name)
            for name, options in sorted(monitors.items()):
                failed = name
                if name in old_options and old_options[name] == options:
                    continue
                # The undo step goes first: a reload stops the old run before the new
                # one can fail.
                if name in old_options:
                    undo.append(_restart(self, name, old_options[name]))
                else:
                    undo.append(_stopper(self, name))
                self._start(name, options)
        except Exception as e:
            for step in reversed(undo):
                try:
                    step()
                except Exception:
                    log.exception("rolling back the state failed at one step")
            self._keep_leases(old_leases)
            raise StateRejected(f"{failed}: {e}; every change was rolled back", failed,
                                True) from e
        self._keep_leases(old_leases)  # a monitor reloaded with new options keeps its lease

    def _keep_leases(self, leases: dict[str, Lease]) -> None:
        for name, lease in leases.items():
            run = self._running.get(name)
            if run is not None:
                lease.run = run
                self._leases[name] = lease


def _restart(mgr: LeaseStateMixin, name: str, options: MonitorOptions) -> Callable[[], None]:
    def step() -> None:
        mgr._start(name, options)

    return step


def _stopper(mgr: LeaseStateMixin, name: str) -> Callable[[], None]:
    def step() -> None:
        mgr._stop(name)

    return step


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = ["Lease", "LeaseStateMixin", "NotRunning", "PreconditionFailed", "StateRejected",
           "check_lease_s", "etag_of"]
