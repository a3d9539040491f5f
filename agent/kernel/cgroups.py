"""cgroup v2: where the hierarchy is mounted, the id of a cgroup and the cgroup of an id.

A cgroup v2 id (bpf_get_current_cgroup_id(), bpf-helpers(7)) is the kernfs node id of
the cgroup's directory, which is also that directory's inode number (st_ino). The way
back from an id to a path is a file handle: kernfs exports its nodes with the id as
the handle (handle type FILEID_KERNFS, 0xfe, 8 bytes), so open_by_handle_at(2) on the
cgroup2 mount opens the directory and /proc/self/fd/N names it. That needs
CAP_DAC_READ_SEARCH (the agent runs as root); where it fails, a walk of the
hierarchy comparing inode numbers finds it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.model.targets import TargetError, TargetSet
from agent.model.workload import UNKNOWN, Workload, container_of, workload_of

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")
FILEID_KERNFS = 0xFE


class CgroupError(OSError):
    """No cgroup v2 hierarchy, or a path that is not a cgroup."""


def cgroup2_mount(mountinfo: Path = MOUNTINFO) -> Path:
    """Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts,
    /sys/fs/cgroup/unified on hybrid ones (proc(5), /proc/pid/mountinfo: the field
    after " - " is the filesystem type)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError as e:
        raise CgroupError(f"cannot read {mountinfo}: {e.strerror}") from None
    for line in lines:
        pre, sep, post = line.partition(" - ")
        if sep and post.split(" ", 1)[0] == "cgroup2":
            # Field 5 is the mount point; octal escapes (\040) stand for spaces.
            return Path(pre.split(" ")[4].encode().decode("unicode_escape"))
    raise CgroupError("no cgroup2 filesystem is mounted (proc(5): mountinfo)")


def normalize(path: str) -> str:
    """A cgroup path as the agent writes it: relative to the cgroup2 root, starting
    with "/", without a trailing "/" (the root is "/")."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise CgroupError(f"{path!r}: '.' and '..' are not allowed in a cgroup path")
    return "/" + "/".join(parts)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_uint64)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(_FileHandle), ctypes.c_int]


class Cgroups:
    """The cgroup v2 hierarchy at ``root`` (its mount point)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else cgroup2_mount()

    def dir_of(self, path: str) -> Path:
        return self.root / normalize(path).lstrip("/")

    def id_of(self, path: str) -> int:
        """The id of the cgroup at ``path``; CgroupError when there is none."""
        d = self.dir_of(path)
        try:
            st = d.stat()
        except OSError as e:
            raise CgroupError(f"{normalize(path)}: no such cgroup under {self.root}"
                              f" ({e.strerror})") from None
        if not d.is_dir():
            raise CgroupError(f"{normalize(path)}: not a cgroup directory")
        return st.st_ino

    def exists(self, path: str, cgroup_id: int) -> bool:
        try:
            return self.id_of(path) == cgroup_id
        except CgroupError:
            return False

    def path_of(self, cgroup_id: int) -> str | None:
        """The path of a live cgroup, through its file handle; None when it is gone."""
        root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            handle = _FileHandle(8, FILEID_KERNFS, cgroup_id)
            fd = _libc.open_by_handle_at(root_fd, ctypes.byref(handle),
                                         os.O_RDONLY | os.O_DIRECTORY)
            if fd < 0:
                return None
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        finally:
            os.close(root_fd)
        root = str(self.root)
        if target == root:
            return "/"
        if target.startswith(root + "/"):
            return normalize(target[len(root):])
        return None  # a cgroup outside this mount's view (another namespace)

    def walk(self, limit: int) -> Iterator[tuple[int, str]]:
        """(id, path) of up to ``limit`` cgroups, parents first."""
        stack = [(self.root, "/")]
        n = 0
        while stack and n < limit:
            d, rel = stack.pop()
            try:
                st = d.stat()
                entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            yield st.st_ino, rel
            n += 1
            stack.extend((Path(e.path), (rel.rstrip("/") + "/" + e.name)) for e in entries)


def with_cgroup_ids(targets: TargetSet, fresh: frozenset[str] | set[str],
                    cgroups: Cgroups | None) -> TargetSet:
    """``targets`` with the id of each of its cgroup paths: taken now for the paths in
    ``fresh`` and those without one, kept for the others. A path that is not a cgroup
    is a TargetError naming it (nothing changed)."""
    known = targets.id_of_cgroup()
    ids: dict[str, int] = {}
    for path in sorted(targets.cgroups):
        if path in known and path not in fresh:
            ids[path] = known[path]
            continue
        if cgroups is None:
            raise TargetError(f"cgroups: {path}: no cgroup v2 hierarchy is mounted")
        try:
            ids[path] = cgroups.id_of(path)
        except CgroupError as e:
            raise TargetError(f"cgroups: {e}") from None
    return replace(targets, cgroup_ids=tuple(sorted(ids.items())))


def container_cgroups(cgroups: Cgroups, prefixes: frozenset[str] | set[str],
                      limit: int = 1_000_000) -> dict[int, str]:
    """id -> path of the cgroups named after a container whose id starts with one of
    ``prefixes`` (the last path component, as common.h's cgroup_mkdir program reads
    it; a container's own sub-cgroups are matched through their ancestor)."""
    if not prefixes:
        return {}
    out: dict[int, str] = {}
    for cid, path in cgroups.walk(limit):
        container = container_of(path.rsplit("/", 1)[-1])
        if container is not None and container.startswith(tuple(prefixes)):
            out[cid] = path
    return out


def describe_cgroup_targets(doc: dict[str, Any], targets: TargetSet, cgroups: Cgroups | None,
                            container_ids: set[int] | None) -> dict[str, Any]:
    """``doc`` (the targets as read back, with ``cgroups`` and ``containers`` lists)
    plus ``cgroup_ids``: each cgroup path with the id it was targeted by and whether
    that cgroup still exists; and ``container_cgroups``: each container prefix with the
    cgroups it matches, from ``container_ids`` (what a kernel map holds) or, without
    them, a walk of the hierarchy."""
    ids = targets.id_of_cgroup()
    doc["cgroup_ids"] = [
        {"path": p, "id": ids.get(p),
         "exists": cgroups is not None and p in ids and cgroups.exists(p, ids[p])}
        for p in doc.get("cgroups", [])]
    prefixes = set(doc.get("containers", []))
    matched: dict[int, str | None]
    if cgroups is None:
        matched = {}
    elif container_ids is None:
        matched = dict(container_cgroups(cgroups, prefixes))
    else:
        matched = {cid: cgroups.path_of(cid) for cid in container_ids}
    named = {cid: (path, container_of(path.rsplit("/", 1)[-1]))
             for cid, path in matched.items() if path is not None}
    doc["container_cgroups"] = [
        {"prefix": prefix,
         "cgroups": [{"id": cid, "path": path} for cid, (path, container) in sorted(named.items())
                     if container is not None and container.startswith(prefix)]}
        for prefix in sorted(prefixes)]
    return doc


class CgroupResolver:
    """cgroup id -> Workload (path, container id, pod uid, unit), cached and bounded.

    Called on the poller threads for every event: a hit is one dict lookup. A miss
    asks, in order, the ``sources`` (e.g. the process tracker's map of cgroups the
    kernel saw created, which still answers for a cgroup removed since) and then the
    file handle. Entries are never wrong: an id is never reused within a boot."""

    def __init__(self, cgroups: Cgroups | None, capacity: int = 4096) -> None:
        self.cgroups = cgroups
        self.capacity = capacity
        self._cache: OrderedDict[int, Workload] = OrderedDict()
        self._lock = threading.Lock()
        self.sources: list[Callable[[int], str | None]] = []
        self.evicted = 0
        self.unresolved = 0

    def learn(self, cgroup_id: int, path: str) -> None:
        with self._lock:
            self._store(cgroup_id, workload_of(normalize(path)))

    def _store(self, cgroup_id: int, w: Workload) -> None:
        self._cache[cgroup_id] = w
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
            self.evicted += 1

    def seed(self, limit: int | None = None) -> int:
        """Learn the cgroups that exist now; how many."""
        if self.cgroups is None:
            return 0
        n = 0
        for cid, path in self.cgroups.walk(limit or self.capacity):
            self.learn(cid, path)
            n += 1
        return n

    def resolve(self, cgroup_id: int) -> Workload:
        w = self._cache.get(cgroup_id)
        if w is not None:
            return w
        path = None
        for source in self.sources:
            path = source(cgroup_id)
            if path is not None:
                break
        if path is None and self.cgroups is not None and cgroup_id:
            path = self.cgroups.path_of(cgroup_id)
        if path is None:
            self.unresolved += 1
            return UNKNOWN  # not cached: a later event may find it
        w = workload_of(normalize(path))
        with self._lock:
            self._store(cgroup_id, w)
        return w

    def __len__(self) -> int:
        return len(self._cache)


_DEFAULT: CgroupResolver | None = None


def default_resolver() -> CgroupResolver:
    """The process's resolver (one cache for every monitor), over the cgroup2 mount;
    without one, every event's workload fields are null."""
    global _DEFAULT
    if _DEFAULT is None:
        try:
            cg: Cgroups | None = Cgroups()
        except CgroupError as e:
            log.warning("cgroup fields will be null: %s", e)
            cg = None
        _DEFAULT = CgroupResolver(cg)
    return _DEFAULT
