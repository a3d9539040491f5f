"""Prometheus metrics: a collector that reads the manager and the hub at scrape time.

One CollectorRegistry per app (two apps in one process never share series). Labels are
bounded: the monitor name and the stream kind; never a pid, uid or comm.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import logsetup
from agent.core.latency import LatencyHistogram
from agent.monitors.contract import MetricSeries

if TYPE_CHECKING:
    from agent.api.deps import AppContext
    from agent.stream.containers import ContainerBook

# (metric suffix, key in MonitorManager._counters, counter?)
MONITOR_SERIES = (
    ("events_seen", "events_seen_kernel", True, "events seen by the kernel programs"),
    ("events_delivered", "events_delivered", True, "events delivered to userspace sinks"),
    ("events_dropped_kernel", "events_dropped_kernel", True,
     "events dropped in the kernel (buffer full)"),
    ("events_dropped_userspace", "events_dropped_userspace", True,
     "events dropped by full output queues"),
    ("events_per_second", "events_per_second", False, "delivery rate over the last second"),
)


class AgentCollector(Collector):
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration time

    def collect(self) -> Iterator[Metric]:
        manager, hub = self.ctx.manager, self.ctx.hub
        if manager is None or hub is None:
            return
        stats = manager.stats()
        yield from _agent(stats["agent"])
        yield from _monitors(stats["monitors"])
        yield _delivery_latency(manager.latency)
        yield from _monitor_tables(manager.monitor_metrics())
        yield from _streams(hub.stats())
        if self.ctx.containers is not None:
            yield from _containers(self.ctx.containers)
        yield from _leases(dict(manager.leases_expired), manager.registry.names())
        if self.ctx.exporter is not None:
            yield from _export(self.ctx.exporter.stats())
        yield from _auth(self.ctx)
        if self.ctx.agent is not None:
            yield from _processes(self.ctx.agent.process_stats())
        yield CounterMetricFamily("ebpf_agent_log_lines_dropped",
                                  "log lines dropped because the log output (stderr or "
                                  "logging.file) did not take them in time",
                                  value=logsetup.dropped_lines())


def _auth(ctx: AppContext) -> Iterator[Metric]:
    failures = CounterMetricFamily(
        "ebpf_agent_auth_failures", "failed authentications: kind=login is a wrong token "
        "at POST /auth/session; bearer, session, ticket: refused requests", labels=["kind"])
    for kind, n in sorted(ctx.auth_failures.items()):
        failures.add_metric([kind], float(n))
    yield failures
    yield GaugeMetricFamily("ebpf_agent_sessions", "open browser sessions",
                            value=len(ctx.sessions))
    yield CounterMetricFamily("ebpf_agent_audit_write_errors",
                              "audit entries that could not be written to the audit file",
                              value=ctx.audit.write_errors)
    not_written = CounterMetricFamily(
        "ebpf_agent_audit_not_written", "audit entries not written to the audit file: "
        "write_error, or rate_limited (refused requests over the per-minute allowance)",
        labels=["reason"])
    for reason, n in sorted(ctx.audit.not_written.items()):
        not_written.add_metric([reason], float(n))
    yield not_written
    yield CounterMetricFamily("ebpf_agent_audit_rotations", "times the audit file was "
                              "rotated (logging.audit_file_max_bytes)",
                              value=ctx.audit.rotations)
    refused = CounterMetricFamily(
        "ebpf_agent_access_refused", "sessions and tickets refused (a token over its quota "
        "or a full store), logins refused for too many in progress", labels=["kind"])
    refused.add_metric(["session"], float(ctx.sessions.refused))
    refused.add_metric(["ticket"], float(ctx.tickets.refused))
    refused.add_metric(["login_in_flight"], float(ctx.logins.too_many))
    yield refused


def _processes(stats: dict[str, Any]) -> Iterator[Metric]:
    """The process table (agent/processes/); nothing when processes.enabled is false."""
    if not stats:
        return
    yield GaugeMetricFamily("ebpf_agent_process_table_size",
                            "processes in the table, live and exited", value=stats["size"])
    yield GaugeMetricFamily("ebpf_agent_process_table_capacity", "processes.capacity",
                            value=stats["capacity"])
    yield CounterMetricFamily("ebpf_agent_process_table_evicted",
                              "entries evicted because the table was full",
                              value=stats["evicted"])
    yield CounterMetricFamily("ebpf_agent_process_table_expired", "exited processes "
                              "dropped (processes.exited_keep, exited_ttl_s)",
                              value=stats["expired"])
    tracker = stats["tracker"]
    yield CounterMetricFamily("ebpf_agent_process_tracker_ring_dropped",
                              "tracker records lost in the kernel (its ring buffer full)",
                              value=tracker["ring_dropped"])
    records = CounterMetricFamily("ebpf_agent_process_tracker_records",
                                  "fork, exec and exit records applied", labels=["kind"])
    for kind, n in sorted(tracker["records"].items()):
        records.add_metric([kind], float(n))
    yield records
    yield CounterMetricFamily("ebpf_agent_process_tracker_catch_up_timeouts",
                              "events whose ancestors stage gave up waiting for the tracker",
                              value=tracker["catch_up_timeouts"])
    yield GaugeMetricFamily("ebpf_agent_process_tracker_running",
                            "1 while the process tracker runs",
                            value=1.0 if tracker["state"] == "running" else 0.0)


def _leases(expired: dict[str, int], names: list[str]) -> Iterator[Metric]:
    family = CounterMetricFamily("ebpf_agent_lease_expired",
                                 "monitors stopped because their lease ran out",
                                 labels=["monitor"])
    for name in names:
        family.add_metric([name], float(expired.get(name, 0)))
    yield family


def _export(nats: dict) -> Iterator[Metric]:
    """produced = published + dropped + buffered, per exporter."""
    for key, doc in (("produced", "events offered to the exporter"),
                     ("published", "events the bus acknowledged"),
                     ("dropped", "events that will never be published (counted by reason)")):
        if key == "dropped":
            family = CounterMetricFamily("ebpf_agent_export_events_dropped", doc,
                                         labels=["exporter", "reason"])
            for reason in ("buffer_full", "publish_failed", "shutdown"):
                family.add_metric(["nats", reason], float(nats[f"dropped_{reason}"]))
        else:
            family = CounterMetricFamily(f"ebpf_agent_export_events_{key}", doc,
                                         labels=["exporter"])
            family.add_metric(["nats"], float(nats[key]))
        yield family
    yield GaugeMetricFamily("ebpf_agent_export_buffered", "events waiting to be published",
                            value=nats["buffered"])
    yield GaugeMetricFamily("ebpf_agent_export_connected", "1 while connected to the bus",
                            value=1.0 if nats["connected"] else 0.0)


def _agent(agent: dict) -> Iterator[Metric]:
    yield GaugeMetricFamily("ebpf_agent_uptime_seconds", "seconds since start",
                            value=agent["uptime_s"])
    yield CounterMetricFamily("ebpf_agent_cpu_seconds", "user+system CPU seconds",
                              value=agent["cpu_s"])
    yield GaugeMetricFamily("ebpf_agent_resident_memory_bytes", "RSS", value=agent["rss_bytes"])


def _monitors(monitors: dict[str, dict]) -> Iterator[Metric]:
    running = GaugeMetricFamily("ebpf_agent_monitor_running", "1 while the monitor runs",
                                labels=["monitor"])
    for name, m in monitors.items():
        running.add_metric([name], 1.0 if m.get("state") == "running" else 0.0)
    yield running
    failed = GaugeMetricFamily("ebpf_agent_monitor_failed",
                               "1 while the monitor is failed (load or poller error)",
                               labels=["monitor"])
    for name, m in monitors.items():
        failed.add_metric([name], 1.0 if m.get("state") == "failed" else 0.0)
    yield failed
    for suffix, key, is_counter, doc in MONITOR_SERIES:
        family_cls = CounterMetricFamily if is_counter else GaugeMetricFamily
        family = family_cls(f"ebpf_agent_monitor_{suffix}", doc, labels=["monitor"])
        for name, m in monitors.items():
            if key in m:
                family.add_metric([name], float(m[key]))
        yield family


def _monitor_tables(series_by_monitor: dict[str, list[MetricSeries]]) -> Iterator[Metric]:
    for monitor, series in series_by_monitor.items():
        for s in series:
            family_cls = CounterMetricFamily if s.counter else GaugeMetricFamily
            family = family_cls(f"ebpf_agent_{monitor}_{s.name}", s.doc, labels=[s.label])
            for value_label, value in s.values.items():
                family.add_metric([_label(value_label)], float(value))
            yield family


def _label(value: str) -> str:
    """A label value the exposition format (UTF-8) can carry: bytes that are not UTF-8
    (surrogate-escaped symbol names) are written as \\xNN."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _containers(book: ContainerBook) -> Iterator[Metric]:
    yield GaugeMetricFamily("ebpf_agent_containers_tracked",
                            "containers GET /containers counts events for",
                            value=len(book))
    yield CounterMetricFamily("ebpf_agent_containers_evicted",
                              "containers evicted from GET /containers "
                              "(stream.max_containers reached)", value=book.evicted)


def _streams(hub: dict) -> Iterator[Metric]:
    yield CounterMetricFamily("ebpf_agent_stream_events_published",
                              "events entered into the stream hub", value=hub["published"])
    subs = GaugeMetricFamily("ebpf_agent_stream_subscribers", "connected subscribers",
                             labels=["kind"])
    delivered = CounterMetricFamily("ebpf_agent_stream_events_delivered",
                                    "events sent to subscribers", labels=["kind"])
    dropped = CounterMetricFamily("ebpf_agent_stream_events_dropped",
                                  "events subscribers lost (evicted, skipped ahead: "
                                  "max_lag_ms, stalled)", labels=["kind"])
    totals = hub["totals"]
    for kind in ("sse", "ws"):
        subs.add_metric([kind], sum(1 for s in hub["subscribers"] if s["kind"] == kind))
        delivered.add_metric([kind], totals.get(f"{kind}_delivered", 0))
        dropped.add_metric([kind], totals.get(f"{kind}_dropped", 0))
    yield from (subs, delivered, dropped)


def _delivery_latency(histograms: dict[str, LatencyHistogram]) -> Metric:
    family = HistogramMetricFamily(
        "ebpf_agent_event_delivery_latency_seconds",
        "kernel timestamp to hand-off to the stream hub and outputs (above 2000 events/s, "
        "one event in 16 is observed)",
        labels=["monitor"])
    for name, hist in sorted(histograms.items()):
        buckets, sum_s = hist.snapshot()
        family.add_metric([name], buckets, sum_s)
    return family


class RequestDuration:
    """ASGI middleware: a histogram of HTTP request durations, from the request to the
    response headers (for `/events` that is the time to open the stream, not its life).
    Labels are bounded: the route template (`/monitors/{name}`), never the raw path; a path
    no route matched is `other`. WebSockets are not timed."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0)

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.histogram = Histogram(
            "ebpf_agent_api_request_duration_seconds",
            "HTTP request duration until the response headers",
            ["method", "route", "status"], registry=registry, buckets=self.BUCKETS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._observe(scope, message["status"], time.perf_counter() - t0)
            await send(message)

        await self.app(scope, receive, timed_send)

    def _observe(self, scope: Scope, status: int, seconds: float) -> None:
        route: Any = scope.get("route")
        if route is None:  # refused before the router (gate, guard): label it all the same
            app = scope.get("app")
            route = _find_route(getattr(getattr(app, "router", None), "routes", ()), scope)
        template = getattr(route, "path", None) or "other"
        self.histogram.labels(scope["method"], template, str(status)).observe(seconds)


def _find_route(routes: Any, scope: Scope) -> Any:
    """The route a request would have gone to (its template labels the histogram)."""
    for route in routes:
        # FastAPI wraps an included router (all ours are included without a prefix).
        inner = getattr(getattr(route, "original_router", None), "routes", None)
        if inner is not None:
            if (found := _find_route(inner, scope)) is not None:
                return found
            continue
        try:
            match, _ = route.matches(scope)
        except Exception:  # a route type that cannot match this scope
            continue
        if match is Match.FULL:
            return route
    return None
