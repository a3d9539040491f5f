"""The REST API in-process with fake monitors: status codes, validation, auth, host and
origin checks, two apps side by side. Real-kernel tests are in tests/api/test_process.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from agent.api.app import context_of, create_app
from tests.support.api import BASE, client_for, fake_registry, fake_report, settings

TOKEN = "s3cret-token"
WS_URL = "ws://127.0.0.1/events/ws"  # the TestClient defaults to host "testserver"


@pytest.fixture
def client() -> Iterator[TestClient]:
    with client_for() as c:
        yield c


def test_health_and_ready(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["version"]
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_ready_is_503_before_the_lifespan() -> None:
    app = create_app(settings(), fake_registry(), report=fake_report())
    client = TestClient(app, base_url=BASE)  # no `with`: lifespan not started
    assert client.get("/ready").status_code == 503
    assert client.get("/monitors").status_code == 503
    assert client.get("/health").status_code == 200


def test_monitor_list_shape(client: TestClient) -> None:
    monitors = {m["name"]: m for m in client.get("/monitors").json()}
    assert set(monitors) == {"fake", "needy", "plain"}
    assert monitors["fake"] == {"name": "fake", "description": "a fake monitor for tests",
                                "state": "stopped", "options": {"level": 1, "label": "x"}}
    assert monitors["needy"]["state"] == "unsupported"
    assert "time_machine" in monitors["needy"]["reason"]


def test_start_apply_options_and_stop(client: TestClient) -> None:
    r = client.post("/monitors/fake/start", json={"level": 3})
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running" and r.json()["options"]["level"] == 3
    # Starting a running monitor: 200, and the new options apply.
    r = client.post("/monitors/fake/start", json={"level": 5, "label": "y"})
    assert r.status_code == 200 and r.json()["options"] == {"level": 5, "label": "y"}
    # No body: a running monitor keeps its options.
    assert client.post("/monitors/fake/start").json()["options"]["level"] == 5
    assert client.get("/monitors/fake").json()["state"] == "running"
    for _ in range(2):  # idempotent
        r = client.post("/monitors/fake/stop")
        assert r.status_code == 200 and r.json()["state"] == "stopped"


def test_start_without_body_uses_configured_options() -> None:
    with client_for(monitors={"fake": {"options": {"level": 7}}}) as c:
        assert c.post("/monitors/fake/start").json()["options"]["level"] == 7


def test_error_statuses_leave_state_unchanged(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={"level": 2})
    before = client.get("/monitors").json()
    assert client.get("/monitors/nope").status_code == 404
    assert client.post("/monitors/nope/start").status_code == 404
    assert client.post("/monitors/nope/stop").status_code == 404
    assert client.get("/monitors/nope/stats").status_code == 404
    r = client.post("/monitors/fake/start", json={"level": 99})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "level"]
    assert client.post("/monitors/fake/start", json={"bogus": 1}).status_code == 422
    assert client.post("/monitors/fake/start", json=[1, 2]).status_code == 422
    r = client.post("/monitors/needy/start")
    assert r.status_code == 409 and "time_machine" in r.json()["detail"]
    assert client.get("/monitors").json() == before


def test_monitor_value_errors_are_422_and_load_failures_409(client: TestClient) -> None:
    r = client.post("/monitors/fake/start", json={"label": "bad-pattern"})
    assert r.status_code == 422 and "not a valid pattern" in r.json()["detail"][0]["msg"]
    r = client.post("/monitors/fake/start", json={"label": "fails"})
    assert r.status_code == 409 and "attach failed" in r.json()["detail"]
    assert client.get("/monitors/fake").json()["state"] == "failed"


def test_stats_pass_only_accepted_query_params(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={})
    client.post("/monitors/plain/start", json={})
    stats = client.get("/monitors/fake/stats", params={"sort": "name", "limit": 1}).json()
    assert stats["state"] == "running" and (stats["sort"], stats["limit"]) == ("name", 1)
    assert "events_delivered" in stats and "events_seen_kernel" in stats
    assert client.get("/monitors/fake/stats").json()["sort"] == "count"
    # plain's stats() takes nothing: the query is not passed (no TypeError, no 500).
    plain = client.get("/monitors/plain/stats", params={"sort": "x"})
    assert plain.status_code == 200 and plain.json()["plain"] is True
    assert client.get("/monitors/fake/stats", params={"sort": "nope"}).status_code == 422
    assert client.get("/monitors/fake/stats", params={"limit": 0}).status_code == 422


def test_targets_edit_and_validation(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={})
    empty = {"pids": [], "uids": [], "comms": [], "cgroups": [], "containers": [],
             "follow_children": True, "cgroup_ids": [], "container_cgroups": []}
    assert client.get("/targets").json() == empty
    assert client.put("/targets/pids", json=[10, 20]).json()["pids"] == [10, 20]
    assert client.post("/targets/pids", json=[30]).json()["pids"] == [10, 20, 30]
    assert client.delete("/targets/pids/20").json()["pids"] == [10, 30]
    assert client.delete("/targets/pids/20").status_code == 200  # idempotent
    assert client.put("/targets/uids", json=[0, 1000]).json()["uids"] == [0, 1000]
    assert client.post("/targets/comms", json=["bash"]).json()["comms"] == ["bash"]
    assert client.delete("/targets/comms/bash").json()["comms"] == []
    assert client.put("/targets/follow_children", json=False).json()["follow_children"] is False
    state = client.get("/targets").json()
    bad = [
        ("put", "/targets/pids", [-1]), ("put", "/targets/pids", [2**32]),
        ("post", "/targets/uids", ["x"]), ("post", "/targets/pids", [1.5]),
        ("post", "/targets/pids", [True]), ("put", "/targets/comms", [""]),
        ("put", "/targets/comms", ["a" * 16]), ("put", "/targets/comms", [1]),
        ("put", "/targets/follow_children", "yes"), ("put", "/targets/bogus", [1]),
        ("put", "/targets/pids", {"pid": 1}), ("put", "/targets/pids", list(range(10241))),
    ]
    for method, path, body in bad:
        r = client.request(method, path, json=body)
        assert r.status_code == 422, (method, path, body, r.text)
        assert isinstance(r.json()["detail"], list)
    assert client.delete("/targets/pids/abc").status_code == 422
    assert client.delete("/targets/pids/-1").status_code == 422
    assert client.get("/targets").json() == state


@pytest.mark.parametrize("body", ["[NaN]", "[Infinity]", "[-Infinity]", "[1e400]",
                                  '{"level": NaN}'])
def test_non_finite_numbers_are_422_not_500(client: TestClient, body: str) -> None:
    path = "/monitors/fake/start" if body.startswith("{") else "/targets/pids"
    before = client.get("/targets").json()
    r = client.request("PUT" if "targets" in path else "POST", path, content=body,
                       headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["detail"]  # valid JSON: NaN/inf are echoed as text
    assert client.get("/targets").json() == before


def test_comm_escapes_stand_for_bytes_other_lone_surrogates_are_422(
        client: TestClient) -> None:
    """"\\udcXX" is how our JSON writes a byte that is not UTF-8 (README): it is
    accepted as that byte and read back in the same form; other lone surrogates are 422."""
    for body in ('["\\ud800"]', '["a\\udc41"]', '["\\udfff"]'):
        r = client.put("/targets/comms", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
    r = client.put("/targets/comms", content='["ab\\udcff"]',
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["comms"] == ["ab\udcff"]
    assert b'"ab\\udcff"' in client.get("/targets").content
    # 15 bytes (13 + two escaped bytes) fit, 16 do not.
    ok = "x" * 13 + "\udcfe\udcff"
    for comms, status in (([ok], 200), (["x" + ok], 422)):
        r = client.put("/targets/comms", content=json.dumps(comms),
                       headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
    assert client.get("/targets").json()["comms"] == [ok]


def test_targets_reach_running_monitors(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={})
    client.put("/targets/pids", json=[42])
    fake = context_of(client.app).registry.get("fake")
    assert fake.targets_seen[-1].pids == frozenset({42})  # type: ignore[attr-defined]


def test_stats_and_metrics(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={})
    stats = client.get("/stats").json()
    assert {"pid", "uptime_s", "cpu_s", "rss_bytes"} <= set(stats["agent"])
    fake = stats["monitors"]["fake"]
    for key in ("events_seen_kernel", "events_delivered", "events_dropped_kernel",
                "events_dropped_userspace", "events_per_second", "started_at"):
        assert key in fake
    assert stats["streams"]["subscribers"] == []
    text = client.get("/metrics").text
    assert 'ebpf_agent_monitor_running{monitor="fake"} 1.0' in text
    assert 'ebpf_agent_monitor_running{monitor="plain"} 0.0' in text
    assert 'ebpf_agent_stream_events_delivered_total{kind="sse"}' in text
    assert "ebpf_agent_cpu_seconds_total" in text


def test_capabilities(client: TestClient) -> None:
    caps = client.get("/capabilities").json()
    assert caps["kernel"] == "test" and "any_monitor_supported" in caps


def test_token_protects_everything_but_health() -> None:
    with client_for(token=TOKEN) as c:
        assert c.get("/health").status_code == 200
        paths = ["/ready", "/monitors", "/monitors/fake", "/targets", "/stats", "/metrics",
                 "/capabilities", "/monitors/fake/stats", "/events"]
        for path in paths:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                r = c.get(path, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json() == {"detail": "missing or invalid bearer token"}
        assert c.post("/monitors/fake/start", json={"level": 99}).status_code == 401
        assert c.put("/targets/pids", json=[1]).status_code == 401
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/monitors", headers=good).status_code == 200
        with pytest.raises(WebSocketDenialResponse) as denied, c.websocket_connect(WS_URL):
            pass
        assert denied.value.status_code == 401


def test_token_from_file(tmp_path: Any) -> None:
    (tmp_path / "token").write_text("from-file\n")
    (tmp_path / "token").chmod(0o600)
    with client_for(token_file=tmp_path / "token") as c:
        assert c.get("/monitors").status_code == 401
        assert c.get("/monitors", headers={"Authorization": "Bearer from-file"}).status_code == 200


def test_foreign_host_and_origin_are_refused(client: TestClient) -> None:
    assert client.get("/monitors", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/health", headers={"Host": "localhost:8765"}).status_code == 200
    # A page on another origin cannot change state, even without a token configured.
    r = client.post("/monitors/fake/start", json={}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "not allowed" in r.json()["detail"]
    assert client.get("/monitors/fake").json()["state"] == "stopped"
    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect(
            WS_URL, headers={"Origin": "https://evil.example"}):
        pass
    assert denied.value.status_code == 403
    assert "access-control-allow-origin" not in client.get(
        "/monitors", headers={"Origin": "https://evil.example"}).headers


def test_cors_only_for_configured_origins() -> None:
    origin = "https://console.example"
    with client_for(api={"cors_origins": [origin]}) as c:
        r = c.options("/monitors/fake/start", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == origin
        r = c.post("/monitors/fake/start", json={}, headers={"Origin": origin})
        assert r.status_code == 200


def test_two_apps_side_by_side() -> None:
    with client_for() as a, client_for() as b:
        a.post("/monitors/fake/start", json={"level": 4})
        a.put("/targets/pids", json=[7])
        assert b.get("/monitors/fake").json()["state"] == "stopped"
        assert b.get("/targets").json()["pids"] == []
        assert context_of(a.app).hub is not context_of(b.app).hub
        assert context_of(a.app).metrics is not context_of(b.app).metrics
        assert 'monitor_running{monitor="fake"} 1.0' in a.get("/metrics").text
        assert 'monitor_running{monitor="fake"} 0.0' in b.get("/metrics").text


def test_max_subscribers_is_503() -> None:
    from agent.stream.hub import Filters

    with client_for(stream={"max_subscribers": 1}) as c:
        hub = context_of(c.app).hub
        assert hub is not None
        hub.subscribe("sse", Filters())
        r = c.get("/events")
        assert r.status_code == 503 and "max_subscribers" in r.json()["detail"]
        with pytest.raises(WebSocketDenialResponse) as denied, c.websocket_connect(WS_URL):
            pass
        assert denied.value.status_code == 503


def test_shutdown_stops_every_monitor() -> None:
    c = client_for()
    with c:
        c.post("/monitors/fake/start", json={})
        manager = context_of(c.app).manager
    assert manager is not None and manager._closed
    assert manager._running == {}


def test_errors_are_json(client: TestClient) -> None:
    r = client.get("/no/such/path")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    r = client.delete("/monitors")
    assert r.status_code == 405 and "detail" in r.json()


def test_monitor_options_schema(client: TestClient) -> None:
    from tests.support.api import FakeOptions

    r = client.get("/monitors/fake/schema")
    assert r.status_code == 200 and r.json() == FakeOptions.model_json_schema()
    assert r.json()["properties"]["level"]["maximum"] == 10
    assert client.get("/monitors/nope/schema").status_code == 404


def test_stats_query_errors_name_the_query_field(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={})
    r = client.get("/monitors/fake/stats", params={"limit": "x"})
    assert r.status_code == 422
