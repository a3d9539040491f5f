"""agent/bpf/types.h (included by common.h and every monitor header): the event header,
the target flags, the pid kinds and the counter indices, as Python mirrors them."""

from __future__ import annotations

from agent.model.events import COMM_LEN, EventHeader
from agent.monitors.bcc import (
    BPF_DIR,
    KERNEL_COUNTERS,
    PID_FOLLOWED,
    PID_TARGET,
    TF_COMMS,
    TF_FOLLOW,
    TF_PIDS,
    TF_READY,
    TF_UIDS,
)
from tests.support.layout import assert_constants, assert_layout, c_values, indexed, struct_sizes

HEADER = BPF_DIR / "types.h"


def test_event_header_layout() -> None:
    assert_layout(HEADER, "event_hdr", EventHeader)


def test_map_key_sizes() -> None:
    assert struct_sizes(HEADER, ["comm_key"]) == {"comm_key": COMM_LEN}


def test_constants_match_python() -> None:
    assert_constants(HEADER, {
        "COMM_LEN": COMM_LEN,
        "TF_PIDS": TF_PIDS, "TF_UIDS": TF_UIDS, "TF_COMMS": TF_COMMS,
        "TF_FOLLOW": TF_FOLLOW, "TF_READY": TF_READY,
        "PID_TARGET": PID_TARGET, "PID_FOLLOWED": PID_FOLLOWED,
        **indexed(KERNEL_COUNTERS, "CNT_{}"),
    })
    assert c_values(HEADER, {"n": "NR_COUNTERS"})["n"] > len(KERNEL_COUNTERS)
