"""Bad input the hostile test of issue 16 sent: comms holding non-UTF-8 byte escapes in
the state document, option values of the wrong type, a comm holding "/", bodies that
are not UTF-8 or nest too deep, duplicate keys in a state document (in-process, fakes)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import client_for

JSON = {"content-type": "application/json"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with client_for() as c:
        yield c


def put_state(client: TestClient, doc: dict[str, Any], **headers: str) -> Any:
    # json.dumps writes the lone surrogate as "\udcff" (httpx's json= refuses it).
    return client.put("/state", content=json.dumps(doc), headers={**JSON, **headers})


def test_state_with_a_byte_escape_in_a_comm_applies_and_answers_200(
        client: TestClient) -> None:
    comm = "ab\udcff"
    before = client.get("/state").headers["etag"]
    r = put_state(client, {"monitors": {"fake": {}}, "targets": {"comms": [comm]}},
                  **{"If-Match": before})
    assert r.status_code == 200, r.text
    assert r.json()["applied"] is True
    assert r.json()["state"]["targets"]["comms"] == [comm]
    got = client.get("/state")
    assert got.status_code == 200 and got.json()["targets"]["comms"] == [comm]
    assert got.headers["etag"] == r.headers["etag"] != before
    # The ETag works in If-Match, and the same document again changes nothing.
    again = put_state(client, {"monitors": {"fake": {}}, "targets": {"comms": [comm]}},
                      **{"If-Match": got.headers["etag"]})
    assert again.status_code == 200 and again.json()["changes"] == []
    stale = put_state(client, {"monitors": {}}, **{"If-Match": before})
    assert stale.status_code == 412
    assert client.get("/state").json() == got.json()


@pytest.mark.parametrize("path,body,loc", [
    ("/monitors/fake/start", {"level": True}, ["body", "level"]),
    ("/monitors/fake/start", {"level": "5"}, ["body", "level"]),
    ("/monitors/fake/start", {"level": 2.0}, ["body", "level"]),
    ("/monitors/fake/start", {"label": 5}, ["body", "label"]),
    ("/monitors/fake/start", {"bogus": 1}, ["body", "bogus"]),
    ("/state", {"monitors": {"fake": {"level": True}}}, ["body", "monitors", "fake", "level"]),
    ("/state", {"monitors": {"fake": {"level": "5"}}}, ["body", "monitors", "fake", "level"]),
    ("/state", {"monitors": {"plain": {"bogus": 1}}}, ["body", "monitors", "plain", "bogus"]),
])
def test_option_types_are_strict_and_the_422_names_the_monitor(
        client: TestClient, path: str, body: dict[str, Any], loc: list[str]) -> None:
    client.post("/monitors/fake/start", json={"level": 3})
    before = client.get("/state").json()
    method = "PUT" if path == "/state" else "POST"
    r = client.request(method, path, json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == loc
    assert detail["msg"].endswith(f"(monitor {loc[-2] if path == '/state' else 'fake'})")
    assert client.get("/state").json() == before


def test_right_types_are_still_accepted(client: TestClient) -> None:
    r = client.post("/monitors/fake/start", json={"level": 4, "label": "y"})
    assert r.status_code == 200 and r.json()["options"] == {"level": 4, "label": "y"}


@pytest.mark.parametrize("comm", ["<svg/onload=1>", "a/b", "/", "a?b#c", "50% off"])
def test_a_comm_holding_a_slash_is_added_then_removed_alone(client: TestClient,
                                                             comm: str) -> None:
    from urllib.parse import quote

    assert client.put("/targets/comms", json=[comm, "keep"]).status_code == 200
    r = client.delete(f"/targets/comms/{quote(comm, safe='')}")
    assert r.status_code == 200, r.text
    assert r.json()["comms"] == ["keep"]


@pytest.mark.parametrize("value", ["%0A0", "1%0A", "a%2Fb"])
def test_a_pid_path_value_that_is_not_a_number_is_422_not_404(client: TestClient,
                                                              value: str) -> None:
    r = client.delete(f"/targets/pids/{value}")
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("body,msg", [
    (b'{"monitors": {"fake": {"label": "\xff"}}}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deep"),
    (b'{"monitors": {', "JSON decode error"),
])
def test_bodies_that_are_not_json_are_422(client: TestClient, body: bytes, msg: str) -> None:
    for method, path in (("PUT", "/state"), ("POST", "/monitors/fake/start"),
                         ("PUT", "/targets/pids")):
        r = client.request(method, path, content=body, headers=JSON)
        assert r.status_code == 422, (path, r.text)
        assert msg in r.json()["detail"][0]["msg"]
    assert client.get("/state").json()["monitors"] == {}


@pytest.mark.parametrize("body,key", [
    ('{"monitors": {"fake": {}, "fake": {"level": 3}}}', "fake"),
    ('{"monitors": {"fake": {"level": 2, "level": 3}}}', "level"),
    ('{"monitors": {}, "monitors": {"fake": {}}}', "monitors"),
])
def test_duplicate_keys_in_a_state_document_are_422(client: TestClient, body: str,
                                                    key: str) -> None:
    r = client.put("/state", content=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["msg"] == f"key {key!r} appears twice in one object"
    assert client.get("/state").json()["monitors"] == {}
