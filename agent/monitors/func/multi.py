"""One BPF program for every probed function: uprobe_multi links with a cookie per
attach point (Linux 6.6+). The program reads the function's probe id with
bpf_get_attach_cookie(), so what is compiled does not grow with the number of functions
(func.c, FUNC_COOKIE_PROGRAMS) and one link per binary carries all its functions.

A link is all or nothing: the kernel refuses the whole link when one address cannot be
probed (x86 cannot single-step some instructions: ENOTSUPP). A refused group is split in
halves and retried, so k bad functions among n cost O(k log n) extra link attempts and
every other function is attached.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from agent.kernel.probes import (
    BPF_F_UPROBE_MULTI_RETURN,
    BPF_LINK_CREATE,
    BPF_TRACE_UPROBE_MULTI,
    NR_BPF,
    _libc,
    _UprobeMultiAttr,
    describe_errno,
)

CLOSE_THREADS = 32


def link_create(prog_fd: int, path: str, offsets: list[int], cookies: list[int] | None,
                retprobe: bool) -> int:
    """A BPF link attaching ``prog_fd`` at file offsets of ``path`` in every process
    (pid 0), with one cookie per offset; raises OSError. BCC 0.26 predates these links,
    so this is bpf(2) itself."""
    nr = NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(38, "bpf(2) syscall number unknown for this architecture")
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
    )
    fd = _libc().syscall(nr, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, describe_errno(err))
    return int(fd)


@lru_cache(maxsize=64)
def _load_segments(path: str, mtime_ns: int) -> tuple[tuple[int, int, int], ...]:
    """(p_vaddr, p_memsz, p_offset) of the PT_LOAD segments of a 64-bit ELF file."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise OSError(8, f"{path}: not a 64-bit ELF file")
        end = "<" if head[5] == 1 else ">"
        phoff, = struct.unpack_from(end + "Q", head, 32)
        phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, _filesz, p_memsz, _align = (
            struct.unpack_from(end + "IIQQQQQQ", table, i * phentsize))
        if p_type == 1:  # PT_LOAD
            out.append((p_vaddr, p_memsz, p_offset))
    return tuple(out)


def file_offsets(path: str, vaddrs: list[int]) -> list[int]:
    """File offsets of ELF virtual addresses (where uprobes go), from the program headers
    read once per binary (BCC's bcc_resolve_symname does the same per symbol)."""
    segments = _load_segments(path, os.stat(path).st_mtime_ns)
    out = []
    for v in vaddrs:
        for vaddr, memsz, offset in segments:
            if vaddr <= v < vaddr + memsz:
                out.append(v - vaddr + offset)
                break
        else:
            raise OSError(22, f"{path}: address {v:#x} is in no loadable segment")
    return out


# x86 legacy prefixes and REX bytes that may precede an opcode.
_PREFIXES = frozenset([0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67,
                       *range(0x40, 0x50)])
LOCK_PREFIX = 0xF0


def lock_prefixed(path: str, offsets: list[int]) -> set[int]:
    """Indices of offsets whose first instruction carries a lock prefix: x86 uprobes
    refuse those (arch/x86/kernel/uprobes.c, uprobe_init_insn: -ENOTSUPP). Screening
    them out first spares the link splitting below a failed attempt per level (each
    attempt registers, then unregisters, every uprobe of the group: ~1 ms apiece here).
    Other refusals are still found by splitting."""
    out: set[int] = set()
    if os.uname().machine != "x86_64":
        return out
    with open(path, "rb") as f:
        for i, off in enumerate(offsets):
            f.seek(off)
            for b in f.read(15):
                if b == LOCK_PREFIX:
                    out.add(i)
                if b not in _PREFIXES:
                    break
    return out


class CookieLinks:
    """uprobe_multi links of the two shared programs, one per binary and direction."""

    def __init__(self, entry_fd: int, return_fd: int | None) -> None:
        self.entry_fd, self.return_fd = entry_fd, return_fd
        self.fds: list[int] = []

    def attach(self, path: str, ids: list[int], offsets: list[int], retprobe: bool,
               failed: Callable[[int, OSError], None]) -> list[int]:
        """Attaches what the kernel accepts; returns the ids attached, calls ``failed``
        for each refused one."""
        prog = self.return_fd if retprobe else self.entry_fd
        assert prog is not None
        attached: list[int] = []
        pending = [(ids, offsets)]
        while pending:
            group, offs = pending.pop()
            try:
                self.fds.append(link_create(prog, path, offs, group, retprobe))
                attached += group
            except OSError as e:
                if len(group) == 1:
                    failed(group[0], e)
                    continue
                half = len(group) // 2
                pending += [(group[:half], offs[:half]), (group[half:], offs[half:])]
        return attached

    def close(self) -> None:
        fds, self.fds = self.fds, []
        if not fds:
            return
        # Closing a link unregisters its uprobes and waits for RCU grace periods outside
        # any global lock: closes from several threads share them.
        with ThreadPoolExecutor(min(CLOSE_THREADS, len(fds))) as pool:
            list(pool.map(os.close, fds))
