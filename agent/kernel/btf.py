"""A small reader of the kernel's BTF (``/sys/kernel/btf/vmlinux``).

BCC has no CO-RE, and the kernel headers BCC compiles against may belong to another
kernel, so a struct read through header types lands on wrong offsets (docs/kernel.md). The running
kernel describes its own layout in BTF; we read member offsets from it at start-up
and hand them to BPF programs as ``-D`` constants. Format: the kernel's
Documentation/bpf/btf.rst ("Type encoding").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F

# Kinds (btf.rst, "BTF_KIND_*") and the bytes of data that follow each btf_type.
KIND_STRUCT = 4
KIND_UNION = 5
_FIXED_EXTRA = {1: 4, 3: 12, 14: 4, 17: 4}  # INT, ARRAY, VAR, DECL_TAG
# STRUCT, UNION, ENUM, FUNC_PROTO, DATASEC, ENUM64: bytes per member (vlen of them).
_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}


class BTFError(Exception):
    """BTF is missing, malformed, or lacks a struct or member we need."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


@dataclass(frozen=True)
class Composite:
    name: str
    size: int
    members: tuple[Member, ...]


class BTF:
    """Structs and unions of one BTF blob, by type id and by name."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x}")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        types = blob[hdr_len + type_off : hdr_len + type_off + type_len]
        self._strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        self._composites: dict[int, Composite] = {}
        self._by_name: dict[str, int] = {}
        self._parse_types(types)

    def _string(self, offset: int) -> str:
        end = self._strings.index(b"\0", offset)
        return self._strings[offset:end].decode()

    def _parse_types(self, data: bytes) -> None:
        pos, type_id = 0, 1
        while pos < len(data):
            name_off, info, size = struct.unpack_from("<III", data, pos)
            pos += 12
            vlen, kind, kind_flag = info & 0xFFFF, (info >> 24) & 0x1F, info >> 31
            if kind in (KIND_STRUCT, KIND_UNION):
                members = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, pos + 12 * i)
                    bit_offset = m_off & 0xFFFFFF if kind_flag else m_off
                    members.append(Member(self._string(m_name), m_type, bit_offset))
                name = self._string(name_off)
                self._composites[type_id] = Composite(name, size, tuple(members))
                if name and kind == KIND_STRUCT:
                    self._by_name.setdefault(name, type_id)
            pos += _FIXED_EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            type_id += 1

    def struct(self, name: str) -> Composite:
        try:
            return self._composites[self._by_name[name]]
        except KeyError:
            raise BTFError(f"struct {name} not found in BTF") from None

    def member_offset(self, struct_name: str, member: str) -> int:
        """Byte offset of ``member`` in ``struct struct_name``, searching anonymous members."""
        found = self._find(self.struct(struct_name), member)
        if found is None:
            raise BTFError(f"struct {struct_name} has no member {member} in this kernel's BTF")
        if found % 8:
            raise BTFError(f"{struct_name}.{member} is a bitfield")
        return found // 8

    def _find(self, comp: Composite, member: str) -> int | None:
        for m in comp.members:
            if m.name == member:
                return m.bit_offset
            if not m.name:
                inner = self._resolve_composite(m.type_id)
                if inner is not None:
                    sub = self._find(inner, member)
                    if sub is not None:
                        return m.bit_offset + sub
        return None

    def _resolve_composite(self, type_id: int) -> Composite | None:
        return self._composites.get(type_id)


@lru_cache(maxsize=1)
def vmlinux_btf() -> BTF:
    try:
        return BTF(VMLINUX_BTF.read_bytes())
    except OSError as e:
        raise BTFError(f"cannot read {VMLINUX_BTF}: {e.strerror}") from None


# Offsets every BPF program receives (agent/bpf/common.h; the process tracker,
# agent/processes/tracker.c, also reads pid, exit_code and the signal_struct ones).
TASK_FIELDS = (
    ("task_struct", "real_parent"),
    ("task_struct", "tgid"),
    ("task_struct", "pid"),
    ("task_struct", "exit_code"),
    ("task_struct", "signal"),
    ("signal_struct", "flags"),
    ("signal_struct", "group_exit_code"),
    ("task_struct", "group_leader"),
    ("task_struct", "start_boottime"),
    ("task_struct", "mm"),
    ("mm_struct", "arg_start"),
    ("mm_struct", "arg_end"),
)


def kernel_offsets(btf: BTF | None = None) -> dict[str, int]:
    """``{"OFF_TASK_STRUCT_REAL_PARENT": 1280, ...}``; raises BTFError when a field is missing."""
    btf = btf or vmlinux_btf()
    return {
        f"OFF_{s.upper()}_{m.upper()}": btf.member_offset(s, m) for s, m in TASK_FIELDS
    }


# The syscall number in struct pt_regs, per machine (the member the kernel's
# syscall_get_nr() reads on x86-64 and arm64).
PT_REGS_SYSCALL_NR = {"x86_64": "orig_ax", "aarch64": "syscallno"}


def pt_regs_nr_offset(machine: str | None = None) -> int:
    """Offset of the syscall number in this kernel's struct pt_regs."""
    m = machine or os.uname().machine
    field = PT_REGS_SYSCALL_NR.get(m)
    if field is None:
        raise BTFError(f"no known pt_regs syscall-number field for machine {m}")
    return vmlinux_btf().member_offset("pt_regs", field)
