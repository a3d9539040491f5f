"""What a cgroup path says about the workload: container id, Kubernetes pod uid and
systemd unit. Pure functions of the path (relative to the cgroup2 root), so they give
the same answer in the kernel's first event of a container and long after.

How runtimes name their cgroups (the last matching component wins: a container's own
sub-cgroups, e.g. ``init.scope`` of systemd inside it, keep the container's id):

* systemd cgroup driver: ``docker-<id>.scope``, ``cri-containerd-<id>.scope``,
  ``crio-<id>.scope``, ``libpod-<id>.scope`` (podman), under ``system.slice``,
  ``machine.slice`` or a kubepods slice;
* cgroupfs driver: ``/docker/<id>``, ``/kubepods/<qos>/pod<uid>/<id>``,
  ``/libpod_parent/libpod-<id>``;
* ``crio-conmon-<id>.scope`` and ``libpod-conmon-<id>.scope`` hold the runtime's
  monitor process (conmon), not the container: no container id.

<id> is 64 lower-case hex digits. Pods: ``kubepods-<qos>-pod<uid>.slice`` (systemd
driver: the uid's dashes written as underscores, systemd.unit(5) escaping) or
``pod<uid>`` (cgroupfs). The unit is the deepest ``.service`` or ``.scope`` component:
the systemd unit whose processes these are (systemd.scope(5), systemd.service(5)).
"""

from __future__ import annotations

import re
from typing import NamedTuple

CONTAINER_ID_LEN = 64
_CONTAINER = re.compile(
    r"^(?:(?:docker|cri-containerd|crio|libpod)-)?([0-9a-f]{64})(?:\.scope)?$")
_CONMON = re.compile(r"^(?:crio|libpod)-conmon-[0-9a-f]{64}\.scope$")
_POD = re.compile(
    r"^(?:kubepods(?:-[a-z]+)?-)?pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_]"
    r"[0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")
_UNIT_SUFFIXES = (".service", ".scope")


class Workload(NamedTuple):
    """The cgroup of an event and what it names; None where it does not apply."""

    cgroup: str | None
    container_id: str | None
    pod_uid: str | None
    unit: str | None


UNKNOWN = Workload(None, None, None, None)


def container_of(component: str) -> str | None:
    if _CONMON.match(component):
        return None
    m = _CONTAINER.match(component)
    return m.group(1) if m else None


def workload_of(path: str) -> Workload:
    """The workload fields of a cgroup path ("/" is the root: none of them)."""
    container = pod = unit = None
    for component in path.split("/"):
        if not component:
            continue
        c = container_of(component)
        if c is not None:
            container = c
        p = _POD.match(component)
        if p is not None:
            pod = p.group(1).replace("_", "-")
        if component.endswith(_UNIT_SUFFIXES):
            unit = component
    return Workload(path, container, pod, unit)
