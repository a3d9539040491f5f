"""The two Prometheus histograms with fake monitors: event delivery latency (kernel
ts_ns -> hand-off) and API request duration (by route template)."""

from __future__ import annotations

import re
import time

from fastapi.testclient import TestClient

from agent.api.app import create_app
from agent.core.manager import LATENCY_SAMPLE_FAST
from agent.core.pipeline import MonitorSink
from tests.support.api import fake_registry, fake_report, settings

BASE = "http://127.0.0.1"


def sample(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert m, f"{name}{{{labels}}} missing"
    return float(m.group(1))


def test_delivery_latency_histogram_counts_events_with_a_kernel_timestamp() -> None:
    registry = fake_registry()
    app = create_app(settings(), registry, report=fake_report())
    inbox = registry.get("fake").inbox  # type: ignore[attr-defined]
    with TestClient(app, base_url=BASE) as client:
        assert client.post("/monitors/fake/start", json={}).status_code == 200
        inbox.put({"ts_ns": time.monotonic_ns() - 5_000_000, "pid": 1})  # 5 ms old
        inbox.put({"pid": 2})  # no kernel timestamp: delivered, not timed
        deadline = time.monotonic() + 10
        while client.get("/monitors/fake/stats").json()["events_delivered"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        text = client.get("/metrics").text
    name = "ebpf_agent_event_delivery_latency_seconds"
    assert sample(text, f"{name}_count", 'monitor="fake"') == 1
    assert sample(text, f"{name}_bucket", 'le="0.004194304",monitor="fake"') == 0
    assert sample(text, f"{name}_bucket", 'le="+Inf",monitor="fake"') == 1
    assert sample(text, f"{name}_sum", 'monitor="fake"') >= 0.005


def test_sink_samples_one_event_in_n_when_told() -> None:
    sink = MonitorSink()
    sink.sample_mask = LATENCY_SAMPLE_FAST - 1
    for _ in range(LATENCY_SAMPLE_FAST * 10):
        sink.publish({"ts_ns": time.monotonic_ns()})
    assert sink.delivered == LATENCY_SAMPLE_FAST * 10
    assert sum(sink.latency.counts) == 10  # type: ignore[union-attr]


def test_request_duration_is_labelled_by_route_template_and_status() -> None:
    app = create_app(settings(token="t0ken-0123456789"), fake_registry(), report=fake_report())
    auth = {"Authorization": "Bearer t0ken-0123456789"}
    with TestClient(app, base_url=BASE) as client:
        assert client.get("/monitors/fake", headers=auth).status_code == 200
        assert client.get("/monitors/plain", headers=auth).status_code == 200
        assert client.get("/monitors/nope", headers=auth).status_code == 404
        assert client.get("/monitors").status_code == 401
        assert client.get("/no/such/path", headers=auth).status_code == 404
        text = client.get("/metrics", headers=auth).text
    name = "ebpf_agent_api_request_duration_seconds_count"
    assert sample(text, name, 'method="GET",route="/monitors/{name}",status="200"') == 2
    assert sample(text, name, 'method="GET",route="/monitors/{name}",status="404"') == 1
    assert sample(text, name, 'method="GET",route="/monitors",status="401"') == 1
    assert sample(text, name, 'method="GET",route="other",status="404"') == 1
    assert "/monitors/fake" not in text and "/no/such/path" not in text  # bounded labels
