"""One StreamFilters model (agent/model/filters.py): a limit changed in LIMITS is the limit
of every entry point: the SSE and WebSocket streams, tickets (and the gate redeeming
them), ebpf-agentctl events and the OpenAPI document."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from agent.api.app import create_app
from agent.fleet.events import filters_of
from agent.model import filters as filters_module
from agent.model.filters import FilterLimits, StreamFilters
from tests.support.api import fake_registry, fake_report, settings, thread_server

TOKEN = "filters-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server() -> Iterator[str]:
    s = settings(token=TOKEN)
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv:
        yield srv.url


def sse_status(url: str, params: list[tuple[str, str]]) -> int:
    with httpx.Client(timeout=10) as c, \
            c.stream("GET", url + "/events", params=params, headers=AUTH) as r:
        return r.status_code


def ws_status(url: str, query: str) -> int:
    try:
        with connect(url.replace("http", "ws") + "/events/ws?" + query,
                     additional_headers=AUTH, open_timeout=10):
            return 101
    except InvalidStatus as e:
        return e.response.status_code


def ticket_status(url: str, body: dict[str, Any]) -> tuple[int, str | None]:
    r = httpx.post(url + "/events/tickets", json=body, headers=AUTH, timeout=10)
    return r.status_code, r.json().get("ticket") if r.status_code == 200 else None


def agentctl_accepts(**kw: Any) -> bool:
    try:
        filters_of(kw.pop("monitor", []), kw.pop("pid", []), kw.pop("uid", []),
                   kw.pop("comm", []), **kw)
    except ValueError:
        return False
    return True


# (the limit changed, a value now too long / too many, one that fits)
CASES = [
    ("comm_bytes", 4, {"comm": ["abcde"]}, {"comm": ["abcd"]}),
    ("comm_bytes", 20, {"comm": ["c" * 21]}, {"comm": ["c" * 20]}),  # raised above 15
    ("monitor_chars", 3, {"monitor": ["exec"]}, {"monitor": ["exe"]}),
    ("pids", 2, {"pid": [1, 2, 3]}, {"pid": [1, 2]}),
    ("container_ids", 1, {"container_id": ["ab", "cd"]}, {"container_id": ["ab"]}),
    ("cgroup_chars", 8, {"cgroup": ["/abcdefgh"]}, {"cgroup": ["/abcdefg"]}),
    ("unit_chars", 8, {"unit": ["a.service"]}, {"unit": ["a.scope"]}),
    ("process_ids", 1, {"process_id": ["0123456789abcdef-1-2", "0123456789abcdef-1-3"]},
     {"process_id": ["0123456789abcdef-1-2"]}),
]


@pytest.mark.parametrize(("limit", "value", "refused", "accepted"), CASES)
def test_one_limit_is_enforced_by_every_entry_point(
        server: str, monkeypatch: pytest.MonkeyPatch, limit: str, value: int,
        refused: dict[str, list[Any]], accepted: dict[str, list[Any]]) -> None:
    monkeypatch.setattr(filters_module, "LIMITS", FilterLimits(**{limit: value}))

    def params(f: dict[str, list[Any]]) -> list[tuple[str, str]]:
        return [(k, str(v)) for k, vs in f.items() for v in vs]

    def query(f: dict[str, list[Any]]) -> str:
        return str(httpx.QueryParams(params(f)))

    # Refused everywhere: a 422 for the SSE stream and the ticket, the WebSocket handshake
    # refused, ebpf-agentctl refuses before asking any host.
    assert sse_status(server, params(refused)) == 422
    assert ws_status(server, query(refused)) == 403
    assert ticket_status(server, refused)[0] == 422
    assert not agentctl_accepts(**refused)
    # Accepted everywhere, including a ticket with the filter redeemed by the gate.
    assert sse_status(server, params(accepted)) == 200
    assert ws_status(server, query(accepted)) == 101
    status, ticket = ticket_status(server, accepted)
    assert status == 200 and ticket is not None
    assert sse_status(server, [("ticket", ticket), *params(accepted)]) == 200
    assert agentctl_accepts(**accepted)


def test_the_openapi_document_shows_the_limits_in_force(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filters_module, "LIMITS", FilterLimits(comm_bytes=4, pids=2))
    app = create_app(settings(token=TOKEN), fake_registry(), report=fake_report())
    schema = app.openapi()["components"]["schemas"]["StreamFilters"]["properties"]
    assert schema["comm"]["items"]["maxLength"] == 4
    assert schema["pid"]["maxItems"] == 2


@pytest.mark.parametrize(("filters", "error"), [
    ({"comm": [""]}, "empty process name"),
    ({"comm": ["a" * 16]}, "16 bytes; a comm holds at most 15"),
    ({"comm": ["\ud800"]}, "lone surrogate"),
    ({"pid": [2**32]}, "outside 0..4294967295"),
    ({"uid": [-1]}, "outside 0..4294967295"),
    ({"monitor": ["m"] * 65}, "at most 64 monitor values"),
    ({"pid": ["7"]}, "valid integer"),
    ({"other": [1]}, "Extra inputs"),
    ({"container_id": ["ABCDEF"]}, "not a container id prefix"),
    ({"container_id": [""]}, "not a container id prefix"),
    ({"container_id": ["a" * 65]}, "not a container id prefix"),
    ({"container_id": ["docker-abc"]}, "not a container id prefix"),
    ({"cgroup": ["system.slice"]}, "starts with '/'"),
    ({"cgroup": ["/a//b"]}, "empty, '.' or '..' component"),
    ({"cgroup": ["/a/b/"]}, "empty, '.' or '..' component"),
    ({"cgroup": ["/a/../b"]}, "empty, '.' or '..' component"),
    ({"cgroup": ["/" + "a" * 4096]}, "longer than 4096"),
    ({"unit": [""]}, "not a unit name"),
    ({"unit": ["a/b.service"]}, "not a unit name"),
    ({"process_id": ["4158"]}, "not a process id"),
    ({"process_id": ["0123456789ABCDEF-1-2"]}, "not a process id"),
    ({"cgroup": ["/"] * 257}, "at most 256 cgroup values"),
])
def test_bad_filters_name_what_is_wrong(filters: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        StreamFilters(**filters)


def test_a_comm_of_15_bytes_with_a_byte_escape_is_a_valid_filter() -> None:
    comm = "\udcff" + "x" * 14  # byte 0xff, then 14 ASCII: 15 bytes
    assert StreamFilters(comm=[comm]).comm == [comm]
    assert StreamFilters(comm=["echo"]).matches({"comm": "echo", "pid": 3})
    assert not StreamFilters(comm=["echo"], pid=[4]).matches({"comm": "echo", "pid": 3})


@pytest.mark.parametrize(("query", "loc"), [
    ([("container_id", "XYZ")], ["query", "container_id"]),
    ([("cgroup", "relative/path")], ["query", "cgroup"]),
    ([("unit", "")], ["query", "unit"]),
    ([("process_id", "1-2-3")], ["query", "process_id"]),
])
def test_a_bad_workload_filter_is_a_422_naming_it(server: str, query: list[tuple[str, str]],
                                                   loc: list[str]) -> None:
    r = httpx.get(server + "/events", params=query, headers=AUTH, timeout=10)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == loc
    r = httpx.post(server + "/events/tickets", json={query[0][0]: [query[0][1]]},
                   headers=AUTH, timeout=10)
    assert r.status_code == 422


def test_a_ticket_with_workload_filters_opens_only_that_stream(server: str) -> None:
    body = {"container_id": ["4f3c"], "cgroup": ["/system.slice"], "unit": ["x.service"]}
    status, ticket = ticket_status(server, body)
    assert status == 200 and ticket is not None
    # The same filters in the URL (or none) redeem it; others are refused.

    def redeem(params: list[tuple[str, str]]) -> int:
        with httpx.Client(timeout=10) as c, c.stream("GET", server + "/events",
                                                     params=params) as r:
            return r.status_code

    assert redeem([("ticket", ticket), ("container_id", "ffff")]) == 401
    status, ticket = ticket_status(server, body)
    assert redeem([("ticket", str(ticket)), ("container_id", "4f3c")]) == 200


def test_agentctl_names_the_option_of_a_bad_workload_filter() -> None:
    with pytest.raises(ValueError, match="^--container: "):
        filters_of([], [], [], [], container_id=["XYZ"])
    with pytest.raises(ValueError, match="^--process-id: "):
        filters_of([], [], [], [], process_id=["1"])
    with pytest.raises(ValueError, match="^--cgroup: "):
        filters_of([], [], [], [], cgroup=["a"])
