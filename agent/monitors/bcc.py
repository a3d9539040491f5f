"""The BCC-backed base most monitors share: compile one C program (the monitor's own file
with agent/bpf/common.h inlined), attach, drain its ring/perf buffer, keep the target maps.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import re
import sys
import threading
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from agent.kernel import procfs
from agent.kernel.capabilities import CMPXCHG_KERNEL, kernel_version
from agent.kernel.cgroups import container_cgroups
from agent.model.events import Event, MonotonicClock
from agent.model.targets import TargetSet
from agent.monitors import compiled
from agent.monitors.compiled import Decoding, make_decoder
from agent.monitors.contract import BaseMonitor, MonitorContext, MonitorError, OptionsT
from agent.monitors.decoder import Hook
from agent.monitors.ringbuf import RingReader, ringbuf_supported

log = logging.getLogger(__name__)

# Shared C (common.h); each monitor's own C lives in its folder.
BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"

# Mirrors of agent/bpf/types.h (tests/monitors/test_common.py checks them with gcc):
# the CNT_* indices, the TF_* flags and the PID_* kinds.
KERNEL_COUNTERS = ("seen", "submitted", "dropped", "follow_full", "pending_full",
                   "cgroups_full")
TF_PIDS, TF_UIDS, TF_COMMS, TF_FOLLOW, TF_READY = 1, 2, 4, 8, 16
TF_CGROUPS, TF_CONTAINERS = 32, 64
TF_CGROUP_GEN = 1  # target_flags index of the cgroup targets' generation
PID_TARGET, PID_FOLLOWED = 1, 2  # values in target_pids
CG_PATH, CG_CONTAINER = 1, 2  # bits of target_cgroups values
CONTAINER_ID_LEN = 64
# The tracepoints of common.h's own programs (following children of target pids,
# targeting the cgroups of new containers): every BccMonitor needs them, so each
# subclass's REQUIRED_TRACEPOINTS gets them added.
COMMON_TRACEPOINTS = ("sched:sched_process_fork", "sched:sched_process_exit",
                      "cgroup:cgroup_mkdir", "cgroup:cgroup_rmdir")

# Records one ring buffer consume call hands to the callback before it returns: libbpf's
# ring_buffer__poll/__consume loop until the ring is empty, which never happens while a
# flood keeps it filled; a callback returning a negative value ends the call (the record
# it was given counts as consumed). BCC 0.26 has no ring_buffer__consume_n.
CONSUME_BUDGET = 4096
STOP_CONSUMING = -1


# libbcc compiles with one clang/LLVM instance per process that is not safe on two
# threads at once (two BPF() constructions at the same time crash the process): the
# control thread builds the monitors, the process tracker (agent/processes/) its own
# program on its thread; both take this lock around BPF() and cleanup().
COMPILE_LOCK = threading.Lock()


def build_bpf(text: str, cflags: list[str]) -> Any:
    """A BCC object compiled from ``text``: the one place the agent builds them (its
    monitors and the process tracker), under COMPILE_LOCK.

    Compiling a program makes clang/LLVM allocate tens of MB through malloc and free most
    of it once the object is loaded; glibc keeps those freed pages in its heaps (the
    arena of the thread that compiled), so the process's RSS stayed at its peak of every
    compile. malloc_trim(3) returns the free pages of every arena to the kernel (since
    glibc 2.8 it walks all arenas, not only the main heap); it runs once per build
    (failed or not), never per event, and not at all where the C library has no
    malloc_trim. Lowering M_ARENA_MAX (mallopt(3)) instead would make the poller and the
    event loop contend for one arena on every allocation, and would not give the
    compile's pages back."""
    from bcc import BPF  # imported here: no BPF work (or libbcc loading) at import time

    with COMPILE_LOCK:
        try:
            return BPF(text=text, cflags=cflags)
        finally:  # a failed compile frees its memory too
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)


_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only

_LOCAL_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.MULTILINE)


def inline_includes(path: Path, seen: frozenset[Path] = frozenset()) -> str:
    """The source with our own ``#include "x.h"`` lines replaced by the files, looked up
    beside the including file first, then in agent/bpf/ (common.h).

    BCC rewrites map calls and generates tracepoint argument structs only in the main
    file, so TRACEPOINT_PROBEs in common.h must reach the compiler as part of it.
    """
    if path in seen:
        return ""

    def expand(match: re.Match[str]) -> str:
        name = match.group(1)
        local = path.parent / name
        return inline_includes(local if local.exists() else BPF_DIR / name, seen | {path})

    return _LOCAL_INCLUDE.sub(expand, path.read_text())


class BccMonitor(BaseMonitor[OptionsT]):
    """A monitor whose kernel side is one BCC program including agent/bpf/common.h."""

    BPF_SOURCE: ClassVar[str] = ""  # file name in the monitor's own folder
    REQUIRED_FEATURES: ClassVar[tuple[str, ...]] = (
        "root", "bcc", "tracefs", "btf", "kernel_headers")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.REQUIRED_TRACEPOINTS = tuple(dict.fromkeys(
            (*cls.REQUIRED_TRACEPOINTS, *COMMON_TRACEPOINTS)))

    def __init__(self, options: OptionsT, ctx: MonitorContext) -> None:
        super().__init__(options, ctx)
        self.bpf: Any = None
        self.use_ringbuf = False
        self._reader: RingReader | None = None  # our ring buffer consumer (x86-64)
        self.lost_in_perf = 0
        self.parse_errors = 0
        # Poller thread only, except _stopping (set once by the control thread).
        self._budget = CONSUME_BUDGET
        self._stopping = False
        # Control thread: the cgroup targets last written to the maps, and the container
        # cgroups that did not fit in target_cgroups (counted with CNT_CGROUPS_FULL).
        self._cgroups_synced: tuple[Any, ...] | None = None
        self._cgroup_paths: dict[int, str] = {}  # id -> operator's path
        self.cgroups_full = 0
        # common.h's per-CPU cgroup verdict slot, where the kernel has the atomic it
        # takes; without it every call with a cgroup target looks up the LRU cache.
        self.cgroup_slot = kernel_version() >= CMPXCHG_KERNEL

    # -- kernel side ---------------------------------------------------------------
    def extra_cflags(self) -> dict[str, int | str]:
        """Monitor-specific -D constants."""
        return {}

    @classmethod
    def source_dir(cls) -> Path:
        """The monitor's folder (agent/monitors/<name>/), where BPF_SOURCE lives."""
        module = sys.modules[cls.__module__]
        return Path(module.__file__ or ".").resolve().parent

    def bpf_text(self) -> str:
        return inline_includes(self.source_dir() / self.BPF_SOURCE)

    def cflags(self) -> list[str]:
        t, lim = self.ctx.transport, self.ctx.limits
        self.use_ringbuf = t.kind == "ringbuf" or (t.kind == "auto" and self.ctx.ringbuf_supported)
        defines: dict[str, int | str] = {
            **self.ctx.kernel_offsets,
            "MAX_TARGET_PIDS": lim.pids,
            "MAX_TARGET_UIDS": lim.uids,
            "MAX_TARGET_COMMS": lim.comms,
            "MAX_TARGET_CGROUPS": lim.cgroups,
            "MAX_TARGET_CONTAINERS": lim.containers,
            "RINGBUF_PAGES": t.ringbuf_pages,
            **self.extra_cflags(),
        }
        flags = [f"-I{self.source_dir()}", f"-I{BPF_DIR}", "-Wno-macro-redefined"]
        flags += [f"-D{k}={v}" for k, v in defines.items()]
        if self.use_ringbuf:
            flags.append("-DUSE_RINGBUF")
        if self.cgroup_slot:
            flags.append("-DCGROUP_SLOT")
        return flags

    def load(self) -> None:
        self.__dict__.pop("decoder", None)  # built anew for what this load resolves
        if self.ctx.transport.decoder == "compiled" and not compiled.available():
            raise MonitorError(f"{self.name}: transport.decoder is 'compiled' but the"
                               f" extension is not built ({compiled.IMPORT_ERROR});"
                               " reinstall with gcc and the Python headers")
        try:
            self.bpf = build_bpf(self.bpf_text(), self.cflags())
            self.set_targets(self.ctx.targets)  # tracepoints are live already: see TF_READY
            self.attach()
            self.open_buffer()
        except Exception as e:
            self.close()
            raise MonitorError(f"{self.name}: loading the BPF program failed: {e}") from e

    def attach(self) -> None:
        """TRACEPOINT_PROBE programs attach themselves when BCC loads them."""

    def open_buffer(self) -> None:
        if self.use_ringbuf and ringbuf_supported():
            table = self.bpf[b"events"]
            self._reader = RingReader(table.map_fd, table.max_entries, self._on_record,
                                      max_delay_s=self.ctx.transport.max_delay_ms / 1000)
        elif self.use_ringbuf:
            self.bpf[b"events"].open_ring_buffer(self._on_raw_event)
        else:
            self.bpf[b"events"].open_perf_buffer(
                self._on_raw_event, page_cnt=self.ctx.transport.perf_pages,
                lost_cb=self._on_lost, wakeup_events=self.ctx.transport.wakeup_every,
            )

    def _on_lost(self, lost: int) -> None:
        self.lost_in_perf += lost

    def _on_raw_event(self, _cpu_or_ctx: Any, data: int, size: int) -> int:
        """The buffer callback (poller thread). The ring buffer honours the return value
        (STOP_CONSUMING ends the consume call); the perf reader ignores it."""
        return self._on_record(ctypes.string_at(data, size))

    def _on_record(self, raw: bytes) -> int:
        """One record (poller thread), from BCC's callbacks or from our RingReader, which
        also stops at STOP_CONSUMING."""
        self._budget -= 1
        try:
            event = self.parse_event(raw)
        except Exception:  # a bad record must not kill the poller; it is counted
            self.parse_errors += 1
            log.exception("%s: cannot decode an event", self.name)
            event = None
        if event is not None:
            self.ctx.sink.publish(event)
        return STOP_CONSUMING if self._budget <= 0 or self._stopping else 0

    def parse_event(self, raw: bytes) -> Event | None:
        """The event from one raw record; its struct starts with ``struct event_hdr``.
        Decoded by the declaration (EVENT) unless a monitor overrides this: with the
        compiled decoder, a Record (a read-only mapping carrying its JSON bytes: see
        agent/monitors/compiled.py)."""
        if self.EVENT is None:
            raise NotImplementedError(f"{self.name}: no EVENT declaration and no parse_event")
        return self.decoder.decode(raw)

    @cached_property
    def decoder(self) -> Decoding:
        """The decoder of EVENT for these options, built at the first record (after
        load: LOOKUP tables may come from what load resolved): compiled or Python as
        the transport's ``decoder`` setting says."""
        assert self.EVENT is not None
        return make_decoder(self.EVENT, self.name, self._clock, self.ctx.transport.decoder,
                            tables=self.decode_tables(), hooks=self.decode_hooks(),
                            options=self.options.model_dump(), identity=self.ctx.identity,
                            cgroups=self.ctx.cgroups)

    def decode_tables(self) -> dict[str, Mapping[Any, Any]]:
        """LOOKUP tables of EVENT's fields, by name (e.g. probe id -> function)."""
        return {}

    def decode_hooks(self) -> dict[str, Hook]:
        """HOOK functions of EVENT's fields, by name."""
        return {}

    @cached_property
    def _clock(self) -> MonotonicClock:
        return MonotonicClock()

    def poll(self, timeout_ms: int) -> None:
        """Poller thread. Each consume call ends after CONSUME_BUDGET records (ring
        buffer), so poll returns at any event rate. BCC's perf reader cannot be ended
        from the callback: it reads each CPU's buffer until empty, which request_stop
        guarantees by quiescing the programs."""
        if self.bpf is None or self._stopping:
            return
        # Producers do not wake us for every event (the perf buffer every `wakeup_every`
        # events, the ring buffer when we had read everything): drain what is there
        # after every wait, woken or timed out.
        if self._reader is not None:
            if not self._stopping:
                self._budget = CONSUME_BUDGET
                self._reader.poll(timeout_ms)
        elif self.use_ringbuf:
            self._budget = CONSUME_BUDGET
            self.bpf.ring_buffer_poll(timeout_ms)
            if not self._stopping:
                self._budget = CONSUME_BUDGET
                self.bpf.ring_buffer_consume()
        else:
            self.bpf.perf_buffer_poll(timeout_ms)
            if not self._stopping:
                self.bpf.perf_buffer_consume()

    def request_stop(self) -> None:
        """Control thread: end the poller's consume call at its next record, and stop
        the programs from producing (target_flags without TF_READY matches nothing) so
        that a perf buffer drains. Only the maps are written; the object stays."""
        self._stopping = True
        if self.bpf is None:
            return
        try:
            self.bpf[b"target_flags"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        except Exception:  # best effort: the ring buffer path does not need it
            log.exception("%s: cannot quiesce the programs", self.name)

    def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            reader.close()
        if self.bpf is not None:
            bpf, self.bpf = self.bpf, None
            with COMPILE_LOCK:
                bpf.cleanup()
            # bcc.BPF registers its cleanup with atexit when created (and donothing when
            # a program fails to load) and never unregisters it: that reference kept
            # every closed BPF object (tables, ctypes types, source text) alive for the
            # life of the process, one more per monitor start.
            atexit.unregister(bpf.cleanup)
            atexit.unregister(bpf.donothing)

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
            | (TF_CGROUPS if targets.cgroups else 0)
            | (TF_CONTAINERS if targets.containers else 0)
            | TF_READY
        )
        flags = self.bpf[b"target_flags"]
        # While the maps are rewritten only filters active both before and after stay
        # on: a filter being added is switched on once its map is full, one being
        # removed is switched off before its map empties.
        flags[ctypes.c_int(0)] = ctypes.c_uint32(
            self._read_flags() & new_flags
            & (TF_PIDS | TF_UIDS | TF_COMMS | TF_CGROUPS | TF_CONTAINERS | TF_READY)
        )
        self._sync_pids(targets.pids)
        self._sync_ids("target_uids", targets.uids)
        self._sync_comms(targets.comms)
        self._sync_cgroups(targets)
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

    def _sync_cgroups(self, targets: TargetSet) -> None:
        """target_containers and target_cgroups (operator paths and the cgroups of
        existing containers), then a new generation: verdicts the kernel cached from the
        old maps are not used again (common.h cgroup_match)."""
        state = (targets.cgroup_ids, targets.containers)
        if state == self._cgroups_synced:
            return
        trie = self.bpf[b"target_containers"]
        present = {self._prefix_of(k) for k in trie}
        for prefix in present - targets.containers:
            with contextlib.suppress(KeyError):
                del trie[self._container_key(trie, prefix)]
        for prefix in targets.containers - present:
            trie[self._container_key(trie, prefix)] = trie.Leaf(1)
        table = self.bpf[b"target_cgroups"]
        # Listed before the walk: a container cgroup made after this listing was added
        # by the kernel's cgroup_mkdir program (the trie is already full) and stays; one
        # listed here was there for the walk too, which says whether it still matches.
        listed = {k.value: v.value for k, v in table.items()}
        cg = self.ctx.cgroups.cgroups
        matched = set(container_cgroups(cg, targets.containers)) if cg is not None else set()
        paths = {cid for _, cid in targets.cgroup_ids}
        for cid in (set(listed) | paths | matched):
            kinds = (CG_PATH if cid in paths else 0) | (CG_CONTAINER if cid in matched else 0)
            if kinds == listed.get(cid):
                continue
            if not kinds:
                with contextlib.suppress(KeyError):  # removed by cgroup_rmdir meanwhile
                    del table[table.Key(cid)]
                continue
            try:
                table[table.Key(cid)] = table.Leaf(kinds)
            except Exception:  # full: BCC raises a bare Exception
                self.cgroups_full += 1
                log.warning("%s: target_cgroups is full: cgroup %d not targeted",
                            self.name, cid)
        gen = self.bpf[b"target_flags"]
        old = int(gen[ctypes.c_int(TF_CGROUP_GEN)].value)
        gen[ctypes.c_int(TF_CGROUP_GEN)] = ctypes.c_uint32((old + 1) & 0xFFFFFFFF)
        self._cgroups_synced = state
        self._cgroup_paths = {cid: path for path, cid in targets.cgroup_ids}

    @staticmethod
    def _container_key(trie: Any, prefix: str) -> Any:
        key = trie.Key()
        key.prefixlen = len(prefix) * 8
        key.id = prefix.encode("ascii")
        return key

    @staticmethod
    def _prefix_of(key: Any) -> str:
        return bytes(key.id)[: key.prefixlen // 8].decode("ascii")

    def _seed_followed(self, targets: TargetSet) -> None:
        """Reset followed children: the living descendants of the target pids."""
        table = self.bpf[b"target_pids"]
        for key, kind in list(table.items()):
            if kind.value == PID_FOLLOWED:
                # common.h's sched_process_exit program deletes a followed pid when it
                # exits: it may be gone between the listing and this delete.
                with contextlib.suppress(KeyError):
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
            "cgroups": sorted(self._operator_cgroups()),
            "containers": sorted(self._prefix_of(k) for k in self.bpf[b"target_containers"]),
            "follow_children": bool(self._read_flags() & TF_FOLLOW),
        }

    def _operator_cgroups(self) -> list[str]:
        path_of = self._cgroup_paths
        return [path_of.get(k.value, f"<cgroup id {k.value}>")
                for k, v in self.bpf[b"target_cgroups"].items() if v.value & CG_PATH]

    def container_cgroup_ids(self) -> set[int]:
        """The ids target_cgroups holds for containers (the kernel adds new ones)."""
        return {k.value for k, v in self.bpf[b"target_cgroups"].items()
                if v.value & CG_CONTAINER}

    def kernel_counters(self) -> dict[str, int]:
        if self.bpf is None:
            return {}
        table = self.bpf[b"counters"]
        out = {}
        for i, name in enumerate(KERNEL_COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        out["dropped"] += self.lost_in_perf
        out["cgroups_full"] += self.cgroups_full
        out["parse_errors"] = self.parse_errors
        return out
