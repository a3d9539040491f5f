"""FuncMonitor's probe scope: with pid targets the uprobes are placed in the targeted
processes (and followed children) only. Checked on the real kernel with programs the
test runs: exact counts for a target, nothing for an untargeted process, and the truth
of where breakpoints are, read from each process's own memory (/proc/PID/mem): a probed
function's first bytes differ from the file's (x86: int3), an unprobed one's do not."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from agent.kernel.procfs import process_start
from agent.kernel.symbols import file_offsets, resolve_binary, user_symbols
from agent.model.targets import TargetSet
from agent.monitors.func.monitor import FuncOptions
from tests.support.kernel import CollectingSink, compile_c
from tests.support.monitors import drain, loaded_monitor

K = 37  # getpid calls per "go": odd, so neither 0 nor a doubling passes

# Commands on stdin, one line each: "go" calls getpid K times and answers "done";
# "fork" forks a child that takes over stdin (the parent waits for it) and answers
# "child <pid>", then the same commands reach the child until "exit"; the parent
# answers "reaped" when the child is gone; "exit" ends the process.
PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t (*volatile call)(void) = getpid;

int main(int argc, char **argv)
{
    int k = atoi(argv[1]);
    char line[16];
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (!strcmp(line, "go\n")) {
            for (int i = 0; i < k; i++)
                call();
            printf("done\n");
        } else if (!strcmp(line, "fork\n")) {
            /* the child names itself through syscall(2), not the counted getpid */
            pid_t child = fork();
            if (child == 0) {
                printf("child %ld\n", syscall(SYS_getpid));
                continue;
            }
            waitpid(child, NULL, 0);
            printf("reaped\n");
        } else {
            return 0;
        }
    }
    return 0;
}
"""


@dataclass
class Proc:
    """The program, answering commands; ``pid`` is whichever process reads stdin."""

    popen: subprocess.Popen[bytes]
    pid: int

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        return self.popen.stdin, self.popen.stdout

    def send(self, command: str) -> str:
        stdin, stdout = self._pipes()
        stdin.write(f"{command}\n".encode())
        stdin.flush()
        return stdout.readline().decode().strip()

    def go(self) -> None:
        assert self.send("go") == "done"

    def fork(self) -> Proc:
        answer = self.send("fork").split()
        assert answer[0] == "child"
        return Proc(self.popen, int(answer[1]))

    def end_child(self) -> None:
        assert self.send("exit") == "reaped"


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("scope"), "scopecaller", PROGRAM)


@contextmanager
def running(binary: Path) -> Iterator[Proc]:
    popen = subprocess.Popen([str(binary), str(K)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert popen.stdout is not None and popen.stdout.readline() == b"ready\n"
        yield Proc(popen, popen.pid)
    finally:
        popen.kill()
        popen.wait()


LIBC = resolve_binary("c")
GETPID_OFFSET = file_offsets(LIBC, [dict(user_symbols(LIBC, "getpid"))["getpid"]])[0]


def probed(pid: int, path: str = LIBC, offset: int = GETPID_OFFSET) -> bool:
    """Whether the process's code at ``path``'s file offset differs from the file's
    (a uprobe breakpoint is written over the function's first instruction)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or os.path.realpath(fields[5]) != path:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pgoff = int(fields[2], 16)
            if pgoff <= offset < pgoff + end - start:
                break
        else:
            raise AssertionError(f"{path} offset {offset:#x} is not mapped in {pid}")
    with open(f"/proc/{pid}/mem", "rb") as mem, open(path, "rb") as file:
        mem.seek(start + offset - pgoff)
        file.seek(offset)
        return mem.read(4) != file.read(4)


def getpid_count(m: Any) -> int:
    counts = {f["name"]: f["count"] for f in m.stats()["functions"]}
    return int(counts.get("getpid", 0))


def pids(*values: int, follow: bool = False) -> TargetSet:
    return TargetSet(pids=frozenset(values), follow_children=follow)


ALL_LIBC = {"patterns": ["c:*"], "max_probes": 20_000, "latency": True}
GETPID = {"patterns": ["c:getpid"], "latency": False}


# -- pid scope ------------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("options", "uprobe_multi"), [
    (ALL_LIBC, True),  # one program, attach cookies, a link per binary and process
    (GETPID, True),
    (GETPID, False),  # BCC's perf-event uprobes with pid=
], ids=["c:*", "getpid", "getpid-bcc-perf"])
def test_a_pid_target_is_probed_and_counted_exactly_and_no_other_process_is(
        program: Path, options: dict[str, Any], uprobe_multi: bool) -> None:
    with running(program) as target, running(program) as other:
        with loaded_monitor(
                "func", CollectingSink(), targets=pids(target.pid), **options,
                before_load=lambda m: setattr(m, "prefer_uprobe_multi", uprobe_multi)) as m:
            assert probed(target.pid) and not probed(other.pid)
            other.go()
            target.go()
            other.go()
            assert getpid_count(m) == K
            status = m.stats()
            assert (status["probe_scope"], status["probed_pids"]) == ("pids", [target.pid])
            assert status["unprobed_pids"] == {}
        assert not probed(target.pid)  # closing removed the breakpoints


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_an_untargeted_process_yields_no_event(program: Path) -> None:
    sink = CollectingSink()
    with running(program) as target, running(program) as other, loaded_monitor(
            "func", sink, targets=pids(target.pid), events=True, **GETPID) as m:
        other.go()
        target.go()
        other.go()
        drain(m)
        counters = m.kernel_counters()
    assert {e["pid"] for e in sink.events} == {target.pid}
    assert len(sink.events) == K
    assert counters["seen"] == K  # the other's calls never reached the program


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_targets_changed_live_move_the_probes(program: Path) -> None:
    with running(program) as a, running(program) as b, loaded_monitor(
            "func", CollectingSink(), targets=pids(a.pid), **GETPID) as m:
        m.set_targets(pids(a.pid, b.pid))  # b added
        assert probed(a.pid) and probed(b.pid)
        a.go()
        b.go()
        assert getpid_count(m) == 2 * K
        m.set_targets(pids(b.pid))  # a removed
        assert not probed(a.pid) and probed(b.pid)
        a.go()
        b.go()
        assert getpid_count(m) == 3 * K
        assert m.stats()["probed_pids"] == [b.pid]
        m.set_targets(pids())  # no pids: every process, both counted
        assert m.stats()["probe_scope"] == "host"
        assert probed(a.pid) and probed(b.pid)
        a.go()
        b.go()
        assert getpid_count(m) == 5 * K
        m.set_targets(pids(a.pid))  # back to one pid: b's breakpoint leaves
        assert not probed(b.pid) and probed(a.pid)
        b.go()
        assert getpid_count(m) == 5 * K


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("options", [GETPID, ALL_LIBC], ids=["getpid", "c:*"])
def test_a_followed_child_is_probed_from_the_next_tick_and_counted_exactly(
        program: Path, options: dict[str, Any]) -> None:
    """The window, as documented: a child's calls before the control thread's tick gave
    it links of its own are not counted (here the test plays the tick: m.periodic());
    every call after it is."""
    with running(program) as parent, loaded_monitor(
            "func", CollectingSink(), targets=pids(parent.pid, follow=True), **options) as m:
        child = parent.fork()
        child.go()  # before the tick: inside the window
        assert getpid_count(m) == 0
        m.periodic()
        status = m.stats()
        assert status["probed_pids"] == sorted([parent.pid, child.pid])
        assert status["children_attached"] == 1
        assert probed(child.pid)
        child.go()
        assert getpid_count(m) == K
        child.end_child()
        parent.go()
        assert getpid_count(m) == 2 * K
        m.periodic()  # the child exited: its links are closed
        assert m.stats()["probed_pids"] == [parent.pid]


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_a_child_is_not_probed_without_follow_children(program: Path) -> None:
    with running(program) as parent, loaded_monitor(
            "func", CollectingSink(), targets=pids(parent.pid, follow=False), **GETPID) as m:
        child = parent.fork()
        m.periodic()
        assert m.stats()["probed_pids"] == [parent.pid]
        child.go()
        assert getpid_count(m) == 0
        child.end_child()
        parent.go()
        assert getpid_count(m) == K


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_a_target_pid_without_a_process_is_named_and_probes_nothing(program: Path) -> None:
    with running(program) as gone:
        pass
    assert process_start(gone.pid) is None
    with running(program) as other, loaded_monitor(
            "func", CollectingSink(), targets=pids(gone.pid), **GETPID) as m:
        other.go()
        status = m.stats()
        assert not probed(other.pid)
    assert status["probe_scope"] == "pids"
    assert status["probed_pids"] == []
    assert "no such process" in status["unprobed_pids"][str(gone.pid)]


# -- host scope ---------------------------------------------------------------------------
@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("targets", "options", "counted"), [
    (TargetSet(uids=frozenset({os.getuid()})), {}, 2),  # uids only: every process probed
    (TargetSet(comms=frozenset({"scopecaller"})), {}, 2),
    (pids(), {}, 2),  # no targets
], ids=["uids", "comms", "none"])
def test_without_pid_targets_the_probes_are_host_wide(
        program: Path, targets: TargetSet, options: dict[str, Any], counted: int) -> None:
    with running(program) as a, running(program) as b, loaded_monitor(
            "func", CollectingSink(), targets=targets, **GETPID, **options) as m:
        assert probed(a.pid) and probed(b.pid)
        a.go()
        b.go()
        assert getpid_count(m) == counted * K
        status = m.stats()
    assert status["probe_scope"] == "host"
    assert "every process" in status["probe_scope_detail"]
    assert "probed_pids" not in status


@pytest.mark.kernel
@pytest.mark.usefixtures("kernel")
def test_probe_scope_host_places_probes_everywhere_and_still_filters(program: Path) -> None:
    with running(program) as target, running(program) as other, loaded_monitor(
            "func", CollectingSink(), targets=pids(target.pid, follow=True),
            probe_scope="host", **GETPID) as m:
        assert probed(target.pid) and probed(other.pid)
        child = target.fork()
        child.go()  # no window: the host-wide probes and the kernel's follow count it
        other.go()
        target.end_child()
        target.go()
        assert getpid_count(m) == 2 * K
        assert m.stats()["probe_scope"] == "host"


@pytest.mark.parametrize("value", ["pids", "", "HOST", 1, None])
def test_probe_scope_option_refuses_other_values(value: object) -> None:
    with pytest.raises(ValueError, match="probe_scope"):
        FuncOptions(patterns=["c:getpid"], probe_scope=value)


def test_probe_scope_option_defaults_to_auto() -> None:
    assert FuncOptions(patterns=["c:getpid"]).probe_scope == "auto"
