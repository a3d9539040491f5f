#!/usr/bin/env python3
"""Generate ``agent/kernel/syscall_table.py`` from the kernel's own syscall tables.

Inputs are verbatim copies of the Linux source tables, saved under ``tools/syscall_tbl/``
so that this script runs offline and its output is reproducible:

* ``x86_64.tbl``: ``arch/x86/entry/syscalls/syscall_64.tbl``; ABIs ``common`` and ``64``
  (the ``x32`` entries, 512-547, are a different ABI and are left out).
* ``arm64.tbl``: ``scripts/syscall.tbl`` (``arch/arm64/tools/syscall_64.tbl`` is a symlink
  to it since v6.11); ABIs ``common`` and ``64`` (``scripts/Makefile.asm-headers``) plus
  ``renameat rlimit memfd_secret`` (``arch/arm64/kernel/Makefile.syscalls``).

Each saved file starts with a provenance block (repository, path, commit) and the SHA-256
of the verbatim upstream text that follows the marker line; the script refuses a file whose
text no longer matches that digest. To update: replace the text below the marker with a newer
upstream table, fix the provenance lines and the digest, then run::

    python3 tools/gen_syscall_table.py          # rewrite agent/kernel/syscall_table.py
    python3 tools/gen_syscall_table.py --check  # exit 1 if the committed file is stale

Every syscall name is given exactly one category (see ``categorize``); names that fall
through to ``other`` are listed on stderr so a new syscall's category is a visible decision.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TBL_DIR = ROOT / "tools" / "syscall_tbl"
OUTPUT = ROOT / "agent" / "kernel" / "syscall_table.py"
MARKER = "# ---- verbatim upstream text follows ----\n"

CATEGORY_NAMES: tuple[str, ...] = (
    "file",
    "network",
    "process",
    "memory",
    "signal",
    "ipc",
    "time",
    "other",
)


@dataclass(frozen=True)
class Source:
    machine: str  # platform.machine() on Linux
    filename: str  # under TBL_DIR
    abis: frozenset[str]


SOURCES: tuple[Source, ...] = (
    Source("x86_64", "x86_64.tbl", frozenset({"common", "64"})),
    Source(
        "aarch64",
        "arm64.tbl",
        frozenset({"common", "64", "renameat", "rlimit", "memfd_secret"}),
    ),
)


@dataclass(frozen=True)
class Provenance:
    repo: str
    path: str
    commit: str


# --------------------------------------------------------------------------- reading


def read_saved(path: Path) -> tuple[Provenance, str]:
    """Split a saved table into its provenance and the verbatim upstream text."""
    raw = path.read_text(encoding="utf-8")
    head, sep, body = raw.partition(MARKER)
    if not sep:
        raise SystemExit(f"{path}: no marker line {MARKER.strip()!r}")
    fields: dict[str, str] = {}
    for line in head.splitlines():
        m = re.match(r"^#\s*(source repo|source path|source commit):\s*(\S+)", line)
        if m:
            fields[m.group(1)] = m.group(2)
        m = re.match(r"^#\s*sha256\b[^:]*:\s*([0-9a-f]{64})\s*$", line)
        if m:
            fields["sha256"] = m.group(1)
    missing = {"source repo", "source path", "source commit", "sha256"} - fields.keys()
    if missing:
        raise SystemExit(f"{path}: provenance block lacks {sorted(missing)}")
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    if digest != fields["sha256"]:
        raise SystemExit(
            f"{path}: upstream text was changed (sha256 {digest}, header says "
            f"{fields['sha256']}); update the provenance block together with the text"
        )
    repo = fields["source repo"].removeprefix("https://github.com/")
    return Provenance(repo, fields["source path"], fields["source commit"]), body


def parse_tbl(text: str, abis: frozenset[str], where: str = "<tbl>") -> dict[int, str]:
    """Parse a kernel ``.tbl``: ``<number> <abi> <name> [<entry point> ...]`` per line.

    Entries without an entry point (reserved or removed calls such as ``uselib``) are kept:
    their numbers are still defined in the uapi headers and can still be issued.
    """
    table: dict[int, str] = {}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit():
            raise ValueError(f"{where}:{lineno}: malformed line {line!r}")
        nr, abi, name = int(parts[0]), parts[1], parts[2]
        if abi not in abis:
            continue
        if nr in table:
            raise ValueError(f"{where}:{lineno}: number {nr} used by {table[nr]!r} and {name!r}")
        if name in seen:
            raise ValueError(f"{where}:{lineno}: {name!r} numbered both {seen[name]} and {nr}")
        table[nr] = name
        seen[name] = nr
    if not table:
        raise ValueError(f"{where}: no entries for ABIs {sorted(abis)}")
    return dict(sorted(table.items()))


# --------------------------------------------------------------------------- categories

# Explicit names win over the prefix rules below; both are checked before falling back to
# "other". Names are whitespace-separated; `#` starts a comment. Keep each name in one place.
_EXPLICIT_TEXT: dict[str, str] = {
    "file": """
        # descriptors and data
        read write open openat openat2 creat close close_range lseek pread64 pwrite64
        readv writev preadv pwritev preadv2 pwritev2 dup dup2 dup3 fcntl flock ioctl
        sendfile splice tee vmsplice copy_file_range readahead fadvise64 fallocate
        truncate ftruncate cachestat name_to_handle_at open_by_handle_at uselib
        # readiness / multiplexing (epoll_*, inotify_*, io_* below)
        poll ppoll select pselect6
        # metadata and namespace
        stat fstat lstat newfstatat statx statfs fstatfs ustat access faccessat faccessat2
        getdents getdents64 getcwd chdir fchdir chroot pivot_root rename renameat renameat2
        mkdir mkdirat rmdir link linkat unlink unlinkat symlink symlinkat readlink
        readlinkat chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat umask
        utime utimes utimensat futimesat mknod mknodat
        # durability
        sync syncfs fsync fdatasync sync_file_range
        # mounts and filesystems
        mount umount2 move_mount open_tree fsopen fsconfig fsmount fspick mount_setattr
        statmount listmount quotactl quotactl_fd
    """,
    "network": """
        socket socketpair bind listen accept accept4 connect getsockname getpeername
        sendto recvfrom sendmsg recvmsg sendmmsg recvmmsg shutdown setsockopt getsockopt
    """,
    "process": """
        fork vfork clone clone3 execve execveat exit exit_group wait4 waitid
        getpid getppid gettid getpgid setpgid getpgrp getsid setsid getgroups setgroups
        capget capset prctl arch_prctl ptrace personality unshare setns seccomp
        set_tid_address set_robust_list get_robust_list set_thread_area get_thread_area
        modify_ldt getpriority setpriority getrlimit setrlimit prlimit64 getrusage
        ioprio_set ioprio_get getcpu kcmp rseq acct
    """,
    "memory": """
        mmap munmap mprotect brk madvise process_madvise mremap msync mincore membarrier
        mbind set_mempolicy get_mempolicy set_mempolicy_home_node migrate_pages move_pages
        remap_file_pages userfaultfd process_vm_readv process_vm_writev process_mrelease
        map_shadow_stack mseal swapon swapoff
    """,
    "signal": """
        kill tkill tgkill sigaltstack pause pidfd_send_signal restart_syscall
    """,
    "ipc": """
        pipe pipe2
    """,
    "time": """
        nanosleep gettimeofday settimeofday time times alarm setitimer getitimer adjtimex
    """,
    "other": """
        # system administration and kernel facilities that fit no class above
        uname sysinfo syslog reboot sethostname setdomainname iopl ioperm vhangup _sysctl
        sysfs init_module finit_module delete_module create_module get_kernel_syms
        query_module kexec_load kexec_file_load add_key request_key keyctl bpf
        perf_event_open getrandom lookup_dcookie nfsservctl uretprobe
        # never implemented on x86_64 (reserved numbers)
        getpmsg putpmsg afs_syscall tuxcall security vserver
    """,
}


def _words(text: str) -> tuple[str, ...]:
    return tuple(w for line in text.splitlines() for w in line.split("#", 1)[0].split())


EXPLICIT: dict[str, tuple[str, ...]] = {c: _words(t) for c, t in _EXPLICIT_TEXT.items()}

# (regex, category), tried in order after EXPLICIT.
PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^rt_(tg)?sig", "signal"),  # rt_sig*, rt_tgsigqueueinfo
    (r"^signalfd", "signal"),
    (r"^(set|get)(res|re|fs|e)?[ug]id$", "process"),
    (r"^sched_", "process"),
    (r"^pidfd_", "process"),
    (r"^(clock_|timer)", "time"),  # clock_*, timer_*, timerfd_*
    (r"^(msg|sem|shm|mq_)", "ipc"),
    (r"^futex", "ipc"),
    (r"^eventfd", "ipc"),
    (r"^(mlock|munlock|pkey_|memfd_)", "memory"),
    (r"xattr", "file"),  # [lf]{get,set,list,remove}xattr and the *xattrat family
    (r"^(epoll_|inotify_|fanotify_|io_uring_|io_)", "file"),
    (r"^(landlock_|lsm_)", "other"),
)


def categorize(name: str) -> str:
    """The category of one syscall name: EXPLICIT, then PATTERNS, else ``other``."""
    return _rule_for(name)[0]


def _rule_for(name: str) -> tuple[str, str]:
    for category, names in EXPLICIT.items():
        if name in names:
            return category, "explicit"
    for pattern, category in PATTERNS:
        if re.search(pattern, name):
            return category, pattern
    return "other", "fallback"


def _check_rules() -> None:
    seen: dict[str, str] = {}
    for category, names in EXPLICIT.items():
        if category not in CATEGORY_NAMES:
            raise SystemExit(f"unknown category {category!r}")
        for name in names:
            if name in seen:
                raise SystemExit(f"{name!r} listed under both {seen[name]} and {category}")
            seen[name] = category
    for _, category in PATTERNS:
        if category not in CATEGORY_NAMES:
            raise SystemExit(f"unknown category {category!r}")


# --------------------------------------------------------------------------- output


def build() -> tuple[dict[str, Provenance], dict[str, dict[int, str]], dict[str, str]]:
    _check_rules()
    provenance: dict[str, Provenance] = {}
    tables: dict[str, dict[int, str]] = {}
    for src in SOURCES:
        path = TBL_DIR / src.filename
        prov, body = read_saved(path)
        provenance[src.machine] = prov
        tables[src.machine] = parse_tbl(body, src.abis, str(path.relative_to(ROOT)))
    names = sorted({n for table in tables.values() for n in table.values()})
    categories = {name: categorize(name) for name in names}
    return provenance, tables, categories


def render(
    provenance: dict[str, Provenance],
    tables: dict[str, dict[int, str]],
    categories: dict[str, str],
) -> str:
    out: list[str] = [
        '"""Linux syscall numbers and categories per machine: GENERATED, do not edit.',
        "",
        "Written by tools/gen_syscall_table.py from the kernel's syscall tables saved in",
        "tools/syscall_tbl/ (see SOURCES); change the generator or its inputs and re-run it.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "# machine -> where its table comes from (github repository, path, commit)",
        "SOURCES: dict[str, dict[str, str]] = {",
    ]
    for machine, prov in provenance.items():
        out += [
            f'    "{machine}": {{',
            f'        "repo": "{prov.repo}",',
            f'        "path": "{prov.path}",',
            f'        "commit": "{prov.commit}",',
            "    },",
        ]
    out += [
        "}",
        "",
        "CATEGORY_NAMES: tuple[str, ...] = (",
        *[f'    "{c}",' for c in CATEGORY_NAMES],
        ")",
        "",
        "# machine (platform.machine()) -> syscall number -> name, without the sys_ prefix",
        "SYSCALLS: dict[str, dict[int, str]] = {",
    ]
    for machine, table in tables.items():
        out.append(f'    "{machine}": {{')
        out += [f'        {nr}: "{name}",' for nr, name in table.items()]
        out.append("    },")
    out += [
        "}",
        "",
        "# every name in SYSCALLS -> one of CATEGORY_NAMES",
        "CATEGORIES: dict[str, str] = {",
        *[f'    "{name}": "{cat}",' for name, cat in categories.items()],
        "}",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if stale")
    ap.add_argument("--output", type=Path, default=OUTPUT)
    args = ap.parse_args(argv)

    provenance, tables, categories = build()
    text = render(provenance, tables, categories)

    for machine, table in tables.items():
        last = max(table)
        print(f"{machine}: {len(table)} syscalls, highest {last} {table[last]}", file=sys.stderr)
    counts = {c: sum(1 for v in categories.values() if v == c) for c in CATEGORY_NAMES}
    print("categories: " + ", ".join(f"{c}={n}" for c, n in counts.items()), file=sys.stderr)
    fallback = [n for n in categories if _rule_for(n)[1] == "fallback"]
    if fallback:
        print("no rule, filed as other: " + " ".join(fallback), file=sys.stderr)

    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: re-run tools/gen_syscall_table.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date", file=sys.stderr)
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
