"""EventDecoder and console lines from a declaration: every decode kind on a record the
test builds, byte for byte, and the errors a declaration the monitor cannot serve gets."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent.kernel.cgroups import CgroupResolver
from agent.kernel.identity import ProcessIdentity
from agent.model.event_decl import Csv, Decode, EventDecl, EventField, Member
from agent.model.events import COMMON_CSV_FIELDS, COMMON_FIELDS, EventHeader, MonotonicClock
from agent.monitors.decoder import EventDecoder, console_line

DECL = EventDecl(
    struct="toy_event", header="toy.h",
    members=(
        Member("ret", "s32"), Member("flags", "u32"), Member("code", "u16"),
        Member("_pad", "u16"), Member("addr", "u8", 4), Member("name", "char", 8),
        Member("latency_ns", "u64"), Member("tail", "char", "TAIL"),
    ),
    fields=(
        EventField("name", "string", "a C string"),
        EventField("ret", "integer", "the return value"),
        EventField("error", "string", "errno name", Decode.ERRNO, source="ret", nullable=True),
        EventField("kind", "string", "code by name", Decode.ENUM, source="code",
                   arg={1: "one", 2: "two"}),
        EventField("big", "boolean", "flag 4", Decode.FLAG, source="flags", arg=4),
        EventField("addr", "string", "hex", Decode.BYTES_HEX),
        EventField("label", "string", "from a table", Decode.LOOKUP, source="code"),
        EventField("mode", "string", "an option", Decode.OPTION),
        EventField("words", "string[]", "a hook", Decode.HOOK, arg="tail", csv=Csv.JSON),
        EventField("latency_ns", "integer", "when flag 1", when=("flags", 1)),
        EventField("hidden", "integer", "no CSV", Decode.INT, source="code", csv=Csv.NONE),
    ),
)


def record(ret: int, flags: int, code: int, name: bytes, tail: bytes = b"") -> bytes:
    hdr = EventHeader(ts_ns=time.monotonic_ns(), pid=10, tid=11, ppid=9, uid=1000, gid=100,
                      comm=b"cat")
    cls = DECL.ctypes_struct({"TAIL": 16})
    e = cls(hdr=hdr, ret=ret, flags=flags, code=code, name=name, latency_ns=77)
    e.addr[:] = [0xC0, 0xA8, 0x00, 0x01]
    fixed = bytes(e)[: DECL.offsets({"TAIL": 16})["tail"]]
    return fixed + tail  # the kernel sends only the used part of the tail


def hook(raw: bytes, members: dict[str, Any]) -> dict[str, Any]:
    tail = raw[DECL.offsets()["tail"]:]
    return {"words": [w.decode() for w in tail.split(b"\0") if w]}


def decoder() -> EventDecoder:
    return EventDecoder(DECL, "toy", MonotonicClock(), tables={"label": {1: "L1", 3: "L3"}},
                        hooks={"tail": hook}, options={"mode": "fast"})


@pytest.mark.parametrize(("ret", "flags", "code", "name", "want"), [
    (-2, 1 | 4, 1, b"ab\xff", {"name": "ab\udcff", "ret": -2, "error": "ENOENT",
                               "kind": "one", "big": True, "label": "L1", "latency_ns": 77}),
    (5, 0, 3, b"12345678", {"name": "12345678", "ret": 5, "error": None, "kind": "3",
                            "big": False, "label": "L3"}),
    (-4096, 4, 1, b"", {"name": "", "ret": -4096, "error": None, "kind": "one", "big": True,
                        "label": "L1"}),
])
def test_every_kind(ret: int, flags: int, code: int, name: bytes, want: dict[str, Any]) -> None:
    e = decoder().decode(record(ret, flags, code, name, b"x\0yz\0"))
    assert list(e)[: len(COMMON_FIELDS)] == list(COMMON_FIELDS)
    assert (e["monitor"], e["pid"], e["tid"], e["ppid"], e["uid"], e["gid"], e["comm"]) == (
        "toy", 10, 11, 9, 1000, 100, "cat")
    own = {k: v for k, v in e.items() if k not in COMMON_FIELDS}
    assert own == {**want, "addr": "c0a80001", "mode": "fast", "words": ["x", "yz"],
                   "hidden": code}
    # Declared order, the conditional field in its place.
    assert [k for k in DECL.keys if k in e] == list(own)
    DECL.model("ToyEvent").model_validate(own)


def test_a_value_missing_from_a_lookup_table_is_an_error() -> None:
    with pytest.raises(KeyError):
        decoder().decode(record(0, 0, 2, b"n"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tables": {}}, "needs the table 'label'"),
    ({"hooks": {}}, "needs the hook 'tail'"),
    ({"options": {}}, "needs the option 'mode'"),
])
def test_what_the_monitor_must_supply(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"tables": {"label": {}}, "hooks": {"tail": hook},
                            "options": {"mode": "m"}, **kwargs}
    with pytest.raises(ValueError, match=message):
        EventDecoder(DECL, "toy", MonotonicClock(), **args)


def test_csv_row_and_columns() -> None:
    e = decoder().decode(record(-13, 1, 1, b"n", b"a,b\0"))
    assert DECL.csv_columns == ("name", "ret", "error", "kind", "big", "addr", "label",
                                "mode", "words", "latency_ns")
    row = DECL.csv_row(e, COMMON_CSV_FIELDS)
    assert row[len(COMMON_CSV_FIELDS):] == [
        "n", -13, "EACCES", "one", False, "c0a80001", "L1", "fast", '["a,b"]', 77]
    assert row[:2] == [e["timestamp"], e["ts_ns"]]


def test_console_lines() -> None:
    e = decoder().decode(record(-2, 1, 1, b"n", b"a\0b\nc\0"))
    ts = e["timestamp"]
    assert console_line(DECL, e) == (
        f"{ts} toy pid=10 tid=11 comm=cat name=n ret=-2 error=ENOENT kind=one big=False "
        f"addr=c0a80001 label=L1 mode=fast words=['a', 'b\\nc'] latency_ns=77 hidden=1")
    templated = EventDecl(
        struct="toy_event", header="toy.h", members=DECL.members, fields=DECL.fields,
        console="pid={pid} {ret:errno} {latency_ns:us}us{latency_ns:opt_ns} {words:words}"
                "{missing:opt_ns}")
    assert console_line(templated, e) == f"{ts} toy pid=10 -2 ENOENT 0.1us 77 ns a b\\nc"


@pytest.mark.parametrize(("pid", "ppid", "cgroup_id", "want"), [
    # start_ns 1.234 s and 0.5 s at 100 ticks/s: ticks 123 and 50.
    (10, 9, 7, {"process_id": "00ff00ff00ff00ff-123-10",
                "parent_process_id": "00ff00ff00ff00ff-50-9", "cgroup_id": 7,
                "cgroup": "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod"
                          "0a1b2c3d_0000_1111_2222_333344445555.slice/cri-containerd-"
                          + "ab" * 32 + ".scope",
                "container_id": "ab" * 32, "pod_uid": "0a1b2c3d-0000-1111-2222-333344445555",
                "unit": "cri-containerd-" + "ab" * 32 + ".scope"}),
    # The parent of init (pid 0): no process; a cgroup nobody can resolve: nulls.
    (1, 0, 99, {"process_id": "00ff00ff00ff00ff-123-1", "parent_process_id": None,
                "cgroup_id": 99, "cgroup": None, "container_id": None, "pod_uid": None,
                "unit": None}),
])
def test_identity_and_workload_fields(pid: int, ppid: int, cgroup_id: int,
                                      want: dict[str, Any]) -> None:
    identity = ProcessIdentity("00ff00ff00ff00ff", 10_000_000)
    resolver = CgroupResolver(None)
    resolver.learn(7, str(want["cgroup"]))
    raw = bytearray(record(0, 0, 1, b"n"))
    hdr = EventHeader.from_buffer(raw)
    hdr.pid, hdr.ppid, hdr.start_ns, hdr.parent_start_ns, hdr.cgroup_id = (
        pid, ppid, 1_234_567_890, 500_000_000, cgroup_id)
    e = EventDecoder(DECL, "toy", MonotonicClock(), tables={"label": {1: "L1"}},
                     hooks={"tail": hook}, options={"mode": "m"}, identity=identity,
                     cgroups=resolver).decode(bytes(raw))
    assert {k: e[k] for k in want} == want
    # An unresolved id is not cached: it is asked again on the next event.
    assert resolver.unresolved == (1 if cgroup_id == 99 else 0)


NET = EventDecl(
    struct="net_event", header="net.h",
    members=(Member("family", "u16"), Member("port", "u16"), Member("_pad", "u32"),
             Member("addr", "u8", 16), Member("v4", "u8", 4), Member("_pad2", "u32")),
    fields=(
        EventField("addr", "string", "by family", Decode.INET, arg="family", nullable=True),
        EventField("v4", "string", "by length", Decode.INET),
        EventField("port", "integer", "network order", Decode.NET16),
    ),
)


@pytest.mark.parametrize(("family", "addr", "want"), [
    (2, bytes([10, 1, 2, 3]) + bytes(12), "10.1.2.3"),
    (10, bytes(15) + b"\x01", "::1"),
    (1, bytes(16), None),  # AF_UNIX: no address
])
def test_addresses_and_ports(family: int, addr: bytes, want: str | None) -> None:
    cls = NET.ctypes_struct()
    e = cls(hdr=EventHeader(ts_ns=1, comm=b"x"), family=family,
            port=int.from_bytes((8080).to_bytes(2, "big"), "little"))
    e.addr[:] = list(addr)
    e.v4[:] = [192, 168, 0, 1]
    got = EventDecoder(NET, "net", MonotonicClock()).decode(bytes(e))
    assert (got["addr"], got["v4"], got["port"]) == (want, "192.168.0.1", 8080)
