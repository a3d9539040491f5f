"""The monitor manager: one control thread owns every BCC object.

Handlers (REST, CLI) never touch BPF objects; they send commands to the control
thread and wait on a Future (Tetragon's sensor manager does the same). The control
thread also runs the periodic work on a timer (delivery rates, monitor.periodic(),
snapshot reads for the CSV snapshots), so it never stops under load.

Each running monitor has a poller thread that only drains its ring/perf buffer into
the sinks (monitor.poll). Stopping asks the monitor to make a poll in progress return
(BaseMonitor.request_stop: bounded consume calls, production quiesced), joins the
poller, and frees the BPF object only once the poller is gone: a poller that does not
end in time keeps its object alive (``_stuck``) until it does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import ValidationError

from agent.config import OutputSettings, TargetSettings, TransportSettings
from agent.core.latency import LatencyHistogram
from agent.core.leases import LeaseStateMixin
from agent.kernel.capabilities import CapabilityReport
from agent.model.events import Event
from agent.model.targets import (
    KINDS,
    TargetKind,
    TargetLimits,
    TargetSet,
    check_capacity,
    validate_values,
)
from agent.monitors.contract import (
    BaseMonitor,
    MetricSeries,
    MonitorContext,
    MonitorError,
    MonitorOptions,
)
from agent.monitors.registry import MonitorRegistry
from agent.output.writer import OutputWriter, WriterFactory

log = logging.getLogger(__name__)
T = TypeVar("T")
POLL_TIMEOUT_MS = 100
TICK_S = 0.25  # the control thread's timer: rates, periodic(), snapshots, stuck pollers
RATE_WINDOW_S = 1.0
STOP_JOIN_S = 2.0  # a poller returns within one bounded consume call once asked to stop
# Above this many events/s the delivery latency histogram samples one event in
# LATENCY_SAMPLE_FAST (~200 ns saved per skipped event; bench/latency_histogram.py).
LATENCY_SAMPLE_ABOVE_RATE = 2000
LATENCY_SAMPLE_FAST = 16


class UnknownMonitor(KeyError):
    pass


class MonitorUnsupported(Exception):
    """This kernel cannot run the monitor (or these options); 409 with the reason."""


class OptionsInvalid(ValueError):
    """Options (or a stats query) that fail validation; 422. ``errors`` is pydantic's
    list; ``where``: the request part they came from ("body" or "query"); ``monitor``:
    whose options they are; ``loc``: where they sit in that part (e.g. ("monitors",
    "exec") in a state document)."""

    def __init__(self, message: str, errors: list[Any] | None = None,
                 where: str = "body", monitor: str | None = None,
                 loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.errors = errors or []
        self.where = where
        self.monitor = monitor
        self.loc = loc


class MonitorSink:
    """Counts what a monitor delivers and fans it out. Runs on the poller thread."""

    def __init__(self, publish: Callable[[Event], object] | None,
                 latency: LatencyHistogram | None = None) -> None:
        self.delivered = 0
        self._publish = publish
        self.writer: OutputWriter | None = None
        self.latency = latency if latency is not None else LatencyHistogram()
        # Observe the latency of events whose count has these bits clear: 0 = every event;
        # the poller raises it under load (one in LATENCY_SAMPLE_FAST events).
        self.sample_mask = 0

    def publish(self, event: Event) -> None:
        n = self.delivered = self.delivered + 1
        if not n & self.sample_mask and self.latency is not None:
            ts_ns = event.get("ts_ns")
            if ts_ns:  # kernel timestamp -> handed to the hub and outputs: now
                self.latency.observe_since(ts_ns)
        # The hub returns the bytes it encoded: the JSONL output writes those.
        data = self._publish(event) if self._publish is not None else None
        if self.writer is not None:
            self.writer.offer(event, data if isinstance(data, bytes) else None)


@dataclass
class Running:
    monitor: BaseMonitor
    options: MonitorOptions
    sink: MonitorSink
    started_at: str
    started_mono: float
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    rate: float = 0.0
    poll_error: str | None = None
    # Control thread only: the rate window and the last snapshot.
    rate_mark: tuple[float, int] = (0.0, 0)
    last_snapshot: float = 0.0


class MonitorManager(LeaseStateMixin):  # leases and GET/PUT /state: agent/core/leases.py
    def __init__(
        self,
        registry: MonitorRegistry,
        report: CapabilityReport,
        targets: TargetSet | None = None,
        limits: TargetLimits | None = None,
        transport: TransportSettings | None = None,
        output: OutputSettings | None = None,
        publish: Callable[[Event], object] | None = None,
        writers: WriterFactory | None = None,
    ) -> None:
        """``writers``: makes each started monitor's output (files, console); None: no
        output. ``output``: the settings section (the snapshot interval); default: the
        writers' one."""
        self.registry = registry
        self.report = report
        self.limits = limits or TargetSettings().limits()
        self.transport = transport or TransportSettings()
        self._writers = writers
        self.output = output or (writers.output if writers else OutputSettings(formats=[]))
        self._publish = publish
        self._targets = targets or TargetSet()
        check_capacity(self._targets, self.limits)
        self._running: dict[str, Running] = {}
        self._failed: dict[str, str] = {}
        self._last_options: dict[str, MonitorOptions] = {}
        # Per monitor name, kept across restarts so the Prometheus histogram never resets.
        self.latency: dict[str, LatencyHistogram] = {}
        self._commands: queue.Queue[Any] = queue.Queue()
        # Stopped monitors whose poller did not end in time: freed once it has.
        self._stuck: list[Running] = []
        self._thread = threading.Thread(target=self._control_loop, name="bpf-control", daemon=True)
        self._started = time.monotonic()
        self._closed = False
        self._init_leases()
        self._thread.start()

    # -- the control thread --------------------------------------------------------
    def _control_loop(self) -> None:
        next_tick = time.monotonic() + TICK_S
        while True:
            try:
                item = self._commands.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = ()
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + TICK_S
            if item is None:
                return
            if not item:
                continue
            fn, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def _tick(self) -> None:
        """Periodic work (control thread): it reads BCC tables, so it runs here and not
        on the pollers, which may spend seconds inside one poll under a flood."""
        now = time.monotonic()
        for run in list(self._running.values()):
            try:
                self._periodic(run, now)
            except Exception:
                log.exception("monitor %s: periodic work failed", run.monitor.name)
        self._reap_stuck()

    def _periodic(self, run: Running, now: float) -> None:
        mark_time, mark_count = run.rate_mark
        if now - mark_time >= RATE_WINDOW_S:
            delivered = run.sink.delivered
            run.rate = (delivered - mark_count) / (now - mark_time)
            run.rate_mark = (now, delivered)
            # Read by the poller on its next event: plain int, no lock needed.
            run.sink.sample_mask = (LATENCY_SAMPLE_FAST - 1
                                    if run.rate > LATENCY_SAMPLE_ABOVE_RATE else 0)
            run.monitor.periodic()
        writer = run.sink.writer
        if writer is not None and writer.wants_snapshots and (
            now - run.last_snapshot >= self.output.snapshot_interval_s
        ):
            writer.offer_snapshot(run.monitor.snapshot_rows())
            run.last_snapshot = now

    def _reap_stuck(self) -> None:
        for run in list(self._stuck):
            if run.thread is not None and run.thread.is_alive():
                continue
            self._stuck.remove(run)
            try:
                run.monitor.close()
            except Exception:
                log.exception("monitor %s: close failed", run.monitor.name)
                continue
            log.info("monitor %s: its late poller ended; BPF object freed", run.monitor.name)

    def submit(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._closed:
            fut.set_exception(RuntimeError("the monitor manager is shut down"))
        else:
            self._commands.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], T], timeout: float | None = 120) -> T:
        return self.submit(fn).result(timeout)

    async def acall(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.submit(fn))

    # -- monitors ------------------------------------------------------------------
    def monitor_class(self, name: str) -> type[BaseMonitor]:
        if name not in self.registry:
            raise UnknownMonitor(name)
        return self.registry.get(name)

    def parse_options(self, name: str, options: dict[str, Any] | None,
                      loc: tuple[str | int, ...] = ()) -> MonitorOptions:
        """``loc``: where the options sit in the request body (for the 422)."""
        cls = self.monitor_class(name)
        try:
            return cls.Options(**(options or {}))
        except ValidationError as e:
            raise OptionsInvalid(f"invalid options for {name}", e.errors(),
                                 monitor=name, loc=loc) from None

    def start_monitor(self, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        parsed = self.parse_options(name, options)
        return self.call(lambda: self._start(name, parsed))

    def stop_monitor(self, name: str) -> dict[str, Any]:
        self.monitor_class(name)
        return self.call(lambda: self._stop(name))

    def _unsupported_reason(self, cls: type[BaseMonitor], options: MonitorOptions) -> str | None:
        return self.report.support_reason(cls) or cls.option_errors(options, self.report)

    def _start(self, name: str, options: MonitorOptions) -> dict[str, Any]:
        cls = self.monitor_class(name)
        current = self._running.get(name)
        if current is not None:
            if current.options == options:
                return self._info(name)
            if current.monitor.apply_options(options):
                current.options = options  # changed in place: no reload, no gap
                return self._info(name)
        # Everything that can refuse the options runs before a running monitor is
        # touched: a refused change leaves it running as it was.
        reason = self._unsupported_reason(cls, options)
        if reason:
            raise MonitorUnsupported(f"{name} cannot run on this kernel: {reason}")
        sink = MonitorSink(self._publish, self.latency.setdefault(name, LatencyHistogram()))
        ctx = MonitorContext(
            targets=self._targets,
            sink=sink,
            transport=self.transport,
            limits=self.limits,
            ringbuf_supported=self.report.feature("ringbuf").available,
            kernel_offsets=self.report.kernel_offsets,
        )
        monitor = cls(options, ctx)
        monitor.prepare()
        self._check_output(name)
        if current is not None:
            self._stop(name)
        sink.writer = self._open_writer(name, monitor)
        try:
            monitor.load()
        except BaseException as e:
            # load() leaves nothing loaded on failure; close() again costs nothing and
            # covers a monitor that does not.
            monitor.close()
            if sink.writer is not None:
                sink.writer.close()
            if isinstance(e, MonitorError):
                self._failed[name] = str(e)
                raise MonitorUnsupported(str(e)) from e
            raise
        run = Running(monitor, options, sink, _now_iso(), time.monotonic())
        run.rate_mark, run.last_snapshot = (run.started_mono, 0), run.started_mono
        run.thread = threading.Thread(target=self._poll_loop, args=(run,), name=f"poll-{name}",
                                      daemon=True)
        self._running[name] = run
        self._failed.pop(name, None)
        self._last_options[name] = options
        run.thread.start()
        log.info("monitor %s started", name)
        return self._info(name)

    def _check_output(self, name: str) -> None:
        """Output paths that would fail: OutputPathError (422) or MonitorUnsupported."""
        if self._writers is None:
            return
        try:
            self._writers.check(name)
        except OSError as e:
            raise MonitorUnsupported(f"{name}: output: {e}") from None

    def _open_writer(self, name: str, monitor: BaseMonitor) -> OutputWriter | None:
        if self._writers is None:
            return None
        try:
            return self._writers.open(name, monitor)
        except OSError as e:
            raise MonitorUnsupported(f"{name}: output: {e}") from None

    def _poll_loop(self, run: Running) -> None:
        """The poller thread: drains the buffer, nothing else (monitor.poll returns
        after a bounded number of records, or once request_stop was called)."""
        try:
            while not run.stop.is_set():
                run.monitor.poll(POLL_TIMEOUT_MS)
        except Exception as e:  # reported in the monitor's state, never silent
            run.poll_error = f"poller failed: {e}"
            log.exception("monitor %s: poller failed", run.monitor.name)

    def _stop(self, name: str) -> dict[str, Any]:
        run = self._running.pop(name, None)
        if run is not None:
            run.stop.set()
            run.monitor.request_stop()
            if run.thread is not None:
                run.thread.join(timeout=STOP_JOIN_S)
            writer = run.sink.writer
            if writer is not None and writer.wants_snapshots:
                writer.offer_snapshot(run.monitor.snapshot_rows())  # the final totals
            if run.thread is not None and run.thread.is_alive():
                # Freeing the BPF object under a poller inside libbpf crashes the
                # process: keep it until the poller has returned (_reap_stuck).
                log.error("monitor %s: the poller did not return within %.0f s; its BPF "
                          "object is freed once it does", name, STOP_JOIN_S)
                self._stuck.append(run)
            else:
                run.monitor.close()
            if run.sink.writer is not None:
                run.sink.writer.close()
            if run.poll_error:
                self._failed[name] = run.poll_error
            log.info("monitor %s stopped", name)
        return self._info(name)

    def _info(self, name: str) -> dict[str, Any]:
        cls = self.monitor_class(name)
        run = self._running.get(name)
        info: dict[str, Any] = {"name": name, "description": cls.description}
        options = run.options if run else self._last_options.get(name) or _defaults(cls)
        info["options"] = options.model_dump(mode="json") if options else {}
        static_reason = self.report.support_reason(cls)
        if run is not None:
            info["state"] = "failed" if run.poll_error else "running"
            if run.poll_error:
                info["reason"] = run.poll_error
        elif static_reason:
            info["state"], info["reason"] = "unsupported", static_reason
        elif name in self._failed:
            info["state"], info["reason"] = "failed", self._failed[name]
        else:
            info["state"] = "stopped"
        return info

    def monitors(self) -> list[dict[str, Any]]:
        return self.call(lambda: [self._info(c.name) for c in self.registry])

    def monitor_info(self, name: str) -> dict[str, Any]:
        self.monitor_class(name)
        return self.call(lambda: self._info(name))

    def running(self) -> list[str]:
        return self.call(lambda: sorted(self._running))

    # -- targets -------------------------------------------------------------------
    def targets(self) -> dict[str, Any]:
        """The targets as the kernel maps hold them (the stored set when none runs)."""

        def read() -> dict[str, Any]:
            for run in self._running.values():
                reader = getattr(run.monitor, "read_targets", None)
                if reader is not None and getattr(run.monitor, "bpf", None) is not None:
                    return dict(reader())
            return self._targets.as_dict()

        return self.call(read)

    def update_targets(self, kind: TargetKind, op: str, values: Any) -> dict[str, Any]:
        """``op``: replace, add or remove. Validation errors raise TargetError (422) and
        change nothing."""
        if kind not in KINDS:
            raise ValueError(kind)
        parsed = validate_values(kind, values)

        def apply() -> dict[str, Any]:
            current = self._targets.get(kind)
            new = {"replace": parsed, "add": current | parsed, "remove": current - parsed}[op]
            updated = self._targets.with_values(kind, frozenset(new))
            check_capacity(updated, self.limits)
            self._apply_targets(updated)
            return updated.as_dict()

        return self.call(apply)

    def set_follow_children(self, follow: bool) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            updated = dataclasses.replace(self._targets, follow_children=follow)
            self._apply_targets(updated)
            return updated.as_dict()

        return self.call(apply)

    def _apply_targets(self, updated: TargetSet) -> None:
        self._targets = updated
        for run in self._running.values():
            run.monitor.ctx.targets = updated
            run.monitor.set_targets(updated)

    # -- stats ---------------------------------------------------------------------
    def monitor_stats(self, name: str, **query: Any) -> dict[str, Any]:
        """Counters and the monitor's stats(); ``query`` is validated against the
        monitor's StatsQuery model (OptionsInvalid, 422) and only the fields it declares
        and the caller gave reach stats()."""
        cls = self.monitor_class(name)
        try:
            parsed = cls.StatsQuery.model_validate(query)
        except ValidationError as e:
            raise OptionsInvalid(f"invalid stats query for {name}", e.errors(),
                                 where="query") from None
        accepted = parsed.model_dump(exclude_unset=True)

        def read() -> dict[str, Any]:
            run = self._running.get(name)
            out = self._counters(name, run)
            if run is not None:
                out.update(run.monitor.stats(**accepted))
            return out

        return self.call(read)

    def _counters(self, name: str, run: Running | None) -> dict[str, Any]:
        if run is None:
            return {"name": name, "state": self._info(name)["state"]}
        kernel = run.monitor.kernel_counters()
        writer = run.sink.writer
        return {
            "name": name,
            "state": "failed" if run.poll_error else "running",
            "started_at": run.started_at,
            "uptime_s": round(time.monotonic() - run.started_mono, 3),
            "kernel": kernel,
            "events_seen_kernel": kernel.get("seen", 0),
            "events_dropped_kernel": kernel.get("dropped", 0),
            "events_delivered": run.sink.delivered,
            "events_dropped_userspace": writer.dropped if writer else 0,
            "events_per_second": round(run.rate, 1),
        }

    def stats(self) -> dict[str, Any]:
        def read() -> dict[str, Any]:
            return {name: self._counters(name, self._running.get(name)) for name in
                    self.registry.names()}

        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "agent": {
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - self._started, 3),
                "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
                "rss_bytes": _rss_bytes(),
            },
            "monitors": self.call(read),
        }

    def monitor_metrics(self) -> dict[str, list[MetricSeries]]:
        """The Prometheus series of every running monitor (control thread)."""

        def read() -> dict[str, list[MetricSeries]]:
            return {name: run.monitor.metric_series() for name, run in self._running.items()}

        return self.call(read)

    # -- lifecycle -----------------------------------------------------------------
    def shutdown(self, timeout: float = 30) -> None:
        """Stop every monitor (detaching every probe) and end the control thread."""
        if self._closed:
            return

        def stop_all() -> None:
            for name in list(self._running):
                try:
                    self._stop(name)
                except Exception:
                    log.exception("stopping %s failed", name)
            for run in self._stuck:
                if run.thread is not None:
                    run.thread.join(STOP_JOIN_S)
            self._reap_stuck()  # still alive: left to the exiting process, never freed

        try:
            self.call(stop_all, timeout=timeout)
        finally:
            self._closed = True
            self._commands.put(None)
            self._thread.join(timeout)


def _defaults(cls: type[BaseMonitor]) -> MonitorOptions | None:
    try:
        return cls.Options()
    except ValidationError:
        return None  # options with required fields (func: patterns) have no default


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
