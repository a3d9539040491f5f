"""AncestorStage: the ``ancestors`` list (process_id, pid, comm, parent first) added to
every event when ``processes.event_ancestors`` is N > 0 (agent/model/events.py
ENRICHED_FIELDS declares it). Runs on the pollers, before the event is encoded: a few
dict lookups under the table's lock per event."""

from __future__ import annotations

from agent.model.events import ANCESTORS, Event
from agent.processes.table import ProcessTable


class AncestorStage:
    def __init__(self, table: ProcessTable, limit: int) -> None:
        self.table = table
        self.limit = limit

    def __call__(self, event: Event) -> None:
        event[ANCESTORS] = self.table.ancestors_brief(
            event.get("parent_process_id"), event.get("ppid"), self.limit)
