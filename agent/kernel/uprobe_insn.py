"""First instructions that x86-64 uprobes must not be placed on, read from the binary.

A uprobe replaces a function's first instruction with int3; when it fires the kernel
either executes a copy of the instruction out of line or emulates it
(the kernel's x86 uprobe code). Three classes are screened out before attaching:

* **refused by the kernel, legacy prefixes**: is_prefix_bad() refuses a lock or an
  ES/CS/SS/DS segment prefix (-ENOTSUPP).
* **refused by the kernel, VEX/EVEX**: uprobe_init_insn() checks ``OPCODE1(insn)``
  against good_insns_64, the table of ONE-byte opcodes; for a VEX/EVEX instruction the
  decoder stores the byte after the prefix there ("VEX has only 1 byte for opcode"), so
  e.g. ``vmovd %esi,%xmm0`` (c5 f9 **6e** c6, "outs") and ``vpxor`` (.. **ef**, "out")
  are refused. Both kinds are harmless but each refusal costs a failed link attempt per
  split level (agent/monitors/func/cookie_links.py), each registering and unregistering
  the whole group in every process mapping the binary: with glibc's such functions,
  ``c:*`` started many times slower (bench/RESULTS.md, "Figures the code cites").
* **accepted, then corrupting** (the dangerous one): VEX/EVEX instructions whose opcode
  byte is one branch_setup_xol_ops() emulates (0x70-0x7f Jcc, 0x90 nop, 0xe8 call,
  0xe9/0xeb jmp). It keys on the same ``OPCODE1`` without looking at the opcode map, so
  ``vpbroadcastb %esi,%zmm16`` (62 e2 7d 48 **7a** c6) is taken for ``jp rel8`` and
  ``vpor`` (.. **eb** ..) for ``jmp rel8``: the kernel "emulates" a branch and the
  instruction never runs, in every process calling the function. Measured on Linux 6.18
  with test binaries: functions starting with VEX 0x78, 0x7e, 0x7f, 0x90, 0xe8, 0xe9,
  0xeb and EVEX 0x7a returned stale register values under a uprobe
  (tests/monitors/test_func_libc.py keeps four of them). In glibc 2.36 this hits
  ``__memset_avx512_unaligned_erms`` (the memset
  that AVX-512 machines select): probed, memset left stale bytes behind and the Python
  process calling it died with a general protection fault in Py_DECREF. The screen is
  unconditional: no kernel version is known to look at the prefix there, and the cost
  is a handful of functions.

Only the first instruction matters: a uprobe is placed at the symbol's address.
"""

from __future__ import annotations

import os

# x86 legacy prefixes (segment overrides, operand/address size, rep) and REX bytes that
# may precede an opcode; VEX/EVEX may follow segment and address-size prefixes only, but
# skipping all of them is enough to find the first non-prefix byte.
_PREFIXES = frozenset([0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67,
                       *range(0x40, 0x50)])
LOCK_PREFIX = 0xF0
# is_prefix_bad(): the kernel refuses lock and the ES, CS, SS, DS segment overrides.
REFUSED_PREFIXES = frozenset([LOCK_PREFIX, 0x26, 0x2E, 0x36, 0x3E])
# The zeros of the kernel's good_insns_64 table (x86 uprobes): one-byte opcodes invalid in
# 64-bit mode, in/out, int/iret, hlt, cli/sti... Only applied to VEX/EVEX opcode bytes
# here, which the kernel looks up in this same table.
REFUSED_OPCODES_64 = frozenset([
    0x06, 0x07, 0x0E, 0x16, 0x17, 0x1E, 0x1F, 0x27, 0x2F, 0x37, 0x3F, 0x60, 0x61, 0x62,
    0x6C, 0x6D, 0x6E, 0x6F, 0x82, 0x9A, 0xCC, 0xCD, 0xCE, 0xCF, 0xD4, 0xD5, 0xD6, 0xE4,
    0xE5, 0xE6, 0xE7, 0xEA, 0xEC, 0xED, 0xEE, 0xEF, 0xF1, 0xF4, 0xFA, 0xFB,
])
# In 64-bit mode C5 and C4 always start a 2- and 3-byte VEX prefix and 62 a 4-byte EVEX
# prefix (LDS, LES and BOUND do not exist there): the opcode byte follows the prefix.
_VEX_PREFIX_LEN = {0xC5: 2, 0xC4: 3, 0x62: 4}
# The one-byte opcodes branch_setup_xol_ops() emulates: Jcc rel8, nop, call/jmp rel32,
# jmp rel8 (the 0x0f two-byte forms never match a VEX opcode, which is one byte).
BRANCH_OPCODES = frozenset([*range(0x70, 0x80), 0x90, 0xE8, 0xE9, 0xEB])
# AMD's XOP prefix (8F with a map select >= 8; POP r/m is 8F /0, whose ModRM reg field
# is 0, so the two never collide). Not verified either way on a CPU with XOP: left out
# as a precaution, since the kernel's decoder may take its opcode byte the same way.
XOP_PREFIX = 0x8F
XOP_REASON = ("its first instruction is XOP-encoded (AMD), whose handling by x86 "
              "uprobes is unverified: left out as a precaution")


def prefix_reason(prefix: int) -> str:
    what = "lock" if prefix == LOCK_PREFIX else f"segment ({prefix:#04x})"
    return (f"its first instruction has a {what} prefix, which x86 uprobes refuse "
            f"(ENOTSUPP)")


def vex_reason(prefix: int, opcode: int) -> str:
    kind = "EVEX" if prefix == 0x62 else "VEX"
    if opcode in REFUSED_OPCODES_64:
        return (f"its first instruction is {kind}-encoded with opcode byte {opcode:#04x}, "
                f"which x86 uprobes refuse (ENOTSUPP: the kernel checks it against its "
                f"one-byte opcode table)")
    return (f"its first instruction is {kind}-encoded with opcode byte {opcode:#04x}, which "
            f"the kernel's x86 uprobe code mistakes for a branch or nop and skips instead "
            f"of executing it: probing it would corrupt every process calling the function")


def first_instruction_hazard(code: bytes) -> str | None:
    """Why a uprobe must not go on the instruction starting ``code`` (its first 15
    bytes), or None."""
    for i, b in enumerate(code):
        if b in REFUSED_PREFIXES:
            return prefix_reason(b)
        if b in _PREFIXES:
            continue
        if b == XOP_PREFIX and i + 1 < len(code) and code[i + 1] & 0x1F >= 8:
            return XOP_REASON
        n = _VEX_PREFIX_LEN.get(b)
        if n is not None and i + n < len(code):
            op = code[i + n]
            if op in BRANCH_OPCODES or op in REFUSED_OPCODES_64:
                return vex_reason(b, op)
        return None
    return None


def uprobe_hazards(path: str, offsets: list[int]) -> dict[int, str]:
    """Index -> reason for the file offsets of ``path`` whose first instruction must not
    carry a uprobe. Empty on other architectures (the rules are x86's)."""
    out: dict[int, str] = {}
    if os.uname().machine != "x86_64":
        return out
    with open(path, "rb") as f:
        for i, off in enumerate(offsets):
            f.seek(off)
            reason = first_instruction_hazard(f.read(15))
            if reason is not None:
                out[i] = reason
    return out
