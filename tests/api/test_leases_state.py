"""Leases (a monitor stops by itself unless renewed) and GET/PUT /state (ETag, If-Match,
all or nothing), in-process with fake monitors."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.api.app import create_app
from tests.support.api import fake_registry, fake_report, settings

BASE = "http://127.0.0.1"


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(settings(), fake_registry(), report=fake_report())
    with TestClient(app, base_url=BASE) as c:
        yield c


def monitor(client: TestClient, name: str) -> dict[str, Any]:
    r = client.get(f"/monitors/{name}")
    assert r.status_code == 200
    return dict(r.json())


def wait_state(client: TestClient, name: str, state: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = monitor(client, name)
        if info["state"] == state:
            return info
        time.sleep(0.05)
    raise AssertionError(f"{name} not {state} in {timeout}s: {monitor(client, name)}")


def test_lease_shows_and_expiry_stops_the_monitor(client: TestClient,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "agent.core.leases")
    r = client.post("/monitors/fake/start", params={"lease_s": 1}, json={"level": 2})
    assert r.status_code == 200
    lease = r.json()["lease"]
    assert lease["lease_s"] == 1 and 0 < lease["remaining_s"] <= 1
    assert lease["expires_at"].endswith("Z")
    listed = {m["name"]: m for m in client.get("/monitors").json()}
    assert listed["fake"]["lease"]["lease_s"] == 1
    assert "lease" not in listed["plain"]

    info = wait_state(client, "fake", "stopped")
    assert info["reason"] == f"lease expired at {lease['expires_at']}"
    assert "lease" not in info
    assert any("lease of monitor fake expired" in r.getMessage() for r in caplog.records)
    metrics = client.get("/metrics").text
    assert 'ebpf_agent_lease_expired_total{monitor="fake"} 1.0' in metrics
    assert 'ebpf_agent_lease_expired_total{monitor="plain"} 0.0' in metrics
    expired = [e for e in client.get("/audit").json()["entries"]
               if e["method"] == "LEASE-EXPIRED"]
    assert [(e["path"], e["client"], e["token"], e["body"]) for e in expired] == [
        ("/monitors/fake/lease", "agent", None,
         f"lease_s=1 expired_at={lease['expires_at']}")]

    # A new start clears the note and, without lease_s, runs without a lease.
    info = client.post("/monitors/fake/start").json()
    assert info["state"] == "running" and "lease" not in info and "reason" not in info


def test_renewal_keeps_it_running(client: TestClient) -> None:
    client.post("/monitors/fake/start", params={"lease_s": 2})
    for _ in range(12):  # 3 s in all: past the first deadline
        time.sleep(0.25)
        r = client.post("/monitors/fake/lease", json={"lease_s": 2})
        assert r.status_code == 200 and r.json()["state"] == "running"
    assert monitor(client, "fake")["state"] == "running"
    # null removes the lease: it runs until stopped, past the last deadline.
    r = client.post("/monitors/fake/lease", json={"lease_s": None})
    assert r.status_code == 200 and "lease" not in r.json()
    time.sleep(2.5)
    assert monitor(client, "fake")["state"] == "running"
    assert client.get("/metrics").text.count('ebpf_agent_lease_expired_total{monitor="fake"} 0.0')


def test_options_reload_keeps_the_lease_and_stop_drops_it(client: TestClient) -> None:
    client.post("/monitors/fake/start", params={"lease_s": 600})
    info = client.post("/monitors/fake/start", json={"level": 7}).json()
    assert info["options"]["level"] == 7 and info["lease"]["lease_s"] == 600
    client.post("/monitors/fake/stop")
    assert "lease" not in client.post("/monitors/fake/start").json()


def test_state_changes_keep_leases_of_monitors_that_stay(client: TestClient) -> None:
    client.post("/monitors/fake/start", params={"lease_s": 600})
    client.post("/monitors/plain/start", params={"lease_s": 600})
    client.post("/monitors/plain/stop")
    client.post("/monitors/plain/start")  # a new run, without a lease
    r = client.put("/state", json={"monitors": {"fake": {"level": 8}, "plain": {"level": 2}}})
    assert r.status_code == 200
    assert monitor(client, "fake")["lease"]["lease_s"] == 600  # reloaded, still leased
    assert "lease" not in monitor(client, "plain")


def test_lease_errors(client: TestClient) -> None:
    assert client.post("/monitors/fake/lease", json={"lease_s": 5}).status_code == 409
    assert client.post("/monitors/nope/lease", json={"lease_s": 5}).status_code == 404
    client.post("/monitors/fake/start")
    for bad in ({"lease_s": 0}, {"lease_s": "x"}, {"lease_s": 10**9}, {}, {"lease_s": 5, "x": 1}):
        assert client.post("/monitors/fake/lease", json=bad).status_code == 422, bad
    assert client.post("/monitors/fake/start", params={"lease_s": 0}).status_code == 422
    assert "lease" not in monitor(client, "fake")


def test_state_etag_dry_run_apply_and_stale_if_match(client: TestClient) -> None:
    r = client.get("/state")
    assert r.status_code == 200
    assert r.json() == {"monitors": {}, "targets": {"pids": [], "uids": [], "comms": [],
                                                    "cgroups": [], "containers": [],
                                                    "follow_children": True}}
    etag = r.headers["etag"]
    desired = {"monitors": {"fake": {"level": 3}, "plain": None},
               "targets": {"pids": [10, 11], "comms": ["bash"]}}

    dry = client.put("/state", json=desired, params={"dry_run": True}, headers={"If-Match": etag})
    assert dry.status_code == 200 and dry.json()["applied"] is False
    assert dry.json()["changes"] == [
        {"action": "start", "monitor": "fake", "options": {"level": 3, "label": "x"}},
        {"action": "start", "monitor": "plain", "options": {"level": 1, "label": "x"}},
        {"action": "targets", "kind": "pids", "add": [10, 11], "remove": []},
        {"action": "targets", "kind": "comms", "add": ["bash"], "remove": []},
    ]
    assert client.get("/state").headers["etag"] == etag  # nothing changed

    r = client.put("/state", json=desired, headers={"If-Match": etag})
    assert r.status_code == 200 and r.json()["applied"] is True
    new_etag = r.headers["etag"]
    assert new_etag != etag
    state = client.get("/state")
    assert state.headers["etag"] == new_etag
    assert state.json() == {"monitors": {"fake": {"level": 3, "label": "x"},
                                         "plain": {"level": 1, "label": "x"}},
                            "targets": {"pids": [10, 11], "uids": [], "comms": ["bash"],
                                        "cgroups": [], "containers": [],
                                        "follow_children": True}}
    assert client.get("/targets").json()["pids"] == [10, 11]

    # The same document again: nothing to do. The old ETag: 412 with the current one.
    again = client.put("/state", json=desired, headers={"If-Match": new_etag})
    assert again.json()["changes"] == [] and again.json()["applied"] is False
    stale = client.put("/state", json={"monitors": {}}, headers={"If-Match": etag})
    assert stale.status_code == 412 and stale.headers["etag"] == new_etag
    assert client.get("/state").json()["monitors"].keys() == {"fake", "plain"}

    # Unconditional: stop everything, targets left alone.
    r = client.put("/state", json={"monitors": {}})
    assert [c["action"] for c in r.json()["changes"]] == ["stop", "stop"]
    assert monitor(client, "fake")["state"] == "stopped"
    assert client.get("/targets").json()["comms"] == ["bash"]


def test_a_failed_start_rolls_everything_back(client: TestClient) -> None:
    client.put("/state", json={"monitors": {"fake": {"level": 2}, "plain": {}},
                               "targets": {"uids": [1000]}})
    before = client.get("/state")
    r = client.put("/state", json={"monitors": {"fake": {"level": 9},
                                                "plain": {"label": "fails"}},
                                   "targets": {"uids": [0]}})
    assert r.status_code == 409
    assert r.json()["detail"]["monitor"] == "plain"
    assert r.json()["detail"]["rolled_back"] is True
    assert "fake: attach failed" in r.json()["detail"]["message"]
    after = client.get("/state")
    assert after.json() == before.json() and after.headers["etag"] == before.headers["etag"]
    assert monitor(client, "plain")["state"] == "running"


@pytest.mark.parametrize("body,status", [
    ({"monitors": {"nope": {}}}, 404),
    ({"monitors": {"fake": {"level": 99}}}, 422),
    ({"monitors": {"fake": {"bogus": 1}}}, 422),
    ({"monitors": {}, "targets": {"pids": [-1]}}, 422),
    ({"monitors": {}, "targets": {"comms": ["x" * 16]}}, 422),
    ({"monitors": {}, "targets": {"colour": []}}, 422),
    ({"monitors": [], "targets": {}}, 422),
    ({"targets": {}}, 422),
    ({"monitors": {}, "extra": 1}, 422),
])
def test_invalid_documents_change_nothing(client: TestClient, body: Any, status: int) -> None:
    client.put("/state", json={"monitors": {"fake": {}}, "targets": {"pids": [5]}})
    before = client.get("/state")
    r = client.put("/state", json=body)
    assert r.status_code == status, r.text
    assert client.get("/state").json() == before.json()
