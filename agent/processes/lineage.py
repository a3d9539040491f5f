"""AncestorStage: the ``ancestors`` list (process_id, pid, comm, parent first) added to
every event when ``processes.event_ancestors`` is N > 0 (agent/model/events.py
ENRICHED_FIELDS declares it). Runs on the pollers, before the event is encoded: a few
dict lookups under the table's lock per event.

A chain cut at a process the table does not know may only be late: the tracker's
records (fork, exec) come through their own ring buffer, and a process that forked a
moment ago can have its event handled first. Then the stage waits (bounded) for the
tracker to apply what the kernel produced before, and looks again."""

from __future__ import annotations

from collections.abc import Callable

from agent.model.events import ANCESTORS, Event
from agent.processes.table import ProcessTable


class AncestorStage:
    def __init__(self, table: ProcessTable, limit: int,
                 catch_up: Callable[[], bool] | None = None) -> None:
        self.table = table
        self.limit = limit
        self.catch_up = catch_up  # ProcessTracker.catch_up

    def __call__(self, event: Event) -> None:
        parent_id, ppid = event.get("parent_process_id"), event.get("ppid")
        chain, whole = self.table.ancestors_brief(parent_id, ppid, self.limit)
        if not whole and self.catch_up is not None and self.catch_up():
            chain, whole = self.table.ancestors_brief(parent_id, ppid, self.limit)
        event[ANCESTORS] = chain
