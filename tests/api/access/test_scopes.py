"""Each route declares the scope it needs (needs(...)), and the OpenAPI document shows it:
every operation but the public ones names exactly one scope in its security
requirement."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute

from agent.api.access.scopes import needs
from agent.api.app import create_app
from tests.support.api import client_for, fake_registry, fake_report, settings

PUBLIC = {("GET", "/health"), ("POST", "/auth/session"), ("GET", "/ui"), ("GET", "/ui/"),
          ("GET", "/ui/{name}")}
CONTROL = {("GET", "/audit"), ("POST", "/monitors/{name}/start"),
           ("POST", "/monitors/{name}/lease"), ("POST", "/monitors/{name}/stop"),
           ("POST", "/monitors/{name}/stats/reset"), ("PUT", "/targets/follow_children"),
           ("PUT", "/targets/{kind}"), ("POST", "/targets/{kind}"),
           ("DELETE", "/targets/{kind}/{value}"), ("PUT", "/state")}


def app() -> Any:
    return create_app(settings(token="scopes-token-0123"), fake_registry(),
                      report=fake_report())


def flat(routes: Any) -> list[Any]:
    """The routes, with included routers (FastAPI wraps them) opened."""
    out = []
    for route in routes:
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        out += flat(inner) if inner is not None else [route]
    return out


def test_every_operation_names_its_one_scope_in_openapi() -> None:
    paths = app().openapi()["paths"]
    seen = set()
    for path, ops in paths.items():
        for method, op in ops.items():
            key = (method.upper(), path)
            seen.add(key)
            if key in PUBLIC:
                assert "security" not in op, key
                continue
            expected = "control" if key in CONTROL else "read"
            assert op["security"] == [{"HTTPBearer": [expected]}], key
    assert seen >= CONTROL  # the table names real operations


def test_the_websocket_route_declares_read_like_the_rest() -> None:
    routes = {r.path: r for r in flat(app().routes) if isinstance(r, APIWebSocketRoute)}
    calls = [d.call for d in routes["/events/ws"].dependant.dependencies]
    assert needs("read") in calls


def test_no_route_is_left_without_a_rule() -> None:
    routes = [r for r in flat(app().routes) if isinstance(r, APIRoute)]
    assert len(routes) > 20
    for route in routes:
        if not isinstance(route, APIRoute):
            continue
        path = re.sub(r":[^}]+}", "}", route.path)  # as OpenAPI names it: no converter
        for method in route.methods:
            if (method, path) in PUBLIC or method == "HEAD":
                continue
            calls = [d.call for d in route.dependant.dependencies]
            wanted = "control" if (method, path) in CONTROL else "read"
            assert needs(wanted) in calls, (method, path)


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/audit", None),
    ("POST", "/monitors/fake/start", {}),
    ("PUT", "/targets/pids", [1]),
    ("PUT", "/state", {"monitors": {}}),
])
def test_a_read_token_gets_403_naming_the_scope(method: str, path: str,
                                                body: Any) -> None:
    tokens = [{"name": "viewer", "scope": "read", "token": "scopes-viewer-0123"}]
    with client_for(tokens=tokens) as c:
        r = c.request(method, path, json=body,
                      headers={"Authorization": "Bearer scopes-viewer-0123"})
        assert r.status_code == 403
        assert r.json()["detail"] == (f"token 'viewer' has scope read: {method} {path} "
                                      "needs scope control")
