"""FileMonitor: its C/Python layouts, the decoding of flags, and its events against the
truth of `strace -f` for workloads the tests run (a tar extraction, renames, removals,
a failing open), with the prefix, writes_only and errors_only filters in the kernel."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.model.events import Event
from agent.model.targets import TargetSet
from agent.monitors.file.monitor import (
    AT_FDCWD,
    FILE_COUNTERS,
    FILE_MAX_PREFIXES,
    FILE_OPS,
    FILE_PATH_SIZE,
    FILE_PREFIX_SIZE,
    FILE_RES,
    FileConfig,
    FileEvent,
    FileMonitor,
    FileOptions,
    FilePrefix,
    FileTopKey,
    FileTopVal,
    decode_flags,
    has_mode,
    is_write,
    top,
)
from tests.support.filters import WORKLOAD_COMM, filter_tests
from tests.support.kernel import require_kernel
from tests.support.layout import assert_constants, assert_layout, indexed
from tests.support.monitors import CollectingSink, drain, loaded_monitor

HEADER = FileMonitor.source_dir() / "file.h"
STRACE_OPS = ",".join(FILE_OPS)


# -- layouts and decoding (no kernel) ---------------------------------------------------------


@pytest.mark.parametrize("name, cls", [
    ("file_event", FileEvent), ("file_config", FileConfig), ("file_prefix", FilePrefix),
    ("file_top_key", FileTopKey), ("file_top_val", FileTopVal),
])
def test_layout(name: str, cls: type) -> None:
    assert_layout(HEADER, name, cls)


def test_constants() -> None:
    assert_constants(HEADER, {
        "FILE_PATH_SIZE": FILE_PATH_SIZE, "FILE_MAX_PREFIXES": FILE_MAX_PREFIXES,
        "FILE_PREFIX_SIZE": FILE_PREFIX_SIZE, "FILE_NR_OPS": len(FILE_OPS),
        "FILE_NR_COUNTERS": len(FILE_COUNTERS),
        **indexed(FILE_OPS, "FILE_OP_{}"),
        **{f"FILE_RES_{n}": i for i, n in enumerate(
            ("ABSOLUTE", "CWD", "DIRFD", "NONE", "UNREAD"))},
    })
    assert len(FILE_RES) == 5


@pytest.mark.parametrize("op, flags, expected", [
    ("openat", os.O_RDONLY, "O_RDONLY"),
    ("openat", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "O_WRONLY|O_CREAT|O_TRUNC"),
    ("open", os.O_RDWR | os.O_APPEND | os.O_CLOEXEC, "O_RDWR|O_APPEND|O_CLOEXEC"),
    ("openat2", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, "O_RDONLY|O_DIRECTORY|O_NOFOLLOW"),
    ("openat", os.O_WRONLY | os.O_TMPFILE, "O_WRONLY|O_TMPFILE"),
    ("openat", os.O_WRONLY | os.O_SYNC, "O_WRONLY|O_SYNC"),
    ("openat", os.O_WRONLY | os.O_DSYNC, "O_WRONLY|O_DSYNC"),
    ("openat", 1 << 30, "O_RDONLY|0x40000000"),  # no name: kept as a number
    ("unlinkat", 0x200, "AT_REMOVEDIR"),
    ("unlinkat", 0, ""),
    ("renameat2", 1, "RENAME_NOREPLACE"),
    ("renameat2", 2 | 8, "RENAME_EXCHANGE|0x8"),
    ("mkdirat", 0, ""),
])
def test_decode_flags(op: str, flags: int, expected: str) -> None:
    assert decode_flags(op, flags) == expected


@pytest.mark.parametrize("op, flags, mode, write", [
    ("openat", os.O_RDONLY, False, False),
    ("openat", os.O_RDONLY | os.O_CREAT, True, True),
    ("openat", os.O_RDONLY | os.O_TRUNC, False, True),
    ("openat", os.O_WRONLY, False, True),
    ("openat", os.O_RDWR | os.O_TMPFILE, True, True),
    ("openat", os.O_RDONLY | os.O_DIRECTORY, False, False),
    ("creat", 0, True, True),
    ("mkdir", 0, True, True),
    ("unlink", 0, False, True),
    ("renameat2", 0, False, True),
])
def test_mode_and_writes(op: str, flags: int, mode: bool, write: bool) -> None:
    assert (has_mode(op, flags), is_write(op, flags)) == (mode, write)


@pytest.mark.parametrize("options, field", [
    ({"include_prefixes": ["etc/"]}, "include_prefixes"),  # not absolute
    ({"exclude_prefixes": ["/" + "x" * FILE_PREFIX_SIZE]}, "exclude_prefixes"),  # too long
    ({"include_prefixes": ["/a"] * (FILE_MAX_PREFIXES + 1)}, "include_prefixes"),  # too many
    ({"top_entries": 1}, "top_entries"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_bad_options_are_refused_with_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        FileOptions(**options)
    assert field in str(err.value)


def test_top_lists_order_and_limit() -> None:
    rows = [{"path": p, "opens": o, "failures": f} for p, o, f in
            [("/b", 5, 0), ("/a", 5, 1), ("/c", 9, 0), ("/d", 0, 3)]]
    assert [r["path"] for r in top(rows, "opens", 2)] == ["/c", "/a"]
    assert [r["path"] for r in top(rows, "failures", 10)] == ["/d", "/a"]  # zero rows left out


# -- ground truth: strace -f -y ---------------------------------------------------------------

_LINE = re.compile(
    r"^(?P<op>\w+)\((?P<args>.*)\)\s+= (?P<ret>-?\d+)(?:<[^>]*>)?(?: (?P<err>E\w+))?")
_ARG = re.compile(r'(?:AT_FDCWD|-?\d+)<(?P<dir>[^>]*)>|"(?P<str>(?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    op: str
    path: str
    path2: str
    ret: int


def strace_calls(path: Path, cwd: Path) -> list[Call]:
    """The calls of one `strace -y -o` file (one process: -ff). With -y, strace shows the
    directory of AT_FDCWD and of every dirfd; a legacy (non-*at) call's relative path is
    relative to ``cwd``, the workloads' only directory for such calls."""
    calls = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m or m["op"] not in FILE_OPS:
            continue
        paths, base = [], str(cwd)
        for a in _ARG.finditer(m["args"]):
            if a["dir"] is not None:
                base = a["dir"]
            else:
                p = a["str"].encode().decode("unicode_escape")
                paths.append(p if p.startswith("/") else f"{base}/{p}")
                base = str(cwd)
        ret = int(m["ret"])
        if ret == -1 and m["err"]:
            ret = -getattr(errno, m["err"])
        calls.append(Call(m["op"], paths[0], paths[1] if len(paths) > 1 else "", ret))
    return calls


def event_call(e: Event) -> Call:
    return Call(e["op"], e["path"], e["path2"], e["ret"])


@pytest.fixture(scope="module")
def file_monitor() -> Iterator[tuple[Any, CollectingSink]]:
    """One loaded monitor for the module (compiling it takes seconds); each test sets
    its options (live, apply_options) and targets its own workload."""
    require_kernel()
    sink = CollectingSink()
    nobody = TargetSet(pids=frozenset({0x3FFFFFFF}))  # no such process: quiet until set
    with loaded_monitor("file", sink, targets=nobody) as m:
        yield m, sink


def run_workload(file_monitor: tuple[Any, CollectingSink], argv: list[str], cwd: Path,
                 **options: Any) -> tuple[int, list[Event]]:
    """Run ``argv`` in ``cwd`` as the only target (with its children), under these
    options; returns its pid and every event of it and its descendants."""
    m, sink = file_monitor
    assert m.apply_options(FileOptions(**options))
    # The gate waits for its target entry before it execs the workload.
    gate = subprocess.Popen(["/bin/sh", "-c", 'read _ && exec "$@"', "gate", *argv],
                            stdin=subprocess.PIPE, cwd=cwd)
    m.set_targets(TargetSet(pids=frozenset({gate.pid}), follow_children=True))
    sink.events.clear()
    assert gate.stdin is not None
    gate.stdin.write(b"go\n")
    gate.stdin.close()
    assert gate.wait(120) == 0
    drain(m, 10)
    m.set_targets(TargetSet(pids=frozenset({0x3FFFFFFF})))
    drain(m, 2)
    return gate.pid, list(sink.events)


WORKLOAD = (
    "mkdir x && cd x && tar xf ../a.tar && mv d/f d/g && mv d e && rm e/g && rm -r e && "
    "cat /nonexistent-file-monitor-test 2>/dev/null; "
    "printf data > created && ln -s created link && rm created link"
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d" / "sub").mkdir(parents=True)
    for name, data in (("d/f", "one"), ("d/sub/h", "two"), ("d/k", "three")):
        (src / name).write_text(data)
    with tarfile.open(tmp_path / "a.tar", "w") as t:
        t.add(src / "d", arcname="d")
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.tar").write_bytes((tmp_path / "a.tar").read_bytes())
    return work


@pytest.mark.usefixtures("kernel")
def test_events_equal_what_strace_records(file_monitor, tree: Path) -> None:
    """Every call strace -f sees the workload make, as (op, absolute path, path2, ret),
    per process in order: no call missing, none extra, relative paths resolved."""
    out = tree.parent / "strace"
    gate_pid, events = run_workload(
        file_monitor,
        ["strace", "-ff", "-y", "-qq", "-o", str(out), "-e", f"trace={STRACE_OPS}",
         "/bin/sh", "-c", WORKLOAD],
        tree,
    )
    truth = {int(p.name.rsplit(".", 1)[1]): strace_calls(p, tree)
             for p in tree.parent.glob("strace.*")}
    ours: dict[int, list[Call]] = {}
    for e in events:
        if e["pid"] != gate_pid:  # the gate became strace: its own opens are not traced
            ours.setdefault(e["pid"], []).append(event_call(e))
    assert {p: c for p, c in truth.items() if c} == ours
    calls = [c for cs in truth.values() for c in cs]
    # what the workload is known to do, so that an empty or partial trace cannot pass
    assert Call("mkdir", f"{tree}/x", "", 0) in calls
    assert Call("renameat2", f"{tree}/x/d", f"{tree}/x/e", 0) in calls
    assert Call("openat", "/nonexistent-file-monitor-test", "", -errno.ENOENT) in calls
    extracted = [c for c in calls if c.op == "openat" and c.path == f"{tree}/x/d/sub/h"]
    assert len(extracted) == 1 and extracted[0].ret >= 0
    mine = [e for e in events if e["pid"] != gate_pid]
    assert all(e["path_from"] in ("absolute", "cwd", "dirfd") for e in mine)
    failed = next(e for e in mine if e["path"] == "/nonexistent-file-monitor-test")
    assert (failed["error"], failed["flags"], failed["mode"]) == ("ENOENT", "O_RDONLY", None)
    FileMonitor.EventModel.model_validate(failed)


@pytest.mark.usefixtures("kernel")
def test_prefix_filter_lets_exactly_its_paths_through(file_monitor, tree: Path) -> None:
    """include /etc/ and the tree's x/d/sub/, exclude its k file: exactly the calls on
    those paths, relative ones included (resolved before the comparison)."""
    inside = f"{tree}/x/d/sub/"
    _pid, events = run_workload(
        file_monitor, ["/bin/sh", "-c", WORKLOAD + "; cat /etc/hostname > /dev/null"], tree,
        include_prefixes=["/etc/", inside, f"{tree}/x/d/k"],
        exclude_prefixes=["/etc/ld.so", f"{tree}/x/d/k"],
    )
    paths = {e["path"] for e in events}
    assert f"{tree}/x/d/sub" not in paths  # the directory itself is not under sub/
    assert f"{tree}/x/d/sub/h" in paths and "/etc/hostname" in paths
    for e in events:
        assert e["path"].startswith(("/etc/", inside)) or e["path2"].startswith(inside)
        assert not e["path"].startswith(("/etc/ld.so", f"{tree}/x/d/k"))


@pytest.mark.usefixtures("kernel")
def test_prefix_matching_nothing_yields_no_event(file_monitor, tree: Path) -> None:
    """A process opening only files outside the prefixes: not one event, and the calls
    were dropped at sys_enter (counted), not after."""
    m, _sink = file_monitor
    before = m.kernel_counters()["prefix_filtered"]
    _pid, events = run_workload(file_monitor, ["/bin/sh", "-c", WORKLOAD], tree,
                                include_prefixes=["/no-such-prefix/"])
    assert events == []
    assert m.kernel_counters()["prefix_filtered"] - before >= 20


# A Python workload pinned to one CPU (each CPU keeps its own directory paths: pinned,
# every call after the first in a directory uses the kept path unless it was dropped).
# -I: no cwd in sys.path (nothing opened in the tree but what the script opens).
PINNED = "import os\nos.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"


def python_workload(script: str) -> list[str]:
    return ["/usr/bin/python3", "-I", "-S", "-c", PINNED + script]


def calls_of(events: list[Event]) -> list[tuple[str, str, str]]:
    """(op kind, path, path2): open/rename/... whatever the C library chose (mkdir or
    mkdirat, rename or renameat2)."""
    kind = {"open": "open", "openat": "open", "openat2": "open", "creat": "open",
            "unlink": "unlink", "unlinkat": "unlink", "rmdir": "rmdir", "mkdir": "mkdir",
            "mkdirat": "mkdir", "rename": "rename", "renameat": "rename", "renameat2": "rename"}
    return [("rmdir" if e["op"] == "unlinkat" and "AT_REMOVEDIR" in e["flags"] else kind[e["op"]],
             e["path"], e["path2"]) for e in events]


@pytest.mark.usefixtures("kernel")
def test_relative_paths_after_the_directory_moved(file_monitor, tmp_path: Path) -> None:
    """Calls relative to the working directory and to a dirfd, many in one directory
    (its path is kept per CPU, file.c file_dirs), then after that directory was renamed,
    removed and replaced: every path is the directory's path at the call, and the
    directory was walked only a few times for the 200 calls in it."""
    m, _sink = file_monitor
    script = (
        "os.mkdir('a'); os.chdir('a')\n"
        "os.close(os.open('f', os.O_WRONLY | os.O_CREAT, 0o600))\n"
        "for _ in range(200):\n    os.close(os.open('f', os.O_RDONLY))\n"
        "os.close(os.open('/etc/hostname', os.O_RDONLY))\n"  # outside the prefix
        "os.rename('../a', '../b')\n"
        "os.close(os.open('f', os.O_RDONLY))\n"
        "d = os.open('.', os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.close(os.open('f', os.O_RDONLY, dir_fd=d))\n"
        "os.rename('../b', '../c')\n"
        "os.close(os.open('f', os.O_RDONLY, dir_fd=d))\n"
        "os.close(d)\n"
        "os.chdir('..'); os.unlink('c/f'); os.rmdir('c'); os.mkdir('z'); os.chdir('z')\n"
        "os.close(os.open('g', os.O_WRONLY | os.O_CREAT, 0o600))\n"
    )
    t = str(tmp_path)
    before = m.kernel_counters()["dir_walks"]
    _pid, events = run_workload(file_monitor, python_workload(script), tmp_path,
                                include_prefixes=[t + "/"])
    walks = m.kernel_counters()["dir_walks"] - before
    assert calls_of(events) == [
        ("mkdir", f"{t}/a", ""),
        *[("open", f"{t}/a/f", "")] * 201,
        ("rename", f"{t}/a/../a", f"{t}/a/../b"),
        ("open", f"{t}/b/f", ""),
        ("open", f"{t}/b/.", ""),
        ("open", f"{t}/b/f", ""),
        ("rename", f"{t}/b/../b", f"{t}/b/../c"),
        ("open", f"{t}/c/f", ""),
        ("unlink", f"{t}/c/f", ""),
        ("rmdir", f"{t}/c", ""),
        ("mkdir", f"{t}/z", ""),
        ("open", f"{t}/z/g", ""),
    ]
    assert all(e["ret"] >= 0 for e in events)
    # every call that waited for its sys_exit was taken out, and counted out: the count
    # that lets sys_exit skip its lookup is back to 0 (a drift up would cost, down lose)
    assert len(m.bpf[b"file_pending"]) == 0
    assert m.bpf[b"file_inflight"][ctypes.c_int(0)].value == 0
    # tmp_path, a (once, then kept), b, c (after each rename), tmp_path again, z: about 6,
    # not 200; a rename or mount anywhere on the machine meanwhile adds one each
    assert 4 <= walks <= 50


@pytest.mark.usefixtures("kernel")
def test_relative_paths_after_their_mount_moved(file_monitor, tmp_path: Path) -> None:
    """A directory on a tmpfs moved to another mount point (mount(2) MS_MOVE, in a
    private mount namespace): the call after the move names the new place."""
    script = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "os.mkdir('m1'); os.mkdir('m2')\n"
        "assert libc.mount(b'none', b'm1', b'tmpfs', 0, None) == 0, ctypes.get_errno()\n"
        "os.mkdir('m1/d'); os.chdir('m1/d')\n"
        "for _ in range(3):\n    os.close(os.open('f', os.O_WRONLY | os.O_CREAT, 0o600))\n"
        "assert libc.mount(b'../../m1', b'../../m2', None, 8192, None) == 0\n"  # MS_MOVE
        "os.close(os.open('f', os.O_RDONLY))\n"
    )
    t = str(tmp_path)
    argv = ["unshare", "--mount", "--propagation", "private", *python_workload(script)]
    _pid, events = run_workload(file_monitor, argv, tmp_path, include_prefixes=[t + "/"])
    assert calls_of(events) == [
        ("mkdir", f"{t}/m1", ""), ("mkdir", f"{t}/m2", ""), ("mkdir", f"{t}/m1/d", ""),
        *[("open", f"{t}/m1/d/f", "")] * 3,
        ("open", f"{t}/m2/d/f", ""),
    ]


@pytest.mark.usefixtures("kernel")
def test_writes_only(file_monitor, tree: Path) -> None:
    """Only opens that write/create/truncate, and every mkdir, rename and remove."""
    _pid, everything = run_workload(file_monitor, ["/bin/sh", "-c", WORKLOAD], tree)
    (tree / "x").exists() and subprocess.run(["rm", "-rf", str(tree / "x")], check=True)
    _pid, writes = run_workload(file_monitor, ["/bin/sh", "-c", WORKLOAD], tree,
                                writes_only=True)
    expected = [(e["op"], e["path"]) for e in everything
                if e["op"] not in ("open", "openat", "openat2", "creat")
                or any(f in e["flags"] for f in ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC"))]
    assert [(e["op"], e["path"]) for e in writes] == expected
    assert ("openat", f"{tree}/x/created") in expected  # the shell's > created
    assert not any(e["flags"].startswith("O_RDONLY") and "O_CREAT" not in e["flags"]
                   and "O_TRUNC" not in e["flags"] for e in writes)


@pytest.mark.usefixtures("kernel")
def test_errors_only(file_monitor, tree: Path) -> None:
    _pid, events = run_workload(file_monitor, ["/bin/sh", "-c", WORKLOAD], tree,
                                errors_only=True)
    assert events and all(e["ret"] < 0 and e["error"] for e in events)
    assert ("/nonexistent-file-monitor-test", "ENOENT") in {(e["path"], e["error"])
                                                            for e in events}


@pytest.mark.usefixtures("kernel")
def test_relative_to_a_dirfd_and_an_unknown_one(file_monitor, tmp_path: Path) -> None:
    """openat with a directory fd resolves against that directory; with an fd that is
    not open the event keeps the path as given and says so."""
    script = (
        "import os\n"
        f"d = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.close(os.open('made', os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=d))\n"
        "try:\n    os.open('rel', os.O_RDONLY, dir_fd=999)\nexcept OSError: pass\n"
    )
    _pid, events = run_workload(file_monitor, ["/usr/bin/python3", "-c", script], Path("/"),
                                include_prefixes=[str(tmp_path)], )
    made = [e for e in events if e["path"] == f"{tmp_path}/made"]
    assert len(made) == 1
    assert (made[0]["path_from"], made[0]["flags"], made[0]["mode"]) == (
        "dirfd", "O_WRONLY|O_CREAT|O_CLOEXEC", "0600")
    assert made[0]["dirfd"] >= 0 and made[0]["ret"] >= 0
    # the unknown one matches no prefix: seen without them
    _pid, events = run_workload(file_monitor, ["/usr/bin/python3", "-c", script], Path("/"),
                                errors_only=True)
    rel = [e for e in events if e["path"] == "rel"]
    assert [(e["path_from"], e["dirfd"], e["error"]) for e in rel] == [("unknown", 999, "EBADF")]


@pytest.mark.usefixtures("kernel")
def test_top_lists(file_monitor, tree: Path) -> None:
    m, _sink = file_monitor
    m.stats(reset=True)
    run_workload(file_monitor, ["/bin/sh", "-c", WORKLOAD + "; cat /nonexistent-file-monitor-test"
                                " 2>/dev/null; true"], tree, include_prefixes=["/nonexistent-"])
    s = m.stats(limit=5)
    row = {"path": "/nonexistent-file-monitor-test", "calls": 2, "opens": 2, "failures": 2,
           "last_error": "ENOENT"}
    assert s["top_lists"] == {
        "most_opened": {"key": ["path"], "sort": "opens", "rows": [row]},
        "most_failing": {"key": ["path"], "sort": "failures", "rows": [row]},
    }
    assert (s["paths"], s["evicted"], s["capacity"]) == (1, 0, 4096)
    series = {f.name: f.values for f in m.metric_series()}
    assert series == {"opens": {"/nonexistent-file-monitor-test": 2},
                      "failures": {"/nonexistent-file-monitor-test": 2}}
    m.stats(reset=True)
    assert m.stats()["paths"] == 0


def test_at_fdcwd_constant() -> None:
    assert AT_FDCWD == -100


# -- the common header and stream filters (tests/support/filters.py) ----------------------
# The workload's dynamic loader opens /etc/ld.so.cache once, under the workload's comm.
filter_events, test_common_fields_of_a_known_process, test_stream_filter = filter_tests(
    "file",
    lambda e, binary: e["path"] == "/etc/ld.so.cache" and e["comm"] == WORKLOAD_COMM,
    lambda binary: {"include_prefixes": ["/etc/ld.so.cache"]},
)
