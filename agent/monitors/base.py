"""The monitor contract, the registry, and the BCC-backed base most monitors share.

A monitor is one C file in agent/bpf/ plus one module (or package) in agent/monitors/
registered with ``@register_monitor("name")``; discovery imports every module of this
package, so adding a monitor touches no shared file.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import pkgutil
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from agent.core.events import Event, EventSink
from agent.core.targets import TargetLimits, TargetSet
from agent.kernel import procfs

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"

# Mirrors the CNT_* indices of agent/bpf/common.h.
KERNEL_COUNTERS = ("seen", "submitted", "dropped", "follow_full", "pending_full")
TF_PIDS, TF_UIDS, TF_COMMS, TF_FOLLOW, TF_READY = 1, 2, 4, 8, 16
PID_TARGET, PID_FOLLOWED = 1, 2  # values in target_pids (common.h)


@dataclass(frozen=True)
class MetricSeries:
    """One Prometheus family a monitor exports: ``ebpf_agent_<monitor>_<name>`` with one
    label whose values come from a bounded set (syscall names, probed functions)."""

    name: str
    doc: str
    label: str
    values: dict[str, float]
    counter: bool = True


class MonitorError(Exception):
    """A monitor could not be loaded or attached; the message says why."""


class DuplicateMonitorError(Exception):
    pass


class MonitorOptions(BaseModel):
    """Base of every monitor's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TransportSettings:
    kind: str = "auto"  # auto | ringbuf | perf
    ringbuf_pages: int = 512  # shared by all CPUs; a power of two
    perf_pages: int = 64  # per CPU; a power of two
    # Wake the consumer once per this many events (per CPU); 1 = every event. Events
    # in between wait at most one poll timeout (100 ms).
    wakeup_every: int = 32


@dataclass
class MonitorContext:
    """What a running monitor receives from the manager."""

    targets: TargetSet
    sink: EventSink
    transport: TransportSettings = field(default_factory=TransportSettings)
    limits: TargetLimits = field(default_factory=TargetLimits)
    ringbuf_supported: bool = True
    kernel_offsets: dict[str, int] = field(default_factory=dict)


class BaseMonitor(ABC):
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[MonitorOptions]] = MonitorOptions
    # "category:event" tracepoints and capability names (agent.kernel.capabilities).
    REQUIRED_TRACEPOINTS: ClassVar[tuple[str, ...]] = ()
    REQUIRED_FEATURES: ClassVar[tuple[str, ...]] = ()
    CSV_FIELDS: ClassVar[tuple[str, ...]] = ()
    # Aggregating monitors: columns of the periodic snapshot rows (<name>-snapshot.csv).
    SNAPSHOT_FIELDS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: MonitorOptions, ctx: MonitorContext) -> None:
        self.options = options
        self.ctx = ctx

    @classmethod
    def option_errors(cls, options: MonitorOptions, report: Any) -> str | None:
        """Why these options cannot run on this kernel (409), beyond the static needs."""
        return None

    @abstractmethod
    def load(self) -> None:
        """Compile, load and attach; raise MonitorError with the reason on failure."""

    @abstractmethod
    def poll(self, timeout_ms: int) -> None:
        """Deliver pending events to ctx.sink; called in a loop by the poller thread."""

    @abstractmethod
    def close(self) -> None:
        """Detach every probe and free every map. Idempotent."""

    @abstractmethod
    def set_targets(self, targets: TargetSet) -> None:
        """Write the target set into the kernel maps."""

    def apply_options(self, options: MonitorOptions) -> bool:
        """Take new options without reloading, when only live-changeable ones differ;
        False (the default) makes the manager reload the monitor with them."""
        return False

    def kernel_counters(self) -> dict[str, int]:
        return {}

    def stats(self) -> dict[str, Any]:
        """Monitor-specific figures (aggregating monitors return their tables)."""
        return {}

    def periodic(self) -> None:  # noqa: B027 (optional hook)
        """Called about once a second on the poller thread (snapshots, housekeeping)."""

    def snapshot_rows(self) -> list[dict[str, Any]]:
        """The aggregate tables as rows of SNAPSHOT_FIELDS (aggregating monitors)."""
        return []

    def metric_series(self) -> list[MetricSeries]:
        """Prometheus series of aggregating monitors' tables (read at scrape time)."""
        return []

    def csv_row(self, event: Event) -> list[Any]:
        return [event.get(f) for f in self.CSV_FIELDS]

    def console_line(self, event: Event) -> str:
        return " ".join(f"{k}={event[k]}" for k in self.CSV_FIELDS if k in event)


M = TypeVar("M", bound=type[BaseMonitor])


class MonitorRegistry:
    """Monitor classes by name. A fresh instance per test; ``default_registry`` for the app."""

    def __init__(self) -> None:
        self._classes: dict[str, type[BaseMonitor]] = {}

    def register(self, name: str, description: str = "") -> Callable[[M], M]:
        def decorate(cls: M) -> M:
            existing = self._classes.get(name)
            # Re-registering the very same class (a module imported twice) is harmless.
            same = existing is not None and (existing.__module__, existing.__qualname__) == (
                cls.__module__, cls.__qualname__)
            if existing is not None and not same:
                raise DuplicateMonitorError(
                    f"monitor name {name!r} registered twice: {existing.__module__}."
                    f"{existing.__qualname__} and {cls.__module__}.{cls.__qualname__}"
                )
            cls.name = name
            doc_lines = (cls.__doc__ or "").strip().splitlines()
            cls.description = description or (doc_lines[0] if doc_lines else name)
            self._classes[name] = cls
            return cls

        return decorate

    def discover(self, package: str = "agent.monitors") -> None:
        """Import every module of ``package`` so that their decorators run."""
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1] != "base":
                importlib.import_module(info.name)

    def get(self, name: str) -> type[BaseMonitor]:
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[BaseMonitor]]:
        return iter(sorted(self._classes.values(), key=lambda c: c.name))

    def names(self) -> list[str]:
        return sorted(self._classes)


default_registry = MonitorRegistry()
register_monitor = default_registry.register


def discover_monitors() -> MonitorRegistry:
    default_registry.discover()
    return default_registry


_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


def inline_includes(path: Path, seen: frozenset[Path] = frozenset()) -> str:
    """The source with our own ``#include "x.h"`` lines replaced by the files.

    BCC rewrites map calls and generates tracepoint argument structs only in the main
    file, so TRACEPOINT_PROBEs in common.h must reach the compiler as part of it.
    """
    if path in seen:
        return ""

    def expand(match: re.Match[str]) -> str:
        return inline_includes(path.parent / match.group(1), seen | {path})

    return _LOCAL_INCLUDE.sub(expand, path.read_text())


class BccMonitor(BaseMonitor):
    """A monitor whose kernel side is one BCC program including agent/bpf/common.h."""

    BPF_SOURCE: ClassVar[str] = ""  # file name in agent/bpf/
    REQUIRED_FEATURES: ClassVar[tuple[str, ...]] = (
        "root", "bcc", "tracefs", "btf", "kernel_headers")

    def __init__(self, options: MonitorOptions, ctx: MonitorContext) -> None:
        super().__init__(options, ctx)
        self.bpf: Any = None
        self.use_ringbuf = False
        self.lost_in_perf = 0
        self.parse_errors = 0

    # -- kernel side ---------------------------------------------------------------
    def extra_cflags(self) -> dict[str, int | str]:
        """Monitor-specific -D constants."""
        return {}

    def bpf_text(self) -> str:
        return inline_includes(BPF_DIR / self.BPF_SOURCE)

    def cflags(self) -> list[str]:
        t, lim = self.ctx.transport, self.ctx.limits
        self.use_ringbuf = t.kind == "ringbuf" or (t.kind == "auto" and self.ctx.ringbuf_supported)
        defines: dict[str, int | str] = {
            **self.ctx.kernel_offsets,
            "MAX_TARGET_PIDS": lim.pids,
            "MAX_TARGET_UIDS": lim.uids,
            "MAX_TARGET_COMMS": lim.comms,
            "RINGBUF_PAGES": t.ringbuf_pages,
            "WAKEUP_EVERY": t.wakeup_every,
            **self.extra_cflags(),
        }
        flags = [f"-I{BPF_DIR}", "-Wno-macro-redefined"]
        flags += [f"-D{k}={v}" for k, v in defines.items()]
        if self.use_ringbuf:
            flags.append("-DUSE_RINGBUF")
        return flags

    def load(self) -> None:
        from bcc import BPF  # imported here: no BPF work (or libbcc loading) at import time

        try:
            self.bpf = BPF(text=self.bpf_text(), cflags=self.cflags())
            self.set_targets(self.ctx.targets)  # tracepoints are live already: see TF_READY
            self.attach()
            self.open_buffer()
        except Exception as e:
            self.close()
            raise MonitorError(f"{self.name}: loading the BPF program failed: {e}") from e

    def attach(self) -> None:
        """TRACEPOINT_PROBE programs attach themselves when BCC loads them."""

    def open_buffer(self) -> None:
        if self.use_ringbuf:
            self.bpf[b"events"].open_ring_buffer(self._on_raw_event)
        else:
            self.bpf[b"events"].open_perf_buffer(
                self._on_raw_event, page_cnt=self.ctx.transport.perf_pages,
                lost_cb=self._on_lost, wakeup_events=self.ctx.transport.wakeup_every,
            )

    def _on_lost(self, lost: int) -> None:
        self.lost_in_perf += lost

    def _on_raw_event(self, _cpu_or_ctx: Any, data: int, size: int) -> int:
        try:
            event = self.parse_event(ctypes.string_at(data, size))
        except Exception:  # a bad record must not kill the poller; it is counted
            self.parse_errors += 1
            log.exception("%s: cannot decode an event", self.name)
            return 0
        if event is not None:
            self.ctx.sink.publish(event)
        return 0

    def parse_event(self, raw: bytes) -> Event | None:
        raise NotImplementedError

    def poll(self, timeout_ms: int) -> None:
        if self.bpf is None:
            return
        # Producers wake us only every `wakeup_every` events: drain what is there after
        # every wait, woken or timed out.
        if self.use_ringbuf:
            self.bpf.ring_buffer_poll(timeout_ms)
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(timeout_ms)
            self.bpf.perf_buffer_consume()

    def close(self) -> None:
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            bpf.cleanup()

    # -- targets -------------------------------------------------------------------
    def set_targets(self, targets: TargetSet) -> None:
        if self.bpf is None:
            return
        old_pids = self._operator_pids()
        old_follow = bool(self._read_flags() & TF_FOLLOW)
        new_flags = (
            (TF_PIDS if targets.pids else 0)
            | (TF_UIDS if targets.uids else 0)
            | (TF_COMMS if targets.comms else 0)
            | (TF_FOLLOW if targets.follow_children else 0)
            | TF_READY
        )
        flags = self.bpf[b"target_flags"]
        # While the maps are rewritten only filters active both before and after stay
        # on: a filter being added is switched on once its map is full, one being
        # removed is switched off before its map empties.
        flags[ctypes.c_int(0)] = ctypes.c_uint32(
            self._read_flags() & new_flags & (TF_PIDS | TF_UIDS | TF_COMMS | TF_READY)
        )
        self._sync_pids(targets.pids)
        self._sync_ids("target_uids", targets.uids)
        self._sync_comms(targets.comms)
        if old_pids != set(targets.pids) or old_follow != targets.follow_children:
            self._seed_followed(targets)
        flags[ctypes.c_int(0)] = ctypes.c_uint32(new_flags)

    def _read_flags(self) -> int:
        return int(self.bpf[b"target_flags"][ctypes.c_int(0)].value)

    def _operator_pids(self) -> set[int]:
        return {k.value for k, v in self.bpf[b"target_pids"].items() if v.value == PID_TARGET}

    def _sync_pids(self, wanted: frozenset[int]) -> None:
        table = self.bpf[b"target_pids"]
        for pid in self._operator_pids() - wanted:
            del table[table.Key(pid)]
        for pid in wanted:
            table[table.Key(pid)] = table.Leaf(PID_TARGET)

    def _sync_ids(self, map_name: str, wanted: frozenset[int]) -> None:
        table = self.bpf[map_name.encode()]
        present = {k.value for k in table}
        for v in present - wanted:
            del table[table.Key(v)]
        for v in wanted - present:
            table[table.Key(v)] = table.Leaf(1)

    def _sync_comms(self, wanted: frozenset[str]) -> None:
        table = self.bpf[b"target_comms"]
        present = {bytes(k.comm).rstrip(b"\0").decode("utf-8", "surrogateescape") for k in table}
        for c in present - wanted:
            table.__delitem__(self._comm_key(table, c))
        for c in wanted - present:
            table[self._comm_key(table, c)] = table.Leaf(1)

    @staticmethod
    def _comm_key(table: Any, comm: str) -> Any:
        key = table.Key()
        key.comm = comm.encode("utf-8", "surrogateescape")
        return key

    def _seed_followed(self, targets: TargetSet) -> None:
        """Reset followed children: the living descendants of the target pids."""
        table = self.bpf[b"target_pids"]
        for key, kind in list(table.items()):
            if kind.value == PID_FOLLOWED:
                del table[key]
        if not (targets.pids and targets.follow_children):
            return
        for pid in procfs.descendants(targets.pids) - targets.pids:
            table[table.Key(pid)] = table.Leaf(PID_FOLLOWED)

    def read_targets(self) -> dict[str, Any]:
        """The target maps as the kernel holds them."""
        return {
            "pids": sorted(self._operator_pids()),
            "uids": sorted(k.value for k in self.bpf[b"target_uids"]),
            "comms": sorted(
                bytes(k.comm).rstrip(b"\0").decode("utf-8", "surrogateescape")
                for k in self.bpf[b"target_comms"]
            ),
            "follow_children": bool(self._read_flags() & TF_FOLLOW),
        }

    def kernel_counters(self) -> dict[str, int]:
        if self.bpf is None:
            return {}
        table = self.bpf[b"counters"]
        out = {}
        for i, name in enumerate(KERNEL_COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        out["dropped"] += self.lost_in_perf
        out["parse_errors"] = self.parse_errors
        return out
