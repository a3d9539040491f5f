"""Kernel test helpers: whether eBPF can run here (skip outside CI, fail under CI=true),
small C programs, BPF program ownership. Sinks and loaded monitors: tests/support/monitors.py."""

from __future__ import annotations

import os
import subprocess
import textwrap
from functools import lru_cache
from pathlib import Path

import pytest

from tests.support.monitors import CollectingSink

__all__ = ["CollectingSink", "compile_c", "kernel_problem", "loaded_prog_ids",
           "prog_ids_held_by", "require_kernel"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=1)
def kernel_problem() -> str | None:
    """Why eBPF monitors cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    from agent.kernel.capabilities import build_report
    from agent.monitors.registry import discover_monitors

    report = build_report(discover_monitors())
    exec_support = next((m for m in report.monitors if m.name == "exec"), None)
    if exec_support is None:
        return "exec monitor not registered"
    return exec_support.reason


def require_kernel() -> None:
    problem = kernel_problem()
    if problem is None:
        return
    message = f"eBPF unavailable: {problem}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: kernel tests must not skip)")
    pytest.skip(message)


def compile_c(directory: Path, name: str, source: str, *flags: str) -> Path:
    """gcc a small program (``flags``: e.g. "-O2"; default -O0) into ``directory``;
    returns the binary's path. Tests and bench/ alike."""
    src = directory / f"{name}.c"
    src.write_text(textwrap.dedent(source))
    binary = directory / name
    subprocess.run(["gcc", *(flags or ("-O0",)), "-o", str(binary), str(src)], check=True)
    return binary


def prog_ids_held_by(pid: int) -> set[int]:
    """BPF program ids a process holds fds for (/proc/PID/fdinfo: "prog_id:"); this
    bpftool build has no "pids" field, so ownership is read here."""
    ids: set[int] = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def loaded_prog_ids() -> set[int]:
    """Every BPF program the kernel has loaded, as ``bpftool prog show`` lists them."""
    import json

    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, check=True)
    return {p["id"] for p in json.loads(out.stdout)}
