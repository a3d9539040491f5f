"""FuncMonitor: call counts, latency histograms and optional per-call events for the
functions matched by glob patterns.

Patterns (as BCC's funccount spells them):

* ``lib:glob`` -- a library resolved like BCC does (``c`` -> the libc of ld.so.cache,
  else an executable found in PATH), uprobes on its ELF function symbols;
* ``/path:glob`` -- a binary or library by path, uprobes;
* ``glob`` -- kernel functions (kprobes), resolved against tracefs'
  available_filter_functions. Refused with a reason (409) on kernels without kprobes.

BPF code is generated for the resolved set: one tiny program per function (entry, and
return when ``latency``) whose probe id is a constant; see agent/monitors/func/func.c. Uprobes are
attached through uprobe_multi links where the kernel has them (6.6+), else through BCC's
perf events, whose detach is slow (FuncMonitor.attach says why).
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import gzip
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator

from agent.model.events import COMMON_CSV_FIELDS, Event, EventHeader
from agent.monitors.bcc import BccMonitor, inline_includes
from agent.monitors.contract import MetricSeries, MonitorContext, MonitorError, MonitorOptions
from agent.monitors.registry import register_monitor

log = logging.getLogger(__name__)

# Mirrors agent/monitors/func/func.h.
FUNC_HIST_SLOTS = 40
FUNC_F_LATENCY = 1
FUNC_COUNTERS = ("suppressed", "no_entry")
NR_FUNC_COUNTERS = 4

PROBES_MARKER = "/* FUNC_PROBES */"
KERNEL_TARGET = "kernel"
TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
# BCC counts every perf-event uprobe, uretprobe, kprobe and kretprobe of the process
# against one quota (bcc/__init__.py _default_probe_limit = 1000, env BCC_PROBE_LIMIT);
# with latency a function takes two, so 500 functions is the most one monitor can attach
# that way (uprobe_multi links are outside the quota, but compile time grows too: ~5 s
# per 200 functions with latency, measured).
MAX_PROBES_LIMIT = 500
_SAFE_NAME = re.compile(r"^[\w.@$]+$")


class FuncPatternError(ValueError):
    """A pattern cannot be resolved: no match, too many matches, unknown library (422)."""


class FuncOptions(MonitorOptions):
    patterns: list[str] = Field(
        ..., min_length=1, max_length=64,
        description="lib:glob or /path:glob (uprobes), or a bare glob (kernel, kprobes)",
    )
    latency: bool = Field(True, description="latency histogram (adds a return probe)")
    events: bool = Field(False, description="one event per call, rate-limited in the kernel")
    max_probes: int = Field(
        200, ge=1, le=MAX_PROBES_LIMIT, description="refuse patterns matching more functions"
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
class Probe:
    """One resolved function. ``address`` is the ELF symbol value (0 for kernel)."""

    kind: str  # "uprobe" | "kprobe"
    target: str  # real path of the binary, or "kernel"
    name: str
    address: int = 0
    pattern: str = ""


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


def glob_regex(glob: str) -> str:
    """The glob as an anchored regex (fnmatch.translate ends it with ``\\Z``)."""
    return fnmatch.translate(glob)


# -- resolving user-space patterns ----------------------------------------------------
def resolve_binary(target: str) -> str:
    """A real path: ``/path`` as given, a name as BCC's funccount does: a library, else an
    executable in PATH (its BPF.find_exe, which wants bytes; shutil.which is the same)."""
    from bcc import BPF

    path: str | None
    if target.startswith("/"):
        path = target
    else:
        found = BPF.find_library(target)  # ld.so.cache: "c" -> .../libc.so.6
        path = os.fsdecode(found) if found else shutil.which(target)
    if not path or not os.path.isfile(path):
        raise FuncPatternError(f"{target!r}: no such library or binary")
    return os.path.realpath(path)


def user_symbols(path: str, glob: str) -> list[tuple[str, int]]:
    """(name, ELF address) of the function symbols of ``path`` that match ``glob``."""
    from bcc import BPF

    try:
        found = BPF.get_user_functions_and_addresses(path, glob_regex(glob).encode())
    except Exception as e:  # BCC raises a bare Exception: not ELF, unreadable...
        raise FuncPatternError(f"{path}: cannot read its symbols: {e}") from e
    # Undefined (imported) symbols have no address in this file.
    return [(n.decode("utf-8", "surrogateescape"), a) for n, a in found if a]


def name_rank(name: str) -> tuple[int, int, str]:
    """Which alias names a function: ``getpid`` before ``__getpid`` before ``__GI_x``."""
    return (len(name) - len(name.lstrip("_")), len(name), name)


def dedup_by_address(probes: list[Probe]) -> list[Probe]:
    """One probe per (binary, address). Aliases share an address (``getpid`` and
    ``__getpid`` in libc): probing both would count each call twice, and BCC names a
    uprobe event by path and address, so the second attach would collide."""
    best: dict[tuple[str, int], Probe] = {}
    for p in probes:
        key = (p.target, p.address)
        if key not in best or name_rank(p.name) < name_rank(best[key].name):
            best[key] = p
    return list(best.values())


def resolve_user(text: str, pat: Pattern) -> list[Probe]:
    assert pat.target is not None
    path = resolve_binary(pat.target)
    return [
        Probe("uprobe", path, name, addr, text)
        for name, addr in user_symbols(path, pat.glob)
    ]


# -- resolving kernel patterns --------------------------------------------------------
def tracefs_dir() -> Path | None:
    for d in TRACEFS_DIRS:
        if (d / "available_events").exists():
            return d
    return None


def kernel_functions() -> list[str]:
    """Traceable kernel functions, without duplicates (static functions of the same name
    in several files: a kprobe by name attaches to one of them anyway)."""
    d = tracefs_dir()
    if d is None:
        raise FuncPatternError("tracefs is not mounted: cannot list kernel functions")
    names: dict[str, None] = {}
    try:
        with open(d / "available_filter_functions") as f:
            for line in f:  # "name" or "name [module]"
                names[line.split(maxsplit=1)[0]] = None
    except OSError as e:  # EPERM under some lockdown setups
        raise FuncPatternError(f"cannot list kernel functions: {e}") from e
    return list(names)


def resolve_kernel(text: str, pat: Pattern, functions: list[str]) -> list[Probe]:
    rx = re.compile(glob_regex(pat.glob))
    return [Probe("kprobe", KERNEL_TARGET, n, 0, text) for n in functions if rx.match(n)]


# -- kprobes availability --------------------------------------------------------------
def kernel_config_kprobes() -> bool | None:
    """CONFIG_KPROBES from /proc/config.gz or /boot/config-*; None when neither exists."""
    release = os.uname().release
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            opener: Any = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        return "\nCONFIG_KPROBES=y" in "\n" + text
    return None


def kprobes_status() -> tuple[bool, str]:
    """Whether kprobes can be created, and the evidence.

    BCC creates a kprobe through the perf "kprobe" PMU when the kernel has one, else
    through tracefs kprobe_events; both exist only with CONFIG_KPROBE_EVENTS (which
    needs CONFIG_KPROBES)."""
    if Path("/sys/bus/event_source/devices/kprobe").exists():
        return True, "perf kprobe PMU present"
    d = tracefs_dir()
    if d is not None:
        if (d / "kprobe_events").exists():
            return True, f"{d}/kprobe_events present"
        return False, f"{d}/kprobe_events is missing (kernel built without CONFIG_KPROBES)"
    config = kernel_config_kprobes()
    if config is None:
        return False, "cannot tell: tracefs is not mounted and the kernel config is unreadable"
    return config, "CONFIG_KPROBES=y" if config else "CONFIG_KPROBES is not set"


def kprobes_available() -> bool:
    return kprobes_status()[0]


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


# -- attaching uprobes ------------------------------------------------------------------
ENOTSUPP = 524  # kernel-internal errno (include/linux/errno.h), which strerror() lacks
BPF_LINK_CREATE = 28  # enum bpf_cmd, include/uapi/linux/bpf.h
BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type, Linux 6.6 (our 6.1 headers lack it)
BPF_F_UPROBE_MULTI_RETURN = 1
_NR_BPF = {"x86_64": 321, "aarch64": 280}  # the bpf(2) syscall number


class _UprobeMultiAttr(ctypes.Structure):
    """``union bpf_attr``'s link_create member, uprobe_multi variant."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("path", ctypes.c_uint64),
        ("offsets", ctypes.c_uint64),
        ("ref_ctr_offsets", ctypes.c_uint64),
        ("cookies", ctypes.c_uint64),
        ("cnt", ctypes.c_uint32),
        ("um_flags", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def uprobe_multi_link(prog_fd: int, path: str, offset: int, retprobe: bool) -> int:
    """A BPF link attaching ``prog_fd`` at a file offset of ``path`` in every process
    (pid 0); raises OSError. BCC 0.26 predates these links, so this is bpf(2) itself."""
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "bpf(2) syscall number unknown for this architecture")
    libc = _libc()
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    offsets = (ctypes.c_uint64 * 1)(offset)
    attr = _UprobeMultiAttr(
        prog_fd=prog_fd,
        attach_type=BPF_TRACE_UPROBE_MULTI,
        path=ctypes.addressof(path_buf),
        offsets=ctypes.addressof(offsets),
        cnt=1,
        um_flags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0,
    )
    fd = libc.syscall(nr, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, describe_errno(err))
    return int(fd)


def file_offset(path: str, vaddr: int) -> int:
    """The file offset of an ELF virtual address (what a uprobe is placed at), found from
    the program headers by BCC's bcc_resolve_symname, as its attach_uprobe(addr=) does."""
    from bcc import BPF

    _path, offset = BPF._check_path_symbol(path, b"", vaddr, -1)
    return int(offset)


class UprobeMultiLinks:
    """The generated programs attached through uprobe_multi links, one link each.

    Closing a link unregisters its uprobe and waits for RCU grace periods, but outside
    any global lock: closes from many threads share the grace periods (measured here:
    40 links in 0.07 s in parallel against 2.1 s one by one)."""

    CLOSE_THREADS = 32

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.fds: dict[str, int] = {}

    @classmethod
    def create(cls, bpf: Any) -> UprobeMultiLinks | None:
        """An instance when the kernel has uprobe_multi links, else None. The probe is
        libbpf's: a link on "/" fails with EBADF only where the attach type exists."""
        from bcc import BPF

        try:
            fn = bpf.load_func(
                b"func_feature_probe", BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI
            )
        except Exception:  # the program load was refused: an older kernel
            return None
        try:
            os.close(uprobe_multi_link(fn.fd, "/", 0, retprobe=False))  # never succeeds
        except OSError as e:
            return cls(bpf) if e.errno == errno.EBADF else None
        return None

    def attach(self, fn_name: str, path: str, vaddr: int, retprobe: bool) -> None:
        from bcc import BPF

        fn = self.bpf.load_func(fn_name.encode(), BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)
        self.fds[fn_name] = uprobe_multi_link(fn.fd, path, file_offset(path, vaddr), retprobe)

    def detach(self, fn_name: str) -> None:
        fd = self.fds.pop(fn_name, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        fds, self.fds = list(self.fds.values()), {}
        if not fds:
            return
        with ThreadPoolExecutor(min(self.CLOSE_THREADS, len(fds))) as pool:
            list(pool.map(os.close, fds))


def describe_errno(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP (the kernel cannot probe the instruction at this address)"
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def describe_error(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return describe_errno(error.errno)
    return str(error)


def remove_leaked_uprobe_event(bpf: Any, p: Probe, retprobe: bool) -> None:
    """libbcc falls back to tracefs uprobe_events when the perf uprobe PMU refuses a
    probe, and when perf_event_open then fails too it leaves the event it created behind
    ("<event>_bcc_<pid>"). Remove exactly that one: other monitors of this process may be
    creating their own events at the same moment."""
    tracefs = tracefs_dir()
    if tracefs is None:
        return
    try:
        offset = file_offset(p.target, p.address)
        prefix = b"r" if retprobe else b"p"
        name = bpf._get_uprobe_evname(prefix, p.target.encode(), offset, -1).decode()
        leaked = f"{name}_bcc_{os.getpid()}"
        if f"uprobes/{leaked} " not in (tracefs / "uprobe_events").read_text():
            return
        # os.open, not open(..., "a"): Python seeks to the end of a file opened for
        # appending, and tracefs refuses that seek with EINVAL.
        fd = os.open(tracefs / "uprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"-:uprobes/{leaked}\n".encode())
        finally:
            os.close(fd)
    except Exception:
        log.exception("func: cannot remove the uprobe event left by a failed attach")


# -- the monitor ------------------------------------------------------------------------
class FuncEvent(ctypes.Structure):
    """Mirror of ``struct func_event`` in agent/monitors/func/func.h."""

    _fields_ = [
        ("hdr", EventHeader),
        ("latency_ns", ctypes.c_uint64),
        ("probe_id", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class FuncStats(ctypes.Structure):
    """Mirror of ``struct func_stats`` in agent/monitors/func/func.h."""

    _fields_ = [
        ("count", ctypes.c_uint64),
        ("total_ns", ctypes.c_uint64),
        ("hist", ctypes.c_uint64 * FUNC_HIST_SLOTS),
    ]


STATS_WORDS = ctypes.sizeof(FuncStats) // 8


@register_monitor("func", "function calls by glob pattern: counts, latency, events")
class FuncMonitor(BccMonitor):
    """Function calls (uprobes and kprobes) matched by glob patterns."""

    Options = FuncOptions
    BPF_SOURCE = "func.c"
    REQUIRED_TRACEPOINTS = ("sched:sched_process_fork", "sched:sched_process_exit")
    # ignore: BccMonitor's unannotated tuple makes mypy infer a fixed 5-tuple type.
    REQUIRED_FEATURES = (*BccMonitor.REQUIRED_FEATURES, "uprobes")  # type: ignore[assignment]
    CSV_FIELDS: ClassVar[tuple[str, ...]] = (
        *COMMON_CSV_FIELDS, "function", "target", "latency_ns",
    )

    options: FuncOptions

    def __init__(self, options: MonitorOptions, ctx: MonitorContext) -> None:
        super().__init__(options, ctx)
        self.probes: list[Probe] = []
        self._prepared = False
        self.unattached: dict[int, str] = {}  # probe id -> why the kernel refused it
        self.links: UprobeMultiLinks | None = None
        # False forces BCC's perf-event uprobes (the only way before Linux 6.6): tests and
        # the bench set it to cover and compare that path.
        self.prefer_uprobe_multi = True
        self.attach_seconds = 0.0

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
        if len(probes) > options.max_probes:
            raise FuncPatternError(
                f"patterns match {len(probes)} functions, more than max_probes="
                f"{options.max_probes}; narrow the patterns or raise max_probes"
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
        super().load()

    def extra_cflags(self) -> dict[str, int | str]:
        return {
            "NR_PROBES": max(len(self.probes), 1),
            "FUNC_LATENCY": int(self.options.latency),
            "FUNC_EVENTS": int(self.options.events),
            "EVENTS_PER_SECOND": self.options.events_per_second,
        }

    def bpf_text(self) -> str:
        template = inline_includes(self.source_dir() / self.BPF_SOURCE)
        if PROBES_MARKER not in template:
            raise MonitorError(f"{self.BPF_SOURCE}: the {PROBES_MARKER} marker is missing")
        return template.replace(PROBES_MARKER, generate_probes(self.probes, self.options.latency))

    def attach(self) -> None:
        """Attach every resolved function; the program was compiled once by BPF(text=...),
        each attach loads one small generated program and creates one probe.

        Uprobes go through uprobe_multi BPF links when the kernel has them (Linux 6.6+):
        BCC's perf-event uprobes cost ~100 ms each to *close* here, serialised on the
        kernel's event_mutex (perf_trace_event_unreg waits for RCU grace periods), i.e.
        minutes to stop 200 functions with latency; links close in parallel instead.

        A function the kernel refuses (x86 uprobes cannot single-step some instructions,
        e.g. the lock prefix that starts glibc's pthread_spin_lock: ENOTSUPP) is skipped
        and listed in stats()["unattached"]; only when none attaches is it an error."""
        # BccMonitor.load sets the targets after attach(); until then target_flags is 0,
        # "everything", and every process's calls would count. Filter from the start.
        self.set_targets(self.ctx.targets)
        check_stats_layout(self.bpf[b"func_stats"])
        start = time.monotonic()
        self.unattached = {}
        uses_uprobes = any(p.kind == "uprobe" for p in self.probes)
        self.links = None
        if uses_uprobes and self.prefer_uprobe_multi:
            self.links = UprobeMultiLinks.create(self.bpf)
        for i, p in enumerate(self.probes):
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

    @property
    def attach_mode(self) -> str:
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
            remove_leaked_uprobe_event(self.bpf, p, retprobe)
        kind = f"{p.kind[0]}{'ret' if retprobe else ''}probe"  # uprobe, uretprobe, kprobe...
        return f"the kernel refused the {kind}: {describe_error(error)}"

    def close(self) -> None:
        links, self.links = self.links, None
        if links is not None:
            links.close()
        super().close()

    # -- events ---------------------------------------------------------------------
    def parse_event(self, raw: bytes) -> Event:
        e = FuncEvent.from_buffer_copy(raw[: ctypes.sizeof(FuncEvent)])
        probe = self.probes[e.probe_id]
        event: Event = {
            **self.common_fields(e.hdr),
            "function": probe.name,
            "target": probe.target,
        }
        if e.flags & FUNC_F_LATENCY:
            event["latency_ns"] = e.latency_ns
        return event

    def console_line(self, event: Event) -> str:
        latency = f" {event['latency_ns']} ns" if "latency_ns" in event else ""
        return (
            f"{event['timestamp']} func pid={event['pid']} tid={event['tid']} "
            f"comm={event['comm']} {event['target']}:{event['function']}{latency}"
        )

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
            {"name": p.name, "target": p.target, "error": self.unattached[i]}
            for i, p in enumerate(self.probes) if i in self.unattached
        ]
        return {
            "functions": functions,
            "unattached": unattached,
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
