"""The generated syscall/errno tables against the kernel headers installed on this host.

The x86_64 table must agree with linux-libc-dev's ``asm/unistd_64.h`` and the aarch64 table
with ``asm-generic/unistd.h`` (run through cpp with arm64's settings). Our tables may be
newer than the headers: every header entry must be ours, not the other way round. When a
header is missing the comparison is skipped, except under CI=true where it fails.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agent.kernel import syscalls
from agent.kernel.syscall_table import CATEGORIES, CATEGORY_NAMES, SOURCES, SYSCALLS

ROOT = Path(__file__).resolve().parents[2]
UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
UNISTD_GENERIC = Path("/usr/include/asm-generic/unistd.h")
ERRNO_BASE = Path("/usr/include/asm-generic/errno-base.h")
ERRNO = Path("/usr/include/asm-generic/errno.h")

# arch/arm64/include/uapi/asm/unistd.h (before v6.11 generated it) sets these, then
# includes asm-generic/unistd.h.
ARM64_WANTS = (
    "__ARCH_WANT_RENAMEAT",
    "__ARCH_WANT_NEW_STAT",
    "__ARCH_WANT_SET_GET_RLIMIT",
    "__ARCH_WANT_TIME32_SYSCALLS",
    "__ARCH_WANT_SYS_CLONE3",
    "__ARCH_WANT_MEMFD_SECRET",
)


# Header entries our (newer) tables rightly lack. arm64's nfsservctl (42, never implemented
# there) has no line in scripts/syscall.tbl, so v6.11+ headers no longer define it.
DROPPED_UPSTREAM: dict[str, dict[str, int]] = {"aarch64": {"nfsservctl": 42}}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _need(path: Path, package: str = "linux-libc-dev") -> Path:
    if not path.is_file():
        reason = f"{path} not found (Debian package {package})"
        if _in_ci():
            pytest.fail(f"{reason}: CI must compare against the kernel headers")
        pytest.skip(reason)
    return path


def _nr_defines(text: str) -> dict[str, int]:
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^#define\s+__NR_(\w+)\s+(\d+)\s*$", text, re.MULTILINE)
    }


def _by_name(machine: str) -> dict[str, int]:
    return {name: nr for nr, name in SYSCALLS[machine].items()}


def _mismatches(header: dict[str, int], ours: dict[str, int]) -> list[str]:
    return [
        f"{name}: header {nr}, ours {ours.get(name, 'missing')}"
        for name, nr in sorted(header.items(), key=lambda kv: kv[1])
        if ours.get(name) != nr
    ]


# --------------------------------------------------------------------------- known values

KNOWN = [
    ("x86_64", "read", 0),
    ("x86_64", "openat", 257),
    ("x86_64", "getppid", 110),
    ("x86_64", "nanosleep", 35),
    ("x86_64", "execve", 59),
    ("x86_64", "clone3", 435),
    ("x86_64", "mseal", 462),
    ("aarch64", "getppid", 173),
    ("aarch64", "openat", 56),
    ("aarch64", "read", 63),
    ("aarch64", "execve", 221),
    ("aarch64", "fstat", 80),
    ("aarch64", "renameat", 38),
    ("aarch64", "mseal", 462),
]


@pytest.mark.parametrize(("machine", "name", "nr"), KNOWN)
def test_known_numbers(machine: str, name: str, nr: int) -> None:
    assert SYSCALLS[machine][nr] == name
    assert syscalls.syscall_name(nr, machine) == name
    assert syscalls.syscall_names(machine)[nr] == name


@pytest.mark.parametrize(
    ("machine", "absent"),
    [
        ("x86_64", "rt_sigreturn_x32"),  # no x32 entries
        ("aarch64", "open"),  # legacy calls the generic table never had
        ("aarch64", "fork"),
        ("aarch64", "mmap2"),  # 32-bit ABI only
        ("aarch64", "clock_gettime64"),
        ("aarch64", "riscv_hwprobe"),  # another architecture's slot
    ],
)
def test_other_abis_left_out(machine: str, absent: str) -> None:
    assert absent not in SYSCALLS[machine].values()


def test_x86_64_has_no_x32_numbers() -> None:
    assert max(SYSCALLS["x86_64"]) < 512


@pytest.mark.parametrize("machine", sorted(SYSCALLS))
def test_tables_are_recent_and_sourced(machine: str) -> None:
    assert max(SYSCALLS[machine]) >= 460, "table predates the 460+ syscalls"
    assert SOURCES[machine]["repo"] == "torvalds/linux"
    assert re.fullmatch(r"[0-9a-f]{40}", SOURCES[machine]["commit"])


# --------------------------------------------------------------------------- kernel headers


def test_x86_64_matches_unistd_64_header() -> None:
    header = _nr_defines(_need(UNISTD_64).read_text())
    assert len(header) > 300, f"parsed only {len(header)} __NR_ lines from {UNISTD_64}"
    assert _mismatches(header, _by_name("x86_64")) == []


def _cpp_macros(path: Path, defines: tuple[str, ...]) -> dict[str, str]:
    cpp = shutil.which("cpp")
    if cpp is None:
        pytest.skip("no C preprocessor (cpp) to expand asm-generic/unistd.h")
    args = [cpp, "-dM", "-D__BITS_PER_LONG=64", *(f"-D{d}" for d in defines), str(path)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"^#define\s+(\w+)\s+(.*)$", out, re.MULTILINE)
    }


def test_aarch64_matches_generic_unistd_header() -> None:
    macros = _cpp_macros(_need(UNISTD_GENERIC), ARM64_WANTS)

    def value(token: str, depth: int = 0) -> int:
        if token.isdigit():
            return int(token)
        assert depth < 5 and token in macros, f"cannot resolve {token}"
        return value(macros[token], depth + 1)

    not_syscalls = {"syscalls", "arch_specific_syscall"}
    header = {
        key.removeprefix("__NR_"): value(val)
        for key, val in macros.items()
        if key.startswith("__NR_") and key.removeprefix("__NR_") not in not_syscalls
    }
    assert len(header) > 250, f"resolved only {len(header)} __NR_ macros"
    ours = _by_name("aarch64")
    # Removed upstream after the installed headers: a slot that was always sys_ni_syscall.
    for name, nr in DROPPED_UPSTREAM["aarch64"].items():
        if header.get(name) == nr:
            assert name not in ours and nr not in SYSCALLS["aarch64"]
            del header[name]
    assert _mismatches(header, ours) == []


def _errno_headers() -> tuple[dict[str, int], dict[str, str]]:
    numbers: dict[str, int] = {}
    aliases: dict[str, str] = {}
    for path in (_need(ERRNO_BASE), _need(ERRNO)):
        for m in re.finditer(r"^#define\s+(E\w+)\s+(\w+)", path.read_text(), re.MULTILINE):
            name, val = m.groups()
            if val.isdigit():
                numbers[name] = int(val)
            else:
                aliases[name] = val
    return numbers, aliases


def test_errno_names_match_kernel_headers() -> None:
    numbers, aliases = _errno_headers()
    assert len(numbers) > 120, f"parsed only {len(numbers)} errno values"
    wrong = [
        f"{name}={n}: errno_name gives {syscalls.errno_name(n)}"
        for name, n in numbers.items()
        if syscalls.errno_name(n) != name
    ]
    assert wrong == []
    # Python's own constants (from the C library's headers) agree with the kernel's.
    assert [name for name, n in numbers.items() if getattr(errno, name, n) != n] == []


def test_errno_aliases_map_to_either_name() -> None:
    numbers, aliases = _errno_headers()
    assert {"EWOULDBLOCK", "EDEADLOCK"} <= aliases.keys()
    for alias, target in aliases.items():
        assert syscalls.errno_name(numbers[target]) in {alias, target}


@pytest.mark.parametrize(
    ("n", "name"),
    [
        (1, "EPERM"),
        (2, "ENOENT"),
        (-2, "ENOENT"),
        (11, "EAGAIN"),
        (13, "EACCES"),
        (35, "EDEADLK"),
        (95, "EOPNOTSUPP"),
        (110, "ETIMEDOUT"),
        (133, "EHWPOISON"),
        (512, "ERESTARTSYS"),
        (0, "E0"),
        (9999, "E9999"),
        (-9999, "E9999"),
    ],
)
def test_errno_name(n: int, name: str) -> None:
    assert syscalls.errno_name(n) == name


# --------------------------------------------------------------------------- categories


def test_every_syscall_has_one_allowed_category() -> None:
    assert set(CATEGORY_NAMES) == {"file", "network", "process", "memory", "signal", "ipc",
                                   "time", "other"}
    names = {name for table in SYSCALLS.values() for name in table.values()}
    assert names - CATEGORIES.keys() == set()
    assert CATEGORIES.keys() - names == set(), "categories for names in no table"
    assert {c for c in CATEGORIES.values()} <= set(CATEGORY_NAMES)


EXPECTED_CATEGORIES = [
    *[(n, "file") for n in ("read", "write", "openat", "close", "newfstatat", "statx")],
    *[(n, "file") for n in ("fsync", "getxattr", "lremovexattr", "mount", "umount2")],
    *[(n, "file") for n in ("io_uring_enter", "epoll_wait", "ioctl", "sendfile")],
    *[(n, "network") for n in ("socket", "bind", "connect", "sendto", "recvfrom")],
    *[(n, "network") for n in ("recvmsg", "recvmmsg", "accept", "accept4", "listen")],
    *[(n, "process") for n in ("fork", "clone", "clone3", "execve", "execveat")],
    *[(n, "process") for n in ("exit_group", "wait4", "waitid", "getpid", "getppid")],
    *[(n, "process") for n in ("setuid", "setresgid", "setfsuid", "prctl", "ptrace")],
    *[(n, "process") for n in ("sched_yield", "sched_setattr")],
    *[(n, "memory") for n in ("mmap", "munmap", "mprotect", "brk", "madvise", "mremap")],
    *[(n, "memory") for n in ("mlock", "mlockall", "mlock2", "membarrier", "mseal")],
    *[(n, "signal") for n in ("rt_sigaction", "rt_sigreturn", "rt_tgsigqueueinfo")],
    *[(n, "signal") for n in ("kill", "tkill", "tgkill", "sigaltstack", "signalfd4")],
    *[(n, "signal") for n in ("pause",)],
    *[(n, "ipc") for n in ("pipe", "pipe2", "msgsnd", "semop", "shmat", "mq_open")],
    *[(n, "ipc") for n in ("futex", "futex_waitv", "eventfd2")],
    *[(n, "time") for n in ("clock_gettime", "clock_nanosleep", "nanosleep", "time")],
    *[(n, "time") for n in ("timer_create", "timerfd_settime", "gettimeofday")],
    *[(n, "time") for n in ("alarm", "setitimer", "getitimer", "adjtimex")],
    *[(n, "other") for n in ("bpf", "uname", "reboot", "init_module", "getrandom")],
]


@pytest.mark.parametrize(("name", "expected"), EXPECTED_CATEGORIES)
def test_expected_category(name: str, expected: str) -> None:
    assert syscalls.category(name) == expected


def test_unknown_names() -> None:
    assert syscalls.category("no_such_syscall") == "other"
    assert syscalls.syscall_name(99999, "x86_64") == "syscall_99999"
    assert syscalls.syscall_name(0, "riscv64") == "syscall_0"
    assert syscalls.syscall_names("riscv64") == {}


def test_default_machine_is_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(syscalls.platform, "machine", lambda: "aarch64")
    assert syscalls.machine() == "aarch64"
    assert syscalls.syscall_name(173) == "getppid"
    monkeypatch.setattr(syscalls.platform, "machine", lambda: "x86_64")
    assert syscalls.syscall_name(110) == "getppid"
    assert syscalls.syscall_names() == SYSCALLS["x86_64"]


def test_syscall_names_is_a_copy() -> None:
    names = syscalls.syscall_names("x86_64")
    names[0] = "changed"
    assert SYSCALLS["x86_64"][0] == "read"


# --------------------------------------------------------------------------- generator


def _generator() -> ModuleType:
    path = ROOT / "tools" / "gen_syscall_table.py"
    spec = importlib.util.spec_from_file_location("gen_syscall_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_generated_file_is_up_to_date() -> None:
    gen = _generator()
    expected = gen.render(*gen.build())
    current = (ROOT / "agent" / "kernel" / "syscall_table.py").read_text(encoding="utf-8")
    assert current == expected, "re-run: python3 tools/gen_syscall_table.py"


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("1\tcommon\tread\tsys_read\n1\tcommon\twrite\tsys_write\n", "number 1"),
        ("1\tcommon\tread\tsys_read\n2\t64\tread\tsys_read\n", "'read' numbered"),
        ("x\tcommon\tread\n", "malformed"),
    ],
)
def test_parser_rejects_bad_tables(line: str, error: str) -> None:
    gen = _generator()
    with pytest.raises(ValueError, match=error):
        gen.parse_tbl(line, frozenset({"common", "64"}))


def test_parser_keeps_only_requested_abis() -> None:
    gen = _generator()
    text = "# c\n0\tcommon\tread\tsys_read\n1\tx32\tfoo\n2 \t64  bar\tsys_bar\n3\t32\tbaz\n"
    assert gen.parse_tbl(text, frozenset({"common", "64"})) == {0: "read", 2: "bar"}
