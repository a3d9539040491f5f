"""The monitor manager: one control thread owns every BCC object.

Callers (the API's routes, the CLI) never touch BPF objects: they send a command
(agent/core/commands.py) and wait for its answer; the control thread runs each one in
``_dispatch``. The same thread runs the periodic work on a timer (``_tick``: delivery
rates, monitor.periodic(), snapshot reads for the CSV snapshots, leases that ran out,
late pollers), so it never stops under load.

Each running monitor has a poller thread that only drains its ring/perf buffer into
its sink (monitor.poll; agent/core/pipeline.py). Stopping asks the monitor to make a
poll in progress return (BaseMonitor.request_stop: bounded consume calls, production
quiesced), joins the poller, and frees the BPF object only once the poller is gone: a
poller that does not end in time keeps its object alive (``_stuck``) until it does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import resource
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast

from pydantic import ValidationError

from agent.config import OutputSettings, TargetSettings, TransportSettings
from agent.core.commands import (
    ApplyState,
    Command,
    DescribeMonitor,
    ListMonitors,
    ListRunning,
    ReadCounters,
    ReadMetricSeries,
    ReadState,
    ReadStats,
    ReadTargets,
    RenewLease,
    SetFollowChildren,
    SetTargets,
    Start,
    Stop,
    StopAll,
    TargetOp,
)
from agent.core.failures import (
    CommandTimeout,
    ManagerClosed,
    MonitorUnsupported,
    NotRunning,
    OptionsInvalid,
    PreconditionFailed,
    StateRejected,
    UnknownMonitor,
)
from agent.core.latency import LatencyHistogram
from agent.core.leases import Lease, LeaseBook, check_lease_s, iso
from agent.core.pipeline import MonitorSink, SinkFactory
from agent.core.state import etag_of, parse_state, state_changes, state_doc
from agent.kernel.capabilities import CapabilityReport
from agent.kernel.cgroups import (
    Cgroups,
    default_resolver,
    describe_cgroup_targets,
    with_cgroup_ids,
)
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
from agent.monitors.decoder import console_template
from agent.monitors.registry import MonitorRegistry

log = logging.getLogger(__name__)
R = TypeVar("R")
POLL_TIMEOUT_MS = 100
TICK_S = 0.25  # the control thread's timer: rates, periodic(), snapshots, leases, pollers
RATE_WINDOW_S = 1.0
STOP_JOIN_S = 2.0  # a poller returns within one bounded consume call once asked to stop
COMMAND_TIMEOUT_S = 120.0  # a caller gives up (503); a command not begun by then is skipped
# Above this many events/s the delivery latency histogram samples one event in
# LATENCY_SAMPLE_FAST (cost per observed event: bench/latency_histogram.py).
LATENCY_SAMPLE_ABOVE_RATE = 2000
LATENCY_SAMPLE_FAST = 16


class Reply(Protocol):
    """Where the control thread puts a command's answer (concurrent.futures.Future for
    blocking callers, AsyncReply for the event loop)."""

    def set_running_or_notify_cancel(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


class AsyncReply:
    """Completes an asyncio future from the control thread: the answer is handed to the
    loop with call_soon_threadsafe, so an awaiting route needs no pool thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()

    def set_running_or_notify_cancel(self) -> bool:
        return not self.future.cancelled()  # the caller gave up before it ran: skip it

    def set_result(self, result: Any) -> None:
        self._settle(result, None)

    def set_exception(self, exception: BaseException) -> None:
        self._settle(None, exception)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self.loop.call_soon_threadsafe(self._complete, result, error)

    def _complete(self, result: Any, error: BaseException | None) -> None:
        """On the event loop."""
        if self.future.done():  # cancelled meanwhile (timeout, client gone)
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


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


class MonitorManager:
    def __init__(
        self,
        registry: MonitorRegistry,
        report: CapabilityReport,
        targets: TargetSet | None = None,
        limits: TargetLimits | None = None,
        transport: TransportSettings | None = None,
        output: OutputSettings | None = None,
        sinks: SinkFactory | None = None,
        cgroups: Cgroups | None = None,
    ) -> None:
        """``sinks``: makes each started monitor's sink (agent/core/agent.py registers
        the consumers); None: events are counted and go nowhere. ``output``: the
        settings section (the snapshot interval); default: the sinks' writers' one.
        ``cgroups``: the cgroup v2 hierarchy cgroup targets are looked up in (default:
        the agent's resolver's). A target cgroup path that does not exist is a
        TargetError."""
        self.registry = registry
        self.report = report
        self.limits = limits or TargetSettings().limits()
        self.transport = transport or TransportSettings()
        self._sinks = sinks or SinkFactory()
        self.output = output or self._sinks.output or OutputSettings(formats=[])
        self.cgroups = cgroups if cgroups is not None else default_resolver().cgroups
        self._targets = targets or TargetSet()
        check_capacity(self._targets, self.limits)
        self._targets = with_cgroup_ids(self._targets, self._targets.cgroups, self.cgroups)
        self._running: dict[str, Running] = {}
        self._failed: dict[str, str] = {}
        self._last_options: dict[str, MonitorOptions] = {}
        # Per monitor name, kept across restarts so the Prometheus histogram never resets.
        self.latency: dict[str, LatencyHistogram] = {}
        self.leases = LeaseBook()
        # Told of each expiry (monitor name, lease_s, expiry time ISO 8601), on the control
        # thread; the API records it in its audit log.
        self.lease_expired_hook: Callable[[str, float, str], None] | None = None
        self._commands: queue.Queue[tuple[Command[Any], Reply] | None] = queue.Queue()
        # Stopped monitors whose poller did not end in time: freed once it has.
        self._stuck: list[Running] = []
        self._thread = threading.Thread(target=self._control_loop, name="bpf-control", daemon=True)
        self._started = time.monotonic()
        self._closed = False
        self._thread.start()

    # -- sending commands (any thread) ---------------------------------------------------
    def _send(self, command: Command[Any], reply: Reply) -> None:
        if self._closed:
            reply.set_exception(ManagerClosed())
        else:
            self._commands.put((command, reply))

    def execute(self, command: Command[R], timeout: float | None = COMMAND_TIMEOUT_S) -> R:
        """Runs ``command`` on the control thread and waits (not on the event loop)."""
        reply: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._send(command, reply)
        try:
            return cast(R, reply.result(timeout))
        except concurrent.futures.TimeoutError:
            reply.cancel()
            raise CommandTimeout() from None

    async def execute_async(self, command: Command[R],
                            timeout: float | None = COMMAND_TIMEOUT_S) -> R:
        """The same, awaited on the event loop: no pool thread waits for the answer."""
        reply = AsyncReply(asyncio.get_running_loop())
        self._send(command, reply)
        try:
            return cast(R, await asyncio.wait_for(reply.future, timeout))
        except TimeoutError:
            raise CommandTimeout() from None

    # -- the control thread --------------------------------------------------------
    def _control_loop(self) -> None:
        next_tick = time.monotonic() + TICK_S
        while True:
            try:
                item = self._commands.get(timeout=max(0.0, next_tick - time.monotonic()))
                received = True
            except queue.Empty:
                item, received = None, False
            if time.monotonic() >= next_tick:
                self._tick()
                next_tick = time.monotonic() + TICK_S
            if not received:
                continue
            if item is None:  # shutdown() ends the thread
                return
            command, reply = item
            if not reply.set_running_or_notify_cancel():
                continue
            try:
                result = self._dispatch(command)
            except BaseException as e:
                reply.set_exception(e)
            else:
                reply.set_result(result)

    def _dispatch(self, command: Command[Any]) -> Any:
        """Every command, in one place (control thread)."""
        match command:
            case ListMonitors():
                return [self._lease_info(c.name) for c in self.registry]
            case DescribeMonitor(name):
                self.monitor_class(name)
                return self._lease_info(name)
            case ListRunning():
                return sorted(self._running)
            case Start(name, options, lease_s):
                return self._start_leased(name, options, lease_s)
            case Stop(name):
                self.monitor_class(name)
                self._stop(name)
                return self._lease_info(name)
            case StopAll():
                return self._stop_all()
            case RenewLease(name, lease_s):
                return self._renew_lease(name, lease_s)
            case ReadTargets():
                return self._read_targets()
            case SetTargets(kind, op, values):
                return self._set_targets(kind, op, values)
            case SetFollowChildren(follow):
                updated = dataclasses.replace(self._targets, follow_children=follow)
                self._apply_targets(updated)
                return updated.as_dict()
            case ReadStats(name, query):
                return self._read_stats(name, query)
            case ReadCounters():
                return {name: self._counters(name, self._running.get(name))
                        for name in self.registry.names()}
            case ReadMetricSeries():
                return {name: run.monitor.metric_series()
                        for name, run in self._running.items()}
            case ReadState():
                doc = self._state_doc()
                return doc, etag_of(doc)
            case ApplyState(monitors, targets, if_match, dry_run):
                return self._put_state(monitors, targets, if_match, dry_run)
        raise TypeError(f"unknown command {command!r}")

    def _tick(self) -> None:
        """Periodic work (control thread): it reads BCC tables, so it runs here and not
        on the pollers, which may spend seconds inside one poll under a flood."""
        now = time.monotonic()
        for run in list(self._running.values()):
            try:
                self._periodic(run, now)
            except Exception:
                log.exception("monitor %s: periodic work failed", run.monitor.name)
        for name, lease in self.leases.due(now, self._running):
            self._expire(name, lease)
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
        if run.sink.wants_snapshots and (
            now - run.last_snapshot >= self.output.snapshot_interval_s
        ):
            run.sink.offer_snapshot(run.monitor.snapshot_rows())
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

    # -- checking input (any thread, before a command is built) --------------------
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

    def parse_stats_query(self, name: str, query: Mapping[str, Any]) -> dict[str, Any]:
        """``query`` validated against the monitor's StatsQuery model (OptionsInvalid,
        422): only the fields it declares and the caller gave reach stats()."""
        cls = self.monitor_class(name)
        try:
            parsed = cls.StatsQuery.model_validate(dict(query))
        except ValidationError as e:
            raise OptionsInvalid(f"invalid stats query for {name}", e.errors(),
                                 where="query") from None
        return parsed.model_dump(exclude_unset=True)

    def parse_state(self, desired: Any) -> tuple[dict[str, MonitorOptions], TargetSet | None]:
        """A state document checked (ValueError, UnknownMonitor, OptionsInvalid,
        TargetError): nothing changes before it passes."""
        monitors, targets = parse_state(desired, self.parse_options, self.limits)
        if targets is not None:
            targets = with_cgroup_ids(targets, targets.cgroups, self.cgroups)
        return monitors, targets

    # -- blocking shorthands (CLI, tests, the metrics scrape) ------------------------
    def start_monitor(self, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.execute(Start(name, self.parse_options(name, options)))

    def stop_monitor(self, name: str) -> dict[str, Any]:
        return self.execute(Stop(name))

    def monitors(self) -> list[dict[str, Any]]:
        return self.execute(ListMonitors())

    def monitor_info(self, name: str) -> dict[str, Any]:
        return self.execute(DescribeMonitor(name))

    def running(self) -> list[str]:
        return self.execute(ListRunning())

    def targets(self) -> dict[str, Any]:
        return self.execute(ReadTargets())

    def update_targets(self, kind: TargetKind, op: TargetOp, values: Any) -> dict[str, Any]:
        """Validation errors raise TargetError (422) and change nothing."""
        return self.execute(target_command(kind, op, values))

    def monitor_stats(self, name: str, **query: Any) -> dict[str, Any]:
        return self.execute(ReadStats(name, self.parse_stats_query(name, query)))

    def stats(self) -> dict[str, Any]:
        return {"agent": process_figures(self._started), "monitors": self.execute(ReadCounters())}

    def monitor_metrics(self) -> dict[str, list[MetricSeries]]:
        return self.execute(ReadMetricSeries())

    @property
    def leases_expired(self) -> Mapping[str, int]:
        """Expired leases per monitor since start (a Prometheus counter)."""
        return self.leases.expired

    @property
    def started(self) -> float:
        return self._started

    # -- monitors (control thread) ---------------------------------------------------
    def _unsupported_reason(self, cls: type[BaseMonitor], options: MonitorOptions) -> str | None:
        return self.report.support_reason(cls) or cls.option_errors(options, self.report)

    def _start(self, name: str, options: MonitorOptions) -> None:
        cls = self.monitor_class(name)
        current = self._running.get(name)
        if current is not None:
            if current.options == options:
                return
            if current.monitor.apply_options(options):
                current.options = options  # changed in place: no reload, no gap
                return
        # Everything that can refuse the options runs before a running monitor is
        # touched: a refused change leaves it running as it was.
        reason = self._unsupported_reason(cls, options)
        if reason:
            raise MonitorUnsupported(f"{name} cannot run on this kernel: {reason}")
        sink = self._sinks.make(self.latency.setdefault(name, LatencyHistogram()))
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
        try:
            self._sinks.connect(sink, name, monitor)
        except OSError as e:
            raise MonitorUnsupported(f"{name}: output: {e}") from None
        try:
            monitor.load()
        except BaseException as e:
            # load() leaves nothing loaded on failure; close() again costs nothing and
            # covers a monitor that does not.
            monitor.close()
            sink.close()
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

    def _check_output(self, name: str) -> None:
        """Output paths that would fail: OutputPathError (422) or MonitorUnsupported."""
        try:
            self._sinks.check(name)
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

    def _stop(self, name: str) -> None:
        run = self._running.pop(name, None)
        if run is None:
            return
        run.stop.set()
        run.monitor.request_stop()
        if run.thread is not None:
            run.thread.join(timeout=STOP_JOIN_S)
        if run.sink.wants_snapshots:
            run.sink.offer_snapshot(run.monitor.snapshot_rows())  # the final totals
        if run.thread is not None and run.thread.is_alive():
            # Freeing the BPF object under a poller inside libbpf crashes the
            # process: keep it until the poller has returned (_reap_stuck).
            log.error("monitor %s: the poller did not return within %.0f s; its BPF "
                      "object is freed once it does", name, STOP_JOIN_S)
            self._stuck.append(run)
        else:
            run.monitor.close()
        run.sink.close()
        if run.poll_error:
            self._failed[name] = run.poll_error
        log.info("monitor %s stopped", name)

    def _stop_all(self) -> None:
        for name in list(self._running):
            try:
                self._stop(name)
            except Exception:
                log.exception("stopping %s failed", name)
        for run in self._stuck:
            if run.thread is not None:
                run.thread.join(STOP_JOIN_S)
        self._reap_stuck()  # still alive: left to the exiting process, never freed

    def _info(self, name: str) -> dict[str, Any]:
        cls = self.monitor_class(name)
        run = self._running.get(name)
        info: dict[str, Any] = {"name": name, "description": cls.description}
        if cls.EVENT is not None:
            info["summary"] = console_template(cls.EVENT)
        options = run.options if run else self._last_options.get(name) or _defaults(cls)
        info["options"] = options.model_dump(mode="json") if options else {}
        static_reason = self.report.support_reason(cls)
        if run is not None:
            info["state"] = "failed" if run.poll_error else "running"
            if run.poll_error:
                info["reason"] = run.poll_error
            status = run.monitor.status()
            if status:
                info["status"] = status
        elif static_reason:
            info["state"], info["reason"] = "unsupported", static_reason
        elif name in self._failed:
            info["state"], info["reason"] = "failed", self._failed[name]
        else:
            info["state"] = "stopped"
        return info

    # -- leases (control thread) ---------------------------------------------------
    def _lease_info(self, name: str) -> dict[str, Any]:
        """_info plus the lease, or why a stopped monitor stopped by itself."""
        info = self._info(name)
        lease = self.leases.current(name, self._running.get(name))
        note = self.leases.note(name)
        if lease is not None:
            info["lease"] = lease.as_dict()
        elif info.get("state") == "stopped" and note:
            info["reason"] = note
        return info

    def _start_leased(self, name: str, options: MonitorOptions,
                      lease_s: float | None) -> dict[str, Any]:
        if lease_s is not None:
            lease_s = check_lease_s(lease_s)
        previous = self.leases.current(name, self._running.get(name))
        self._start(name, options)
        self.leases.forget_note(name)
        run = self._running.get(name)
        if run is not None and lease_s is not None:
            self.leases.grant(name, run, lease_s)
        elif run is not None and previous is not None:
            self.leases.carry_over({name: previous}, self._running)  # a reload keeps it
        return self._lease_info(name)

    def _renew_lease(self, name: str, lease_s: float | None) -> dict[str, Any]:
        self.monitor_class(name)
        if lease_s is not None:
            lease_s = check_lease_s(lease_s)
        run = self._running.get(name)
        if run is None:
            raise NotRunning(f"{name} is not running: nothing to renew")
        if lease_s is None:
            self.leases.revoke(name)
        else:
            self.leases.grant(name, run, lease_s)
        return self._lease_info(name)

    def _expire(self, name: str, lease: Lease) -> None:
        expired_at = iso(lease.expires_at)
        log.warning("lease of monitor %s expired (%.0f s without renewal, at %s): stopping",
                    name, lease.lease_s, expired_at)
        try:
            self._stop(name)
        except Exception:
            log.exception("stopping %s after its lease expired failed", name)
        if self.lease_expired_hook is not None:
            try:
                self.lease_expired_hook(name, lease.lease_s, expired_at)
            except Exception:
                log.exception("recording the expired lease of %s failed", name)

    # -- targets (control thread) -------------------------------------------------
    def _read_targets(self) -> dict[str, Any]:
        """As the kernel maps hold them (the stored set when none runs), with each
        cgroup's id and whether it still exists, and the cgroups each container prefix
        matches now."""
        for run in self._running.values():
            reader = getattr(run.monitor, "read_targets", None)
            if reader is not None and getattr(run.monitor, "bpf", None) is not None:
                ids = getattr(run.monitor, "container_cgroup_ids", None)
                return describe_cgroup_targets(dict(reader()), self._targets, self.cgroups,
                                               ids() if ids is not None else None)
        return describe_cgroup_targets(self._targets.as_dict(), self._targets, self.cgroups,
                                       None)

    def _set_targets(self, kind: TargetKind, op: TargetOp,
                     values: frozenset[int | str]) -> dict[str, Any]:
        current = self._targets.get(kind)
        new = {"replace": values, "add": current | values, "remove": current - values}[op]
        updated = self._targets.with_values(kind, frozenset(new))
        check_capacity(updated, self.limits)
        if kind == "cgroups":  # the paths asked for get their id now: 422 when missing
            fresh = {str(v) for v in values} if op != "remove" else set()
            updated = with_cgroup_ids(updated, fresh, self.cgroups)
        self._apply_targets(updated)
        return updated.as_dict()

    def _apply_targets(self, updated: TargetSet) -> None:
        self._targets = updated
        for run in self._running.values():
            run.monitor.ctx.targets = updated
            run.monitor.set_targets(updated)

    # -- stats (control thread) ---------------------------------------------------
    def _read_stats(self, name: str, query: Mapping[str, Any]) -> dict[str, Any]:
        self.monitor_class(name)
        run = self._running.get(name)
        out = self._counters(name, run)
        if run is not None:
            out.update(run.monitor.stats(**query))
        return out

    def _counters(self, name: str, run: Running | None) -> dict[str, Any]:
        if run is None:
            return {"name": name, "state": self._info(name)["state"]}
        kernel = run.monitor.kernel_counters()
        return {
            "name": name,
            "state": "failed" if run.poll_error else "running",
            "started_at": run.started_at,
            "uptime_s": round(time.monotonic() - run.started_mono, 3),
            "kernel": kernel,
            "events_seen_kernel": kernel.get("seen", 0),
            "events_dropped_kernel": kernel.get("dropped", 0),
            "events_delivered": run.sink.delivered,
            "events_dropped_userspace": run.sink.dropped,
            "events_per_second": round(run.rate, 1),
        }

    # -- desired state (control thread) --------------------------------------------
    def _state_doc(self) -> dict[str, Any]:
        return state_doc({name: run.options for name, run in self._running.items()},
                         self._targets)

    def _put_state(self, monitors: Mapping[str, MonitorOptions], targets: TargetSet | None,
                   if_match: str | None, dry_run: bool
                   ) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
        """The new document, its ETag and the changes made (with ``dry_run``: that
        would be). A failed start rolls every change back (StateRejected); a stale
        ``if_match`` is PreconditionFailed."""
        current = self._state_doc()
        etag = etag_of(current)
        if if_match is not None and if_match.strip() != "*" and \
                etag not in [t.strip() for t in if_match.split(",")]:
            raise PreconditionFailed(etag)
        running = {name: run.options for name, run in self._running.items()}
        changes = state_changes(running, self._targets, monitors, targets)
        if dry_run or not changes:
            return current, etag, changes
        self._apply_state(monitors, targets)
        doc = self._state_doc()
        return doc, etag_of(doc), changes

    def _apply_state(self, monitors: Mapping[str, MonitorOptions],
                     targets: TargetSet | None) -> None:
        """Undo log: every step records how to reverse it, as (method, argument)."""
        old_targets = self._targets
        old_options = {name: run.options for name, run in self._running.items()}
        old_leases = self.leases.held(self._running)
        undo: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        failed: str | None = None
        try:
            if targets is not None and targets != old_targets:
                self._apply_targets(targets)
                undo.append((self._apply_targets, (old_targets,)))
            for name in sorted(set(self._running) - set(monitors)):
                failed = name
                undo.append((self._start, (name, old_options[name])))
                self._stop(name)
            for name, options in sorted(monitors.items()):
                failed = name
                if name in old_options and old_options[name] == options:
                    continue
                # The undo step goes first: a reload stops the old run before the new
                # one can fail.
                if name in old_options:
                    undo.append((self._start, (name, old_options[name])))
                else:
                    undo.append((self._stop, (name,)))
                self._start(name, options)
        except Exception as e:
            for method, args in reversed(undo):
                try:
                    method(*args)
                except Exception:
                    log.exception("rolling back the state failed at one step")
            self.leases.carry_over(old_leases, self._running)
            raise StateRejected(f"{failed}: {e}; every change was rolled back", failed,
                                True) from e
        self.leases.carry_over(old_leases, self._running)  # a reload keeps its lease

    # -- lifecycle -----------------------------------------------------------------
    def shutdown(self, timeout: float = 30) -> None:
        """Stop every monitor (detaching every probe) and end the control thread."""
        if self._closed:
            return
        try:
            self.execute(StopAll(), timeout=timeout)
        finally:
            self._closed = True
            self._commands.put(None)
            self._thread.join(timeout)


def target_command(kind: TargetKind, op: TargetOp, values: Any) -> SetTargets:
    """``values`` checked (TargetError, 422) into a command; ``op``: replace, add or
    remove."""
    if kind not in KINDS:
        raise ValueError(kind)
    return SetTargets(kind, op, validate_values(kind, values))


def process_figures(started: float) -> dict[str, Any]:
    """The agent process: pid, uptime, CPU, RSS (any thread)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 3),
        "cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        "rss_bytes": _rss_bytes(),
    }


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
