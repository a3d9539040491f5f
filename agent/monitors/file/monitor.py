"""FileMonitor: calls that open, create, remove or rename a path, one event each.

The kernel side (file.c) hooks the ``syscalls:sys_enter_*``/``sys_exit_*`` tracepoints of
open, openat, openat2, creat, unlink, unlinkat, rmdir, rename, renameat, renameat2,
mkdir and mkdirat (those this kernel has: arm64 has only the *at ones and openat2).

What an event says (FileEventModel):
- ``op`` is the syscall; ``path`` (and ``path2``, a rename's new name) is absolute when
  it could be known: relative paths are resolved in the kernel at sys_enter from the
  working directory or dirfd's directory (``path_from``: ``absolute``, ``cwd``, ``dirfd``;
  ``unknown`` when not: dirfd not open, a directory deeper than the walk allows;
  ``unreadable`` when the path could not be read at all). Paths are not normalised:
  ``a/../b`` stays as given, after the directory.
- ``flags`` and ``mode`` are decoded with this machine's O_* values (``os`` module);
  ``ret`` is the fd or 0, or ``-errno`` with ``error`` its name.

Filters in the kernel (options, changeable without a reload): include/exclude path
prefixes (a rename passes when either name does), ``writes_only``, ``errors_only``.
Decided at sys_enter where possible: writes_only from the flags before any memory is
read; the prefixes right after reading (and, for a relative path, resolving) the path,
so a call elsewhere stores nothing.

Top list (stats, metrics): per path, the calls that passed the kernel filters
(errors_only aside), opens and failures, in an LRU map of ``top_entries`` paths;
``evicted`` counts the paths that had to make room.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from pydantic import Field, field_validator

from agent.kernel.btf import BTFError, vmlinux_btf
from agent.kernel.syscalls import errno_name
from agent.kernel.tracefs import find_tracefs, is_dir
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

# Mirrors of agent/monitors/file/file.h (tests/monitors/test_file.py checks them with gcc).
FILE_PATH_SIZE = 256
FILE_MAX_PREFIXES = 8
FILE_PREFIX_SIZE = 128
FILE_OPS = (  # FILE_OP_* order
    "open", "openat", "openat2", "creat", "unlink", "unlinkat", "rmdir",
    "rename", "renameat", "renameat2", "mkdir", "mkdirat",
)
OPEN_OPS = frozenset(FILE_OPS[:4])
RENAME_OPS = frozenset(("rename", "renameat", "renameat2"))
AT_OPS = frozenset(("openat", "openat2", "unlinkat", "renameat", "renameat2", "mkdirat"))
FILE_RES = ("absolute", "cwd", "dirfd", "unknown", "unreadable")  # FILE_RES_* order
FILE_EF_PATH_CUT, FILE_EF_PATH2_CUT = 1, 2
FILE_CFG_ARMED, FILE_CFG_WRITES_ONLY, FILE_CFG_ERRORS_ONLY = 1, 2, 4
FILE_COUNTERS = ("top_inserted", "prefix_filtered", "unresolved", "dir_walks")  # FILE_CNT_*
AT_FDCWD = -100  # include/uapi/linux/fcntl.h

# Each op needs its enter and exit tracepoints. The *at ones exist on every
# architecture; the legacy ones (open, creat, unlink, rmdir, rename, mkdir, renameat)
# not on arm64 and the other architectures of include/uapi/asm-generic/unistd.h, and
# openat2 only since Linux 5.6: those are compiled in when present.
REQUIRED_OPS = ("openat", "unlinkat", "renameat2", "mkdirat")
OPTIONAL_OPS = tuple(op for op in FILE_OPS if op not in REQUIRED_OPS)

# BTF members the kernel's path walk reads (file.c dir_path()).
WALK_FIELDS = (
    ("task_struct", "fs"), ("task_struct", "files"),
    ("fs_struct", "pwd"), ("fs_struct", "root"),
    ("path", "mnt"), ("path", "dentry"),
    ("files_struct", "fdt"), ("fdtable", "fd"), ("fdtable", "max_fds"),
    ("file", "f_path"),
    ("dentry", "d_parent"), ("dentry", "d_name"), ("qstr", "name"),
    ("vfsmount", "mnt_root"),
    ("mount", "mnt"), ("mount", "mnt_parent"), ("mount", "mnt_mountpoint"),
    # what tells a kept directory path (file.c file_dirs) is still the same directory's
    ("dentry", "d_inode"), ("inode", "i_ino"), ("inode", "i_generation"),
)
# The calls besides renames after which a kept directory path may be stale: they change
# the mount tree (umount2's tracepoint is sys_exit_umount). Hooked at sys_exit when
# this kernel has them.
MOUNT_CALLS = ("mount", "umount", "move_mount", "pivot_root")


def walk_offsets() -> dict[str, int]:
    """``{"OFF_DENTRY_D_PARENT": 24, ...}`` from this kernel's BTF; BTFError if one is missing.
    OFF_MOUNT_ID: what tells a struct mount from one later allocated at its address:
    ``mnt_id_unique`` (64-bit, never reused; Linux 6.8+), else ``mnt_id``."""
    btf = vmlinux_btf()
    out = {f"OFF_{s.upper()}_{m.upper()}": btf.member_offset(s, m) for s, m in WALK_FIELDS}
    try:
        out["OFF_MOUNT_ID"] = btf.member_offset("mount", "mnt_id_unique")
    except BTFError:
        out["OFF_MOUNT_ID"] = btf.member_offset("mount", "mnt_id")
    return out


# -- decoding -----------------------------------------------------------------------------

# open(2) flags with this machine's values (the os module's); O_ACCMODE apart.
_OPEN_FLAG_NAMES = (
    "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND", "O_NONBLOCK", "O_DSYNC",
    "O_ASYNC", "O_DIRECT", "O_LARGEFILE", "O_DIRECTORY", "O_NOFOLLOW", "O_NOATIME",
    "O_CLOEXEC", "O_PATH",
)
O_TMPFILE_BIT = getattr(os, "O_TMPFILE", 0) & ~os.O_DIRECTORY  # __O_TMPFILE
_SYNC_ONLY = os.O_SYNC & ~os.O_DSYNC  # __O_SYNC: O_SYNC is __O_SYNC | O_DSYNC
_ACCMODE = ("O_RDONLY", "O_WRONLY", "O_RDWR")
AT_REMOVEDIR = 0x200  # include/uapi/linux/fcntl.h
RENAME_FLAG_NAMES = ((1, "RENAME_NOREPLACE"), (2, "RENAME_EXCHANGE"), (4, "RENAME_WHITEOUT"))


def open_flags(flags: int) -> str:
    """``O_WRONLY|O_CREAT|O_TRUNC`` for an open's flags, names as in fcntl.h; bits
    without a name as a hex remainder."""
    acc = flags & os.O_ACCMODE
    names = [_ACCMODE[acc] if acc < 3 else f"{acc:#x}"]
    rest = flags & ~os.O_ACCMODE
    if O_TMPFILE_BIT and rest & O_TMPFILE_BIT:
        names.append("O_TMPFILE")
        rest &= ~(O_TMPFILE_BIT | os.O_DIRECTORY)
    if _SYNC_ONLY and rest & _SYNC_ONLY:
        names.append("O_SYNC")
        rest &= ~os.O_SYNC
    for name in _OPEN_FLAG_NAMES:
        bit = getattr(os, name, 0)
        if bit and rest & bit:
            names.append(name)
            rest &= ~bit
    if rest:
        names.append(f"{rest:#x}")
    return "|".join(names)


def named_bits(flags: int, table: tuple[tuple[int, str], ...]) -> str:
    names = []
    for bit, name in table:
        if flags & bit:
            names.append(name)
            flags &= ~bit
    if flags:
        names.append(f"{flags:#x}")
    return "|".join(names)


def decode_flags(op: str, flags: int) -> str:
    if op in OPEN_OPS:
        return open_flags(flags)
    if op == "unlinkat":
        return named_bits(flags, ((AT_REMOVEDIR, "AT_REMOVEDIR"),))
    if op == "renameat2":
        return named_bits(flags, RENAME_FLAG_NAMES)
    return ""


def has_mode(op: str, flags: int) -> bool:
    """Whether the call takes a mode: mkdir and creat always, an open with O_CREAT or
    O_TMPFILE (open(2))."""
    if op in ("mkdir", "mkdirat", "creat"):
        return True
    return op in OPEN_OPS and bool(flags & (os.O_CREAT | O_TMPFILE_BIT))


def is_write(op: str, flags: int) -> bool:
    """What writes_only lets through (file.c open_writes()), for userspace checks."""
    if op not in OPEN_OPS or op == "creat":
        return True
    return bool(flags & os.O_ACCMODE) or bool(flags & (os.O_CREAT | os.O_TRUNC | O_TMPFILE_BIT))


# -- structs --------------------------------------------------------------------------------


class FileConfig(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("n_include", ctypes.c_uint32),
        ("n_exclude", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class FilePrefix(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("s", ctypes.c_char * FILE_PREFIX_SIZE),
    ]


FILE_EVENT = EventDecl(
    struct="file_event", header="file.h",
    doc="A call that opened, created, removed or renamed a path.",
    members=(
        Member("ret", "s64"),
        Member("flags", "u64"),
        Member("mode", "u32"),
        Member("dirfd", "s32"),
        Member("dirfd2", "s32"),
        Member("evflags", "u32"),
        Member("op", "u16"),
        Member("res", "u8"),
        Member("res2", "u8"),
        Member("_pad", "u32"),
        Member("path", "char", FILE_PATH_SIZE),
        Member("path2", "char", FILE_PATH_SIZE),  # sent for renames only
    ),
    fields=(
        EventField("op", "string", "the syscall: " + ", ".join(FILE_OPS), Decode.ENUM,
                   arg=dict(enumerate(FILE_OPS))),
        EventField("path", "string", "the path, absolute unless path_from says it could not be"),
        EventField("path_from", "string",
                   "absolute: given so; cwd/dirfd: a relative path resolved in the kernel "
                   "against the working directory / dirfd at the call; unknown: relative, "
                   "directory not known (path as given); unreadable: not readable from the "
                   "caller's memory", Decode.ENUM, source="res", arg=dict(enumerate(FILE_RES))),
        EventField("path2", "string", "renames: the new name (as path); else empty",
                   Decode.HOOK, arg="call"),
        EventField("path2_from", "string", "as path_from, for path2; empty if there is none",
                   Decode.HOOK, arg="call"),
        EventField("truncated", "boolean", f"a path was longer than {FILE_PATH_SIZE - 1} "
                   "bytes: cut", Decode.FLAG, source="evflags",
                   arg=FILE_EF_PATH_CUT | FILE_EF_PATH2_CUT),
        EventField("dirfd", "integer", "the *at calls' directory fd (-100: AT_FDCWD), else null",
                   Decode.HOOK, arg="call", nullable=True),
        EventField("flags", "string", "decoded flags: open flags (O_WRONLY|O_CREAT...), "
                   "unlinkat's AT_REMOVEDIR, renameat2's RENAME_*; empty when none",
                   Decode.HOOK, arg="call"),
        EventField("mode", "string", "octal creation mode (mkdir, creat, opens with "
                   "O_CREAT/O_TMPFILE), else null", Decode.HOOK, arg="call", nullable=True),
        EventField("ret", "integer", "fd (opens) or 0, or -errno"),
        EventField("error", "string", "errno name when ret < 0 (ENOENT...), else null",
                   Decode.ERRNO, source="ret", nullable=True),
    ),
    console="pid={pid} comm={comm} {op} {path} {path2} {flags} = {ret:errno}",
)
FileEvent = FILE_EVENT.ctypes_struct(None, "FileEvent")


class FileTopKey(ctypes.Structure):
    _fields_ = [("path", ctypes.c_char * FILE_PATH_SIZE)]


class FileTopVal(ctypes.Structure):
    _fields_ = [
        ("calls", ctypes.c_uint64),
        ("opens", ctypes.c_uint64),
        ("failures", ctypes.c_uint64),
        ("last_errno", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


# -- options, query, event --------------------------------------------------------------------


class FileOptions(MonitorOptions):
    include_prefixes: list[str] = Field(
        default_factory=list, max_length=FILE_MAX_PREFIXES,
        description="report only paths starting with one of these (absolute, at most "
        f"{FILE_PREFIX_SIZE - 1} bytes each); empty: every path. Byte prefixes: "
        "'/etc/' matches /etc/passwd, '/etc' also /etcetera",
    )
    exclude_prefixes: list[str] = Field(
        default_factory=list, max_length=FILE_MAX_PREFIXES,
        description="never report paths starting with one of these",
    )
    writes_only: bool = Field(
        False, description="only opens that write, create or truncate, and every remove, "
        "rename and mkdir")
    errors_only: bool = Field(False, description="only calls that failed")
    top_entries: int = Field(
        4096, ge=64, le=1 << 18,
        description="paths the in-kernel top list holds (LRU: the least recent makes room)")
    metric_top: int = Field(
        20, ge=0, le=1000,
        description="paths per Prometheus family (the most opened, the most failing)")
    max_pending: int = Field(
        16384, ge=64, le=1 << 20,
        description="calls in flight between sys_enter and sys_exit (one per thread)")

    @field_validator("include_prefixes", "exclude_prefixes")
    @classmethod
    def _prefixes(cls, v: list[str]) -> list[str]:
        for p in v:
            raw = p.encode("utf-8", "surrogateescape")
            if not p.startswith("/"):
                raise ValueError(f"prefix {p!r} is not absolute (must start with '/')")
            if len(raw) > FILE_PREFIX_SIZE - 1:
                raise ValueError(f"prefix {p!r} is longer than {FILE_PREFIX_SIZE - 1} bytes")
            if "\0" in p:
                raise ValueError(f"prefix {p!r} contains a NUL byte")
        return v


class FileStatsQuery(MonitorStatsQuery):
    limit: int = Field(20, ge=0, le=100000, description="rows in each top list")
    reset: bool = Field(False, description="clear the top list after reading it")


@register_monitor("file", "paths opened, created, removed and renamed (open*, creat, unlink*, "
                  "rmdir, rename*, mkdir*)")
class FileMonitor(BccMonitor[FileOptions]):
    """File opens, creations, removals and renames."""

    Options = FileOptions
    StatsQuery = FileStatsQuery
    EVENT = FILE_EVENT
    BPF_SOURCE = "file.c"
    REQUIRED_TRACEPOINTS = (
        *(f"syscalls:sys_{d}_{op}" for op in REQUIRED_OPS for d in ("enter", "exit")),
    )

    def __init__(self, options: FileOptions, ctx: MonitorContext) -> None:
        super().__init__(options, ctx)
        self._top_base = 0  # top_inserted at the last reset
        self.ops: tuple[str, ...] = REQUIRED_OPS

    @classmethod
    def option_errors(cls, options: MonitorOptions, report: Any) -> str | None:
        try:
            walk_offsets()
        except BTFError as e:
            return f"resolving relative paths needs BTF offsets: {e}"
        return None

    # -- kernel side -------------------------------------------------------------------
    @staticmethod
    def present_ops() -> tuple[str, ...]:
        """The ops whose two tracepoints this kernel has (file.c compiles only those)."""
        tracefs = find_tracefs()
        if tracefs is None:
            return REQUIRED_OPS
        base = tracefs / "events" / "syscalls"
        return tuple(
            op for op in FILE_OPS
            if op in REQUIRED_OPS
            or (is_dir(base / f"sys_enter_{op}") and is_dir(base / f"sys_exit_{op}"))
        )

    @staticmethod
    def present_mount_calls() -> tuple[str, ...]:
        """The MOUNT_CALLS whose sys_exit tracepoint this kernel has."""
        tracefs = find_tracefs()
        if tracefs is None:
            return ()
        base = tracefs / "events" / "syscalls"
        return tuple(c for c in MOUNT_CALLS if is_dir(base / f"sys_exit_{c}"))

    def extra_cflags(self) -> dict[str, int | str]:
        try:
            offsets = walk_offsets()
        except BTFError as e:
            raise MonitorError(f"file: {e}") from e
        self.ops = self.present_ops()
        flags: dict[str, int | str] = {
            **offsets,
            "MAX_PENDING": self.options.max_pending,
            "TOP_ENTRIES": self.options.top_entries,
            "FILE_O_ACCMODE": os.O_ACCMODE,
            "FILE_O_WRONLY": os.O_WRONLY,
            "FILE_O_CREAT": os.O_CREAT,
            "FILE_O_TRUNC": os.O_TRUNC,
            "FILE_O_TMPFILE": O_TMPFILE_BIT,
            "FILE_AT_FDCWD": AT_FDCWD,
        }
        for op in self.ops:
            if op in OPTIONAL_OPS:
                flags[f"HAVE_{op.upper()}"] = 1
        for call in self.present_mount_calls():
            flags[f"HAVE_MOVES_{call.upper()}"] = 1
        return flags

    def load(self) -> None:
        super().load()
        try:
            self._write_config()
        except Exception as e:
            self.close()
            raise MonitorError(f"{self.name}: writing the configuration failed: {e}") from e

    def _write_config(self) -> None:
        """Prefixes first, then the configuration that arms the programs with their counts."""
        o = self.options
        table = self.bpf[b"file_prefixes"]
        for base, prefixes in ((0, o.include_prefixes), (FILE_MAX_PREFIXES, o.exclude_prefixes)):
            for i in range(FILE_MAX_PREFIXES):
                p = prefixes[i].encode("utf-8", "surrogateescape") if i < len(prefixes) else b""
                table[ctypes.c_int(base + i)] = FilePrefix(len=len(p), s=p)
        self.bpf[b"file_config"][ctypes.c_int(0)] = FileConfig(
            flags=FILE_CFG_ARMED
            | (FILE_CFG_WRITES_ONLY if o.writes_only else 0)
            | (FILE_CFG_ERRORS_ONLY if o.errors_only else 0),
            n_include=len(o.include_prefixes),
            n_exclude=len(o.exclude_prefixes),
        )

    def apply_options(self, options: MonitorOptions) -> bool:
        """The filters live in maps: they change without recompiling. (While the prefix
        table is rewritten, a call may see a mix of the old and the new prefixes.)"""
        if not isinstance(options, FileOptions) or self.bpf is None:
            return False
        live = {"include_prefixes", "exclude_prefixes", "writes_only", "errors_only",
                "metric_top"}
        if options.model_dump(exclude=live) != self.options.model_dump(exclude=live):
            return False
        self.options = options
        self._write_config()
        return True

    # -- events ------------------------------------------------------------------------
    def decode_hooks(self) -> dict[str, Any]:
        return {"call": decode_call}

    # -- top list ----------------------------------------------------------------------
    def _top_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "path": decode_c_string(key.path),
                "calls": int(val.calls),
                "opens": int(val.opens),
                "failures": int(val.failures),
                "last_error": errno_name(val.last_errno) if val.last_errno else "",
            }
            for key, val in self.bpf[b"file_top"].items()
        ]

    def stats(self, limit: int = 20, reset: bool = False) -> dict[str, Any]:
        """The most opened paths and the most failing ones, from the kernel's top list;
        ``reset`` clears it after reading."""
        rows = self._top_rows() if self.bpf is not None else []
        inserted = self.kernel_counters().get("top_inserted", 0)
        out = {
            "top_lists": {
                name: top_list(rows, column, limit) for name, column in TOP_LISTS.items()
            },
            "paths": len(rows),
            "capacity": self.options.top_entries,
            "evicted": max(0, inserted - self._top_base - len(rows)),
        }
        if reset and self.bpf is not None:
            self.bpf[b"file_top"].clear()
            self._top_base = inserted
        return out

    def metric_series(self) -> list[MetricSeries]:
        """The top ``metric_top`` paths of each list: a bounded label set."""
        if self.bpf is None or not self.options.metric_top:
            return []
        rows = self._top_rows()
        n = self.options.metric_top
        return [
            MetricSeries("opens", f"opens per path (the {n} most opened, kernel top list)",
                         "path", {r["path"]: r["opens"] for r in top(rows, "opens", n)}),
            MetricSeries("failures", f"failed calls per path (the {n} most failing)",
                         "path", {r["path"]: r["failures"] for r in top(rows, "failures", n)}),
        ]

    def kernel_counters(self) -> dict[str, int]:
        out = super().kernel_counters()
        if self.bpf is None:
            return out
        table = self.bpf[b"file_counters"]
        for i, name in enumerate(FILE_COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(i)]))
        return out


def resolution(res: int) -> str:
    return FILE_RES[res] if res < len(FILE_RES) else str(res)


def decode_call(raw: bytes, members: dict[str, Any]) -> dict[str, Any]:
    """The fields that depend on the op: path2 (renames), dirfd (*at calls), flags and
    mode (decoded by op)."""
    code, flags = members["op"], members["flags"]
    op = FILE_OPS[code] if code < len(FILE_OPS) else str(code)
    rename = op in RENAME_OPS
    return {
        "path2": decode_c_string(raw[_PATH2_OFFSET:_PATH2_OFFSET + FILE_PATH_SIZE])
        if rename else "",
        "path2_from": resolution(members["res2"]) if rename else "",
        "dirfd": members["dirfd"] if op in AT_OPS else None,
        "flags": decode_flags(op, flags),
        "mode": f"{members['mode']:04o}" if has_mode(op, flags) else None,
    }


_PATH2_OFFSET = FILE_EVENT.offsets()["path2"]


# The stats' top lists: name -> the column each is ordered by. Each list describes
# itself in the stats (key columns, sort column, rows) so that clients render and merge
# top lists of any monitor the same way (ebpf-agentctl stats <monitor>).
TOP_LISTS = {"most_opened": "opens", "most_failing": "failures"}


def top_list(rows: list[dict[str, Any]], column: str, limit: int) -> dict[str, Any]:
    return {"key": ["path"], "sort": column, "rows": top(rows, column, limit)}


def top(rows: list[dict[str, Any]], field: str, limit: int) -> list[dict[str, Any]]:
    """The rows with a non-zero ``field``, largest first (ties by path), at most ``limit``."""
    chosen = sorted((r for r in rows if r[field]), key=lambda r: (-r[field], r["path"]))
    return chosen[:limit]
