"""agent/bpf/types.h (included by common.h and every monitor header): the event header,
the target flags, the pid kinds and the counter indices, as Python mirrors them."""

from __future__ import annotations

import ctypes
import subprocess
from types import SimpleNamespace
from typing import Any

import pytest

from agent.model.events import (
    COMM_LEN,
    COMMON_FIELDS,
    ENRICHED_FIELDS,
    HEADER,
    EventHeader,
    EventModel,
)
from agent.model.targets import TargetSet
from agent.monitors.bcc import (
    BPF_DIR,
    CG_CONTAINER,
    CG_PATH,
    CONTAINER_ID_LEN,
    KERNEL_COUNTERS,
    PID_FOLLOWED,
    PID_TARGET,
    TF_CGROUP_GEN,
    TF_CGROUPS,
    TF_COMMS,
    TF_CONTAINERS,
    TF_FOLLOW,
    TF_PIDS,
    TF_READY,
    TF_UIDS,
    BccMonitor,
)
from tests.support.layout import (
    assert_constants,
    assert_event_layout,
    assert_layout,
    c_values,
    indexed,
    struct_sizes,
)

TYPES_H = BPF_DIR / "types.h"


def test_event_header_layout() -> None:
    assert_event_layout(HEADER, BPF_DIR)
    assert_layout(TYPES_H, "event_hdr", EventHeader)
    # then the fields a stage may add (agent/model/events.py ENRICHED_FIELDS)
    assert tuple(EventModel.model_fields) == (*COMMON_FIELDS, *ENRICHED_FIELDS)


def test_map_key_sizes() -> None:
    assert struct_sizes(TYPES_H, ["comm_key", "container_key", "cgroup_verdict"]) == {
        "comm_key": COMM_LEN, "container_key": 4 + CONTAINER_ID_LEN, "cgroup_verdict": 12}


def test_constants_match_python() -> None:
    assert_constants(TYPES_H, {
        "COMM_LEN": COMM_LEN,
        "TF_PIDS": TF_PIDS, "TF_UIDS": TF_UIDS, "TF_COMMS": TF_COMMS,
        "TF_FOLLOW": TF_FOLLOW, "TF_READY": TF_READY,
        "TF_CGROUPS": TF_CGROUPS, "TF_CONTAINERS": TF_CONTAINERS, "TF_CGROUP_GEN": TF_CGROUP_GEN,
        "PID_TARGET": PID_TARGET, "PID_FOLLOWED": PID_FOLLOWED,
        "CG_PATH": CG_PATH, "CG_CONTAINER": CG_CONTAINER, "CONTAINER_ID_LEN": CONTAINER_ID_LEN,
        **indexed(KERNEL_COUNTERS, "CNT_{}"),
    })
    assert c_values(TYPES_H, {"n": "NR_COUNTERS"})["n"] >= len(KERNEL_COUNTERS)


SETTINGS_MACROS = {"MAX_TARGET_PIDS": 8, "MAX_TARGET_UIDS": 8, "MAX_TARGET_COMMS": 8,
                   "MAX_TARGET_CGROUPS": 8, "MAX_TARGET_CONTAINERS": 8,
                   "RINGBUF_PAGES": 64}


def preprocess(defines: dict[str, int]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gcc", "-E", "-x", "c", f"-I{BPF_DIR}", *(f"-D{k}={v}" for k, v in defines.items()),
         "-o", "/dev/null", str(BPF_DIR / "common.h")],
        capture_output=True, text=True,
    )


@pytest.mark.parametrize("missing", sorted(SETTINGS_MACROS))
def test_settings_constants_have_no_default_in_c(missing: str) -> None:
    """A constant that must agree with a setting comes only through -D: without it the
    program does not compile (BccMonitor.cflags always passes it)."""
    assert preprocess(SETTINGS_MACROS).returncode == 0
    proc = preprocess({k: v for k, v in SETTINGS_MACROS.items() if k != missing})
    assert proc.returncode != 0 and f"{missing} must be defined" in proc.stderr


def test_cflags_pass_every_settings_constant() -> None:
    from agent.config import TransportSettings
    from agent.model.targets import TargetSet
    from agent.monitors.contract import MonitorContext
    from agent.monitors.exec.monitor import ExecMonitor, ExecOptions

    transport = TransportSettings(wakeup_every=7, ringbuf_pages=128)
    ctx = MonitorContext(targets=TargetSet(), sink=None, transport=transport)  # type: ignore[arg-type]
    flags = ExecMonitor(ExecOptions(), ctx).cflags()
    assert "-DRINGBUF_PAGES=128" in flags
    # The ring buffer's wake-ups are the kernel's adaptive ones (common.h); wakeup_every
    # is the perf buffer's, set from userspace (open_perf_buffer's wakeup_events).
    assert not any(f.startswith("-DWAKEUP_EVERY") for f in flags)
    assert {f"-D{k}" for k in SETTINGS_MACROS} <= {f.split("=")[0] for f in flags}


def test_common_tracepoints_are_those_of_common_h() -> None:
    """Every BccMonitor requires the tracepoints common.h's programs attach to (a kernel
    without them gets 409 with the reason), without listing them itself."""
    import re

    from agent.monitors.bcc import COMMON_TRACEPOINTS
    from agent.monitors.registry import discover_monitors

    text = (BPF_DIR / "common.h").read_text()
    found = re.findall(r"^TRACEPOINT_PROBE\((\w+), (\w+)\)", text, re.MULTILINE)
    assert set(COMMON_TRACEPOINTS) == {f"{c}:{e}" for c, e in found}
    for cls in discover_monitors():
        assert set(COMMON_TRACEPOINTS) <= set(cls.REQUIRED_TRACEPOINTS), cls.name


class _KernelRacedTable(dict):
    """target_pids as BCC exposes it, where the kernel's sched_process_exit program
    deletes a followed pid between the agent's listing and its own delete."""

    class Key(ctypes.c_uint32):
        pass

    class Leaf(ctypes.c_uint8):
        pass

    def __init__(self, entries: dict[int, int], exits: set[int]) -> None:
        super().__init__({self.Key(k).value: v for k, v in entries.items()})
        self.exits = exits

    def items(self):  # type: ignore[override]
        return [(self.Key(k), self.Leaf(v)) for k, v in super().items()]

    def __delitem__(self, key: Any) -> None:
        pid = key.value
        if pid in self.exits:  # the kernel got there first
            super().__delitem__(pid)
            raise KeyError(pid)
        super().__delitem__(pid)


def test_reseeding_followed_pids_survives_a_child_exiting_meanwhile() -> None:
    """A followed child that exits while the targets change is not a 500 (seen in a soak:
    DELETE /targets/pids/N answered 500 once in 62 minutes)."""
    table = _KernelRacedTable({10: PID_TARGET, 11: PID_FOLLOWED, 12: PID_FOLLOWED}, {11})
    monitor = SimpleNamespace(bpf={b"target_pids": table})
    BccMonitor._seed_followed(monitor, TargetSet())  # type: ignore[arg-type]
    assert dict(table) == {10: PID_TARGET}
