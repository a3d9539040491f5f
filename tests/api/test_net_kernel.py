"""The net monitor through the REST API of a real agent: started with options, its
per-endpoint top lists on /monitors/net/stats and its bounded series on /metrics are the
exact totals of connections the test made; bad options are a 422."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.api import Agent, kernel_agent
from tests.support.tcp import server, start_client

CONNECTIONS, SENT, REPLY = 3, 4321, 8765


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    with kernel_agent(tmp_path_factory.mktemp("agent")) as a:
        yield a


def test_stats_and_metrics_over_http(agent: Agent) -> None:
    try:
        r = agent.request("POST", "/monitors/net/start", json={"events": ["close"]})
        assert r.status_code == 200 and r.json()["state"] == "running", r.text
        with server("127.0.0.1", CONNECTIONS, REPLY) as srv:
            for _ in range(CONNECTIONS):
                start_client("127.0.0.1", srv.port, SENT)
            assert srv.received() == [SENT] * CONNECTIONS
        want_out = {"direction": "out", "address": "127.0.0.1", "port": srv.port,
                    "connections": CONNECTIONS, "failures": 0,
                    "bytes_sent": CONNECTIONS * SENT, "bytes_received": CONNECTIONS * REPLY}
        stats: dict = {}
        for _ in range(50):  # the last close may still be in flight
            stats = agent.request("GET", "/monitors/net/stats",
                                  params={"limit": 10000}).json()
            if want_out in stats["by_bytes"]:
                break
        assert want_out in stats["by_bytes"] and want_out in stats["by_connections"]
        assert {**want_out, "direction": "in", "bytes_sent": CONNECTIONS * REPLY,
                "bytes_received": CONNECTIONS * SENT} in stats["by_bytes"]
        assert len(agent.request("GET", "/monitors/net/stats",
                                 params={"limit": 1}).json()["by_bytes"]) == 1
        metrics = agent.request("GET", "/metrics").text
        label = f'{{endpoint="out:127.0.0.1:{srv.port}"}}'
        values = {ln.split("{")[0]: float(ln.split()[-1])
                  for ln in metrics.splitlines() if label in ln}
        assert values == {
            "ebpf_agent_net_connections_total": CONNECTIONS,
            "ebpf_agent_net_failures_total": 0,
            "ebpf_agent_net_sent_bytes_total": CONNECTIONS * SENT,
            "ebpf_agent_net_received_bytes_total": CONNECTIONS * REPLY,
        }
    finally:
        agent.request("POST", "/monitors/net/stop")


@pytest.mark.parametrize("body, needle", [
    ({"ports_include": [0]}, "ports_include"),
    ({"addrs_exclude": ["300.1.1.1"]}, "addrs_exclude"),
    ({"events": []}, "events"),
])
def test_bad_options_are_422(agent: Agent, body: dict, needle: str) -> None:
    r = agent.request("POST", "/monitors/net/start", json=body)
    assert r.status_code == 422 and needle in r.text, r.text
    assert agent.request("GET", "/monitors/net").json()["state"] in ("stopped", "failed")
