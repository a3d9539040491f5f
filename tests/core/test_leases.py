"""The lease book: leases run out at their deadline (checked by the control thread's
tick with the time it passes), belong to one run of a monitor, and are counted."""

from __future__ import annotations

import time

import pytest

from agent.core.leases import LeaseBook, check_lease_s


def test_due_returns_only_leases_past_their_deadline_and_counts_them() -> None:
    book, run_a, run_b = LeaseBook(), object(), object()
    book.grant("a", run_a, 5)
    book.grant("b", run_b, 60)
    running = {"a": run_a, "b": run_b}
    now = time.monotonic()
    assert book.due(now, running) == []
    due = book.due(now + 10, running)
    assert [(name, lease.lease_s) for name, lease in due] == [("a", 5.0)]
    assert book.expired == {"a": 1}
    assert (book.note("a") or "").startswith("lease expired at ")
    assert book.due(now + 10, running) == []  # removed: expires once
    assert book.current("b", run_b) is not None


def test_a_lease_belongs_to_one_run() -> None:
    book, old, new = LeaseBook(), object(), object()
    book.grant("a", old, 5)
    assert book.current("a", new) is None  # restarted meanwhile: not leased
    assert book.current("a", old) is None  # and the stale lease is gone
    book.grant("a", old, 5)
    held = book.held({"a": old})
    book.carry_over(held, {"a": new})  # reloaded with new options: keeps its lease
    lease = book.current("a", new)
    assert lease is not None and lease.lease_s == 5.0
    assert book.due(time.monotonic() + 60, {}) == []  # not running: nothing to stop
    assert book.expired == {}


def test_revoke_and_notes() -> None:
    book, run = LeaseBook(), object()
    book.grant("a", run, 5)
    book.revoke("a")
    assert book.current("a", run) is None
    book.grant("a", run, 1)
    book.due(time.monotonic() + 2, {"a": run})
    book.forget_note("a")
    assert book.note("a") is None


@pytest.mark.parametrize(("value", "ok"), [
    (1, True), (604800, True), (0.5, False), (604801, False), (True, False), ("5", False),
])
def test_check_lease_s(value: object, ok: bool) -> None:
    if ok:
        assert check_lease_s(value) == float(value)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match="lease_s"):
            check_lease_s(value)
