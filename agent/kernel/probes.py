"""kprobes and uprobes: whether the kernel offers kprobes, uprobe_multi BPF links through
bpf(2) itself (BCC 0.26 predates them), and readable errors for refused probes. Only
BCC's public API is used here; what needs its internals lives with the monitor."""

from __future__ import annotations

import ctypes
import errno
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from agent.kernel.kconfig import kernel_config
from agent.kernel.symbols import file_offset
from agent.kernel.tracefs import find_tracefs

KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
ENOTSUPP = 524  # a kernel-internal errno, which errno(3) and strerror() lack
BPF_LINK_CREATE = 28  # enum bpf_cmd, bpf(2)
BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type, Linux 6.6 (our 6.1 headers lack it)
BPF_F_UPROBE_MULTI_RETURN = 1
NR_BPF = {"x86_64": 321, "aarch64": 280}  # the bpf(2) syscall number


# -- kprobes availability --------------------------------------------------------------
def kprobes_status() -> tuple[bool, str]:
    """Whether kprobes can be created, and the evidence. The one check: the capability
    report's "kprobes" feature and the func monitor both use it.

    BCC creates a kprobe through the perf "kprobe" PMU when the kernel has one, else
    through tracefs kprobe_events; both exist only with CONFIG_KPROBE_EVENTS (which
    needs CONFIG_KPROBES)."""
    if KPROBE_PMU.exists():
        return True, "perf kprobe PMU present"
    d = find_tracefs()
    if d is not None:
        if (d / "kprobe_events").exists():
            return True, f"{d}/kprobe_events present"
        return False, f"{d}/kprobe_events is missing (kernel built without CONFIG_KPROBES)"
    config = kernel_config()
    if not config:
        return False, "cannot tell: tracefs is not mounted and the kernel config is unreadable"
    if config.get("CONFIG_KPROBES") == "y":
        return True, "CONFIG_KPROBES=y"
    return False, "CONFIG_KPROBES is not set in this kernel"


def kprobes_available() -> bool:
    return kprobes_status()[0]


# -- errors ------------------------------------------------------------------------------
def describe_errno(err: int) -> str:
    if err == ENOTSUPP:
        return "ENOTSUPP (the kernel cannot probe the instruction at this address)"
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def describe_error(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        return describe_errno(error.errno)
    return str(error)


# -- uprobe_multi links ------------------------------------------------------------------
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


def uprobe_multi_link(prog_fd: int, path: str, offsets: list[int],
                      cookies: list[int] | None, retprobe: bool, pid: int = 0) -> int:
    """A BPF link attaching ``prog_fd`` at file offsets of ``path``, with one attach
    cookie per offset (bpf_get_attach_cookie()) when given; raises OSError. A link is
    all or nothing: one offset the kernel cannot probe fails it whole. BCC 0.26
    predates these links, so this is bpf(2) BPF_LINK_CREATE itself.

    ``pid`` 0: every process. Otherwise the link belongs to that process (ESRCH when
    there is none): the kernel's uprobe filter places the breakpoints only in that
    process's address space (uprobe_multi_link_filter compares the mm), so no other
    process traps at all, and it runs the program only for that process's threads.
    The link does not follow fork: a child inherits the breakpoints in the pages it
    copies, traps on them, and the program does not run for it (the link's task is
    another thread group)."""
    nr = NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "bpf(2) syscall number unknown for this architecture")
    n = len(offsets)
    path_buf = ctypes.create_string_buffer(os.fsencode(path))
    offs = (ctypes.c_uint64 * n)(*offsets)
    cks = (ctypes.c_uint64 * n)(*cookies) if cookies is not None else None
    attr = _UprobeMultiAttr(
        prog_fd=prog_fd,
        attach_type=BPF_TRACE_UPROBE_MULTI,
        path=ctypes.addressof(path_buf),
        offsets=ctypes.addressof(offs),
        cookies=ctypes.addressof(cks) if cks is not None else 0,
        cnt=n,
        um_flags=BPF_F_UPROBE_MULTI_RETURN if retprobe else 0,
        pid=pid,
    )
    fd = _libc().syscall(nr, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, describe_errno(err))
    return int(fd)


# Closing a link unregisters its uprobes and waits for RCU grace periods, but outside any
# global lock: closes from several threads share the grace periods (bench/RESULTS.md,
# "Figures the code cites"). The threads live only while close_links runs.
CLOSE_THREADS = 32


def close_links(fds: list[int]) -> None:
    """Close BPF link fds, from up to CLOSE_THREADS threads at once."""
    if not fds:
        return
    with ThreadPoolExecutor(min(CLOSE_THREADS, len(fds))) as pool:
        list(pool.map(os.close, fds))


class UprobeMultiLinks:
    """Programs of one BCC object attached through uprobe_multi links, one link per
    program and process (pid 0: every process), closed together by close_links."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self.fds: dict[tuple[str, int], int] = {}

    @classmethod
    def create(cls, bpf: Any, feature_probe: str) -> UprobeMultiLinks | None:
        """An instance when the kernel has uprobe_multi links, else None.
        ``feature_probe``: a program of ``bpf`` never attached otherwise. A link on
        "/" (a directory) fails with EBADF only where the attach type exists: an older
        kernel refuses the attach type first (EINVAL)."""
        from bcc import BPF

        try:
            fn = bpf.load_func(feature_probe.encode(), BPF.KPROBE,
                               attach_type=BPF_TRACE_UPROBE_MULTI)
        except Exception:  # the program load was refused: an older kernel
            return None
        try:
            os.close(uprobe_multi_link(fn.fd, "/", [0], None, retprobe=False))  # fails
        except OSError as e:
            return cls(bpf) if e.errno == errno.EBADF else None
        return None

    def attach(self, fn_name: str, path: str, vaddr: int, retprobe: bool,
               pid: int = 0) -> None:
        from bcc import BPF

        fn = self.bpf.load_func(fn_name.encode(), BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)
        self.fds[fn_name, pid] = uprobe_multi_link(
            fn.fd, path, [file_offset(path, vaddr)], None, retprobe, pid)

    def detach(self, fn_name: str, pid: int = 0) -> None:
        fd = self.fds.pop((fn_name, pid), None)
        if fd is not None:
            os.close(fd)

    def take_pid(self, pid: int) -> list[int]:
        """The link fds of process ``pid`` (0: of every process), no longer held here:
        the caller closes them."""
        return [self.fds.pop(key) for key in [k for k in self.fds if k[1] == pid]]

    def close(self) -> None:
        fds, self.fds = list(self.fds.values()), {}
        close_links(fds)
