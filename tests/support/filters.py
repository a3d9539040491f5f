"""Stream filters on real events of every monitor.

One workload, run as user nobody under a comm of its own, gives every monitor an event
of a process the test started: exec sees its execve, syscall a slow nanosleep, func a
call of flt_target(), net a TCP connect over loopback. Its events go through a real
EventHub; each filter (monitor, pid, uid, comm) must return exactly the hub's events
with that value, the workload's among them, and a value nobody has must return nothing
of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.model.events import COMMON_FIELDS, Event
from agent.monitors.registry import default_registry
from agent.stream.hub import EventHub, Filters
from tests.support.kernel import compile_c, require_kernel
from tests.support.monitors import loaded_monitor

FILTER_FIELDS = ("monitor", "pid", "uid", "comm")
NOBODY = 65534
WORKLOAD_COMM = "flt_workload"
SLEEP_MS = 80
# Values no event carries: a filter on them must return nothing of ours.
ABSENT = {"monitor": "no-such-monitor", "pid": 0, "uid": 3_999_999, "comm": "no-such-comm"}

WORKLOAD_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* noinline: a uprobe target with a symbol of its own. */
__attribute__((noinline)) int flt_target(int x)
{
    __asm__ volatile("");
    return x + 1;
}

/* One TCP connection over loopback to a listener of its own, never accepted. */
static int tcp_self_connect(void)
{
    struct sockaddr_in a = {0};
    socklen_t len = sizeof(a);
    int l = socket(AF_INET, SOCK_STREAM, 0), c = socket(AF_INET, SOCK_STREAM, 0);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int r = bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 1)
        || getsockname(l, (struct sockaddr *)&a, &len)
        || connect(c, (struct sockaddr *)&a, sizeof(a));
    close(c);
    close(l);
    return r;
}

int main(void)
{
    struct timespec ts = {0, SLEEP_MS * 1000 * 1000};
    int r = flt_target(1);
    if (tcp_self_connect())
        return 2;
    nanosleep(&ts, 0);   /* a slow syscall for the syscall monitor */
    return r == 2 ? 0 : 1;
}
""".replace("SLEEP_MS", str(SLEEP_MS))


@contextlib.contextmanager
def workload_binary() -> Iterator[Path]:
    """The workload compiled into a fresh directory user nobody can reach (pytest's
    tmp_path is under a 0700 directory of root)."""
    d = Path(tempfile.mkdtemp(prefix="ebpf-agent-filters-"))
    try:
        d.chmod(0o755)
        yield compile_c(d, WORKLOAD_COMM, WORKLOAD_C)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Recorded:
    """Events a monitor published into a hub while the workload ran once."""

    monitor: str
    hub: EventHub
    pid: int  # the workload's
    own: Event  # the workload's event (matched by the monitor's predicate)


def stream(hub: EventHub, filters: Filters) -> list[Event]:
    """Every event in the hub that a new subscriber with these filters reads."""
    sub = hub.subscribe("sse", filters, last_event_id=0)
    try:
        out: list[Event] = []
        while True:
            batch = sub.read(4096)
            assert not batch.missed, "the hub ring overflowed during the test"
            out += [json.loads(ev.data) for ev in batch.events]
            if not hub.has_after(sub.position):
                return out
    finally:
        hub.unsubscribe(sub)


def record(name: str, binary: Path, own: Callable[[Event], bool], timeout: float = 15,
           **options: Any) -> Recorded:
    """Load monitor ``name`` publishing into a hub, run the workload as nobody, and wait
    for its event (``own``). No kernel-side targets: the filters are the hub's."""
    hub = EventHub(capacity=1 << 18)
    with loaded_monitor(name, hub, **options) as m:
        proc = subprocess.Popen(
            ["/usr/bin/setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             str(binary)],
        )
        assert proc.wait(30) == 0
        deadline = time.monotonic() + timeout
        mine: list[Event] = []
        while time.monotonic() < deadline and not mine:
            m.poll(50)
            mine = [e for e in stream(hub, Filters()) if e.get("pid") == proc.pid and own(e)]
        for _ in range(3):  # whatever else the kernel buffered meanwhile
            m.poll(50)
    assert len(mine) == 1, f"{name}: expected one event of the workload, got {mine}"
    return Recorded(name, hub, proc.pid, mine[0])


def check_own_event(rec: Recorded) -> None:
    """The common fields of the workload's event, exactly."""
    e = rec.own
    assert list(e)[: len(COMMON_FIELDS)] == list(COMMON_FIELDS)
    assert e["monitor"] == rec.monitor
    assert (e["uid"], e["gid"], e["comm"]) == (NOBODY, NOBODY, WORKLOAD_COMM)
    assert e["pid"] == e["tid"] == rec.pid  # setpriv execs the workload in place
    assert e["ppid"] == os.getpid()
    assert e["ts_ns"] > 0 and e["timestamp"].endswith("Z")
    # The event holds exactly what its monitor documents (OpenAPI <Name>Event).
    default_registry.discover()
    default_registry.get(rec.monitor).EventModel.model_validate(e)


def check_filter(rec: Recorded, field: str) -> None:
    """Filtering on ``field`` returns exactly the events with that value."""
    everything = stream(rec.hub, Filters())
    assert rec.own in everything
    for value, has_own in ((rec.own[field], True), (ABSENT[field], False)):
        got = stream(rec.hub, Filters(**{f"{field}s": frozenset({value})}))
        assert got == [e for e in everything if e.get(field) == value]
        assert (rec.own in got) is has_own


def filter_tests(monitor: str, own: Callable[[Event, Path], bool],
                 options: Callable[[Path], dict[str, Any]] | None = None) -> tuple[Any, ...]:
    """The fixture and tests a monitor's test module takes as its own:

        filter_events, test_common_fields_of_a_known_process, test_stream_filter = (
            filter_tests("exec", lambda e, binary: e["filename"] == str(binary)))

    ``own`` picks the workload's event; ``options`` gives the monitor's options for the
    workload binary (e.g. func's pattern on it)."""

    @pytest.fixture(scope="module")
    def filter_events(filter_workload: Path) -> Recorded:
        require_kernel()
        return record(monitor, filter_workload, lambda e: own(e, filter_workload),
                      **(options(filter_workload) if options else {}))

    @pytest.mark.usefixtures("kernel")
    def test_common_fields_of_a_known_process(filter_events: Recorded) -> None:
        check_own_event(filter_events)

    @pytest.mark.usefixtures("kernel")
    @pytest.mark.parametrize("field", FILTER_FIELDS)
    def test_stream_filter(filter_events: Recorded, field: str) -> None:
        check_filter(filter_events, field)

    return filter_events, test_common_fields_of_a_known_process, test_stream_filter
