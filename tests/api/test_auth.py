"""Scoped tokens, browser sessions, stream tickets, the audit log, the CSRF rule and the
body cap, in-process with fake monitors (the real server is in test_hardening.py)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from agent.api.access.logins import LoginLimiter
from agent.api.access.redact import RedactSecrets
from agent.api.app import context_of, create_app
from tests.support.api import (
    BASE,
    fake_registry,
    fake_report,
    read_sse,
    read_ws,
    settings,
    thread_server,
)
from tests.support.api import client_for as support_client_for

ADMIN, VIEWER, HASHED = "admin-secret-0123", "viewer-secret-0123", "hashed-secret-0123"
TOKENS = [
    {"name": "admin", "scope": "control", "token": ADMIN},
    {"name": "viewer", "scope": "read", "token": VIEWER},
    {"name": "ops", "scope": "control", "sha256": hashlib.sha256(HASHED.encode()).hexdigest()},
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client_for(**overrides: Any) -> TestClient:
    return support_client_for(**{"tokens": TOKENS, **overrides})


@pytest.fixture
def client() -> Iterator[TestClient]:
    with client_for() as c:
        yield c


def metric(client: TestClient, line_start: str) -> float:
    text = client.get("/metrics", headers=bearer(ADMIN)).text
    return float(next(ln for ln in text.splitlines() if ln.startswith(line_start)).split()[-1])


# -- scoped tokens ------------------------------------------------------------------------
def test_read_token_reads_but_cannot_change_state(client: TestClient) -> None:
    assert client.get("/monitors", headers=bearer(VIEWER)).status_code == 200
    assert client.get("/targets", headers=bearer(VIEWER)).status_code == 200
    r = client.post("/monitors/fake/start", json={}, headers=bearer(VIEWER))
    assert r.status_code == 403
    assert r.json() == {"detail": "token 'viewer' has scope read: "
                                  "POST /monitors/fake/start needs scope control"}
    assert client.put("/targets/pids", json=[1], headers=bearer(VIEWER)).status_code == 403
    assert client.get("/audit", headers=bearer(VIEWER)).status_code == 403
    # Nothing changed.
    assert client.get("/monitors/fake", headers=bearer(ADMIN)).json()["state"] == "stopped"
    assert client.get("/targets", headers=bearer(ADMIN)).json()["pids"] == []


def test_control_tokens_from_config_hash_and_legacy_token(tmp_path: Path) -> None:
    assert client_for().__enter__().post(
        "/monitors/fake/start", json={}, headers=bearer(HASHED)).status_code == 200
    (tmp_path / "t").write_text("from-a-file\n")
    (tmp_path / "t").chmod(0o600)  # like the single token_file: not readable by others
    with client_for(token="legacy-secret", tokens=[
            {"name": "filed", "scope": "read", "token_file": str(tmp_path / "t")}]) as c:
        who = c.get("/auth/session", headers=bearer("legacy-secret")).json()
        assert who == {"name": "default", "scope": "control", "via": "bearer", "auth": "token"}
        who = c.get("/auth/session", headers=bearer("from-a-file")).json()
        assert (who["name"], who["scope"]) == ("filed", "read")
        assert c.get("/monitors", headers=bearer(HASHED)).status_code == 401


def test_scoped_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    from agent.config import ConfigError

    (tmp_path / "t").write_text("secret\n")
    (tmp_path / "t").chmod(0o644)
    with pytest.raises(ConfigError, match="tokens.filed.token_file .*readable by group"):
        client_for(tokens=[{"name": "filed", "scope": "read",
                            "token_file": str(tmp_path / "t")}])


def test_token_config_needs_exactly_one_secret() -> None:
    from agent.config import ConfigError, load_settings

    for bad in ({"name": "x", "scope": "read"},
                {"name": "x", "scope": "read", "token": "a", "sha256": "0" * 64},
                {"name": "x", "scope": "admin", "token": "a"},
                {"name": "x", "scope": "read", "sha256": "zz"}):
        with pytest.raises(ConfigError, match="tokens.0"):
            load_settings(None, {"tokens": [bad]})


def test_auth_on_without_any_token_refuses_everything() -> None:
    app = create_app(settings(api={"auth": "token"}), fake_registry(), report=fake_report())
    with TestClient(app, base_url=BASE) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/monitors").status_code == 401
        assert c.post("/auth/session", json={"token": ""}).status_code == 422
        assert c.post("/auth/session", json={"token": "x"}).status_code == 401


def test_auth_none_is_open() -> None:
    with TestClient(create_app(settings(), fake_registry(), report=fake_report()),
                    base_url=BASE) as c:
        assert c.get("/auth/session").json() == {
            "name": "anonymous", "scope": "control", "via": "open", "auth": "none"}
        assert c.post("/monitors/fake/start", json={}).status_code == 200


def test_docs_need_the_token_or_are_off() -> None:
    with client_for() as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=bearer(VIEWER)).status_code == 200, path
    with client_for(api={"docs": False}) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path, headers=bearer(ADMIN)).status_code == 404, path


# -- sessions -----------------------------------------------------------------------------
def login(c: TestClient, token: str) -> httpx.Response:
    return c.post("/auth/session", json={"token": token})


def test_login_sets_an_httponly_strict_cookie_that_is_not_the_token(client: TestClient) -> None:
    r = login(client, ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "admin", "scope": "control", "via": "session",
                        "auth": "token", "expires_s": 28800.0}
    cookie = r.headers["set-cookie"]
    session_id = cookie.split(";", 1)[0].split("=", 1)[1]
    attrs = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/", "max-age=28800"} <= attrs
    assert "secure" not in attrs  # no TLS here
    assert ADMIN not in cookie and len(session_id) >= 40
    who = client.get("/auth/session").json()  # the client keeps the cookie
    assert who == {"name": "admin", "scope": "control", "via": "session", "auth": "token"}
    assert client.get("/monitors").status_code == 200


def test_cookie_state_changes_need_an_allowed_origin(client: TestClient) -> None:
    login(client, ADMIN)
    r = client.post("/monitors/fake/start", json={})
    assert r.status_code == 403 and "Origin" in r.json()["detail"]
    r = client.post("/monitors/fake/start", json={}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    assert client.get("/monitors/fake").json()["state"] == "stopped"
    r = client.post("/monitors/fake/start", json={}, headers={"Origin": BASE})
    assert r.status_code == 200 and r.json()["state"] == "running"


def test_read_session_gets_403_and_logout_ends_the_session(client: TestClient) -> None:
    login(client, VIEWER)
    r = client.post("/monitors/fake/start", json={}, headers={"Origin": BASE})
    assert r.status_code == 403 and "needs scope control" in r.json()["detail"]
    session_id = client.cookies["ebpf_agent_session"]
    assert client.delete("/auth/session", headers={"Origin": BASE}).status_code == 204
    assert "ebpf_agent_session" not in client.cookies
    r = client.get("/monitors", cookies={"ebpf_agent_session": session_id})
    assert r.status_code == 401


def test_forged_cookie_and_expired_session_are_401(client: TestClient) -> None:
    r = client.get("/monitors", cookies={"ebpf_agent_session": "forged" * 8})
    assert r.status_code == 401
    login(client, ADMIN)
    ctx = context_of(client.app)  # type: ignore[arg-type]
    ctx.sessions.clock = lambda: 1e12  # far in the future: every session has expired
    assert client.get("/monitors").status_code == 401


def test_wrong_login_is_401_counted_and_slowed_down() -> None:
    with client_for(api={"login_failures_per_minute": 2}) as c:
        for _ in range(3):
            r = login(c, "wrong")
            assert r.status_code == 401 and "set-cookie" not in r.headers
        assert metric(c, 'ebpf_agent_auth_failures_total{kind="login"}') == 3
        # The fourth attempt from this address will wait before it is answered.
        assert context_of(c.app).logins.delay("testclient") > 0  # type: ignore[arg-type]


def test_login_limiter_slows_a_burst_and_forgets_after_a_minute() -> None:
    now = [0.0]
    limiter = LoginLimiter(per_minute=3, clock=lambda: now[0])
    delays = []
    for _ in range(8):
        delays.append(limiter.delay("10.0.0.1"))
        limiter.failed("10.0.0.1")
    assert delays[:3] == [0, 0, 0]
    assert delays[3:] == sorted(delays[3:]) and delays[3] > 0  # longer, never shorter
    assert limiter.delay("10.0.0.2") == 0  # per address
    now[0] = 61
    assert limiter.delay("10.0.0.1") == 0


def test_malformed_or_oversize_login_is_422(client: TestClient) -> None:
    assert client.post("/auth/session", content=b"{not json").status_code == 422
    assert client.post("/auth/session", json={"tok": "x"}).status_code == 422
    assert client.post("/auth/session", json={"token": "x" * 5000}).status_code == 422
    big = json.dumps({"token": "x" * 40_000})
    r = client.post("/auth/session", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "set-cookie" not in r.headers


# -- body cap -----------------------------------------------------------------------------
def test_body_cap_and_unauthenticated_bodies() -> None:
    with client_for(api={"max_body_bytes": 2048}) as c:
        big = [1] * 2000  # ~6 KB of JSON
        r = c.put("/targets/pids", json=big, headers=bearer(ADMIN))
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
        assert c.put("/targets/pids", json=big).status_code == 401

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
            yield b"["
            for _ in range(2000):
                yield b"1,"
            yield b"1]"

        r = c.put("/targets/pids", content=chunks(), headers=bearer(ADMIN))
        assert r.status_code == 413
        assert c.get("/targets", headers=bearer(ADMIN)).json()["pids"] == []


# -- stats reset --------------------------------------------------------------------------
def test_stats_reset_is_a_post(client: TestClient) -> None:
    client.post("/monitors/fake/start", json={}, headers=bearer(ADMIN))
    r = client.get("/monitors/fake/stats", params={"reset": "true"}, headers=bearer(VIEWER))
    assert r.status_code == 200 and r.json()["reset"] is False  # a GET never resets
    r = client.post("/monitors/fake/stats/reset", headers=bearer(VIEWER))
    assert r.status_code == 403
    r = client.post("/monitors/fake/stats/reset", params={"limit": 1}, headers=bearer(ADMIN))
    assert r.status_code == 200 and r.json()["reset"] is True and r.json()["limit"] == 1
    client.post("/monitors/plain/start", json={}, headers=bearer(ADMIN))
    # A monitor whose stats() takes no reset answers its stats unchanged.
    assert client.post("/monitors/plain/stats/reset", headers=bearer(ADMIN)).json()["plain"]


# -- audit --------------------------------------------------------------------------------
def test_audit_records_state_changes_without_secrets(tmp_path: Path) -> None:
    audit_file = tmp_path / "audit.jsonl"
    with client_for(logging={"audit_file": str(audit_file)}) as c:
        c.post("/monitors/fake/start", json={"level": 2}, headers=bearer(ADMIN))
        c.put("/targets/pids", json=[42], headers=bearer(VIEWER))
        c.post("/monitors/fake/stop", headers=bearer("not-a-token"))
        login(c, ADMIN)
        c.cookies.clear()
        login(c, "wrong-password-xyz")
        c.post("/events/tickets", json={"monitor": ["fake"]}, headers=bearer(VIEWER))
        c.get("/monitors", headers=bearer(ADMIN))  # reads are not audited
        r = c.get("/audit", headers=bearer(ADMIN))
        assert r.status_code == 200
        entries = r.json()["entries"]
        got = [(e["token"], e["method"], e["path"], e["body"], e["status"]) for e in entries]
        assert got == [
            ("admin", "POST", "/monitors/fake/start", '{"level":2}', 200),
            ("viewer", "PUT", "/targets/pids", None, 403),  # refused before the body
            (None, "POST", "/monitors/fake/stop", None, 401),
            ("admin", "POST", "/auth/session", '{"token":"<redacted>"}', 200),
            (None, "POST", "/auth/session", '{"token":"<redacted>"}', 401),
            ("viewer", "POST", "/events/tickets", '{"monitor":["fake"]}', 200),
        ]
        assert all(e["client"].startswith("testclient:") and e["time"].endswith("Z")
                   for e in entries)
        assert c.get("/audit", params={"limit": 2}, headers=bearer(ADMIN)).json()[
            "entries"] == entries[-2:]
    lines = [json.loads(ln) for ln in audit_file.read_text().splitlines()]
    assert lines == entries
    text = audit_file.read_text()
    assert ADMIN not in text and VIEWER not in text and "wrong-password-xyz" not in text
    assert stat.S_IMODE(os.stat(audit_file).st_mode) == 0o600


def test_audit_ring_is_bounded() -> None:
    with client_for(api={"audit_entries": 3}) as c:
        for pid in range(5):
            c.put("/targets/pids", json=[pid], headers=bearer(ADMIN))
        bodies = [e["body"] for e in c.get("/audit", headers=bearer(ADMIN)).json()["entries"]]
        assert bodies == ["[2]", "[3]", "[4]"]


# -- tickets (a real server: streams) -----------------------------------------------------
def test_tickets_open_one_stream_with_fixed_filters() -> None:
    s = settings(tokens=TOKENS, api={"cors_origins": ["http://dash.example"]})
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        fake: Any = context_of(app).registry.get("fake")
        c.post("/monitors/fake/start", json={}, headers=bearer(ADMIN))

        def ticket(**filters: Any) -> str:
            r = c.post("/events/tickets", json=filters, headers=bearer(VIEWER))
            assert r.status_code == 200 and r.json()["expires_s"] == 30.0
            return str(r.json()["ticket"])

        t = ticket(pid=[7])
        assert c.post("/events/tickets", json={"pid": [-1]},
                      headers=bearer(VIEWER)).status_code == 422
        # A dashboard on another origin: no header, no cookie, the ticket in the URL.
        sse = read_sse(f"{srv.url}/events", params={"ticket": t},
                       headers={"Origin": "http://dash.example"})
        try:
            fake.inbox.put({"pid": 8, "uid": 0, "comm": "x"})
            fake.inbox.put({"pid": 7, "uid": 0, "comm": "x"})
            msg = sse.wait_for(lambda m: m.event == "fake")
            assert msg.data["pid"] == 7  # the ticket's filter applies
        finally:
            sse.stop()
        # Used once: a second connection with it is refused.
        r = c.get("/events", params={"ticket": t})
        assert r.status_code == 401 and "ticket" in r.json()["detail"]
        # A ticket with a different filter in the URL than it was made for.
        r = c.get("/events", params={"ticket": ticket(pid=[7]), "pid": 8})
        assert r.status_code == 401 and "filters" in r.json()["detail"]
        # Expired.
        t = ticket()
        context_of(app).tickets.clock = lambda: 1e12
        assert c.get("/events", params={"ticket": t}).status_code == 401
        context_of(app).tickets.clock = __import__("time").monotonic
        # A ticket opens only streams, not the rest of the API.
        assert c.get("/monitors", params={"ticket": ticket()}).status_code == 401
        # WebSocket.
        ws_url = srv.url.replace("http", "ws") + "/events/ws?ticket=" + ticket(monitor=["fake"])
        ws = read_ws(ws_url)
        try:
            fake.inbox.put({"pid": 9, "uid": 0, "comm": "y"})
            assert ws.wait_for(lambda m: m.event == "fake").data["pid"] == 9
        finally:
            ws.stop()
        assert context_of(app).auth_failures["ticket"] == 3


# -- log redaction ------------------------------------------------------------------------
def test_redaction_of_credentials_in_log_records() -> None:
    flt = RedactSecrets(["plain-secret-42"])
    cases = {
        "> Authorization: Bearer abc.def-123": "> Authorization: Bearer <redacted>",
        "[(b'authorization', b'Bearer abc')]": "[(b'authorization', b'Bearer <redacted>')]",
        '"GET /events?pid=1&ticket=tkt123 HTTP/1.1"':
            '"GET /events?pid=1&ticket=<redacted> HTTP/1.1"',
        "cookie: ebpf_agent_session=sid123; x=1": "cookie: ebpf_agent_session=<redacted>; x=1",
        "token is plain-secret-42!": "token is <redacted>!",
    }
    for text, want in cases.items():
        record = logging.LogRecord("x", logging.DEBUG, "f", 1, "%s", (text,), None)
        assert flt.filter(record)
        assert record.getMessage() == want
