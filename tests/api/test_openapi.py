"""openapi/openapi.json is the app's document, and the API holds to it under fuzzing
(schemathesis against a real uvicorn server with fake monitors: no 5xx, documented status
codes and content types, bodies that match the schemas)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from agent.api.app import create_app
from agent.api.openapi_dump import openapi_document
from tests.support.api import REPO, ThreadServer, fake_registry, fake_report, settings

OPENAPI = REPO / "openapi" / "openapi.json"
TOKEN = "fuzz-token"
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance)


def test_committed_openapi_matches_the_app() -> None:
    committed = json.loads(OPENAPI.read_text())
    assert committed == openapi_document(), "openapi/openapi.json is stale: run `make openapi`"


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ThreadServer]:
    # Fuzzed logins fail by the hundred: no slow-down here (tests/api/test_auth.py has it).
    s = settings(token=TOKEN, stream={"max_subscribers": 4},
                 api={"login_failures_per_minute": 10_000})
    app = create_app(s, fake_registry(), report=fake_report())
    srv = ThreadServer(app, s).start()
    try:
        yield srv
    finally:
        srv.stop()


# The streaming endpoint never ends a response by itself: it is covered by
# tests/api/test_streams.py and tests/api/test_process.py instead.
schema = schemathesis.from_dict(json.loads(OPENAPI.read_text()), force_schema_version="30").exclude(
    path_regex="^/events$")


@schema.parametrize()
@hyp_settings(max_examples=30, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_fuzz_api(case: schemathesis.Case, fuzz_server: ThreadServer) -> None:
    response = case.call(base_url=fuzz_server.url,
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    case.validate_response(response, checks=CHECKS)


def test_fuzz_without_token_is_always_401(fuzz_server: ThreadServer) -> None:
    import httpx

    for op in schema.get_all_operations():
        operation = op.ok()
        path = operation.path.replace("{name}", "fake").replace("{kind}", "pids")
        path = path.replace("{value}", "1")
        r = httpx.request(operation.method.upper(), f"{fuzz_server.url}{path}", json=[1])
        # /health is public; so is the login, which refuses this body as malformed.
        public = {("GET", "/health"): 200, ("POST", "/auth/session"): 422}
        expected = public.get((operation.method.upper(), path), 401)
        assert r.status_code == expected, (operation.method, path, r.text)


def test_each_monitor_options_stats_query_and_event_are_components() -> None:
    from agent.monitors.registry import MonitorRegistry

    schemas = openapi_document()["components"]["schemas"]
    registry = MonitorRegistry()
    registry.discover()
    assert {"exec", "func", "syscall"} <= set(registry.names())
    for cls in registry:
        title = cls.name.title()
        assert schemas[f"{title}Options"]["properties"] == (
            cls.Options.model_json_schema()["properties"])
        assert set(schemas[f"{title}StatsQuery"].get("properties", {})) == set(
            cls.StatsQuery.model_fields)
        event = schemas[f"{title}Event"]["properties"]
        assert list(event)[:9] == ["monitor", "timestamp", "ts_ns", "pid", "tid", "ppid",
                                   "uid", "gid", "comm"]
    assert set(schemas["SyscallStatsQuery"]["properties"]) == {"sort", "limit", "reset"}
    assert schemas["SyscallStatsQuery"]["properties"]["sort"]["enum"] == ["count", "time"]
