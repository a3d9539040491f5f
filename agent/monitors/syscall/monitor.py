"""SyscallMonitor: per-syscall counts, errors, errnos and latency, aggregated in the kernel.

The kernel side (agent/monitors/syscall/syscall.c) is raw tracepoints on sys_enter and sys_exit and
keeps per-CPU tables; nothing crosses to userspace per call except, when
``slow_threshold_us`` is set, the calls slower than it. Userspace reads the tables with
BPF_MAP_LOOKUP_BATCH (a few bpf(2) calls per table).

Two modes (option ``latency``):
- ``latency=True`` (default): a program at sys_enter stamps each call of a target and one
  at sys_exit counts it with its latency (total/min/max, log2 histogram).
- ``latency=False``: only a program at sys_exit, a fraction of the cost per syscall
  (bench/RESULTS.md, "overhead (syscall monitor)"): counts, errors and errnos, filtered
  at exit; ``total_ns``, ``min_ns``, ``max_ns`` and
  ``histogram`` are None, ``sort="time"`` and ``slow_threshold_us`` are refused.
  exit(2) and exit_group(2) are not counted (they never reach sys_exit; syscall.c says
  why no other hook is used). Counted differently from the latency mode: calls in
  flight when counting starts, and calls denied before sys_enter (seccomp
  SECCOMP_RET_ERRNO, ptrace) with their errno, are counted; after an execve(2) the new
  comm decides a comm filter.

Windows: the kernel tables exist in two generations. The kernel writes the one named in
``sc_config.gen``; ``stats(reset=True)`` switches generation, waits for programs that
read the old value to finish (they run with preemption disabled and take microseconds),
reads the old generation, which nothing writes any more, and clears it. So a reset loses
no call and counts none twice.

What is counted (decisions, see agent/monitors/syscall/syscall.c for the kernel facts):
- a call counts at sys_exit, with its return value and latency, when its sys_enter was
  seen for a target task; calls in flight when the monitor loads are not counted, nor
  calls a seccomp filter or ptrace denied before sys_enter (latency mode; see above for
  ``latency=False``);
- exit(2) and exit_group(2) never return: counted at sys_enter, without latency (their
  ``min_ns``/``max_ns`` are None, ``total_ns`` 0); not at all with ``latency=False``;
- a successful execve(2) returns in the new program and counts with the whole exec as
  its latency;
- an error is a return value in [-4095, -1]; ``errnos`` maps names (errno_name()) to
  counts, including kernel-internal restart codes (ERESTARTSYS...) that sys_exit sees
  before the kernel restarts an interrupted call;
- numbers are this machine's native ones: a 32-bit (ia32 compat) process's calls use the
  i386 numbering and are reported under the native names of those numbers;
- per-process entries last for the window, dead processes included: with per_process on
  a busy host, end windows regularly (reset) or raise max_process_entries.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from agent.kernel.btf import BTFError, pt_regs_nr_offset
from agent.kernel.maps import (
    delete_keys,
    lookup_batch,
    lookup_batch_raw,
    sum_columns,
    zero_array_range,
)
from agent.kernel.syscalls import category, errno_name, syscall_name, syscall_names
from agent.model.event_decl import Decode, EventDecl, EventField, Member
from agent.model.events import decode_c_string
from agent.monitors.bcc import BccMonitor
from agent.monitors.contract import (
    MetricSeries,
    MonitorContext,
    MonitorError,
    MonitorOptions,
    MonitorStatsQuery,
)
from agent.monitors.registry import register_monitor

log = logging.getLogger(__name__)

# Mirrors of agent/monitors/syscall/syscall.h (tests/monitors/test_syscall.py checks them with gcc).
SC_COMM_LEN = 16
SC_HIST_SLOTS = 32
SC_GENERATIONS = 2
SC_CFG_ARMED = 1
SC_CFG_SLOW = 2
SC_COUNTERS = (  # SC_CNT_* order
    "process_overflow", "errno_overflow", "nr_out_of_range", "nr_cleared",
)

# How long a generation switch waits for programs still writing the old generation.
GENERATION_SETTLE_S = 0.005
SORT_KEYS = {"count": "count", "time": "total_ns"}
HISTOGRAM_DOC = (
    "slot i counts calls with latency in [2^i, 2^(i+1)) ns; slot 0 includes 0 ns, "
    f"slot {SC_HIST_SLOTS - 1} has no upper bound"
)


SLOW_THRESHOLD_US_MAX = (2**64 - 1) // 1000  # the largest threshold slow_ns can hold


class ScConfig(ctypes.Structure):
    _fields_ = [
        ("slow_ns", ctypes.c_uint64),
        ("gen", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


# A call slower than slow_threshold_us: struct syscall_event of syscall.h.
SYSCALL_EVENT = EventDecl(
    struct="syscall_event", header="syscall.h",
    doc="A call slower than slow_threshold_us (comm: at sys_exit).",
    members=(
        Member("latency_ns", "u64"),
        Member("ret", "s64"),
        Member("nr", "u32"),
        Member("_pad", "u32"),
    ),
    fields=(
        EventField("syscall", "string", "the native name of nr on this machine",
                   Decode.LOOKUP, source="nr"),
        EventField("nr", "integer", "the syscall number"),
        EventField("category", "string", "file, network, process, memory... (agent/kernel)",
                   Decode.LOOKUP, source="nr"),
        EventField("latency_ns", "integer", "from sys_enter to sys_exit"),
        EventField("ret", "integer", "the raw return value: -errno on failure"),
    ),
    console="pid={pid} tid={tid} comm={comm} {syscall} = {ret:errno} {latency_ns:us}us",
)
SyscallEvent = SYSCALL_EVENT.ctypes_struct(name="SyscallEvent")


class ByNumber(dict[int, str]):
    """A LOOKUP table filled on first use: a name per syscall number (any number,
    those outside the table too)."""

    def __init__(self, name_of: Callable[[int], str]) -> None:
        super().__init__()
        self._name_of = name_of

    def __missing__(self, nr: int) -> str:
        value = self[nr] = self._name_of(nr)
        return value


class SyscallOptions(MonitorOptions):
    latency: bool = Field(
        True,
        description="measure latency (a program at sys_enter too); false: counts, errors "
        "and errnos at sys_exit only, at about a quarter of the cost per syscall; "
        "exit/exit_group are then not counted",
    )
    per_process: bool = Field(False, description="also aggregate per (process, syscall)")
    slow_threshold_us: int | None = Field(
        None,
        ge=0,
        le=SLOW_THRESHOLD_US_MAX,  # the kernel compares in ns, a u64 (sc_config.slow_ns)
        description="stream calls slower than this as events; None: off, 0: every call",
    )
    histogram: bool = Field(
        True, description="keep a log2 latency histogram per syscall (with latency only)"
    )
    max_process_entries: int = Field(
        16384,
        ge=64,
        le=1 << 20,
        description="(process, syscall) pairs the per-process table holds; more are counted "
        "in process_overflow and still counted per syscall",
    )
    max_threads: int = Field(
        32768,
        ge=64,
        le=1 << 22,
        description="threads whose call start times the kernel keeps (live, targeted threads)",
    )

    @model_validator(mode="after")
    def _slow_needs_latency(self) -> SyscallOptions:
        if self.slow_threshold_us is not None and not self.latency:
            raise ValueError("slow_threshold_us needs latency=true")
        return self


class SyscallStatsQuery(MonitorStatsQuery):
    sort: Literal["count", "time"] = Field(
        "count", description="order rows by call count or by total latency (latency only)")
    limit: int | None = Field(None, ge=0, description="the first N rows of each list")
    reset: bool = Field(False, description="end the window: return it and start a new one")


# -- aggregation ---------------------------------------------------------------------


def merge_stat(per_cpu: Iterable[Any]) -> dict[str, Any]:
    """Sum the per-CPU copies of one ``struct sc_stat``; min over the CPUs that have one."""
    count = errors = total = max_ns = 0
    mins = []
    for s in per_cpu:
        count += s.count
        errors += s.errors
        total += s.total_ns
        max_ns = max(max_ns, s.max_ns)
        if s.min_ns:
            mins.append(s.min_ns)
    return {
        "count": count,
        "errors": errors,
        "total_ns": total,
        "min_ns": min(mins) if mins else None,
        "max_ns": max_ns if mins else None,
    }


def syscall_entry(nr: int, stat: dict[str, Any]) -> dict[str, Any]:
    name = syscall_name(nr)
    return {"name": name, "nr": nr, "category": category(name), **stat}


def without_latency(stat: dict[str, Any]) -> dict[str, Any]:
    """A row of the latency=False mode: its latency fields are None, not 0."""
    for f in ("total_ns", "min_ns", "max_ns"):
        if f in stat:
            stat[f] = None
    return stat


def sort_limit(rows: list[dict], sort: str, limit: int | None) -> list[dict]:
    field = SORT_KEYS[sort]
    rows.sort(key=lambda r: (-r[field], r["nr"] if "nr" in r else r["pid"]))
    return rows if limit is None else rows[:limit]


def window_max_syscalls(names: dict[int, str]) -> int:
    """Table size per generation: a power of two above the highest syscall number."""
    return 1 << max(names).bit_length()


@register_monitor("syscall", "system calls: counts, errors, errnos and latency per syscall")
class SyscallMonitor(BccMonitor[SyscallOptions]):
    """System calls aggregated in the kernel; slow calls as events."""

    Options = SyscallOptions
    StatsQuery = SyscallStatsQuery
    EVENT = SYSCALL_EVENT
    BPF_SOURCE = "syscall.c"
    REQUIRED_TRACEPOINTS = (
        "raw_syscalls:sys_enter",
        "raw_syscalls:sys_exit",
    )
    # Columns of snapshot_rows(), for the output layer's periodic CSV.
    SNAPSHOT_FIELDS: ClassVar[tuple[str, ...]] = (
        "timestamp", "name", "nr", "category", "count", "errors", "total_ns", "min_ns",
        "max_ns",
    )


    @classmethod
    def option_errors(cls, options: MonitorOptions, report: Any) -> str | None:
        if getattr(options, "latency", True):
            return None
        try:
            pt_regs_nr_offset()
        except BTFError as e:
            return f"latency=false reads the syscall number from pt_regs: {e}; use latency=true"
        return None

    def __init__(self, options: SyscallOptions, ctx: MonitorContext) -> None:
        super().__init__(options, ctx)
        self._gen = 0
        self._window_start = time.monotonic()

    # -- kernel side -------------------------------------------------------------------
    @cached_property
    def _names(self) -> dict[int, str]:
        names = syscall_names()
        if not names:
            raise MonitorError(f"syscall: no syscall table for machine {os.uname().machine}")
        return names

    @cached_property
    def max_syscalls(self) -> int:
        return window_max_syscalls(self._names)

    def _nr(self, name: str) -> int:
        for nr, n in self._names.items():
            if n == name:
                return nr
        raise MonitorError(f"syscall: {name} is missing from the syscall table")

    def extra_cflags(self) -> dict[str, int | str]:
        o = self.options
        flags: dict[str, int | str] = {
            "MAX_SYSCALLS": self.max_syscalls,
            "MAX_THREADS": o.max_threads,
            "MAX_PROC_ENTRIES": o.max_process_entries,
            "NR_EXIT": self._nr("exit"),
            "NR_EXIT_GROUP": self._nr("exit_group"),
        }
        if o.latency:
            flags["WITH_LATENCY"] = 1
            if self._task_storage:
                flags["SC_TASK_STORAGE"] = 1
            if o.histogram:
                flags["WITH_HISTOGRAM"] = 1
        else:
            flags["OFF_PT_REGS_SYSCALL_NR"] = pt_regs_nr_offset()
        if o.per_process:
            flags["PER_PROCESS"] = 1
        return flags

    @property
    def _histogram(self) -> bool:
        return self.options.latency and self.options.histogram

    def attach(self) -> None:
        # The RAW_TRACEPOINT_PROBE and TRACEPOINT_PROBE programs attached themselves.
        if self.options.latency and not self._task_storage:
            # A second program on sched_process_exit frees the exiting thread's start slot.
            self.bpf.attach_tracepoint(tp="sched:sched_process_exit", fn_name="sc_task_exit")

    # Task-local storage for the in-flight start time (syscall.c); a kernel or BCC that
    # refuses it gets the tid-keyed hash map instead, at the cost of one more compile.
    _task_storage = True

    def load(self) -> None:
        try:
            super().load()
        except MonitorError as e:
            if not (self.options.latency and self._task_storage):
                raise
            log.info("syscall: task storage unavailable (%s): using a hash map", e)
            self._task_storage = False
            super().load()
        try:
            self._window_start = time.monotonic()
            self._write_config(armed=True)  # counting starts: the targets are in place
        except Exception as e:
            self.close()
            raise MonitorError(f"{self.name}: writing the configuration failed: {e}") from e

    def _write_config(self, armed: bool = True) -> None:
        threshold = self.options.slow_threshold_us
        cfg = ScConfig(
            slow_ns=0 if threshold is None else threshold * 1000,
            gen=self._gen,
            flags=(SC_CFG_ARMED if armed else 0) | (0 if threshold is None else SC_CFG_SLOW),
        )
        self.bpf[b"sc_config"][ctypes.c_int(0)] = cfg

    def apply_options(self, options: MonitorOptions) -> bool:
        """The slow-call threshold lives in a map: it changes without recompiling."""
        if not isinstance(options, SyscallOptions) or self.bpf is None:
            return False
        rest = {"slow_threshold_us"}
        if options.model_dump(exclude=rest) != self.options.model_dump(exclude=rest):
            return False
        self.set_slow_threshold_us(options.slow_threshold_us)
        return True

    def set_slow_threshold_us(self, threshold_us: int | None) -> None:
        """Change the slow-call threshold of the running programs (None: off)."""
        self.options = SyscallOptions.model_validate(
            {**self.options.model_dump(), "slow_threshold_us": threshold_us}
        )
        if self.bpf is not None:
            self._write_config()

    # -- events ------------------------------------------------------------------------
    def decode_tables(self) -> dict[str, Mapping[Any, Any]]:
        """Names by number, looked up once per number: this runs for every event."""
        return {"syscall": ByNumber(syscall_name),
                "category": ByNumber(lambda nr: category(syscall_name(nr)))}

    # -- tables --------------------------------------------------------------------------
    def _read_syscalls(self, gen: int, histogram: bool) -> dict[int, dict[str, Any]]:
        n = self.max_syscalls
        first = gen * n
        rows: dict[int, dict[str, Any]] = {}
        latency = self.options.latency
        for key, per_cpu in lookup_batch(self.bpf[b"sc_stats"], first - 1 if gen else None, n):
            stat = merge_stat(per_cpu)
            if stat["count"]:
                rows[key - first] = stat if latency else without_latency(stat)
        for row in rows.values():
            row["errnos"] = {}
            row["histogram"] = [] if latency else None
        self._add_errnos(gen, rows)
        if histogram and self._histogram:
            self._add_histograms(gen, rows)
        return rows

    def _add_errnos(self, gen: int, rows: dict[int, dict[str, Any]]) -> None:
        for key, per_cpu in lookup_batch(self.bpf[b"sc_errnos"]):
            if key.gen == gen and key.nr in rows:
                errnos = rows[key.nr]["errnos"]
                name = errno_name(key.err)
                errnos[name] = errnos.get(name, 0) + sum(per_cpu)

    def _add_histograms(self, gen: int, rows: dict[int, dict[str, Any]]) -> None:
        table = self.bpf[b"sc_hist"]
        width = self.max_syscalls * SC_HIST_SLOTS
        first = gen * width
        _keys, values, total = lookup_batch_raw(table, first - 1 if gen else None, width)
        flat = array("Q", bytes(values)[: total * ctypes.sizeof(table.Leaf)])
        sums = sum_columns(flat, total)
        for nr, row in rows.items():
            row["histogram"] = sums[nr * SC_HIST_SLOTS : (nr + 1) * SC_HIST_SLOTS]

    def _read_processes(self, gen: int) -> list[dict[str, Any]]:
        procs: dict[int, dict[str, Any]] = {}
        per_pid: defaultdict[int, list[dict[str, Any]]] = defaultdict(list)
        for key, per_cpu in lookup_batch(self.bpf[b"sc_procs"]):
            if key.gen != gen:
                continue
            comm = next((c for c in (decode_c_string(p.comm) for p in per_cpu) if c), "")
            stat = {
                "count": sum(p.count for p in per_cpu),
                "errors": sum(p.errors for p in per_cpu),
                "total_ns": sum(p.total_ns for p in per_cpu),
                "max_ns": max(p.max_ns for p in per_cpu),
            }
            proc = procs.setdefault(
                key.tgid, {"pid": key.tgid, "comm": comm, "count": 0, "errors": 0, "total_ns": 0}
            )
            proc["comm"] = proc["comm"] or comm
            for f in ("count", "errors", "total_ns"):
                proc[f] += stat[f]
            if not self.options.latency:
                without_latency(stat)
            per_pid[key.tgid].append(syscall_entry(key.nr, stat))
        for pid, proc in procs.items():
            proc["syscalls"] = per_pid[pid]
            if not self.options.latency:
                without_latency(proc)
        return list(procs.values())

    def _clear_generation(self, gen: int) -> None:
        n = self.max_syscalls
        zero_array_range(self.bpf[b"sc_stats"], gen * n, n)
        if self._histogram:
            width = n * SC_HIST_SLOTS
            zero_array_range(self.bpf[b"sc_hist"], gen * width, width)
        for name in ("sc_errnos", "sc_procs") if self.options.per_process else ("sc_errnos",):
            table = self.bpf[name]
            delete_keys(table, [k for k, _ in lookup_batch(table) if k.gen == gen])

    def _switch_generation(self) -> tuple[int, float]:
        """Start a new window; returns the old generation and the old window's length."""
        old, now = self._gen, time.monotonic()
        self._gen ^= 1
        self._write_config()
        interval = now - self._window_start
        self._window_start = now
        # Programs that read the old generation before the switch finish within
        # microseconds: they run with preemption disabled. (On PREEMPT_RT they only
        # have migration disabled; a call preempted across the switch may then land in
        # the generation being cleared and be lost.)
        time.sleep(GENERATION_SETTLE_S)
        return old, interval

    def _window(self, reset: bool, details: bool = True) -> tuple[dict, list, float]:
        """Per-syscall rows, per-process rows and the window's length in seconds;
        ``details``: with histograms and processes. Control thread only (stats, metric
        series and snapshots all run there), so a reset never interleaves a read."""
        if reset:
            gen, interval = self._switch_generation()
        else:
            gen, interval = self._gen, time.monotonic() - self._window_start
        rows = self._read_syscalls(gen, histogram=details)
        per_process = details and self.options.per_process
        procs = self._read_processes(gen) if per_process else []
        if reset:
            self._clear_generation(gen)
        return rows, procs, interval

    # -- results -------------------------------------------------------------------------
    def stats(self, sort: str = "count", limit: int | None = None, reset: bool = False) -> dict:
        """The current window per syscall (and per process), sorted by ``sort``.

        ``sort``: "count" or "time" (total latency; not with latency=False); ``limit``:
        the first N rows of each list; ``reset``: end the window (its figures are
        returned) and start a new one.
        """
        if sort not in SORT_KEYS:
            raise ValueError(f"sort must be one of {sorted(SORT_KEYS)}, not {sort!r}")
        if sort == "time" and not self.options.latency:
            raise ValueError('sort="time" needs latency: this monitor runs with latency=false')
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        if self.bpf is None:
            return {"syscalls": [], "interval_s": 0.0}
        rows, procs, interval = self._window(reset)
        out: dict[str, Any] = {
            "interval_s": round(interval, 6),
            "syscalls": sort_limit(
                [syscall_entry(nr, stat) for nr, stat in rows.items()], sort, limit
            ),
            "histogram_buckets": HISTOGRAM_DOC if self._histogram else None,
        }
        if self.options.per_process:
            for proc in procs:
                proc["syscalls"] = sort_limit(proc["syscalls"], sort, limit)
            out["processes"] = sort_limit(procs, sort, limit)
        return out

    def metric_series(self) -> list[MetricSeries]:
        """Per syscall name (a bounded set: the architecture's table). The figures are
        those of the current window: a POST ./stats/reset shows as a counter reset."""
        rows = self.stats()["syscalls"]
        series = [
            MetricSeries("calls", "system calls in the current window", "syscall",
                         {r["name"]: r["count"] for r in rows}),
            MetricSeries("errors", "failed system calls in the current window", "syscall",
                         {r["name"]: r["errors"] for r in rows}),
        ]
        if self.options.latency:
            series.append(MetricSeries(
                "latency_seconds", "time spent in system calls in the current window",
                "syscall", {r["name"]: r["total_ns"] / 1e9 for r in rows}))
        return series

    def snapshot_rows(self) -> list[dict[str, Any]]:
        """One row per syscall seen in the current window (cumulative since its start),
        for periodic CSV snapshots; columns SNAPSHOT_FIELDS."""
        if self.bpf is None:
            return []
        rows, _procs, _interval = self._window(reset=False, details=False)
        now = self._clock.iso(time.monotonic_ns())
        out = []
        for nr in sorted(rows):
            entry = syscall_entry(nr, rows[nr])
            out.append({"timestamp": now, **{f: entry[f] for f in self.SNAPSHOT_FIELDS[1:]}})
        return out

    def kernel_counters(self) -> dict[str, int]:
        out = super().kernel_counters()
        if self.bpf is None:
            return out
        table = self.bpf[b"sc_counters"]
        for i, name in enumerate(SC_COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        return out
