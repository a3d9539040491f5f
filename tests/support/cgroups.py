"""Real cgroup v2 directories for the tests, named as container runtimes name them,
with the test's own processes moved in (cgroups(7): write the pid to cgroup.procs).
Removed again when empty; a test never touches a cgroup it did not make."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.kernel.cgroups import Cgroups

CONTAINER_ID = "4f3c" * 16  # 64 hex digits, as docker/containerd/CRI-O/podman name them
POD_UID = "6c0e8a3e-1b2d-4c5e-9f70-0123456789ab"

# (runtime, path relative to the cgroup2 root, container_id, pod_uid, unit)
RUNTIME_PATHS = [
    ("kubernetes-containerd",
     "/ebpf-agent-test.slice/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
     f"{POD_UID.replace('-', '_')}.slice/cri-containerd-{CONTAINER_ID}.scope",
     CONTAINER_ID, POD_UID, f"cri-containerd-{CONTAINER_ID}.scope"),
    ("docker", f"/ebpf-agent-test.slice/system.slice/docker-{CONTAINER_ID}.scope",
     CONTAINER_ID, None, f"docker-{CONTAINER_ID}.scope"),
    ("podman", f"/ebpf-agent-test.slice/machine.slice/libpod-{CONTAINER_ID}.scope",
     CONTAINER_ID, None, f"libpod-{CONTAINER_ID}.scope"),
    ("service", "/ebpf-agent-test.slice/system.slice/ebpf-agent-test-nginx.service",
     None, None, "ebpf-agent-test-nginx.service"),
]


def own_cgroup(pid: int | str = "self") -> str:
    """The cgroup v2 path of a process (cgroups(7): the "0::" line of /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"/proc/{pid}/cgroup has no cgroup v2 line")


@contextmanager
def cgroup_dir(path: str) -> Iterator[Path]:
    """Create the cgroup ``path`` (and missing parents); on exit, move every process
    still in it back to the root and remove what was created, deepest first."""
    cg = Cgroups()
    made: list[Path] = []
    d = cg.root
    for part in path.strip("/").split("/"):
        d = d / part
        if not d.exists():
            d.mkdir()
            made.append(d)
    try:
        yield d
    finally:
        for m in reversed(made):
            for _ in range(100):
                for pid in (m / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):  # exited meanwhile
                        (cg.root / "cgroup.procs").write_text(pid)
                try:
                    m.rmdir()
                    break
                except OSError:  # a process still leaving (EBUSY): try again
                    time.sleep(0.05)


def run_in(d: Path, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` inside the cgroup directory ``d`` from its first instruction: the
    child moves itself in before it execs (a shell writing its own pid)."""
    script = f'echo $$ > "{d}/cgroup.procs" && exec "$@"'
    return subprocess.run(["sh", "-c", script, "sh", *argv], capture_output=True, **kw)


def spawn_in(d: Path, argv: list[str]) -> subprocess.Popen:
    script = f'echo $$ > "{d}/cgroup.procs" && exec "$@"'
    return subprocess.Popen(["sh", "-c", script, "sh", *argv], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE)






