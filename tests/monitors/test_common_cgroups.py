"""Cgroup and container targets (agent/bpf/common.h) on the real kernel: real cgroup v2
directories, the test's own processes moved in, exact events and counts per monitor."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from agent.kernel.capabilities import CMPXCHG_KERNEL, kernel_version
from agent.kernel.cgroups import Cgroups, with_cgroup_ids
from agent.model.targets import TargetSet
from tests.support.cgroups import cgroup_dir, spawn_in
from tests.support.kernel import CollectingSink, compile_c
from tests.support.monitors import drain, loaded_monitor, wait_for_events
from tests.support.workloads import calls_c, rounds_c

pytestmark = pytest.mark.usefixtures("kernel")

ROOT = "/ebpf-agent-test-targets"
N_GETPPID, N_GETPID = 1000, 37
CONTAINER = "c0ffee" * 10 + "abcd"  # 64 hex digits
OTHER = CONTAINER[:11] + "f" + CONTAINER[12:]  # differs in the 12th digit

WORKLOAD_C = calls_c(N_GETPPID, N_GETPID)


def cgroup_targets(cgroups: set[str] = frozenset(), containers: set[str] = frozenset(),
                   **kinds: frozenset) -> TargetSet:
    """A target set as the manager makes it: each cgroup path with its id."""
    t = TargetSet(cgroups=frozenset(cgroups), containers=frozenset(containers), **kinds)
    return with_cgroup_ids(t, t.cgroups, Cgroups())


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("cgroup-workload"), "workload", WORKLOAD_C)


@contextmanager
def tree() -> Iterator[dict[str, Path]]:
    """The target T, a cgroup nested two levels under it, and T's sibling S."""
    with cgroup_dir(f"{ROOT}/T/inner/nested") as nested, cgroup_dir(f"{ROOT}/S") as sibling:
        yield {"T": nested.parent.parent, "T/inner/nested": nested, "S": sibling}


def run(proc: subprocess.Popen) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"done\n"


@contextmanager
def started(workload: Path, dirs: dict[str, Path]) -> Iterator[dict[str, subprocess.Popen]]:
    with ExitStack() as stack:
        procs = {}
        for name, d in dirs.items():
            p = spawn_in(d, [str(workload)])
            stack.callback(p.wait)
            stack.callback(p.kill)
            procs[name] = p
        yield procs


MATCHED = {"T": True, "T/inner/nested": True, "S": False}


def test_exec_cgroup_target_lets_exactly_its_subtree_through(sink: CollectingSink,
                                                               workload: Path) -> None:
    with tree() as dirs, loaded_monitor("exec", sink,
                                        targets=cgroup_targets({f"{ROOT}/T"})) as m:
        ids = {name: d.stat().st_ino for name, d in dirs.items()}
        with started(workload, dirs) as procs:
            for p in procs.values():
                run(p)
            wait_for_events(m, sink, lambda e: e["pid"] == procs["T/inner/nested"].pid)
            drain(m)
            seen = {name: [e for e in sink.events if e["pid"] == p.pid]
                    for name, p in procs.items()}
    for name, matched in MATCHED.items():
        events = seen[name]
        assert [(e["argv"], e["ret"]) for e in events] == \
            ([([str(workload)], 0)] if matched else []), name
        if matched:
            assert events[0]["cgroup_id"] == ids[name]
    assert {e["pid"] for e in sink.events} <= {procs["T"].pid, procs["T/inner/nested"].pid}


@pytest.mark.parametrize(("name", "options"), [
    ("syscall", {"per_process": True}),
    ("func", {"patterns": ["c:getpid"]}),
])
def test_cgroup_target_counts_exactly_the_subtree(sink: CollectingSink, workload: Path,
                                                  name: str, options: dict) -> None:
    """Two workloads in the target's subtree, one in its sibling: the counts are the
    two's exactly."""
    with tree() as dirs, started(workload, dirs) as procs, \
            loaded_monitor(name, sink, targets=cgroup_targets({f"{ROOT}/T"}), **options) as m:
        for p in procs.values():
            run(p)
        drain(m)
        stats = m.stats()
    inside = sum(MATCHED.values())
    if name == "syscall":
        rows = {r["name"]: r for r in stats["syscalls"]}
        assert rows["getppid"]["count"] == inside * N_GETPPID
        pids = {p["pid"] for p in stats["processes"]}
        assert pids == {procs[k].pid for k, matched in MATCHED.items() if matched}
    else:
        counts = [f["count"] for f in stats["functions"] if f["name"] in ("getpid", "__getpid")]
        assert counts == [inside * N_GETPID]


def test_cgroup_target_is_anded_with_uids(sink: CollectingSink, workload: Path) -> None:
    """uid 0 (this test's) and the subtree: matched; another uid and the subtree: none."""
    with tree() as dirs, started(workload, {"T": dirs["T"]}) as procs:
        for uids, expected in (({0}, N_GETPPID), ({65534}, 0)):
            targets = cgroup_targets({f"{ROOT}/T"}, uids=frozenset(uids))
            with loaded_monitor("syscall", sink, targets=targets) as m:
                procs["T"].stdin.write(b"go\n")  # type: ignore[union-attr]
                procs["T"].stdin.flush()  # type: ignore[union-attr]
                assert procs["T"].stdout.readline() == b"done\n"  # type: ignore[union-attr]
                drain(m)
                rows = {r["name"]: r["count"] for r in m.stats()["syscalls"]}
            assert rows.get("getppid", 0) == expected, uids
            procs["T"].kill()
            procs["T"].wait()
            procs["T"] = spawn_in(dirs["T"], [str(workload)])


# (case, cgroup path under ROOT made after the target was set, matched)
CONTAINER_PATHS = [
    ("docker", f"system.slice/docker-{CONTAINER}.scope", True),
    ("containerd", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"6c0e8a3e_1b2d_4c5e_9f70_0123456789ab.slice/cri-containerd-{CONTAINER}.scope", True),
    ("crio", f"kubepods.slice/crio-{CONTAINER}.scope", True),
    ("podman", f"machine.slice/libpod-{CONTAINER}.scope", True),
    ("cgroupfs", f"docker/{CONTAINER}", True),
    ("cgroupfs-podman", f"libpod_parent/libpod-{CONTAINER}", True),
    ("inside-the-container", f"system.slice/docker-{CONTAINER}.scope/init.scope", True),
    ("conmon", f"machine.slice/libpod-conmon-{CONTAINER}.scope", False),
    ("other-container", f"system.slice/docker-{OTHER}.scope", False),
    ("unknown-runtime", f"system.slice/lxc-{CONTAINER}.scope", False),
    ("short-id", f"system.slice/docker-{CONTAINER[:63]}.scope", False),
]


@pytest.mark.parametrize("prefix", [CONTAINER[:12], CONTAINER], ids=["12-hex", "64-hex"])
def test_container_target_set_before_the_container_exists(
        sink: CollectingSink, workload: Path, prefix: str) -> None:
    """The target first, then each cgroup is made and a process moved in: the exec of
    its first program is there for a container that matches, and nothing otherwise."""
    cg = Cgroups()
    with loaded_monitor("exec", sink, targets=cgroup_targets(containers={prefix})) as m:
        pids: dict[str, int] = {}
        for case, path, _ in CONTAINER_PATHS:
            with cgroup_dir(f"{ROOT}/{path}") as d:
                p = spawn_in(d, [str(workload)])
                p.stdin.close()  # type: ignore[union-attr]  # EOF: it exits at once
                p.wait()
                pids[case] = p.pid
                cid = cg.id_of(f"{ROOT}/{path}")
                held = m.container_cgroup_ids()
                own = path.rsplit("/", 1)[-1] != "init.scope"
                assert (cid in held) == (own and dict((c, x) for c, _, x in
                                                      CONTAINER_PATHS)[case]), case
        drain(m)
        assert m.container_cgroup_ids() == set()  # every one removed: cgroup_rmdir
        assert m.kernel_counters()["cgroups_full"] == 0
    for case, _, matched in CONTAINER_PATHS:
        events = [e for e in sink.events if e["pid"] == pids[case]]
        assert [e["argv"] for e in events] == ([[str(workload)]] if matched else []), case


def test_existing_container_is_matched_and_released(sink: CollectingSink,
                                                    workload: Path) -> None:
    """A container whose cgroup exists when the target is set is found by userspace's
    walk; removing the prefix removes its id from the kernel map."""
    path = f"{ROOT}/system.slice/docker-{CONTAINER}.scope"
    with cgroup_dir(path) as d, loaded_monitor("exec", sink, targets=TargetSet(
            pids=frozenset({1 << 30}))) as m:
        m.set_targets(cgroup_targets(containers={CONTAINER[:16]}))
        assert m.container_cgroup_ids() == {d.stat().st_ino}
        p = spawn_in(d, [str(workload)])
        p.stdin.close()  # type: ignore[union-attr]
        p.wait()
        events = wait_for_events(m, sink, lambda e: e["pid"] == p.pid)
        assert [e["argv"] for e in events] == [[str(workload)]]
        m.set_targets(cgroup_targets(containers={OTHER[:12]}))
        assert m.container_cgroup_ids() == set()
        assert m.read_targets()["containers"] == [OTHER[:12]]
        q = spawn_in(d, [str(workload)])
        q.stdin.close()  # type: ignore[union-attr]
        q.wait()
        drain(m)
        assert [e for e in sink.events if e["pid"] == q.pid] == []


def test_live_cgroup_edit_takes_effect_at_once(sink: CollectingSink, workload: Path) -> None:
    """A cached verdict never outlives a change: the same cgroup's processes are
    matched, then not, then again, as the target moves (cgroup_verdicts generation)."""
    with tree() as dirs, loaded_monitor("exec", sink,
                                        targets=cgroup_targets({f"{ROOT}/T"})) as m:
        seen = []
        for target in (f"{ROOT}/T", f"{ROOT}/S", f"{ROOT}/T/inner", ROOT):
            m.set_targets(cgroup_targets({target}))
            p = spawn_in(dirs["T/inner/nested"], [str(workload)])
            p.stdin.close()  # type: ignore[union-attr]
            p.wait()
            drain(m)
            seen.append((target, any(e["pid"] == p.pid for e in sink.events)))
        assert seen == [(f"{ROOT}/T", True), (f"{ROOT}/S", False),
                        (f"{ROOT}/T/inner", True), (ROOT, True)]
        assert m.read_targets()["cgroups"] == [ROOT]


# -- the per-CPU verdict slot (common.h cgroup_last): one process on one CPU ------------
N_ROUND = 1000


@pytest.fixture(scope="module")
def rounds_workload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(tmp_path_factory.mktemp("cgroup-rounds"), "rounds", rounds_c(N_ROUND))


@contextmanager
def on_one_cpu(d: Path, workload: Path) -> Iterator[subprocess.Popen]:
    """The rounds workload started in ``d`` and pinned to one CPU: its rounds meet the
    slot its previous round left on that CPU, as long as no other task wrote there in
    between (the tests below target its pid too: the pid check comes first, so no other
    task reaches the cgroup check)."""
    p = spawn_in(d, [str(workload)])
    try:
        os.sched_setaffinity(p.pid, {max(os.sched_getaffinity(0))})
        yield p
    finally:
        p.stdin.close()  # type: ignore[union-attr]  # EOF: it exits
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def move(p: subprocess.Popen, d: Path) -> None:
    """cgroups(7): a process moves to a cgroup when its pid is written to cgroup.procs."""
    (d / "cgroup.procs").write_text(str(p.pid))


def getppid_count(m, pid: int) -> int:
    """The getppid calls counted for ``pid`` (per_process statistics)."""
    for proc in m.stats()["processes"]:
        if proc["pid"] == pid:
            return next((s["count"] for s in proc["syscalls"] if s["name"] == "getppid"), 0)
    return 0


def counted_round(m, p: subprocess.Popen) -> int:
    """One round of the workload: the getppid calls the monitor counted for it."""
    before = getppid_count(m, p.pid)
    run(p)
    return getppid_count(m, p.pid) - before


BUILDS = pytest.mark.parametrize("latency", [True, False], ids=["latency", "counts-only"])
# With the per-CPU slot (kernels with BPF_CMPXCHG) and without it (the LRU cache alone,
# as on older kernels).
SLOT = pytest.mark.parametrize("slot", [True, False], ids=["slot", "lru-only"])


def with_slot(slot: bool):
    """before_load for loaded_monitor: the monitor compiled with or without the slot."""
    if slot and kernel_version() < CMPXCHG_KERNEL:
        pytest.skip(f"the per-CPU slot needs BPF_CMPXCHG (Linux {CMPXCHG_KERNEL})")
    return lambda m: setattr(m, "cgroup_slot", slot)


@SLOT
@BUILDS
def test_target_change_between_two_calls_on_one_cpu(sink: CollectingSink,
                                                    rounds_workload: Path,
                                                    latency: bool, slot: bool) -> None:
    """The same process, cgroup and CPU; the cgroup target changes between two of its
    calls (its pid stays targeted, ANDed): each round is counted exactly as the target
    of that moment says, never as the verdict its CPU cached before the change (the
    generation)."""
    steps = [(f"{ROOT}/T", True), (f"{ROOT}/S", False), (f"{ROOT}/T/inner", True),
             (f"{ROOT}/S", False), (ROOT, True)]
    with tree() as dirs, on_one_cpu(dirs["T/inner/nested"], rounds_workload) as p, \
            loaded_monitor("syscall", sink, before_load=with_slot(slot), per_process=True,
                           latency=latency) as m:
        counted = []
        for target, _ in steps:
            m.set_targets(cgroup_targets({target}, pids=frozenset({p.pid})))
            counted.append((target, counted_round(m, p)))
    assert counted == [(target, N_ROUND if matched else 0) for target, matched in steps]


@SLOT
@BUILDS
def test_process_moved_between_two_calls_on_one_cpu(sink: CollectingSink,
                                                    rounds_workload: Path,
                                                    latency: bool, slot: bool) -> None:
    """The same target (the subtree of T and the process's pid) and CPU; the process
    moves to another cgroup between two of its calls: each round is counted as its
    cgroup of that moment says."""
    steps = [("T", True), ("S", False), ("T/inner/nested", True), ("S", False), ("T", True)]
    with tree() as dirs, on_one_cpu(dirs["T"], rounds_workload) as p, \
            loaded_monitor("syscall", sink, before_load=with_slot(slot), per_process=True,
                           latency=latency) as m:
        m.set_targets(cgroup_targets({f"{ROOT}/T"}, pids=frozenset({p.pid})))
        counted = []
        for name, _ in steps:
            move(p, dirs[name])
            counted.append((name, counted_round(m, p)))
    assert counted == [(name, N_ROUND if matched else 0) for name, matched in steps]


def test_container_cgroup_removed_and_made_again_on_one_cpu(sink: CollectingSink,
                                                            rounds_workload: Path) -> None:
    """A container's cgroup removed and made again under the same name is a new cgroup,
    matched from its creation (cgroup_mkdir); the process moved in and out of each on
    one CPU is counted exactly while inside a matched one."""
    path = f"{ROOT}/system.slice/docker-{CONTAINER}.scope"
    other = f"{ROOT}/system.slice/docker-{OTHER}.scope"
    with cgroup_dir(f"{ROOT}/outside") as outside, \
            on_one_cpu(outside, rounds_workload) as p, \
            loaded_monitor("syscall", sink, per_process=True) as m:
        m.set_targets(cgroup_targets(containers={CONTAINER[:12]}, pids=frozenset({p.pid})))
        counted = []
        for cgroup in (path, path, other, path):
            with cgroup_dir(cgroup) as d:
                move(p, d)
                counted.append((cgroup, counted_round(m, p)))
                move(p, outside)
                counted.append(("outside", counted_round(m, p)))
        assert m.container_cgroup_ids() == set()  # each removed again: cgroup_rmdir
    assert counted == [
        (path, N_ROUND), ("outside", 0), (path, N_ROUND), ("outside", 0),
        (other, 0), ("outside", 0), (path, N_ROUND), ("outside", 0),
    ]


# -- the workload fields on syscall and func events, per runtime naming -------------------
@pytest.mark.parametrize(("name", "options", "wanted"), [
    ("syscall", {"slow_threshold_us": 0}, lambda e: e.get("syscall") == "getppid"),
    ("func", {"patterns": ["c:getpid"], "events": True},
     lambda e: e.get("function") in ("getpid", "__getpid")),
])
def test_events_carry_the_cgroup_and_its_workload(sink: CollectingSink, workload: Path,
                                                   name: str, options: dict, wanted) -> None:
    """A process in a cgroup named as each runtime names it: every one of its events has
    the directory's id (its inode), the path, container id, pod uid and unit, and the
    process_id /proc gives (exec events: tests/monitors/test_exec.py)."""
    from agent.kernel.identity import local_identity
    from tests.support.cgroups import RUNTIME_PATHS

    with ExitStack() as stack:
        placed = []
        for _runtime, path, container_id, pod_uid, unit in RUNTIME_PATHS:
            d = stack.enter_context(cgroup_dir(path))
            p = spawn_in(d, [str(workload)])
            stack.callback(p.wait)
            stack.callback(p.kill)
            placed.append((p, (d.stat().st_ino, path, container_id, pod_uid, unit)))
        targets = TargetSet(pids=frozenset(p.pid for p, _ in placed))
        with loaded_monitor(name, sink, targets=targets, **options) as m:
            for p, _ in placed:
                run(p)
            for p, want in placed:
                events = wait_for_events(m, sink, lambda e, pid=p.pid: e["pid"] == pid
                                         and wanted(e))
                assert events, f"no {name} event of pid {p.pid}"
                ident = local_identity().of_pid(p.pid)
                assert {(e["cgroup_id"], e["cgroup"], e["container_id"], e["pod_uid"],
                         e["unit"], e["process_id"]) for e in events} == {(*want, ident)}
