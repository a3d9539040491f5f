"""Sessions and tickets (issue 16, item 4): quotas per token, and a full store refuses
new entries instead of evicting others' (a read token could end an admin's session and
cancel a control ticket by making many of its own)."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from agent.api.access.principal import Principal
from agent.api.access.sessions import SessionStore, StoreFull, TicketStore
from agent.api.app import create_app
from agent.model.filters import StreamFilters
from tests.support.api import BASE, client_for, fake_registry, fake_report, settings, thread_server

ADMIN, VIEWER, OPS = "sess-admin-0123", "sess-viewer-0123", "sess-ops-0123"
TOKENS = [{"name": "admin", "scope": "control", "token": ADMIN},
          {"name": "viewer", "scope": "read", "token": VIEWER},
          {"name": "ops", "scope": "control", "token": OPS}]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def login(token: str, c: TestClient) -> httpx.Response:
    return c.post("/auth/session", json={"token": token})


def test_read_token_logins_cannot_end_an_admin_session() -> None:
    with client_for(tokens=TOKENS, api={"max_sessions": 4,
                                        "max_sessions_per_token": 2}) as c:
        admin = TestClient(c.app, base_url=BASE)
        assert login(ADMIN, admin).status_code == 200
        viewer = TestClient(c.app, base_url=BASE)
        assert [login(VIEWER, viewer).status_code for _ in range(2)] == [200, 200]
        r = login(VIEWER, viewer)  # over its quota: refused, nobody evicted
        assert r.status_code == 429 and "max_sessions_per_token" in r.json()["detail"]
        assert "set-cookie" not in r.headers
        ops = TestClient(c.app, base_url=BASE)
        assert login(OPS, ops).status_code == 200  # 4 of 4: full
        r = login(ADMIN, TestClient(c.app, base_url=BASE))
        assert r.status_code == 503 and "max_sessions" in r.json()["detail"]
        # Every session made is still valid.
        assert admin.get("/auth/session").json()["name"] == "admin"
        assert admin.post("/targets/pids", json=[5],
                          headers={"Origin": BASE}).status_code == 200
        assert ops.get("/auth/session").json()["name"] == "ops"


def test_read_tickets_cannot_cancel_a_control_ticket() -> None:
    s = settings(tokens=TOKENS, api={"max_tickets": 6, "max_tickets_per_token": 3})
    app = create_app(s, fake_registry(), report=fake_report())
    with thread_server(app, s) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/events/tickets", json={}, headers=bearer(ADMIN))
        assert r.status_code == 200
        control_ticket = r.json()["ticket"]
        statuses = [c.post("/events/tickets", json={}, headers=bearer(VIEWER)).status_code
                    for _ in range(50)]
        assert statuses == [200] * 3 + [429] * 47
        with c.stream("GET", "/events", params={"ticket": control_ticket}) as stream:
            assert stream.status_code == 200


def test_logout_ends_only_the_callers_own_session() -> None:
    with client_for(tokens=TOKENS) as c:
        admin = TestClient(c.app, base_url=BASE)
        assert login(ADMIN, admin).status_code == 200
        viewer = TestClient(c.app, base_url=BASE)
        assert login(VIEWER, viewer).status_code == 200
        # The read token logs out (its cookie), and with a bearer header (no session).
        assert viewer.delete("/auth/session", headers={"Origin": BASE}).status_code == 204
        assert c.delete("/auth/session", headers=bearer(VIEWER)).status_code == 204
        assert admin.get("/auth/session").json()["name"] == "admin"
        assert viewer.get("/auth/session").status_code == 401


@pytest.mark.parametrize("store_class", [SessionStore, TicketStore])
def test_a_full_store_refuses_and_frees_room_as_entries_expire(store_class: type) -> None:
    now = [0.0]
    store = store_class(10.0, 3, lambda: now[0], per_token=2)
    a, b = Principal("a", "read", "bearer"), Principal("b", "control", "bearer")

    def make(who: Principal) -> str:
        if store_class is TicketStore:
            return str(store.create(who, StreamFilters()))
        return str(store.create(who))

    make(a)
    make(a)
    with pytest.raises(StoreFull) as quota:
        make(a)
    assert quota.value.status == 429
    make(b)
    with pytest.raises(StoreFull) as full:
        make(b)
    assert full.value.status == 503 and store.refused == 2
    now[0] = 11.0  # all expired: room again, quotas reset
    assert len(store) == 0
    make(a)
    make(a)
    assert len(store) == 2
