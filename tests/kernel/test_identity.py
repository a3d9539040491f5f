"""Process ids from /proc and cgroup paths from ids, against the running system."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.kernel.cgroups import CgroupError, CgroupResolver, Cgroups, cgroup2_mount, normalize
from agent.kernel.identity import ProcessIdentity, boot_id, local_identity, stat_start_ticks
from tests.support.cgroups import CONTAINER_ID, cgroup_dir, own_cgroup


def test_process_id_from_proc() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        ticks = int(stat[stat.rfind(")") + 2:].split()[19])
        ident = local_identity()
        assert ident.of_pid(child.pid) == f"{boot_id()[:16]}-{ticks}-{child.pid}"
        # The kernel's nanoseconds give the same id at tick granularity.
        assert ident.from_ns(child.pid, ticks * ident.ns_per_tick + ident.ns_per_tick - 1) \
            == ident.of_pid(child.pid)
    finally:
        child.kill()
        child.wait()
    assert stat_start_ticks(child.pid) is None and ident.of_pid(child.pid) is None


def test_pid_zero_has_no_process_id() -> None:
    assert ProcessIdentity("ab" * 8, 10_000_000).from_ns(0, 12345) is None


def test_mount_path_and_id_of_a_cgroup(tmp_path: Path) -> None:
    cg = Cgroups()
    assert cg.root == cgroup2_mount()
    path = f"/ebpf-agent-test.slice/system.slice/docker-{CONTAINER_ID}.scope"
    with cgroup_dir(path) as d:
        cid = cg.id_of(path)
        assert cid == d.stat().st_ino
        assert cg.path_of(cid) == path
        resolver = CgroupResolver(cg)
        w = resolver.resolve(cid)
        assert (w.cgroup, w.container_id, w.unit) == (path, CONTAINER_ID,
                                                      f"docker-{CONTAINER_ID}.scope")
    # Gone: the file handle no longer opens, the cache still answers (ids are not reused).
    assert cg.path_of(cid) is None
    assert resolver.resolve(cid).cgroup == path
    assert cg.path_of(cg.id_of(own_cgroup())) == own_cgroup()
    with pytest.raises(CgroupError, match="no such cgroup"):
        cg.id_of("/ebpf-agent-test-absent")


@pytest.mark.parametrize(("raw", "want"), [
    ("/", "/"), ("", "/"), ("a/b/", "/a/b"), ("//a//b", "/a/b"),
])
def test_normalize(raw: str, want: str) -> None:
    assert normalize(raw) == want


def test_normalize_refuses_dot_dot() -> None:
    with pytest.raises(CgroupError, match="'..' are not allowed"):
        normalize("/a/../b")


def test_mountinfo_without_cgroup2(tmp_path: Path) -> None:
    f = tmp_path / "mountinfo"
    f.write_text("22 1 0:21 / /proc rw - proc proc rw\n")
    with pytest.raises(CgroupError, match="no cgroup2"):
        cgroup2_mount(f)
    f.write_text("41 31 0:38 / /sys/fs/cgroup/my\\040dir rw,relatime - cgroup2 cgroup2 rw\n")
    assert cgroup2_mount(f) == Path("/sys/fs/cgroup/my dir")


def test_resolver_is_bounded() -> None:
    r = CgroupResolver(None, capacity=2)
    for i, p in enumerate(["/a", "/b", "/c"]):
        r.learn(i + 1, p)
    assert (len(r), r.evicted, r.resolve(1).cgroup, r.resolve(3).cgroup) == (2, 1, None, "/c")
