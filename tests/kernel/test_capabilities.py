"""The capability report tells the truth about this host, and gates monitors."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest

from agent.kernel import btf
from agent.kernel.capabilities import (
    CMPXCHG_KERNEL,
    CapabilityReport,
    Feature,
    build_report,
    kernel_version,
)
from agent.monitors.registry import discover_monitors

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / ".venv" / "bin" / "ebpf-agent"


def test_report_matches_the_host() -> None:
    report = build_report(discover_monitors())
    assert report.kernel == platform.release()
    assert report.feature("root").available == (os.geteuid() == 0)
    assert report.feature("btf").available == btf.VMLINUX_BTF.exists()
    config_kprobes = "CONFIG_KPROBES=y" in subprocess.run(
        ["sh", "-c", "zcat /proc/config.gz 2>/dev/null || true"], capture_output=True, text=True
    ).stdout
    if Path("/proc/config.gz").exists():
        assert report.feature("kprobes").available == config_kprobes
    names = [m.name for m in report.monitors]
    assert "exec" in names


@pytest.mark.parametrize(("release", "version", "has_cmpxchg"), [
    ("6.18.44-fc-v1147", (6, 18), True),
    ("5.12.0", (5, 12), True),
    ("5.11.22-100.fc32.x86_64", (5, 11), False),
    ("5.4.0-150-generic", (5, 4), False),
    ("4.18.0-553.el8_10.x86_64", (4, 18), False),
    ("10.0.1", (10, 0), True),
])
def test_kernel_version_of_a_release(release: str, version: tuple[int, int],
                                     has_cmpxchg: bool) -> None:
    """`uname -r` strings as distributions print them; the slot's kernel gate."""
    assert kernel_version(release) == version
    assert (kernel_version(release) >= CMPXCHG_KERNEL) == has_cmpxchg


def test_btf_offsets_agree_with_bpftool() -> None:
    """Our BTF reader against bpftool's dump of the same struct."""
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(btf.VMLINUX_BTF), "format", "raw"],
        capture_output=True, text=True, check=True,
    ).stdout
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "STRUCT 'task_struct'" in line)
    members = {}
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        name = line.split("'")[1]
        members[name] = int(line.split("bits_offset=")[1].split()[0])
    offsets = btf.kernel_offsets()
    assert offsets["OFF_TASK_STRUCT_TGID"] * 8 == members["tgid"]
    assert offsets["OFF_TASK_STRUCT_REAL_PARENT"] * 8 == members["real_parent"]


def test_missing_feature_makes_a_monitor_unsupported_with_reason() -> None:
    reg = discover_monitors()
    report = CapabilityReport("x", "x86_64", {"root": Feature(False, "not root")},
                              tracefs=None)
    reason = report.support_reason(reg.get("exec"))
    assert reason is not None and "root: not root" in reason and "bcc" in reason


def test_check_cli_json_and_exit_code() -> None:
    proc = subprocess.run([str(CLI), "check", "--json"], capture_output=True, text=True)
    data = json.loads(proc.stdout)
    supported = any(m["supported"] for m in data["monitors"])
    assert proc.returncode == (0 if supported else 3)
    assert set(data["features"]) >= {"btf", "tracefs", "bcc", "kernel_headers", "ringbuf",
                                     "kprobes", "uprobes", "fentry", "lockdown", "root"}
    hooks = {m["name"]: m["tracepoints"] for m in data["monitors"]}
    assert "sock:inet_sock_set_state" in hooks["net"]
    assert "syscalls:sys_enter_execve" in hooks["exec"]


def test_check_as_non_root_reports_no_monitor_and_fails() -> None:
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           str(CLI), "check"], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "not root" in proc.stdout
