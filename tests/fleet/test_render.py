"""Readable output of ebpf-agentctl: tables and one line per event."""

from __future__ import annotations

from agent.fleet.events import event_line
from agent.fleet.ops import describe_change
from agent.fleet.render import table
from agent.model.filters import StreamFilters


def test_table_columns_fit_the_widest_cell() -> None:
    assert table(["HOST", "STATE"], [["web1", "up"], ["database-7", None]]).splitlines() == [
        "HOST        STATE", "web1        up", "database-7"]


def test_event_line_and_filters() -> None:
    ev = {"host": "web1", "monitor": "exec", "timestamp": "2026-12-01T21:00:01.123456789Z",
          "pid": 10, "uid": 0, "comm": "echo", "argv": ["/bin/echo", "hi"], "ret": 0}
    assert event_line(ev) == ("21:00:01.123 web1         exec     pid=10 uid=0 echo ret=0 "
                              "/bin/echo hi")
    f = StreamFilters(monitor=["exec"], comm=["echo"])
    assert f.matches(ev) and not f.matches({**ev, "comm": "sh"})
    assert f.params() == [("monitor", "exec"), ("comm", "echo")]


def test_changes_read_as_sentences() -> None:
    assert describe_change({"action": "stop", "monitor": "exec"}) == "stop exec"
    assert describe_change({"action": "options", "monitor": "exec",
                            "changes": {"max_args": {"from": 20, "to": 40}}}) == (
        "change exec options: max_args: 20 -> 40")
    assert describe_change({"action": "targets", "kind": "pids", "add": [1], "remove": [2]}) \
        == "edit targets pids: +1 -2"
    assert describe_change({"action": "targets", "kind": "follow_children", "from": True,
                            "to": False}) == "set targets follow_children: True -> False"


def test_event_line_names_the_container_or_unit() -> None:
    ev = {"host": "web1", "monitor": "exec", "timestamp": "2026-12-01T21:00:01.123456789Z",
          "pid": 10, "uid": 0, "comm": "echo", "argv": ["/bin/echo"], "ret": 0,
          "container_id": "ab12cd34ef56" + "0" * 52, "unit": "docker-x.scope"}
    assert event_line(ev) == ("21:00:01.123 web1         exec     pid=10 uid=0 echo "
                              "[ctr=ab12cd34ef56] ret=0 /bin/echo")
    assert "[unit=nginx.service]" in event_line({**ev, "container_id": None,
                                                 "unit": "nginx.service"})
    assert "[" not in event_line({**ev, "container_id": None, "unit": None})
    f = StreamFilters(container_id=["ab12"], cgroup=["/system.slice"])
    assert f.params() == [("container_id", "ab12"), ("cgroup", "/system.slice")]
    assert f.matches({**ev, "cgroup": "/system.slice/docker-x.scope"})
    assert not f.matches({**ev, "cgroup": "/system.slicex/docker-x.scope"})
