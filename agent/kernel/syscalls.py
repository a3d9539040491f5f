"""Syscall and errno names for the SyscallMonitor.

Numbers come from the generated ``agent/kernel/syscall_table.py`` (the kernel's own syscall
tables, see ``tools/gen_syscall_table.py``); errno names from Python's ``errno.errorcode``,
which tests/kernel/test_syscall_table.py checks against the kernel's uapi errno headers.
"""

from __future__ import annotations

import errno as _errno
import platform

from agent.kernel.syscall_table import CATEGORIES, CATEGORY_NAMES, SYSCALLS

__all__ = [
    "CATEGORY_NAMES",
    "category",
    "errno_name",
    "machine",
    "syscall_name",
    "syscall_names",
]

# Other spellings of the machines we have tables for (BSD/macOS, Debian arch names).
_MACHINE_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}

# Where Linux has two names for one errno value, the one its uapi headers define with the
# number (the other is `#define EWOULDBLOCK EAGAIN`-style); errno.errorcode may hold either,
# e.g. EDEADLOCK for 35 and ENOTSUP for 95 on glibc.
_PREFERRED = {
    _errno.EAGAIN: "EAGAIN",
    _errno.EDEADLK: "EDEADLK",
    _errno.EOPNOTSUPP: "EOPNOTSUPP",
}

# Used only when errno.errorcode lacks the value:
_FALLBACK = {
    # errno(3) values missing from some Pythons' errno module (3.11 on Debian 12)
    133: "EHWPOISON",
    # Kernel-internal codes (errno(3) lists none of them) that never reach user space but
    # can be seen by a tracer at syscall exit, before the kernel restarts an interrupted
    # call.
    512: "ERESTARTSYS",
    513: "ERESTARTNOINTR",
    514: "ERESTARTNOHAND",
    515: "ENOIOCTLCMD",
    516: "ERESTART_RESTARTBLOCK",
}


def machine() -> str:
    """This host's machine name as ``platform.machine()`` reports it (``x86_64``, ...)."""
    return platform.machine()


def _table(machine_name: str | None) -> dict[int, str]:
    m = machine() if machine_name is None else machine_name
    return SYSCALLS.get(_MACHINE_ALIASES.get(m, m), {})


def syscall_names(machine: str | None = None) -> dict[int, str]:
    """Syscall number -> name for ``machine`` (default: this host).

    A copy, so callers may change it. Empty for a machine we have no table for.
    """
    return dict(_table(machine))


def syscall_name(nr: int, machine: str | None = None) -> str:
    """The name of syscall ``nr`` (``openat``), or ``syscall_<nr>`` when unknown."""
    return _table(machine).get(nr, f"syscall_{nr}")


def category(name: str) -> str:
    """One of CATEGORY_NAMES for a syscall name; ``other`` for a name we do not know."""
    return CATEGORIES.get(name, "other")


def errno_name(n: int) -> str:
    """Symbolic name of errno ``n`` (``2`` -> ``ENOENT``), or ``E<n>`` when unknown.

    A raw syscall return value may be passed as is: ``-2`` also gives ``ENOENT``.
    """
    code = abs(n)
    name = _PREFERRED.get(code) or _errno.errorcode.get(code) or _FALLBACK.get(code)
    return name if name is not None else f"E{code}"
