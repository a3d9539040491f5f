"""PUT|POST|DELETE /targets/cgroups and /targets/containers, GET /targets and /state,
against real cgroup v2 directories (the monitors are the fake ones: what reaches them
is checked; the kernel side is tests/monitors/test_common_cgroups.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from agent.api.app import context_of
from agent.kernel.cgroups import CgroupError, Cgroups
from tests.support.api import client_for
from tests.support.cgroups import cgroup_dir

ROOT = "/ebpf-agent-test-api"
CONTAINER = "0123456789abcdef" * 4


@pytest.fixture
def client() -> Iterator[TestClient]:
    try:
        Cgroups()
    except CgroupError as e:
        pytest.skip(f"no cgroup v2 hierarchy: {e}")
    with client_for() as c:
        c.post("/monitors/fake/start", json={})
        yield c


def details(body: dict) -> tuple:
    return body["cgroups"], body["cgroup_ids"], body["containers"], body["container_cgroups"]


def test_cgroup_targets_edit_and_read_back(client: TestClient) -> None:
    with cgroup_dir(f"{ROOT}/a/inner") as inner, cgroup_dir(f"{ROOT}/b") as b:
        a_id, b_id = inner.parent.stat().st_ino, b.stat().st_ino
        r = client.put("/targets/cgroups", json=[f"{ROOT}/a/"])
        assert r.status_code == 200, r.text
        assert details(r.json()) == ([f"{ROOT}/a"], [
            {"path": f"{ROOT}/a", "id": a_id, "exists": True}], [], [])
        r = client.post("/targets/cgroups", json=[f"{ROOT}/b"])
        assert r.json()["cgroups"] == [f"{ROOT}/a", f"{ROOT}/b"]
        # What every running monitor was handed: the paths and their ids.
        fake = context_of(client.app).registry.get("fake")
        seen = fake.targets_seen[-1]  # type: ignore[attr-defined]
        assert seen.cgroup_ids == ((f"{ROOT}/a", a_id), (f"{ROOT}/b", b_id))
        # A path in the URL, with or without its leading "/".
        r = client.delete(f"/targets/cgroups{ROOT}/b")
        assert r.status_code == 200 and r.json()["cgroups"] == [f"{ROOT}/a"]
        assert client.delete(f"/targets/cgroups/{ROOT.lstrip('/')}/b").status_code == 200
        before = client.get("/targets").json()
        bad = [
            ("put", [f"{ROOT}/no-such"], f"{ROOT}/no-such: no such cgroup"),
            ("post", [f"{ROOT}/a", f"{ROOT}/gone"], f"{ROOT}/gone: no such cgroup"),
            ("put", ["relative/path"], "must start with '/'"),
            ("put", [f"{ROOT}/../x"], "'.' and '..' are not allowed"),
            ("put", [5], None),
        ]
        for method, body, message in bad:
            r = client.request(method, "/targets/cgroups", json=body)
            assert r.status_code == 422, (body, r.text)
            if message is not None:
                assert message in r.text, r.text
        assert client.get("/targets").json() == before
        assert fake.targets_seen[-1] == seen.with_values(  # type: ignore[attr-defined]
            "cgroups", frozenset({f"{ROOT}/a"}))
    # The cgroup was removed: still a target, no longer existing.
    assert client.get("/targets").json()["cgroup_ids"] == [
        {"path": f"{ROOT}/a", "id": a_id, "exists": False}]
    # Targeting the path again needs it to exist again.
    assert client.put("/targets/cgroups", json=[f"{ROOT}/a"]).status_code == 422
    assert client.put("/targets/cgroups", json=[]).json()["cgroup_ids"] == []


def test_container_targets_edit_and_read_back(client: TestClient) -> None:
    path = f"{ROOT}/system.slice/docker-{CONTAINER}.scope"
    with cgroup_dir(path) as d, cgroup_dir(f"{ROOT}/system.slice/crio-conmon-{CONTAINER}.scope"):
        r = client.put("/targets/containers", json=[CONTAINER[:12]])
        assert r.status_code == 200, r.text
        assert details(r.json()) == ([], [], [CONTAINER[:12]], [
            {"prefix": CONTAINER[:12], "cgroups": [{"id": d.stat().st_ino, "path": path}]}])
        r = client.post("/targets/containers", json=["f" * 12])
        assert r.json()["container_cgroups"][1] == {"prefix": "f" * 12, "cgroups": []}
        before = client.get("/targets").json()
        for body in (["0123456789a"], ["0123456789AB"], ["0" * 65], ["0123456789ag"], [12]):
            r = client.put("/targets/containers", json=body)
            assert r.status_code == 422, (body, r.text)
        assert "12 to 64 lower-case hex digits" in r.text or "not a string" in r.text
        assert client.get("/targets").json() == before
        assert client.delete("/targets/containers/" + "f" * 12).json()["containers"] == [
            CONTAINER[:12]]
        assert client.delete("/targets/containers/xyz").status_code == 422


def test_state_document_carries_cgroups_and_containers(client: TestClient) -> None:
    with cgroup_dir(f"{ROOT}/s"):
        desired = {"monitors": {"fake": {}},
                   "targets": {"cgroups": [f"{ROOT}/s"], "containers": [CONTAINER]}}
        r = client.put("/state", json=desired)
        assert r.status_code == 200, r.text
        targets = client.get("/state").json()["targets"]
        assert (targets["cgroups"], targets["containers"]) == ([f"{ROOT}/s"], [CONTAINER])
        missing = {"monitors": {"fake": {}}, "targets": {"cgroups": [f"{ROOT}/missing"]}}
        r = client.put("/state", json=missing)
        assert r.status_code == 422 and f"{ROOT}/missing" in r.text
        assert client.get("/state").json()["targets"] == targets
