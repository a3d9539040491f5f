"""Functions a probe can be placed on: ELF symbols of user-space binaries (read through
BCC's symbol resolver) and their file offsets (program headers), and the kernel's
traceable functions (tracefs)."""

from __future__ import annotations

import fnmatch
import os
import shutil
import struct
from dataclasses import dataclass
from functools import lru_cache

from agent.kernel.tracefs import find_tracefs

KERNEL_TARGET = "kernel"


class PatternError(ValueError):
    """A function pattern cannot be resolved: no match, too many matches, unknown
    library, unreadable symbols (the API answers 422)."""


@dataclass(frozen=True)
class Probe:
    """One resolved function. ``address`` is the ELF symbol value (0 for kernel)."""

    kind: str  # "uprobe" | "kprobe"
    target: str  # real path of the binary, or "kernel"
    name: str
    address: int = 0
    pattern: str = ""


def glob_regex(glob: str) -> str:
    """The glob as an anchored regex (fnmatch.translate ends it with ``\\Z``)."""
    return fnmatch.translate(glob)


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
        raise PatternError(f"{target!r}: no such library or binary")
    return os.path.realpath(path)


def user_symbols(path: str, glob: str) -> list[tuple[str, int]]:
    """(name, ELF address) of the function symbols of ``path`` that match ``glob``."""
    from bcc import BPF

    try:
        found = BPF.get_user_functions_and_addresses(path, glob_regex(glob).encode())
    except Exception as e:  # BCC raises a bare Exception: not ELF, unreadable...
        raise PatternError(f"{path}: cannot read its symbols: {e}") from e
    # Undefined (imported) symbols have no address in this file.
    return [(n.decode("utf-8", "surrogateescape"), a) for n, a in found if a]


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
    """File offsets of ELF virtual addresses, where uprobes go (perf_event_open(2) and
    BPF_LINK_CREATE take a path and a file offset), from the PT_LOAD program headers
    read once per binary: offset = vaddr - p_vaddr + p_offset, as BCC's
    bcc_resolve_symname computes it."""
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


def file_offset(path: str, vaddr: int) -> int:
    """The file offset of one ELF virtual address (file_offsets)."""
    return file_offsets(path, [vaddr])[0]


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


def kernel_functions() -> list[str]:
    """Traceable kernel functions, without duplicates (static functions of the same name
    in several files: a kprobe by name attaches to one of them anyway)."""
    d = find_tracefs()
    if d is None:
        raise PatternError("tracefs is not mounted: cannot list kernel functions")
    names: dict[str, None] = {}
    try:
        with open(d / "available_filter_functions") as f:
            for line in f:  # "name" or "name [module]"
                names[line.split(maxsplit=1)[0]] = None
    except OSError as e:  # EPERM under some lockdown setups
        raise PatternError(f"cannot list kernel functions: {e}") from e
    return list(names)
