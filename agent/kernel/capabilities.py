"""What this kernel and host can do, and which monitors can run here.

Each check detects rather than assumes (docs/kernel.md: a user's kernel may differ in
every respect). The same report feeds ``ebpf-agent check``, ``GET /capabilities`` and the
monitor manager, which refuses to start a monitor the report says cannot run.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.kernel import btf
from agent.kernel.kconfig import kernel_config
from agent.kernel.probes import kprobes_status
from agent.kernel.tracefs import find_tracefs
from agent.kernel.tracefs import is_dir as _is_dir


@dataclass
class Feature:
    available: bool
    detail: str = ""


@dataclass
class MonitorSupport:
    name: str
    supported: bool
    reason: str | None = None
    tracepoints: tuple[str, ...] = ()  # the ones it attaches to (REQUIRED_TRACEPOINTS)


@dataclass
class CapabilityReport:
    kernel: str
    machine: str
    features: dict[str, Feature]
    monitors: list[MonitorSupport] = field(default_factory=list)
    tracefs: str | None = None
    kernel_offsets: dict[str, int] = field(default_factory=dict)

    def feature(self, name: str) -> Feature:
        return self.features.get(name, Feature(False, "unknown feature"))

    def missing(self, needs: Iterable[str]) -> list[str]:
        return [f"{n}: {self.feature(n).detail}" for n in needs if not self.feature(n).available]

    def tracepoint_exists(self, name: str) -> bool:
        if self.tracefs is None:
            return False
        category, event = name.split(":", 1)
        return _is_dir(Path(self.tracefs) / "events" / category / event)

    def support_reason(self, monitor_cls: Any) -> str | None:
        """Why ``monitor_cls`` cannot run here, or None when it can."""
        problems = self.missing(monitor_cls.REQUIRED_FEATURES)
        absent = [t for t in monitor_cls.REQUIRED_TRACEPOINTS if not self.tracepoint_exists(t)]
        if absent and self.tracefs is not None:
            problems.append("tracepoints missing: " + ", ".join(absent))
        return "; ".join(problems) or None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["any_monitor_supported"] = any(m.supported for m in self.monitors)
        return out


def _tracefs_feature(tracefs: Path | None) -> Feature:
    if tracefs is not None:
        return Feature(True, str(tracefs))
    if os.geteuid() != 0:
        return Feature(False, "tracefs not readable (root only)")
    return Feature(False, "tracefs not mounted (mount -t tracefs tracefs /sys/kernel/tracing)")


def _lockdown() -> str:
    try:
        text = Path("/sys/kernel/security/lockdown").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else "unknown"


def _kallsyms(*symbols: str) -> set[str]:
    """Which of ``symbols`` the kernel has, in one pass over /proc/kallsyms."""
    wanted = {s.encode() for s in symbols}
    found: set[str] = set()
    try:
        with open("/proc/kallsyms", "rb") as f:
            for line in f:
                name = line.rstrip(b"\n").rsplit(b" ", 1)[-1]
                if name in wanted:
                    found.add(name.decode())
    except OSError:
        pass
    return found


def _check_btf() -> tuple[Feature, dict[str, int]]:
    try:
        offsets = btf.kernel_offsets()
    except btf.BTFError as e:
        return Feature(False, str(e)), {}
    return Feature(True, f"{btf.VMLINUX_BTF} ({len(offsets)} offsets read)"), offsets


def _check_bcc() -> Feature:
    try:
        import bcc  # noqa: F401  (loads libbcc.so through ctypes)
        from bcc import __version__ as version  # type: ignore[attr-defined]
    except ImportError as e:
        return Feature(False, f"python bcc not importable ({e}); install Debian python3-bpfcc")
    except OSError as e:
        return Feature(False, f"libbcc failed to load: {e}")
    return Feature(True, f"bcc {version}")


def _check_headers() -> Feature:
    release = platform.release()
    build = Path(f"/lib/modules/{release}/build")
    if not build.exists():
        return Feature(False, f"missing: no {build} (BCC compiles against kernel headers)")
    target = os.path.realpath(build)
    if release in target:
        return Feature(True, f"matching: {target}")
    # Compiles, but any struct read through header types would be wrong; our programs
    # use BTF offsets instead, so this is usable.
    return Feature(True, f"mismatched: {target} for kernel {release} (offsets come from BTF)")


def _check_kprobes() -> Feature:
    return Feature(*kprobes_status())


def _check_uprobes(tracefs: Path | None, config: dict[str, str]) -> Feature:
    if config and config.get("CONFIG_UPROBE_EVENTS") != "y":
        return Feature(False, "CONFIG_UPROBE_EVENTS is not set in this kernel")
    if tracefs and (tracefs / "uprobe_events").exists():
        return Feature(True, f"{tracefs}/uprobe_events present")
    return Feature(bool(config), "CONFIG_UPROBE_EVENTS=y" if config else "cannot tell")


def kernel_version(release: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running kernel, or of ``release`` as `uname -r` prints it."""
    major, minor = (int(x) for x in re.findall(r"\d+", release or platform.release())[:2])
    return major, minor


# BPF_ATOMIC's compare-and-exchange (BPF_CMPXCHG) came with Linux 5.12; common.h's
# per-CPU cgroup verdict slot (CGROUP_SLOT) needs it.
CMPXCHG_KERNEL = (5, 12)


def _check_ringbuf(kallsyms: set[str]) -> Feature:
    # BPF_MAP_TYPE_RINGBUF came with 5.8; its helpers show in kallsyms where readable.
    if "bpf_ringbuf_output" in kallsyms:
        return Feature(True, "bpf_ringbuf_output in kallsyms")
    major, minor = kernel_version()
    ok = (major, minor) >= (5, 8)
    return Feature(ok, f"kernel {major}.{minor} {'>=' if ok else '<'} 5.8")


def _check_fentry(lockdown: str, kallsyms: set[str]) -> Feature:
    if "bpf_trampoline_link_prog" not in kallsyms:
        return Feature(False, "no BPF trampoline in this kernel")
    if lockdown not in ("none", "unknown"):
        # fentry loads fail with EPERM under lockdown=integrity (docs/kernel.md).
        return Feature(False, f"kernel lockdown is {lockdown}: fentry programs are refused")
    return Feature(True, "BPF trampoline present")


def build_report(registry: Any | None = None) -> CapabilityReport:
    tracefs = find_tracefs()
    config = kernel_config()
    lockdown = _lockdown()
    btf_feature, offsets = _check_btf()
    is_root = os.geteuid() == 0
    kallsyms = _kallsyms("bpf_ringbuf_output", "bpf_trampoline_link_prog")
    features = {
        "root": Feature(is_root, "running as root" if is_root else "not root: eBPF needs root"),
        "bpf_syscall": Feature(
            config.get("CONFIG_BPF_SYSCALL") == "y" if config else Path("/sys/fs/bpf").exists(),
            "CONFIG_BPF_SYSCALL" if config else "from /sys/fs/bpf",
        ),
        "btf": btf_feature,
        "tracefs": _tracefs_feature(tracefs),
        "bcc": _check_bcc(),
        "kernel_headers": _check_headers(),
        "ringbuf": _check_ringbuf(kallsyms),
        "kprobes": _check_kprobes(),
        "uprobes": _check_uprobes(tracefs, config),
        "fentry": _check_fentry(lockdown, kallsyms),
        "lockdown": Feature(lockdown in ("none", "unknown"), lockdown),
    }
    report = CapabilityReport(
        kernel=platform.release(),
        machine=platform.machine(),
        features=features,
        tracefs=str(tracefs) if tracefs else None,
        kernel_offsets=offsets,
    )
    if registry is not None:
        for cls in registry:
            reason = report.support_reason(cls)
            report.monitors.append(MonitorSupport(cls.name, reason is None, reason,
                                                  tuple(cls.REQUIRED_TRACEPOINTS)))
    return report
