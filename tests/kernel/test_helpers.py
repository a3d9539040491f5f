"""The generic kernel helpers of agent/kernel/ (tracefs, kernel config, kprobes, symbols):
what they report matches the host, and the capability report uses the same checks."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest

from agent.kernel import probes
from agent.kernel.capabilities import build_report
from agent.kernel.kconfig import kernel_config
from agent.kernel.symbols import PatternError, Probe, dedup_by_address, kernel_functions
from agent.kernel.tracefs import find_tracefs


def test_kernel_config_is_the_running_kernels() -> None:
    path = Path("/proc/config.gz")
    if not path.exists():
        pytest.skip("no /proc/config.gz")
    text = gzip.decompress(path.read_bytes()).decode()
    config = kernel_config()
    assert config and all(f"{k}={v}" in text for k, v in config.items())
    assert config.get("CONFIG_BPF_SYSCALL") == "y"


def test_find_tracefs_is_the_mounted_one() -> None:
    if os.geteuid() != 0:
        pytest.skip("tracefs is root-only")
    mounts = Path("/proc/mounts").read_text().split("\n")
    tracefs = find_tracefs()
    assert tracefs is not None and (tracefs / "events").is_dir()
    assert any(line.split()[1:3] == [str(tracefs), "tracefs"] for line in mounts if line)


def test_capabilities_and_func_use_one_kprobes_check() -> None:
    report = build_report()
    assert (report.feature("kprobes").available, report.feature("kprobes").detail) == (
        probes.kprobes_status())
    assert probes.kprobes_available() == report.feature("kprobes").available


def test_kernel_functions_or_a_pattern_error() -> None:
    """Traceable kernel functions where tracefs lists them; where it cannot (missing, or
    EPERM under lockdown as here) a PatternError (422), never an OSError (500)."""
    if os.geteuid() != 0:
        pytest.skip("tracefs is root-only")
    try:
        functions = kernel_functions()
    except PatternError as e:
        assert "kernel functions" in str(e)
    else:
        assert functions and len(functions) == len(set(functions))


def test_describe_errno_names_enotsupp() -> None:
    assert "ENOTSUPP" in probes.describe_errno(probes.ENOTSUPP)
    assert probes.describe_errno(2).startswith("ENOENT")


def test_dedup_keeps_the_plain_alias() -> None:
    a = Probe("uprobe", "/lib/libc.so.6", "__getpid", 0x10)
    b = Probe("uprobe", "/lib/libc.so.6", "getpid", 0x10)
    c = Probe("uprobe", "/lib/libc.so.6", "getppid", 0x20)
    assert sorted(p.name for p in dedup_by_address([a, b, c])) == ["getpid", "getppid"]


def test_bpf_syscall_number_matches_the_c_library() -> None:
    """uprobe_multi links go through syscall(SYS_bpf, ...): the number we use must be the
    machine's (asm/unistd.h, as gcc sees it)."""
    machine = os.uname().machine
    if machine not in probes.NR_BPF:
        pytest.skip(f"no bpf(2) number known for {machine}")
    out = subprocess.run(["gcc", "-E", "-dM", "-include", "sys/syscall.h", "-x", "c",
                          "/dev/null"], capture_output=True, text=True, check=True).stdout
    [line] = [x for x in out.splitlines() if x.split()[1:2] == ["__NR_bpf"]]
    assert int(line.split()[2]) == probes.NR_BPF[machine]
