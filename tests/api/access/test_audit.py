"""The audit trail under a flood of refused requests (issue 16, item 3): refusals cannot
evict accepted state changes from GET /audit, recorded paths are cut, the audit file is
rotated at logging.audit_file_max_bytes and what was not written is counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.api.access import audit as audit_module
from agent.api.access.audit import PATH_CHARS, AuditLog
from agent.api.app import context_of
from tests.support.api import client_for

ADMIN, VIEWER = "audit-admin-0123", "audit-viewer-0123"
TOKENS = [{"name": "admin", "scope": "control", "token": ADMIN},
          {"name": "viewer", "scope": "read", "token": VIEWER}]
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def metric(c: TestClient, line_start: str) -> float:
    text = c.get("/metrics", headers=AUTH).text
    return float(next(ln for ln in text.splitlines() if ln.startswith(line_start)).split()[-1])


def test_refused_requests_do_not_evict_accepted_changes() -> None:
    with client_for(tokens=TOKENS, api={"audit_entries": 10,
                                        "audit_refused_entries": 10}) as c:
        assert c.put("/targets/pids", json=[42], headers=AUTH).status_code == 200
        for i in range(30):  # unauthenticated, wrong token, and a read token's 403
            assert c.post(f"/monitors/fake/start?n={i}").status_code == 401
            assert c.post("/monitors/fake/stop",
                          headers={"Authorization": "Bearer nope"}).status_code == 401
            assert c.post("/targets/pids", json=[i],
                          headers={"Authorization": f"Bearer {VIEWER}"}).status_code == 403
        entries = c.get("/audit", headers=AUTH).json()["entries"]
        accepted = [(e["token"], e["method"], e["path"], e["body"], e["status"])
                    for e in entries if e["status"] == 200]
        assert accepted == [("admin", "PUT", "/targets/pids", "[42]", 200)]
        refused = [e for e in entries if e["status"] in (401, 403)]
        assert len(refused) == 10  # their own ring: the newest 10
        assert [e["id"] for e in entries] == sorted(e["id"] for e in entries)
        assert refused[-1]["token"] == "viewer" and refused[-1]["body"] is None


def test_recorded_paths_are_cut() -> None:
    with client_for(tokens=TOKENS) as c:
        long_path = "/monitors/" + "x" * 30_000 + "/start"
        assert c.post(long_path).status_code == 401
        entry = c.get("/audit", headers=AUTH).json()["entries"][-1]
        assert len(entry["path"]) == PATH_CHARS
        assert entry["path"] == long_path[: PATH_CHARS - 3] + "..."


def test_audit_file_is_rotated_and_refusals_are_rate_limited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_module, "REFUSED_LINES_PER_MINUTE", 5)
    path = tmp_path / "audit.jsonl"
    with client_for(tokens=TOKENS, logging={"audit_file": str(path),
                                            "audit_file_max_bytes": 64 * 1024}) as c:
        for _ in range(12):  # 7 over the allowance: counted, not written
            assert c.post("/monitors/fake/stop").status_code == 401
        for _ in range(500):  # ~350-byte lines: about 190 per 64 KiB
            assert c.put("/targets/pids", json=list(range(40)),
                         headers=AUTH).status_code == 200
        assert metric(c, 'ebpf_agent_audit_not_written_total{reason="rate_limited"}') == 7
        assert metric(c, 'ebpf_agent_audit_not_written_total{reason="write_error"}') == 0
        rotations = metric(c, "ebpf_agent_audit_rotations_total")
        assert rotations >= 1
        assert context_of(c.app).audit.rotations == rotations  # type: ignore[arg-type]
    old = path.with_name("audit.jsonl.1")
    assert path.stat().st_size <= 64 * 1024 and old.stat().st_size <= 64 * 1024
    lines = [json.loads(ln) for f in (old, path) for ln in f.read_text().splitlines()]
    assert all(ln["status"] in (200, 401) for ln in lines)
    # No accepted change lost between the two files: their ids run on without a gap.
    ids = [ln["id"] for ln in lines if ln["method"] == "PUT"]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert lines[-1]["method"] == "PUT"


@pytest.mark.parametrize(("token", "status", "refused"), [
    (None, 200, True),  # no credentials (only a public route answers 200 without)
    (None, 401, True),
    ("viewer", 403, True),
    ("admin", 403, True),
    ("admin", 200, False),
    ("admin", 422, False),
    ("admin", 409, False),
])
def test_which_entries_count_as_refused(token: str | None, status: int,
                                        refused: bool) -> None:
    log = AuditLog(capacity=1, refused_capacity=1)
    log.record(token=token, client="c", method="POST", path="/p", body=None, status=status)
    log.record(token="admin", client="c", method="POST", path="/q", body=None, status=200)
    # An accepted entry evicts the previous accepted one only.
    assert [e["path"] for e in log.entries()] == (["/p", "/q"] if refused else ["/q"])
