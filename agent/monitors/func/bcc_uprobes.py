"""BCC's perf-event uprobes (the attach path before uprobe_multi links): cleaning up
after a refused attach. This needs the event name BCC's Python side gives the probe, so
it calls into BCC's internals; it lives here, beside the one monitor using it, and not
in agent/kernel/, which keeps to BCC's public API."""

from __future__ import annotations

import logging
import os
from typing import Any

from agent.kernel.symbols import file_offset
from agent.kernel.tracefs import find_tracefs, has_uprobe_event, remove_uprobe_event

log = logging.getLogger(__name__)


def remove_leaked_uprobe_event(bpf: Any, path: str, vaddr: int, retprobe: bool,
                               pid: int = -1) -> None:
    """libbcc falls back to tracefs uprobe_events when the perf uprobe PMU refuses a
    probe, and when perf_event_open then fails too it leaves the event it created behind
    ("<event>_bcc_<pid>"). Remove exactly that one: other monitors of this process may be
    creating their own events at the same moment. The name is BCC's
    ``_get_uprobe_evname`` (BCC 0.26 has no public equivalent), so it stays equal to
    what the installed BCC created."""
    tracefs = find_tracefs()
    if tracefs is None:
        return
    try:
        offset = file_offset(path, vaddr)
        prefix = b"r" if retprobe else b"p"
        name = bpf._get_uprobe_evname(prefix, path.encode(), offset, pid).decode()
        leaked = f"uprobes/{name}_bcc_{os.getpid()}"
        if has_uprobe_event(tracefs, leaked):
            remove_uprobe_event(tracefs, leaked)
    except Exception:
        log.exception("cannot remove the uprobe event left by a failed attach")
