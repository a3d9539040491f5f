"""workload_of: the container id, pod uid and unit every runtime's cgroup path names."""

from __future__ import annotations

import pytest

from agent.model.workload import Workload, workload_of

ID = "0123456789abcdef" * 4
POD = "6c0e8a3e-1b2d-4c5e-9f70-0123456789ab"


@pytest.mark.parametrize(("path", "container_id", "pod_uid", "unit"), [
    # systemd cgroup driver
    (f"/system.slice/docker-{ID}.scope", ID, None, f"docker-{ID}.scope"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD.replace('-', '_')}"
     f".slice/cri-containerd-{ID}.scope", ID, POD, f"cri-containerd-{ID}.scope"),
    (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{ID}.scope", ID, POD,
     f"crio-{ID}.scope"),
    (f"/machine.slice/libpod-{ID}.scope", ID, None, f"libpod-{ID}.scope"),
    # a container's own sub-cgroup keeps the container's id; the unit is the deepest
    (f"/system.slice/docker-{ID}.scope/init.scope", ID, None, "init.scope"),
    # cgroupfs driver
    (f"/docker/{ID}", ID, None, None),
    (f"/kubepods/besteffort/pod{POD}/{ID}", ID, POD, None),
    (f"/libpod_parent/libpod-{ID}", ID, None, None),
    # runtime monitors (conmon) are not the container
    (f"/machine.slice/libpod-conmon-{ID}.scope", None, None, f"libpod-conmon-{ID}.scope"),
    (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-conmon-{ID}.scope", None,
     POD, f"crio-conmon-{ID}.scope"),
    # no container: services, sessions, the root; ids of the wrong length are not ids
    ("/system.slice/nginx.service", None, None, "nginx.service"),
    ("/user.slice/user-0.slice/session-3.scope", None, None, "session-3.scope"),
    ("/", None, None, None),
    (f"/system.slice/docker-{ID[:63]}.scope", None, None, f"docker-{ID[:63]}.scope"),
    (f"/system.slice/docker-{ID.upper()}.scope", None, None, f"docker-{ID.upper()}.scope"),
])
def test_runtime_paths(path: str, container_id: str | None, pod_uid: str | None,
                       unit: str | None) -> None:
    assert workload_of(path) == Workload(path, container_id, pod_uid, unit)
