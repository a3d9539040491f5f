"""FuncMonitor: call counts, latency histograms and optional per-call events for the
functions matched by glob patterns.

Patterns (as BCC's funccount spells them):

* ``lib:glob`` -- a library resolved like BCC does (``c`` -> the libc of ld.so.cache,
  else an executable found in PATH), uprobes on its ELF function symbols;
* ``/path:glob`` -- a binary or library by path, uprobes;
* ``glob`` -- kernel functions (kprobes), resolved against tracefs'
  available_filter_functions. Refused with a reason (409) on kernels without kprobes.

BPF code is generated for the resolved set: one tiny program per function (entry, and
return when ``latency``) whose probe id is a constant; see func.c. Uprobes are
attached through uprobe_multi links where the kernel has them (6.6+), else through BCC's
perf events, whose detach is slow (FuncMonitor.attach says why).

Probe scope. When the target set names pids, the uprobes are placed in those processes
(and their followed children) only: one set of links per process, the kernel's pid
filter keeping the breakpoints out of every other address space, so an untargeted
process never traps. Otherwise ("host": targets by uid or comm only, none, or kernel
functions) they are placed in every process that maps the binary, and every call on the
host takes the uprobe trap before the in-kernel target filter drops it. FuncMonitor.
sync_probe_scope says how children are followed and what the window costs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from agent.kernel.probes import (
    BPF_TRACE_UPROBE_MULTI,
    UprobeMultiLinks,
    close_links,
    describe_error,
    kprobes_status,
)
from agent.kernel.procfs import process_start
from agent.kernel.symbols import (
    KERNEL_TARGET,
    Probe,
    dedup_by_address,
    file_offsets,
    glob_regex,
    kernel_functions,
    resolve_binary,
    user_symbols,
)
from agent.kernel.symbols import PatternError as FuncPatternError
from agent.kernel.uprobe_insn import uprobe_hazards
from agent.model.event_decl import Decode, EventDecl, EventField, Member
from agent.model.targets import TargetSet
from agent.monitors.bcc import PID_TARGET, TF_FOLLOW, BccMonitor, inline_includes
from agent.monitors.contract import MetricSeries, MonitorContext, MonitorError, MonitorOptions
from agent.monitors.func.bcc_uprobes import remove_leaked_uprobe_event
from agent.monitors.func.cookie_links import CookieLinks, ProcessGone
from agent.monitors.registry import register_monitor

__all__ = ["FuncMonitor", "FuncOptions", "FuncPatternError", "Probe", "parse_pattern"]

log = logging.getLogger(__name__)

# Mirrors of agent/monitors/func/func.h (tests/monitors/test_func.py checks them with gcc).
FUNC_HIST_SLOTS = 40
FUNC_F_LATENCY = 1
FUNC_COUNTERS = ("suppressed", "no_entry")
NR_FUNC_COUNTERS = 4

PROBES_MARKER = "/* FUNC_PROBES */"
FEATURE_PROBE = "func_feature_probe"  # func.c: loaded only to detect uprobe_multi links
# BCC counts every perf-event uprobe, uretprobe, kprobe and kretprobe of the process
# against one quota (BCC's _default_probe_limit = 1000, env BCC_PROBE_LIMIT);
# with latency a function takes two, so 500 functions is the most one monitor can attach
# that way. With uprobe_multi links one program pair serves every function (attach
# cookies), so max_probes counts attach points (a function with latency is two); the
# per-function programs of older kernels are capped at MAX_COMPILED_FUNCTIONS.
MAX_PROBES_LIMIT = 50_000
MAX_COMPILED_FUNCTIONS = 500
_SAFE_NAME = re.compile(r"^[\w.@$]+$")
# Attach time one tick may spend on new processes (what c:* takes per process:
# bench/RESULTS.md, func_all_libc): the control thread also serves the API.
TICK_ATTACH_BUDGET_S = 0.25
MAX_LISTED_PIDS = 100  # status(): probed pids listed (all are counted)
HOST = 0  # the probe scope key of probes placed in every process (uprobe_multi's pid 0)
SCOPE_DETAIL = {
    "pids": "uprobes placed in the target pids and their followed children only: other "
            "processes do not trap and pay nothing; a child is probed from the control "
            "thread's next tick after its fork (about a second): calls it makes before "
            "that are not counted",
    "host": "uprobes placed in every process that maps the binary: each call of a probed "
            "function by any process on the host takes a uprobe trap (microseconds) "
            "before the in-kernel target filter drops it; target pids to confine them",
}


class FuncOptions(MonitorOptions):
    patterns: list[str] = Field(
        ..., min_length=1, max_length=64,
        description="lib:glob or /path:glob (uprobes), or a bare glob (kernel, kprobes)",
    )
    latency: bool = Field(True, description="latency histogram (adds a return probe)")
    events: bool = Field(False, description="one event per call, rate-limited in the kernel")
    max_probes: int = Field(
        1000, ge=1, le=MAX_PROBES_LIMIT,
        description="refuse patterns needing more attach points (a function is one, two "
                    "with latency)",
    )
    events_per_second: int = Field(
        1000, ge=1, le=1_000_000, description="event rate cap; calls over it are counted"
    )
    max_scope_probes: int = Field(
        100_000, ge=1, le=10_000_000,
        description="with probes in the target pids: attach points summed over the probed "
                    "processes (each process holds every attach point of its own, and "
                    "attaching and detaching cost the kernel that much per process); "
                    "processes over it are listed as unprobed",
    )
    probe_scope: Literal["auto", "host"] = Field(
        "auto",
        description="auto: uprobes in the target pids only when the target set names pids "
                    "(a followed child is probed from about a second after its fork), else "
                    "in every process; host: always in every process (every call on the "
                    "host traps; followed children counted from their first instruction)",
    )

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            parse_pattern(p)
        return patterns


@dataclass(frozen=True)
class Pattern:
    target: str | None  # library name or path; None for kernel functions
    glob: str


def parse_pattern(text: str) -> Pattern:
    """``lib:glob`` / ``/path:glob`` / ``glob``. Split at the first colon: library names
    and paths rarely hold one, while ELF symbols (C++ mangled names) never do."""
    if not text or any(c.isspace() or c == "\0" for c in text):
        raise FuncPatternError(f"pattern {text!r}: empty or contains whitespace")
    target, sep, glob = text.partition(":")
    if not sep:
        return Pattern(None, text)
    if not target or not glob:
        raise FuncPatternError(f"pattern {text!r}: expected lib:glob, /path:glob or glob")
    return Pattern(target, glob)


def resolve_user(text: str, pat: Pattern) -> list[Probe]:
    assert pat.target is not None
    path = resolve_binary(pat.target)
    return [
        Probe("uprobe", path, name, addr, text)
        for name, addr in user_symbols(path, pat.glob)
    ]


def resolve_kernel(text: str, pat: Pattern, functions: list[str]) -> list[Probe]:
    rx = re.compile(glob_regex(pat.glob))
    return [Probe("kprobe", KERNEL_TARGET, n, 0, text) for n in functions if rx.match(n)]


def report_kprobes(report: Any) -> tuple[bool, str] | None:
    """``report.features["kprobes"]`` (agent/kernel/capabilities.py) as (available,
    detail) when the report has it; None for any other object."""
    features = getattr(report, "features", None)
    if not isinstance(features, dict) or "kprobes" not in features:
        return None
    feature = features["kprobes"]
    available = getattr(feature, "available", None)
    if not isinstance(available, bool):
        return None
    return available, str(getattr(feature, "detail", "") or "capability report")


# A call of a probed function: struct func_event of func.h.
FUNC_EVENT = EventDecl(
    struct="func_event", header="func.h",
    doc="A call of a probed function (events=true), rate-limited in the kernel.",
    members=(
        Member("latency_ns", "u64"),  # valid when flags & FUNC_F_LATENCY
        Member("probe_id", "u32"),  # index into the resolved probes
        Member("flags", "u32"),  # FUNC_F_*
    ),
    fields=(
        EventField("function", "string", "the symbol name", Decode.LOOKUP, source="probe_id"),
        EventField("target", "string", "the binary's real path, or \"kernel\"",
                   Decode.LOOKUP, source="probe_id"),
        EventField("latency_ns", "integer",
                   "from entry to return; present only with latency=true",
                   when=("flags", FUNC_F_LATENCY)),
    ),
    console="pid={pid} tid={tid} comm={comm} {target}:{function}{latency_ns:opt_ns}",
)
FuncEvent = FUNC_EVENT.ctypes_struct(name="FuncEvent")


# -- the monitor ------------------------------------------------------------------------


class FuncStats(ctypes.Structure):
    """Mirror of ``struct func_stats`` in agent/monitors/func/func.h."""

    _fields_ = [
        ("count", ctypes.c_uint64),
        ("total_ns", ctypes.c_uint64),
        ("hist", ctypes.c_uint64 * FUNC_HIST_SLOTS),
    ]


STATS_WORDS = ctypes.sizeof(FuncStats) // 8


@register_monitor("func", "function calls by glob pattern: counts, latency, events")
class FuncMonitor(BccMonitor[FuncOptions]):
    """Function calls (uprobes and kprobes) matched by glob patterns."""

    Options = FuncOptions
    EVENT = FUNC_EVENT
    BPF_SOURCE = "func.c"
    # ignore: BccMonitor's unannotated tuple makes mypy infer a fixed 5-tuple type.
    REQUIRED_FEATURES = (*BccMonitor.REQUIRED_FEATURES, "uprobes")  # type: ignore[assignment]


    def __init__(self, options: FuncOptions, ctx: MonitorContext) -> None:
        super().__init__(options, ctx)
        self.probes: list[Probe] = []
        self._prepared = False
        self.unattached: dict[int, str] = {}  # probe id -> why it is not attached
        # probe ids left out before attaching (agent/kernel/uprobe_insn.py), a subset of
        # unattached: the kernel would refuse them, or accept them and corrupt processes.
        self.excluded: set[int] = set()
        self.links: UprobeMultiLinks | None = None
        # False forces BCC's perf-event uprobes (the only way before Linux 6.6): tests and
        # the bench set it to cover and compare that path.
        self.prefer_uprobe_multi = True
        self.attach_seconds = 0.0
        # One shared program pair, probe id from the attach cookie (cookie_links.py); False: a
        # program per function (no uprobe_multi links, kprobes, or prefer_uprobe_multi off).
        self.cookie_mode = False
        self._cookie_progs: tuple[int, int | None] | None = None  # entry, return fds
        # Probe scope: pid (HOST: every process) -> the start time of the process its
        # probes were attached for (a reused pid is another process), and its probes.
        self.scopes: dict[int, int] = {}
        self.cookie_links: dict[int, CookieLinks] = {}
        self._attached: dict[int, list[int]] = {}  # program per function: pid -> ids
        self.scope_errors: dict[int, str] = {}  # target pid -> why it has no probes
        self.children_attached = 0  # followed children given probes of their own
        self._refused: dict[int, int] = {}  # pid -> start time: attaching failed
        self.pending = 0  # processes waiting for the next tick's attach budget
        self._closer: ThreadPoolExecutor | None = None  # closes links left behind
        self._closing: list[Future[None]] = []
        self._offsets: dict[str, dict[int, int]] = {}  # binary -> probe id -> file offset
        self._targets = ctx.targets
        self._scope_ready = False

    # -- validation before loading ----------------------------------------------------
    @classmethod
    def resolve(cls, options: FuncOptions) -> list[Probe]:
        """The functions the patterns match, deduplicated; FuncPatternError when a pattern
        matches nothing or the total exceeds ``max_probes``."""
        probes: list[Probe] = []
        functions: list[str] | None = None
        for text in options.patterns:
            pat = parse_pattern(text)
            if pat.target is None:
                functions = kernel_functions() if functions is None else functions
                found = resolve_kernel(text, pat, functions)
            else:
                found = resolve_user(text, pat)
            if not found:
                raise FuncPatternError(f"pattern {text!r} matches no function")
            probes += found
        probes = dedup_by_address(probes)
        points = len(probes) * (2 if options.latency else 1)
        if points > options.max_probes:
            raise FuncPatternError(
                f"patterns match {len(probes)} functions ({points} attach points), more "
                f"than max_probes={options.max_probes}; narrow the patterns or raise "
                f"max_probes"
            )
        return probes

    @classmethod
    def option_errors(cls, options: MonitorOptions, report: Any) -> str | None:
        kernel = [p for p in getattr(options, "patterns", []) if parse_pattern(p).target is None]
        if not kernel:
            return None
        available, reason = report_kprobes(report) or kprobes_status()
        if available:
            return None
        return (
            f"kernel function patterns {kernel} need kprobes, which this kernel does not "
            f"offer ({reason}); user-space patterns (lib:glob, /path:glob) use uprobes"
        )

    # -- kernel side ----------------------------------------------------------------
    def prepare(self) -> None:
        """Resolve the patterns (ELF symbols, kernel functions): a FuncPatternError (422)
        before anything is loaded or a running func monitor is stopped."""
        self.probes = self.resolve(self.options)
        self._prepared = True

    def load(self) -> None:
        # Outside BccMonitor.load's try: a pattern error stays a FuncPatternError (422).
        if not self._prepared:
            self.prepare()
        self.cookie_mode = self.prefer_uprobe_multi and all(
            p.kind == "uprobe" for p in self.probes)
        if self.cookie_mode:
            try:
                super().load()
                return
            except MonitorError as e:
                log.info("func: one program with attach cookies failed (%s): a program "
                         "per function instead", e)
                self.cookie_mode = False
        if len(self.probes) > MAX_COMPILED_FUNCTIONS:
            raise FuncPatternError(
                f"patterns match {len(self.probes)} functions; without uprobe_multi links "
                f"(Linux 6.6+) each needs a program of its own, at most "
                f"{MAX_COMPILED_FUNCTIONS}")
        super().load()

    def extra_cflags(self) -> dict[str, int | str]:
        return {
            "NR_PROBES": max(len(self.probes), 1),
            "FUNC_LATENCY": int(self.options.latency),
            "FUNC_EVENTS": int(self.options.events),
            "EVENTS_PER_SECOND": self.options.events_per_second,
            **({"FUNC_COOKIE_PROGRAMS": 1} if self.cookie_mode else {}),
        }

    def bpf_text(self) -> str:
        template = inline_includes(self.source_dir() / self.BPF_SOURCE)
        if PROBES_MARKER not in template:
            raise MonitorError(f"{self.BPF_SOURCE}: the {PROBES_MARKER} marker is missing")
        if self.cookie_mode:
            return template
        return template.replace(PROBES_MARKER, generate_probes(self.probes, self.options.latency))

    def attach(self) -> None:
        """Attach every resolved function; the program was compiled once by BPF(text=...),
        each attach loads one small generated program and creates one probe.

        Uprobes go through uprobe_multi BPF links when the kernel has them (Linux 6.6+):
        closing BCC's perf-event uprobes is serialised on the kernel's event_mutex
        (perf_trace_event_unreg waits for RCU grace periods inside it), so stopping
        probes costs grace periods one after another; links close in parallel instead
        (figures: bench/RESULTS.md, "func_overhead").

        A function the kernel refuses (x86 uprobes cannot single-step some instructions,
        e.g. the lock prefix that starts glibc's pthread_spin_lock: ENOTSUPP) is skipped
        and listed in stats()["unattached"]; only when none attaches is it an error.
        Where the probes go (every process, or the target pids): sync_probe_scope."""
        # BccMonitor.load sets the targets after attach(); until then target_flags is 0,
        # "everything", and every process's calls would count. Filter from the start.
        self.set_targets(self.ctx.targets)
        check_stats_layout(self.bpf[b"func_stats"])
        start = time.monotonic()
        self.unattached = {}
        self.excluded = set()
        self._screen_uprobes()
        self._plan_offsets()
        uses_uprobes = any(p.kind == "uprobe" for p in self.probes)
        self.links = None
        if uses_uprobes and self.prefer_uprobe_multi:
            self.links = UprobeMultiLinks.create(self.bpf, FEATURE_PROBE)
        if self.cookie_mode:
            if self.links is None:
                raise MonitorError("this kernel has no uprobe_multi links")
            self._cookie_progs = self._load_cookie_programs()
        self._scope_ready = True
        self.sync_probe_scope(at_load=True)
        self.attach_seconds = time.monotonic() - start
        if self.probes and len(self.unattached) == len(self.probes):
            raise MonitorError(f"no function could be attached: {self.unattached[0]}")
        log.info(
            "func: %d functions attached in %.2f s (%s, probe scope %s)",
            len(self.probes) - len(self.unattached), self.attach_seconds, self.attach_mode,
            self.probe_scope,
        )

    # -- probe scope: every process, or the target pids -----------------------------
    @property
    def probe_scope(self) -> str:
        """"pids" when the target set names pids and every probe is a uprobe (a kprobe
        has no pid filter), unless the options ask for "host"."""
        if (self.options.probe_scope == "auto" and self._targets.pids and self.probes
                and all(p.kind == "uprobe" for p in self.probes)):
            return "pids"
        return "host"

    def set_targets(self, targets: TargetSet) -> None:
        """The maps (BccMonitor), then the probes: links for added pids, none left for
        removed ones (the maps already keep a removed pid's calls from counting)."""
        super().set_targets(targets)
        self._targets = targets
        if self._scope_ready:
            self.sync_probe_scope()

    def periodic(self) -> None:
        """Control thread, about once a second: probes for the followed children that
        appeared since the last tick, none left for processes that exited."""
        if self._scope_ready and not self._stopping:
            self.sync_probe_scope(budget_s=TICK_ATTACH_BUDGET_S)

    def _wanted_scope(self) -> dict[int, int]:
        """pid -> start time of each process that should have probes ({HOST: 0}: one set
        for every process). The pids are the kernel's target_pids map: the operator's,
        and with follow_children the children common.h's sched_process_fork program
        added (it removes them at exit). Thread ids there (a thread is followed too) are
        left out: the link of their process covers its threads."""
        if self.probe_scope == "host":
            return {HOST: 0}
        follow = bool(self._read_flags() & TF_FOLLOW)
        wanted: dict[int, int] = {}
        errors: dict[int, str] = {}
        for key, kind in self.bpf[b"target_pids"].items():
            pid = key.value
            if kind.value != PID_TARGET and not follow:
                continue
            started = process_start(pid)
            if started is not None:
                wanted[pid] = started
            elif kind.value == PID_TARGET:
                errors[pid] = "no such process (or not the main thread of one): nothing probed"
        self.scope_errors = errors | {p: e for p, e in self.scope_errors.items()
                                      if p in wanted and p not in self.scopes}
        return wanted

    def sync_probe_scope(self, at_load: bool = False, budget_s: float | None = None) -> None:
        """Make the attached probes match _wanted_scope.

        Followed children: the kernel puts a target's child into target_pids at its fork;
        this runs at every set_targets and on the control thread's tick (periodic, about
        once a second) and gives each new child links of its own. Polling the map, rather
        than a notification from the kernel, keeps common.h and the event path as they
        are and bounds the work to one map read a second; a notification would shorten
        the window without closing it, since links can only be created from userspace.
        The window: a pid-filtered uprobe is per process (the kernel places breakpoints
        in the link's process only and runs the program only for its threads), and a
        child is a new process: it inherits the breakpoints in the pages it copied and
        traps on them, but nothing counts its calls until its own links exist (from its
        fork to the next tick, plus the attach). probe_scope="host" counts children from
        their first instruction, at the host-wide cost.

        A process keeps one set of probes at a time: the old set is detached before the
        new one is attached (a switch between every process and the target pids), since
        both at once would count its calls twice.

        ``budget_s`` (the tick): new processes are attached until it is spent, the rest
        at the next tick (``pending`` in status()), so that a target forking fast cannot
        hold the control thread; the operator's pids come first."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        wanted = self._wanted_scope()
        stale = [pid for pid, started in self.scopes.items() if wanted.get(pid) != started]
        # Into HOST: the targets' links must be gone before it is attached.
        self._detach_scopes(stale, now=HOST in wanted)
        self._refused = {p: t for p, t in self._refused.items() if wanted.get(p) == t}
        new = sorted((pid for pid, started in wanted.items()
                      if pid not in self.scopes and self._refused.get(pid) != started),
                     key=lambda pid: (pid not in self._targets.pids, pid))
        points = self._points_per_process()
        for n, pid in enumerate(new):
            if deadline is not None and time.monotonic() > deadline:
                self.pending = len(new) - n
                return
            probed = len(self.scopes) - (HOST in self.scopes)
            if pid != HOST and (probed + 1) * points > self.options.max_scope_probes:
                self.scope_errors[pid] = (
                    f"not probed: {probed} processes already hold {probed * points} attach "
                    f"points, another {points} would pass max_scope_probes="
                    f"{self.options.max_scope_probes}")
                continue
            self._attach_scope(pid, wanted[pid], at_load)
        self.pending = 0

    def _points_per_process(self) -> int:
        attached = len(self.probes) - len(self.unattached)
        return max(attached, 1) * (2 if self.options.latency else 1)

    def _attach_scope(self, pid: int, started: int, at_load: bool) -> None:
        try:
            if self.cookie_mode:
                self._attach_with_cookies(pid)
            else:
                self._attach_each(pid)
        except ProcessGone:
            close_links(self._release(pid))
            return
        except MonitorError as e:
            close_links(self._release(pid))
            if pid == HOST:  # a pid: the others keep their probes, this one is named
                raise
            self.scope_errors[pid] = str(e)
            self._refused[pid] = started  # not retried while this process lives
            log.warning("func: no probes for pid %d: %s", pid, e)
            return
        self.scopes[pid] = started
        if pid != HOST and not at_load and pid not in self._targets.pids:
            self.children_attached += 1

    def _detach_scopes(self, pids: list[int], now: bool = False) -> None:
        """Links of processes are closed on the closer thread, the control thread going
        on: closing one unregisters each of its uprobes, which visits every process
        mapping the binary under the kernel's uprobe locks (seconds to minutes for c:*
        on a busy host: bench/RESULTS.md, func_all_libc). A process's links can be
        closed late: its calls stopped counting when the maps dropped it, or it exited.
        Closed at once (``now``, and HOST's always): when the other scope follows, since
        both at once would count a target's calls twice."""
        later: list[int] = []
        for pid in pids:
            self.scopes.pop(pid, None)
            fds = self._release(pid)
            if pid == HOST or now:
                close_links(fds)
            else:
                later += fds
        if later:
            if self._closer is None:
                self._closer = ThreadPoolExecutor(1, thread_name_prefix="func-unlink")
            self._closing = [f for f in self._closing if not f.done()]
            self._closing.append(self._closer.submit(close_links, later))

    def _release(self, pid: int) -> list[int]:
        """What was attached for ``pid`` (a partly attached set too): BCC's probes are
        detached, the link fds returned for the caller to close."""
        fds: list[int] = []
        links = self.cookie_links.pop(pid, None)
        if links is not None:
            fds, links.fds = links.fds, []
        ids = self._attached.pop(pid, [])
        if self.links is not None:
            fds += self.links.take_pid(pid)
        else:
            for i in ids:
                self._detach_probe(i, self.probes[i], pid, self.options.latency)
        return fds

    def _plan_offsets(self) -> None:
        """File offsets of the uprobes left after screening, by binary (computed once:
        every process's links use them)."""
        self._offsets = {}
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(self.probes):
            if p.kind == "uprobe" and i not in self.unattached:
                by_path.setdefault(p.target, []).append(i)
        for path, ids in by_path.items():
            try:
                offsets = file_offsets(path, [self.probes[i].address for i in ids])
            except OSError as e:
                for i in ids:
                    self.unattached[i] = f"cannot place a uprobe: {describe_error(e)}"
                continue
            self._offsets[path] = dict(zip(ids, offsets, strict=True))

    # -- attaching -------------------------------------------------------------------

    def _screen_uprobes(self) -> None:
        """Leave out, before any attach, the functions whose first instruction a uprobe
        must not be placed on (agent/kernel/uprobe_insn.py: on x86 the kernel accepts
        VEX/EVEX instructions it then skips instead of executing, corrupting every
        process that calls the function). Each is named in stats()["unattached"]."""
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(self.probes):
            if p.kind == "uprobe":
                by_path.setdefault(p.target, []).append(i)
        for path, ids in by_path.items():
            try:
                offsets = file_offsets(path, [self.probes[i].address for i in ids])
                hazards = uprobe_hazards(path, offsets)
            except OSError as e:
                for i in ids:
                    self.unattached[i] = f"cannot place a uprobe: {describe_error(e)}"
                continue
            for k, reason in hazards.items():
                i = ids[k]
                self.unattached[i] = f"excluded before attaching: {reason}"
                self.excluded.add(i)
            if hazards:
                log.warning("func: %d functions of %s left out: %s", len(hazards), path,
                            ", ".join(self.probes[ids[k]].name for k in sorted(hazards)))

    def _load_cookie_programs(self) -> tuple[int, int | None]:
        from bcc import BPF

        def load(name: bytes) -> int:
            return int(self.bpf.load_func(name, BPF.KPROBE,
                                          attach_type=BPF_TRACE_UPROBE_MULTI).fd)

        return load(b"func_entry_any"), (
            load(b"func_return_any") if self.options.latency else None)

    def _attach_with_cookies(self, pid: int) -> None:
        """Every function of a binary in one link per direction (cookie_links.py), for
        process ``pid`` (HOST: every process). ProcessGone when the process is gone."""
        assert self._cookie_progs is not None
        latency = self.options.latency
        links = self.cookie_links[pid] = CookieLinks(*self._cookie_progs, pid=pid)

        def refused(kind: str) -> Callable[[int, OSError], None]:
            def note(i: int, e: OSError) -> None:
                self.unattached[i] = f"the kernel refused the {kind}: {describe_error(e)}"
                log.warning("func: skipping %s:%s: %s", self.probes[i].target,
                            self.probes[i].name, self.unattached[i])
            return note

        for path, offset_of in self._offsets.items():
            ids = [i for i in offset_of if i not in self.unattached]
            if not ids:
                continue
            ok = links.attach(path, ids, [offset_of[i] for i in ids], False, refused("uprobe"))
            if latency and ok:
                ok.sort()
                # A function whose return probe is refused is listed as unattached; its
                # entry probe stays in its group's link (links are all or nothing) and
                # only stores start times that the LRU table ages out.
                links.attach(path, ok, [offset_of[i] for i in ok], True, refused("uretprobe"))

    def _attach_each(self, pid: int) -> None:
        """A program per function (no attach cookies): each attached for ``pid``."""
        done = self._attached.setdefault(pid, [])
        for i, p in enumerate(self.probes):
            if i in self.unattached:
                continue
            error = self._try_attach(i, p, pid)
            if error is None:
                done.append(i)
                continue
            if pid != HOST and process_start(pid) is None:
                raise ProcessGone(pid)  # not the function: the process went away
            log.warning("func: skipping %s:%s: %s", p.target, p.name, error)
            self.unattached[i] = error

    @property
    def attach_mode(self) -> str:
        if self.cookie_mode and self.links is not None:
            return "uprobe_multi links, one program (attach cookies)"
        return "uprobe_multi links" if self.links is not None else "perf events (BCC)"

    def _try_attach(self, i: int, p: Probe, pid: int) -> str | None:
        """None when attached, else why not (an attached entry half is undone)."""
        try:
            self._attach_probe(f"func_entry_{i}", p, False, pid)
        except Exception as e:
            return self._attach_failed(p, False, e, pid)
        if not self.options.latency:
            return None
        try:
            self._attach_probe(f"func_return_{i}", p, True, pid)
        except Exception as e:
            self._detach_probe(i, p, pid, latency=False)
            return self._attach_failed(p, True, e, pid)
        return None

    def _attach_probe(self, fn_name: str, p: Probe, retprobe: bool, pid: int) -> None:
        if p.kind == "kprobe":  # only in the HOST scope (probe_scope)
            attach = self.bpf.attach_kretprobe if retprobe else self.bpf.attach_kprobe
            attach(event=p.name, fn_name=fn_name)
        elif self.links is not None:
            self.links.attach(fn_name, p.target, p.address, retprobe, pid)
        else:
            # BCC's pid=-1: every process; a pid: the kernel's perf uprobe filter places
            # the breakpoints in that process's address space only.
            attach = self.bpf.attach_uretprobe if retprobe else self.bpf.attach_uprobe
            attach(name=p.target, addr=p.address, fn_name=fn_name, pid=bcc_pid(pid))

    def _detach_probe(self, i: int, p: Probe, pid: int, latency: bool) -> None:
        """Both halves of probe ``i`` for ``pid`` (the entry only, unless ``latency``)."""
        try:
            if p.kind == "kprobe":
                self.bpf.detach_kprobe(event=p.name)
                if latency:
                    self.bpf.detach_kretprobe(event=p.name)
            elif self.links is not None:
                self.links.detach(f"func_entry_{i}", pid)
                self.links.detach(f"func_return_{i}", pid)
            else:
                self.bpf.detach_uprobe(name=p.target, addr=p.address, pid=bcc_pid(pid))
                if latency:
                    self.bpf.detach_uretprobe(name=p.target, addr=p.address, pid=bcc_pid(pid))
        except Exception:
            log.exception("func: cannot detach %s:%s", p.target, p.name)

    def _attach_failed(self, p: Probe, retprobe: bool, error: Exception, pid: int) -> str:
        if "quota" in str(error):  # BCC's per-process probe limit: nothing else would fit
            raise MonitorError(f"{p.target}:{p.name}: {error}") from error
        if p.kind == "uprobe" and self.links is None:
            remove_leaked_uprobe_event(self.bpf, p.target, p.address, retprobe, bcc_pid(pid))
        kind = f"{p.kind[0]}{'ret' if retprobe else ''}probe"  # uprobe, uretprobe, kprobe...
        return f"the kernel refused the {kind}: {describe_error(error)}"

    def close(self) -> None:
        self._scope_ready = False
        fds = [fd for links in self.cookie_links.values() for fd in links.fds]
        self.cookie_links = {}
        close_links(fds)
        closer, self._closer = self._closer, None
        if closer is not None:
            closer.shutdown(wait=True)  # every link closed when close() returns
        self._closing = []
        links, self.links = self.links, None
        if links is not None:
            links.close()
        self.scopes, self._attached = {}, {}
        super().close()


    # -- events ---------------------------------------------------------------------
    def decode_tables(self) -> dict[str, Mapping[Any, Any]]:
        """The resolved probes by probe id (set before load)."""
        return {"function": {i: p.name for i, p in enumerate(self.probes)},
                "target": {i: p.target for i, p in enumerate(self.probes)}}

    # -- aggregates -------------------------------------------------------------------
    def metric_series(self) -> list[MetricSeries]:
        """Per probed function (bounded by max_probes), labelled binary:symbol."""
        rows = self.stats()["functions"]
        label = {id(r): f"{os.path.basename(r['target'])}:{r['name']}" for r in rows}
        series = [MetricSeries("calls", "calls of probed functions", "function",
                               {label[id(r)]: r["count"] for r in rows})]
        if self.options.latency:
            series.append(MetricSeries(
                "latency_seconds", "time spent in probed functions", "function",
                {label[id(r)]: r["total_ns"] / 1e9 for r in rows}))
        return series

    def stats(self) -> dict[str, Any]:
        """Per function, sorted by count: ``histogram[i]`` counts calls that took
        [2^(i-1), 2^i) ns (``histogram[0]``: 0 ns), trailing empty slots left out."""
        if self.bpf is None:
            return {"functions": []}
        table = self.bpf[b"func_stats"]
        functions = []
        for i, p in enumerate(self.probes):
            if i in self.unattached:
                continue
            count, total_ns, hist = sum_per_cpu(table.getvalue(ctypes.c_int(i)))
            entry: dict[str, Any] = {
                "name": p.name, "target": p.target, "count": count, "total_ns": total_ns,
            }
            if p.address:
                entry["address"] = f"{p.address:#x}"
            if self.options.latency:
                entry["histogram"] = trim_zeros(hist)
            functions.append(entry)
        functions.sort(key=lambda f: (-f["count"], f["name"]))
        unattached = [
            {"name": p.name, "target": p.target, "error": self.unattached[i],
             "excluded": i in self.excluded}
            for i, p in enumerate(self.probes) if i in self.unattached
        ]
        return {
            "functions": functions,
            "unattached": unattached,
            "counts": {
                "matched": len(self.probes),
                "attached": len(self.probes) - len(self.unattached),
                "excluded": len(self.excluded),
                "refused": len(self.unattached) - len(self.excluded),
            },
            "attach_mode": self.attach_mode,
            "attach_seconds": round(self.attach_seconds, 3),
            **self.status(),
        }

    def status(self) -> dict[str, Any]:
        """Where the uprobes are placed (also in GET /monitors/func)."""
        scope = self.probe_scope
        out: dict[str, Any] = {"probe_scope": scope, "probe_scope_detail": SCOPE_DETAIL[scope]}
        if scope == "pids":
            pids = sorted(p for p in self.scopes if p != HOST)
            out["probed_pids"] = pids[:MAX_LISTED_PIDS]
            out["probed_processes"] = len(pids)
            out["children_attached"] = self.children_attached
            out["pending"] = self.pending
            out["closing"] = sum(not f.done() for f in self._closing)
            out["unprobed_pids"] = {str(p): e for p, e in sorted(self.scope_errors.items())}
        return out

    def kernel_counters(self) -> dict[str, int]:
        """common.h's counters plus ours. ``seen`` counts calls considered for an event
        (events mode only); seen = submitted + dropped + suppressed."""
        out = super().kernel_counters()
        if self.bpf is not None:
            table = self.bpf[b"func_counters"]
            for i, name in enumerate(FUNC_COUNTERS):
                out[name] = int(sum(table.getvalue(ctypes.c_int(i))))
        return out


def bcc_pid(pid: int) -> int:
    """BCC's pid argument for a probe scope key: -1 is every process."""
    return -1 if pid == HOST else pid


def check_stats_layout(table: Any) -> None:
    """sum_per_cpu reads BCC's per-CPU leaves as rows of STATS_WORDS u64s."""
    size = ctypes.sizeof(table.sLeaf)
    if size != ctypes.sizeof(FuncStats):
        raise MonitorError(f"func_stats leaf is {size} bytes, FuncStats {ctypes.sizeof(FuncStats)}")


def generate_probes(probes: list[Probe], latency: bool) -> str:
    """One entry program (and one return program with latency) per probe id."""
    lines = []
    for i, p in enumerate(probes):
        if _SAFE_NAME.match(p.name):  # never let a symbol name close the comment
            lines.append(f"/* {i}: {p.name} */")
        lines.append(f"int func_entry_{i}(struct pt_regs *ctx) {{ return on_entry(ctx, {i}); }}")
        if latency:
            lines.append(
                f"int func_return_{i}(struct pt_regs *ctx) {{ return on_return(ctx, {i}); }}"
            )
    return "\n".join(lines) + "\n"


def sum_per_cpu(values: Any) -> tuple[int, int, list[int]]:
    """Sums a ctypes array of per-CPU FuncStats: each struct is STATS_WORDS u64s, so the
    buffer viewed as u64 holds field j of every CPU at j, j + STATS_WORDS, ..."""
    words = memoryview(values).cast("B").cast("Q")
    sums = [sum(words[j::STATS_WORDS]) for j in range(STATS_WORDS)]
    return sums[0], sums[1], sums[2:]


def trim_zeros(hist: list[int]) -> list[int]:
    end = len(hist)
    while end and not hist[end - 1]:
        end -= 1
    return hist[:end]
