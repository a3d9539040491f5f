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
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from agent.kernel.probes import (
    BPF_TRACE_UPROBE_MULTI,
    UprobeMultiLinks,
    describe_error,
    kprobes_status,
)
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
from agent.monitors.bcc import BccMonitor, inline_includes
from agent.monitors.contract import MetricSeries, MonitorContext, MonitorError, MonitorOptions
from agent.monitors.func.bcc_uprobes import remove_leaked_uprobe_event
from agent.monitors.func.cookie_links import CookieLinks
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
        self.cookie_links: CookieLinks | None = None

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
        and listed in stats()["unattached"]; only when none attaches is it an error."""
        # BccMonitor.load sets the targets after attach(); until then target_flags is 0,
        # "everything", and every process's calls would count. Filter from the start.
        self.set_targets(self.ctx.targets)
        check_stats_layout(self.bpf[b"func_stats"])
        start = time.monotonic()
        self.unattached = {}
        self.excluded = set()
        self._screen_uprobes()
        uses_uprobes = any(p.kind == "uprobe" for p in self.probes)
        self.links = None
        if uses_uprobes and self.prefer_uprobe_multi:
            self.links = UprobeMultiLinks.create(self.bpf, FEATURE_PROBE)
        if self.cookie_mode:
            if self.links is None:
                raise MonitorError("this kernel has no uprobe_multi links")
            self._attach_with_cookies()
            probes: list[tuple[int, Probe]] = []
        else:
            probes = [(i, p) for i, p in enumerate(self.probes) if i not in self.unattached]
        for i, p in probes:
            error = self._try_attach(i, p)
            if error is not None:
                log.warning("func: skipping %s:%s: %s", p.target, p.name, error)
                self.unattached[i] = error
        self.attach_seconds = time.monotonic() - start
        if self.probes and len(self.unattached) == len(self.probes):
            raise MonitorError(f"no function could be attached: {self.unattached[0]}")
        log.info(
            "func: %d functions attached in %.2f s (%s)",
            len(self.probes) - len(self.unattached), self.attach_seconds, self.attach_mode,
        )

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

    def _attach_with_cookies(self) -> None:
        """Every function of a binary in one link per direction (cookie_links.py)."""
        from bcc import BPF

        latency = self.options.latency
        entry = self.bpf.load_func(b"func_entry_any", BPF.KPROBE,
                                   attach_type=BPF_TRACE_UPROBE_MULTI)
        ret = self.bpf.load_func(b"func_return_any", BPF.KPROBE,
                                 attach_type=BPF_TRACE_UPROBE_MULTI) if latency else None
        links = self.cookie_links = CookieLinks(entry.fd, ret.fd if ret else None)
        by_path: dict[str, list[int]] = {}
        for i, p in enumerate(self.probes):
            if i not in self.unattached:  # screened out (_screen_uprobes)
                by_path.setdefault(p.target, []).append(i)

        def refused(kind: str) -> Callable[[int, OSError], None]:
            def note(i: int, e: OSError) -> None:
                self.unattached[i] = f"the kernel refused the {kind}: {describe_error(e)}"
                log.warning("func: skipping %s:%s: %s", self.probes[i].target,
                            self.probes[i].name, self.unattached[i])
            return note

        for path, ids in by_path.items():
            try:
                offsets = file_offsets(path, [self.probes[i].address for i in ids])
            except OSError as e:
                for i in ids:
                    self.unattached[i] = f"cannot place a uprobe: {describe_error(e)}"
                continue
            offset_of = dict(zip(ids, offsets, strict=True))
            ok = links.attach(path, ids, offsets, False, refused("uprobe"))
            if latency and ok:
                ok.sort()
                # A function whose return probe is refused is listed as unattached; its
                # entry probe stays in its group's link (links are all or nothing) and
                # only stores start times that the LRU table ages out.
                links.attach(path, ok, [offset_of[i] for i in ok], True, refused("uretprobe"))

    @property
    def attach_mode(self) -> str:
        if self.cookie_mode and self.links is not None:
            return "uprobe_multi links, one program (attach cookies)"
        return "uprobe_multi links" if self.links is not None else "perf events (BCC)"

    def _try_attach(self, i: int, p: Probe) -> str | None:
        """None when attached, else why not (an attached entry half is undone)."""
        try:
            self._attach_probe(f"func_entry_{i}", p, retprobe=False)
        except Exception as e:
            return self._attach_failed(p, False, e)
        if not self.options.latency:
            return None
        try:
            self._attach_probe(f"func_return_{i}", p, retprobe=True)
        except Exception as e:
            self._detach_entry(i, p)
            return self._attach_failed(p, True, e)
        return None

    def _attach_probe(self, fn_name: str, p: Probe, retprobe: bool) -> None:
        if p.kind == "kprobe":
            attach = self.bpf.attach_kretprobe if retprobe else self.bpf.attach_kprobe
            attach(event=p.name, fn_name=fn_name)
        elif self.links is not None:
            self.links.attach(fn_name, p.target, p.address, retprobe)
        else:
            # pid=-1: every process; the target set filters in the kernel so that it can
            # change without re-attaching.
            attach = self.bpf.attach_uretprobe if retprobe else self.bpf.attach_uprobe
            attach(name=p.target, addr=p.address, fn_name=fn_name, pid=-1)

    def _detach_entry(self, i: int, p: Probe) -> None:
        try:
            if p.kind == "kprobe":
                self.bpf.detach_kprobe(event=p.name)
            elif self.links is not None:
                self.links.detach(f"func_entry_{i}")
            else:
                self.bpf.detach_uprobe(name=p.target, addr=p.address, pid=-1)
        except Exception:
            log.exception("func: cannot detach %s:%s", p.target, p.name)

    def _attach_failed(self, p: Probe, retprobe: bool, error: Exception) -> str:
        if "quota" in str(error):  # BCC's per-process probe limit: nothing else would fit
            raise MonitorError(f"{p.target}:{p.name}: {error}") from error
        if p.kind == "uprobe" and self.links is None:
            remove_leaked_uprobe_event(self.bpf, p.target, p.address, retprobe)
        kind = f"{p.kind[0]}{'ret' if retprobe else ''}probe"  # uprobe, uretprobe, kprobe...
        return f"the kernel refused the {kind}: {describe_error(error)}"

    def close(self) -> None:
        links, self.links = self.links, None
        if links is not None:
            links.close()
        cookie_links, self.cookie_links = self.cookie_links, None
        if cookie_links is not None:
            cookie_links.close()
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
        }

    def kernel_counters(self) -> dict[str, int]:
        """common.h's counters plus ours. ``seen`` counts calls considered for an event
        (events mode only); seen = submitted + dropped + suppressed."""
        out = super().kernel_counters()
        if self.bpf is not None:
            table = self.bpf[b"func_counters"]
            for i, name in enumerate(FUNC_COUNTERS):
                out[name] = int(sum(table.getvalue(ctypes.c_int(i))))
        return out


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
