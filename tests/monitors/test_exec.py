"""ExecMonitor on the real kernel: exact events for processes the test starts."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import pytest

from agent.kernel.cgroups import Cgroups
from agent.kernel.identity import local_identity
from agent.model.events import COMMON_FIELDS
from agent.model.targets import TargetSet
from agent.monitors.contract import TransportSettings
from agent.output.writer import OutputWriter
from tests.support.cgroups import RUNTIME_PATHS, cgroup_dir, own_cgroup, run_in, spawn_in
from tests.support.filters import filter_tests
from tests.support.kernel import (
    CollectingSink,
    compile_c,
    loaded_prog_ids,
    prog_ids_held_by,
)
from tests.support.monitors import drain, loaded_monitor, wait_for_events

pytestmark = pytest.mark.usefixtures("kernel")

NOBODY = 65534


def exec_monitor(sink: CollectingSink, targets: TargetSet | None = None, transport: str = "auto",
                 ringbuf_pages: int = 512, **options: int) -> ContextManager[Any]:
    transport_settings = TransportSettings(kind=transport, ringbuf_pages=ringbuf_pages)
    return loaded_monitor("exec", sink, targets=targets, transport=transport_settings, **options)


def test_exact_event_for_known_process_and_uid(sink):
    argv = ["/bin/echo", "hello", "exec-test-1"]
    with exec_monitor(sink) as m:
        proc = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
            capture_output=True, check=True,
        )
        assert proc.stdout == b"hello exec-test-1\n"
        events = wait_for_events(m, sink, lambda e: e["argv"] == argv)
    assert len(events) == 1
    e = events[0]
    # setpriv execs echo in place: same pid, whose parent is this test process. (The
    # PATH search before it shows up as failed execs of absent setpriv paths: -ENOENT.)
    setpriv = [x for x in sink.events
               if x["filename"].endswith("/setpriv") and x["pid"] == e["pid"]]
    assert [x["ret"] for x in setpriv if x["ret"] != 0] == [-2] * (len(setpriv) - 1)
    assert [x["uid"] for x in setpriv if x["ret"] == 0] == [0]
    assert e["ppid"] == os.getpid()
    assert e["pid"] == e["tid"]
    assert (e["uid"], e["gid"]) == (NOBODY, NOBODY)
    assert (e["comm"], e["filename"], e["ret"], e["truncated"]) == ("echo", "/bin/echo", 0, False)
    assert e["monitor"] == "exec"
    assert set(e) == {"monitor", "timestamp", "ts_ns", "pid", "tid", "ppid", "uid", "gid",
                      "comm", "filename", "argv", "truncated", "ret", *COMMON_FIELDS}
    # The kernel's identity of the parent (this test process) is what /proc gives; the
    # cgroup is this process's own (the child inherits it).
    identity = local_identity()
    assert e["parent_process_id"] == identity.of_pid(os.getpid())
    assert e["process_id"].startswith(f"{identity.boot}-") and e["process_id"].endswith(
        f"-{e['pid']}")
    cgroup = own_cgroup()
    assert (e["cgroup_id"], e["cgroup"]) == (Cgroups().id_of(cgroup), cgroup)
    assert abs(time.time() - time.mktime(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
               + time.timezone) < 60


@pytest.mark.parametrize("runtime, path, container_id, pod_uid, unit", RUNTIME_PATHS,
                         ids=[r[0] for r in RUNTIME_PATHS])
def test_identity_and_workload_of_a_process_in_a_runtime_cgroup(
        sink, runtime: str, path: str, container_id: str | None, pod_uid: str | None,
        unit: str | None) -> None:
    """A long-lived process started in a cgroup named as the runtime names it: its exec
    event's process_id is what /proc/<pid>/stat gives while it runs, and its cgroup
    fields are the directory's."""
    with cgroup_dir(path) as d, exec_monitor(sink) as m:
        cgroup_id = d.stat().st_ino
        child = spawn_in(d, ["sleep", "30"])
        try:
            events = wait_for_events(m, sink, lambda e: e["pid"] == child.pid
                                     and e["comm"] == "sleep")
            truth = local_identity().of_pid(child.pid)
        finally:
            child.kill()
            child.wait()
    assert len(events) == 1
    e = events[0]
    assert e["argv"] == ["sleep", "30"] and e["ppid"] == os.getpid()
    assert (e["process_id"], e["parent_process_id"]) == (
        truth, local_identity().of_pid(os.getpid()))
    assert (e["cgroup_id"], e["cgroup"], e["container_id"], e["pod_uid"], e["unit"]) == (
        cgroup_id, path, container_id, pod_uid, unit)


def test_failed_exec_reports_enoent(sink):
    code = "import os; os.execv('/nonexistent/prog', ['prog', 'x'])"
    with exec_monitor(sink) as m:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
        assert proc.returncode != 0
        events = wait_for_events(m, sink, lambda e: e["filename"] == "/nonexistent/prog")
    assert len(events) == 1
    e = events[0]
    assert (e["pid"], e["ret"], e["argv"], e["ppid"]) == (proc_pid(sink, e), -2, ["prog", "x"],
                                                          os.getpid())


def proc_pid(sink: CollectingSink, failed: dict) -> int:
    """The python process that tried the failing exec was itself exec'd with that pid."""
    python = [e for e in sink.events if e["pid"] == failed["pid"] and e["ret"] == 0]
    assert python, "the exec of the python interpreter itself was not seen"
    return python[0]["pid"]


def test_exec_from_thread_reports_tgid(sink):
    code = (
        "import os, threading, time\n"
        "def run(): os.execv('/bin/echo', ['/bin/echo', 'from-thread'])\n"
        "t = threading.Thread(target=run); t.start(); time.sleep(5)\n"
    )
    with exec_monitor(sink) as m:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10)
        assert proc.stdout == b"from-thread\n"
        events = wait_for_events(m, sink, lambda e: e["argv"] == ["/bin/echo", "from-thread"])
    assert len(events) == 1
    e = events[0]
    assert e["pid"] != e["tid"], "exec ran on a non-leader thread"
    python = [x for x in sink.events if x["pid"] == e["pid"] and x["argv"][:1] == [sys.executable]]
    assert len(python) == 1 and e["ret"] == 0 and e["ppid"] == os.getpid()


def test_truncation_of_args_and_long_argument(sink):
    many = ["/bin/true"] + [f"a{i}" for i in range(29)]
    long_arg = "x" * 200
    with exec_monitor(sink, max_args=20, arg_size=128) as m:
        subprocess.run(many, check=True)
        subprocess.run(["/bin/true", long_arg], check=True)
        subprocess.run(["/bin/true", "y" * 128], check=True)
        cut_count = wait_for_events(
            m, sink, lambda e: e["argv"][:2] == ["/bin/true", "a1"][:1] + ["a0"])
        cut_long = wait_for_events(m, sink, lambda e: e["argv"][1:] == ["x" * 128])
        exact = wait_for_events(m, sink, lambda e: e["argv"][1:] == ["y" * 128])
    assert len(cut_count) == 1
    assert cut_count[0]["argv"] == many[:20] and cut_count[0]["truncated"] is True
    assert len(cut_long) == 1 and cut_long[0]["truncated"] is True
    assert len(exact) == 1 and exact[0]["truncated"] is False


@pytest.mark.parametrize("transport", ["ringbuf", "perf"])
def test_both_transports_deliver_the_same_event(sink, transport):
    argv = ["/bin/echo", f"transport-{transport}"]
    with exec_monitor(sink, transport=transport) as m:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        p.wait()
        events = wait_for_events(m, sink, lambda e: e["argv"] == argv)
        assert m.use_ringbuf is (transport == "ringbuf")
    assert [(e["pid"], e["ppid"], e["ret"]) for e in events] == [(p.pid, os.getpid(), 0)]


def _waiting_shell(script: str) -> subprocess.Popen:
    """A shell that blocks on stdin until the test says go, then runs ``script``."""
    return subprocess.Popen(["/bin/sh", "-c", f"read go; {script}"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)


def _go(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    proc.wait(timeout=10)


def test_pid_target_follows_children_and_filters_others(sink):
    shell = _waiting_shell("/bin/sh -c '/bin/echo grandchild-marker'; /bin/echo child-marker")
    try:
        with exec_monitor(sink, TargetSet(pids=frozenset({shell.pid}))) as m:
            other = subprocess.Popen(["/bin/echo", "other-marker"], stdout=subprocess.DEVNULL)
            other.wait()
            _go(shell)
            child = wait_for_events(m, sink, lambda e: e["argv"] == ["/bin/echo", "child-marker"])
            grandchild = wait_for_events(m, sink, lambda e: e["argv"][-1:] == ["grandchild-marker"])
            drain(m)
            # Followed children share the kernel map but are not the operator's targets.
            assert m.read_targets()["pids"] == [shell.pid]
    finally:
        shell.kill()
    assert len(child) == 1 and child[0]["ppid"] == shell.pid
    assert len(grandchild) == 1
    assert not [e for e in sink.events if "other-marker" in e["argv"]]
    assert {e["pid"] for e in sink.events} <= ({shell.pid} | {e["pid"] for e in child + grandchild}
                                               | {e["ppid"] for e in grandchild})


def test_follow_children_off_sees_only_the_target(sink):
    shell = _waiting_shell("/bin/echo child-nofollow")
    try:
        targets = TargetSet(pids=frozenset({shell.pid}), follow_children=False)
        with exec_monitor(sink, targets) as m:
            _go(shell)
            drain(m, 10)
    finally:
        shell.kill()
    assert not [e for e in sink.events if "child-nofollow" in e["argv"]]


def test_targets_change_at_runtime(sink):
    idle = subprocess.Popen(["sleep", "30"])  # a target with no descendants
    with exec_monitor(sink) as m:
        subprocess.run(["/bin/echo", "before-change"], stdout=subprocess.DEVNULL, check=True)
        assert wait_for_events(m, sink, lambda e: e["argv"] == ["/bin/echo", "before-change"])
        m.set_targets(TargetSet(pids=frozenset({idle.pid})))
        assert m.read_targets()["pids"] == [idle.pid]
        subprocess.run(["/bin/echo", "while-filtered"], stdout=subprocess.DEVNULL, check=True)
        drain(m, 10)
        assert not [e for e in sink.events if e["argv"] == ["/bin/echo", "while-filtered"]]
        m.set_targets(TargetSet())
        subprocess.run(["/bin/echo", "after-clear"], stdout=subprocess.DEVNULL, check=True)
        assert wait_for_events(m, sink, lambda e: e["argv"] == ["/bin/echo", "after-clear"])
    idle.kill()


@pytest.mark.parametrize(
    ("targets", "seen_nobody", "seen_root"),
    [
        (TargetSet(uids=frozenset({NOBODY})), 1, 0),
        (TargetSet(uids=frozenset({0})), 0, 1),
        (TargetSet(uids=frozenset({12345})), 0, 0),
        (TargetSet(comms=frozenset({"echo"})), 1, 1),
        (TargetSet(comms=frozenset({"no-such-comm"})), 0, 0),
        (TargetSet(uids=frozenset({NOBODY}), comms=frozenset({"echo"})), 1, 0),
    ],
)
def test_uid_and_comm_filters(sink, targets, seen_nobody, seen_root):
    marker = f"filter-{os.urandom(4).hex()}"
    with exec_monitor(sink, targets) as m:
        subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "/bin/echo", marker, "nobody"], stdout=subprocess.DEVNULL, check=True)
        subprocess.run(["/bin/echo", marker, "root"], stdout=subprocess.DEVNULL, check=True)
        drain(m, 10)
    got = [e for e in sink.events if marker in e["argv"] and e["filename"] == "/bin/echo"]
    assert len([e for e in got if e["argv"][-1] == "nobody"]) == seen_nobody
    assert len([e for e in got if e["argv"][-1] == "root"]) == seen_root


AWKWARD = [b"/bin/echo", b"a,b", b'say "hi"', b"line1\nline2", b"\xff\xfe-not-utf8", b""]


def test_awkward_argv_round_trips_through_csv_and_jsonl(sink, tmp_path: Path):
    with exec_monitor(sink) as m:
        writer = OutputWriter("exec", ["csv", "jsonl"], tmp_path, m, flush_interval_s=0.05)
        subprocess.run(AWKWARD, stdout=subprocess.DEVNULL, check=True)
        events = wait_for_events(m, sink, lambda e: e["argv"][:2] == ["/bin/echo", "a,b"])
        assert len(events) == 1
        writer.offer(events[0])
        writer.close()
    as_bytes = [a.encode("utf-8", "surrogateescape") for a in events[0]["argv"]]
    assert as_bytes == AWKWARD

    with open(tmp_path / "exec.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    csv_argv = [a.encode("utf-8", "surrogateescape") for a in json.loads(rows[0]["argv"])]
    assert csv_argv == AWKWARD and rows[0]["pid"] == str(events[0]["pid"])

    lines = (tmp_path / "exec.jsonl").read_bytes().splitlines()
    assert len(lines) == 1
    jsonl_argv = [a.encode("utf-8", "surrogateescape") for a in json.loads(lines[0])["argv"]]
    assert jsonl_argv == AWKWARD


def test_stop_leaves_no_programs(sink):
    before = prog_ids_held_by(os.getpid())
    with exec_monitor(sink):
        loaded = prog_ids_held_by(os.getpid()) - before
        # sys_enter/exit of execve and execveat, sched_process_exec, fork and exit,
        # cgroup_mkdir and cgroup_rmdir.
        assert len(loaded) == 9
        assert loaded <= loaded_prog_ids()
    assert not (loaded_prog_ids() & loaded)


def test_kernel_drops_are_counted(sink):
    """A one-page ring buffer that nobody drains: the kernel must count what it loses."""
    # Only this test's children: execs elsewhere on the host would race the counters.
    with exec_monitor(sink, TargetSet(pids=frozenset({os.getpid()})), ringbuf_pages=1) as m:
        for _ in range(60):
            subprocess.run(["/bin/true", "x" * 100, "y" * 100], check=True)
        before_poll = m.kernel_counters()
        drain(m)
    assert before_poll["dropped"] > 0
    assert before_poll["seen"] == before_poll["submitted"] + before_poll["dropped"]
    assert len(sink.events) == before_poll["submitted"]


def test_existing_descendants_of_a_new_target_are_followed(sink):
    """Children forked before the pid became a target are found in /proc and followed."""
    outer = subprocess.Popen(
        ["/bin/sh", "-c", "/bin/sh -c 'read go; /bin/echo seeded-marker'; true"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)  # the inner shell exists before the monitor learns of the target
    try:
        with exec_monitor(sink, TargetSet(pids=frozenset({outer.pid}))) as m:
            _go(outer)
            found = wait_for_events(m, sink, lambda e: e["argv"] == ["/bin/echo", "seeded-marker"])
    finally:
        outer.kill()
    assert len(found) == 1 and found[0]["ppid"] != outer.pid


FORK_EXEC = r"""
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            /* String literals in .rodata: a page the fresh child has not touched. */
            execl("/bin/true", "true", "rodata-marker", "second,arg", (char *)0);
            _exit(127);
        }
        waitpid(pid, 0, 0);
    }
    return 0;
}
"""


def test_argv_in_untouched_pages_of_a_fresh_child(sink, tmp_path: Path):
    """The caller's argv may be unreadable from BPF (no page faults there): the monitor
    reads the new image's argument area instead, which the kernel just wrote."""
    binary = compile_c(tmp_path, "forkexec", "#include <stdlib.h>\n" + FORK_EXEC)
    with exec_monitor(sink) as m:
        gen = subprocess.Popen([str(binary), "30"])
        assert gen.wait(60) == 0
        drain(m, 10)
    # Children of this generator only: other tests on the machine may run the same one.
    mine = [e for e in sink.events if e["filename"] == "/bin/true" and e["comm"] == "true"
            and e["ppid"] == gen.pid]
    assert len(mine) == 30
    assert all(e["argv"] == ["true", "rodata-marker", "second,arg"] for e in mine)
    assert all(e["ret"] == 0 and not e["truncated"] for e in mine)


def test_failed_exec_with_unreadable_argv_is_marked_truncated(sink, tmp_path: Path):
    """A failed exec has no new image to read from: arguments the kernel would have to
    fault in are missing, and the event says so instead of claiming completeness."""
    source = FORK_EXEC.replace('"/bin/true"', '"/nonexistent/true"')
    binary = compile_c(tmp_path, "forkexec_missing", "#include <stdlib.h>\n" + source)
    with exec_monitor(sink) as m:
        gen = subprocess.Popen([str(binary), "5"])
        assert gen.wait(60) == 0
        drain(m, 10)
    mine = [e for e in sink.events if e["filename"] in ("/nonexistent/true", "")
            and e["ret"] == -2 and e["ppid"] == gen.pid]
    assert len(mine) == 5
    for e in mine:
        complete = e["argv"] == ["true", "rodata-marker", "second,arg"]
        assert complete or e["truncated"] is True


# -- the common header and stream filters (tests/support/filters.py) ----------------------
filter_events, test_common_fields_of_a_known_process, test_stream_filter = filter_tests(
    "exec", lambda e, binary: e["filename"] == str(binary))


def test_csv_and_jsonl_rows_carry_the_workload_columns(sink, tmp_path: Path):
    """The common columns derive from HEADER: a process run in a docker-named cgroup and
    one in a service's cgroup, each row with its cgroup, container, pod and unit (empty
    CSV cells and JSON nulls where a field does not apply)."""
    rows_wanted = [r for r in RUNTIME_PATHS if r[0] in ("docker", "service")]
    with contextlib.ExitStack() as stack, exec_monitor(sink) as m:
        writer = OutputWriter("exec", ["csv", "jsonl"], tmp_path, m, flush_interval_s=0.05)
        expected = []
        for runtime, path, container_id, pod_uid, unit in rows_wanted:
            d = stack.enter_context(cgroup_dir(path))
            marker = f"csv-workload-{runtime}"
            assert run_in(d, ["/bin/echo", marker]).returncode == 0
            (e,) = wait_for_events(m, sink, lambda e, mk=marker: e["argv"] == ["/bin/echo", mk])
            writer.offer(e)
            expected.append((marker, str(d.stat().st_ino), path, container_id, pod_uid, unit,
                             e["process_id"]))
        writer.close()
    with open(tmp_path / "exec.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:len(COMMON_FIELDS) - 1] == list(COMMON_FIELDS[1:])
    got = [(json.loads(r["argv"])[1], r["cgroup_id"], r["cgroup"], r["container_id"],
            r["pod_uid"], r["unit"], r["process_id"]) for r in rows]
    assert got == [(mk, cgid, path, cid or "", pod or "", unit or "", pid)
                   for mk, cgid, path, cid, pod, unit, pid in expected]
    lines = [json.loads(x) for x in (tmp_path / "exec.jsonl").read_bytes().splitlines()]
    assert [(e["argv"][1], str(e["cgroup_id"]), e["cgroup"], e["container_id"], e["pod_uid"],
             e["unit"], e["process_id"]) for e in lines] == expected
    assert all(e["process_id"] and e["parent_process_id"] for e in lines)
