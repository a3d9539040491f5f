"""The compiled per-event path (agent/monitors/fastpath.c, agent/monitors/compiled.py)
against the Python decoder, its reference: the JSON bytes of every record must be
identical, on records the test builds for every decode kind and every monitor's
declaration (non-UTF-8 bytes, truncated argv, the largest values), and on records the
kernel sends for processes the test starts."""

from __future__ import annotations

import ctypes
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.core.pipeline import MonitorSink
from agent.kernel.cgroups import CgroupResolver
from agent.kernel.identity import ProcessIdentity
from agent.model.event_decl import C_TYPES, Csv, Decode, EventDecl, EventField, Member
from agent.model.events import COMMON_FIELDS, HEADER, EventHeader, MonotonicClock, encode_event
from agent.model.targets import TargetSet
from agent.monitors import compiled
from agent.monitors.bcc import BccMonitor
from agent.monitors.contract import MonitorContext, TransportSettings
from agent.monitors.decoder import EventDecoder
from agent.monitors.registry import default_registry
from tests.support.monitors import CollectingSink, NullSink, loaded_monitor

pytestmark = pytest.mark.skipif(not compiled.available(),
                                reason=f"extension not built: {compiled.IMPORT_ERROR}")

IDENTITY = ProcessIdentity("00ff00ff00ff00ff", 10_000_000)
CONTAINER = ("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_"
             "0000_1111_2222_333344445555.slice/cri-containerd-" + "ab" * 32 + ".scope")
U64 = 2**64 - 1


def resolver() -> CgroupResolver:
    r = CgroupResolver(None)
    r.learn(7, CONTAINER)
    r.learn(8, "/system.slice/ssh.service")
    r.learn(9, "/odd/\u00e9\"\\\n")
    return r


TOY = EventDecl(
    struct="toy_event", header="toy.h",
    members=(
        Member("ret", "s64"), Member("flags", "u32"), Member("code", "u16"),
        Member("family", "u16"), Member("addr", "u8", 16), Member("v4", "u8", 4),
        Member("port", "u16"), Member("small", "s8"), Member("byte", "u8"),
        Member("name", "char", 8), Member("big", "u64"), Member("tail", "char", "TAIL"),
    ),
    fields=(
        EventField("name", "string", "a C string"),
        EventField("ret", "integer", "s64"),
        EventField("error", "string", "errno", Decode.ERRNO, source="ret", nullable=True),
        EventField("kind", "string", "enum", Decode.ENUM, source="code",
                   arg={1: "one", 2: "t\"wo"}),
        EventField("on", "boolean", "flag 4", Decode.FLAG, source="flags", arg=4),
        EventField("hex", "string", "hex", Decode.BYTES_HEX, source="v4"),
        EventField("label", "string", "lookup", Decode.LOOKUP, source="code"),
        EventField("mode", "string", "option", Decode.OPTION),
        EventField("words", "string[]", "hook", Decode.HOOK, arg="tail", csv=Csv.JSON),
        EventField("n", "integer", "hook", Decode.HOOK, arg="tail"),
        EventField("addr", "string", "by family", Decode.INET, arg="family", nullable=True),
        EventField("v4", "string", "by length", Decode.INET),
        EventField("port", "integer", "network order", Decode.NET16),
        EventField("small", "integer", "s8"),
        EventField("byte", "integer", "u8"),
        EventField("big", "integer", "when flag 1", when=("flags", 1)),
    ),
)
TAIL = 32
TOY_TABLE = {0: "zero", 1: "L1", 2: "\u00e9", 3: None, 4: ["a", 1], 5: True, 6: 2**63,
             7: -(2**63), 8: (1, 2)}


def toy_hook(raw: bytes, members: dict[str, Any]) -> dict[str, Any]:
    tail = raw[TOY.offsets({"TAIL": TAIL})["tail"]:]
    words = [w.decode("utf-8", "surrogateescape") for w in tail.split(b"\0") if w]
    return {"words": words, "n": len(words)}


def pair(decl: EventDecl, monitor: str = "toy", **kw: Any) -> tuple[EventDecoder, Any]:
    """(the Python decoder, the compiled one) of one declaration, one clock."""
    clock = MonotonicClock()
    kw.setdefault("identity", IDENTITY)
    kw.setdefault("cgroups", resolver())
    ref = EventDecoder(decl, monitor, clock, **kw)
    return ref, compiled.compiled_decoder(ref, monitor, clock, **kw)


def toy_pair() -> tuple[EventDecoder, Any]:
    return pair(TOY, tables={"label": TOY_TABLE}, hooks={"tail": toy_hook},
                options={"mode": "fast\u00e9"})


def as_bytes(event: Any) -> bytes:
    return encode_event(event) if type(event) is dict else event.data


def same(ref: EventDecoder, fast: Any, raw: bytes) -> Any:
    """Decodes with both; the bytes must be identical. Returns the compiled result."""
    try:
        want = encode_event(ref.decode(raw))
    except Exception as e:  # the compiled path must fail the same way
        with pytest.raises(type(e)):
            fast.decode(raw)
        return None
    got = fast.decode(raw)
    assert as_bytes(got) == want
    return got


def toy_record(*, comm: bytes = b"cat", pid: int = 10, ppid: int = 9, ts: int = 10**18,
               cgroup: int = 7, ret: int = -2, flags: int = 5, code: int = 1,
               family: int = 2, addr: bytes = bytes([10, 1, 2, 3]) + bytes(12),
               name: bytes = b"ab", big: int = 77, small: int = -5, byte: int = 255,
               tail: bytes = b"x\0yz\0", start: int = 1_234_567_890) -> bytes:
    hdr = EventHeader(ts_ns=ts, pid=pid, tid=pid + 1, ppid=ppid, uid=1000, gid=100,
                      comm=comm, start_ns=start, parent_start_ns=500_000_000,
                      cgroup_id=cgroup)
    cls = TOY.ctypes_struct({"TAIL": TAIL})
    e = cls(hdr=hdr, ret=ret, flags=flags, code=code, family=family, name=name, big=big,
            port=0x901F, small=small, byte=byte)
    e.addr[:] = list(addr)
    e.v4[:] = [192, 168, 0, 1]
    return bytes(e)[: TOY.offsets({"TAIL": TAIL})["tail"]] + tail


# (what differs from toy_record's defaults, whether the compiled path writes it itself)
CASES: list[tuple[dict[str, Any], bool]] = [
    ({}, True),
    ({"comm": b"a\"b\\c\n\x01\x7f", "name": b"\xc3\xa9\xe2\x82\xac"}, True),  # escapes, UTF-8
    ({"comm": b"ab\xff"}, False),              # not UTF-8: the Python path writes it
    ({"name": b"\xed\xa0\x80"}, False),        # an encoded surrogate is not UTF-8 either
    ({"name": b"\xf0\x9f\x98"}, False),        # a truncated sequence
    ({"name": b"\xf0\x9f\x98\x80abcd"}, True),  # 4-byte sequence, no NUL in 8 bytes
    ({"name": b"12345678"}, True),             # the whole array, no NUL
    ({"tail": b"ok\0\xff\xfe\0"}, False),      # a hook value with surrogates
    ({"ret": -(2**63), "big": U64, "small": -128, "byte": 0, "ts": U64,
      "pid": 2**32 - 1, "ppid": 2**32 - 1, "cgroup": U64, "start": U64}, True),  # extremes
    ({"ret": -4095}, True), ({"ret": -4096}, True), ({"ret": 0}, True), ({"ret": -1}, True),
    ({"code": 2}, True), ({"code": 0xFFFF}, False),  # ENUM name with a quote; LOOKUP miss
    ({"code": 3}, True), ({"code": 4}, True), ({"code": 5}, True), ({"code": 6}, True),
    ({"code": 7}, True), ({"code": 8}, True), ({"code": 0}, True),
    ({"flags": 0}, True), ({"flags": 1}, True),
    ({"family": 10, "addr": bytes(15) + b"\x01"}, True),
    ({"family": 10, "addr": bytes(16)}, True),
    ({"family": 10, "addr": bytes.fromhex("20010db8000000000001000000000001")}, True),
    ({"family": 10, "addr": bytes.fromhex("00000000000000000000ffff01020304")}, True),
    ({"family": 10, "addr": bytes.fromhex("fe800000000000000000000000000000")}, True),
    ({"family": 10, "addr": bytes.fromhex("00010000000100000001000000010000")}, True),
    ({"family": 1}, True),                     # neither family: null
    ({"pid": 0, "ppid": 0}, True),             # no process: null ids
    ({"cgroup": 8}, True), ({"cgroup": 9}, True), ({"cgroup": 99}, True),  # unresolved
    ({"ts": 0}, True),
    ({"tail": b""}, True), ({"tail": b"\0\0"}, True),
]


@pytest.mark.parametrize(("change", "compiled_writes"), CASES)
def test_every_kind_byte_for_byte(change: dict[str, Any], compiled_writes: bool) -> None:
    ref, fast = toy_pair()
    got = same(ref, fast, toy_record(**change))
    if got is not None:
        assert (type(got) is not dict) == compiled_writes
        assert fast.fallbacks == (0 if compiled_writes else 1)


def test_random_ipv6_addresses_as_python_writes_them() -> None:
    rng = random.Random(6)
    ref, fast = toy_pair()
    for _ in range(2000):
        # Runs of zero hextets of every length and position.
        hextets = [rng.choice([0, 0, 0, rng.randrange(1, 0x10000)]) for _ in range(8)]
        addr = b"".join(h.to_bytes(2, "big") for h in hextets)
        got = same(ref, fast, toy_record(family=10, addr=addr))
        assert type(got) is not dict


def test_a_short_record_reads_as_zeros_as_in_python() -> None:
    ref, fast = toy_pair()
    raw = toy_record(tail=b"")
    for cut in (len(raw) - 1, len(raw) // 2, 8, 0):
        same(ref, fast, raw[:cut])


def test_record_is_a_read_only_mapping_of_the_event() -> None:
    ref, fast = toy_pair()
    raw = toy_record()
    want = ref.decode(raw)
    rec = fast.decode(raw)
    for key in COMMON_FIELDS:  # answered from the header, the dict not built
        assert rec.get(key) == want[key], key
        assert rec[key] == want[key], key
    assert rec.get("words") == ["x", "yz"]
    assert rec.get("absent") is None and rec.get("absent", 3) == 3
    with pytest.raises(KeyError):
        rec["absent"]
    assert dict(rec) == want and rec == want and len(rec) == len(want)
    assert list(rec) == list(want) and "name" in rec and "absent" not in rec
    assert dict(**rec) == want
    assert rec.to_dict() == want and rec.to_dict() is not rec.to_dict()


def test_declarations_the_decoder_cannot_serve_are_refused() -> None:
    clock = MonotonicClock()
    ref = EventDecoder(TOY, "toy", clock, tables={"label": {}}, hooks={"tail": toy_hook},
                       options={"mode": "m"})
    with pytest.raises(ValueError, match="table 'label'"):
        compiled.compiled_decoder(ref, "toy", clock, tables={}, hooks={"tail": toy_hook},
                                  options={"mode": "m"})
    with pytest.raises(ValueError, match="option 'mode'"):
        compiled.compiled_decoder(ref, "toy", clock, tables={"label": {}},
                                  hooks={"tail": toy_hook}, options={})
    with pytest.raises(ValueError, match="hook 'tail'"):
        compiled.compiled_decoder(ref, "toy", clock, tables={"label": {}}, hooks={},
                                  options={"mode": "m"})


@pytest.mark.parametrize(("mode", "kind"), [("python", EventDecoder), ("auto", "Decoder"),
                                            ("compiled", "Decoder")])
def test_the_setting_chooses_the_decoder(mode: str, kind: Any) -> None:
    d = compiled.make_decoder(TOY, "toy", MonotonicClock(), mode, tables={"label": TOY_TABLE},
                              hooks={"tail": toy_hook}, options={"mode": "m"})
    assert type(d) is kind if isinstance(kind, type) else type(d).__name__ == kind


def test_without_the_extension_auto_is_python_and_compiled_is_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_fastpath", None)
    monkeypatch.setattr(compiled, "IMPORT_ERROR", "not built")
    d = compiled.make_decoder(TOY, "toy", MonotonicClock(), "auto",
                              tables={"label": TOY_TABLE}, hooks={"tail": toy_hook},
                              options={"mode": "m"})
    assert type(d) is EventDecoder
    with pytest.raises(RuntimeError, match="not built"):
        compiled.make_decoder(TOY, "toy", MonotonicClock(), "compiled",
                              tables={"label": TOY_TABLE}, hooks={"tail": toy_hook},
                              options={"mode": "m"})


def test_the_pipeline_offers_the_records_own_bytes() -> None:
    ref, fast = toy_pair()
    rec = fast.decode(toy_record())
    got: list[tuple[Any, bytes]] = []

    class Keep:
        def offer(self, event: Any, data: bytes) -> None:
            got.append((event, data))

    MonitorSink(consumers=[Keep()]).publish(rec)
    assert got == [(rec, rec.data)] and got[0][1] is rec.data


# -- every monitor's declaration -----------------------------------------------------------
MONITOR_OPTIONS: dict[str, dict[str, Any]] = {"func": {"patterns": ["c:getpid"]}}


def unloaded(name: str) -> BccMonitor:
    default_registry.discover()
    cls = default_registry.get(name)
    m = cls(cls.Options(**MONITOR_OPTIONS.get(name, {})),
            MonitorContext(targets=TargetSet(), sink=NullSink(), identity=IDENTITY,
                           cgroups=resolver()))
    if name == "func":  # what load resolves: the probes by id
        from agent.monitors.func.monitor import Probe

        m.probes = [Probe("uprobe", "/lib/a.so", "f0", 16, "c:f0"),
                    Probe("uprobe", "/lib/\u00e9.so", "f1", 32, "c:f1")]
    return m


def random_record(rng: random.Random, decl: EventDecl, sizes: dict[str, int]) -> bytes:
    """Random bytes for every member; char members mostly printable text (else every
    record would go to the Python path), the header's too."""
    raw = bytearray(rng.randbytes(ctypes.sizeof(decl.ctypes_struct(sizes))))

    def text(off: int, n: int) -> None:
        k = rng.randrange(n + 1)
        raw[off:off + n] = bytes(rng.choice(b"abc \"\\\n/-.") for _ in range(k)).ljust(n, b"\0")
    hdr = HEADER.offsets()
    if rng.random() < 0.9:
        text(hdr["comm"], 16)
    own = decl.offsets(sizes)
    for m in decl.members:
        n = sizes[m.count] if isinstance(m.count, str) else m.count
        if m.ctype == "char" and rng.random() < 0.9:
            text(own[m.name], n)
        elif not n and rng.random() < 0.3:  # small values: enums, flags, families, errnos
            size = ctypes.sizeof(C_TYPES[m.ctype][0])
            raw[own[m.name]:own[m.name] + size] = rng.choice(
                [0, 1, 2, 4, 10, 2**64 - 2]).to_bytes(8, "little")[:size]
    return bytes(raw[: rng.randrange(len(raw) // 2, len(raw) + 1)])


@pytest.mark.parametrize("name", ["exec", "file", "func", "net", "syscall"])
def test_every_monitor_random_records_byte_for_byte(name: str) -> None:
    m = unloaded(name)
    assert m.EVENT is not None
    ref, fast = pair(m.EVENT, name, tables=m.decode_tables(), hooks=m.decode_hooks(),
                     options=m.options.model_dump())
    sizes = {s: 64 for s in m.EVENT.sizes}
    rng = random.Random(name)
    written = 0
    for _ in range(3000):
        got = same(ref, fast, random_record(rng, m.EVENT, sizes))
        written += got is not None and type(got) is not dict
    assert written > 1000  # most records are written by the compiled path itself


def exec_record(m: Any, argv: list[bytes], flags: int) -> bytes:
    """An exec record with these arguments in its area (NUL-separated, as the kernel
    copies them)."""
    decl = m.EVENT
    sizes = {s: m.options.max_args * m.options.arg_size for s in decl.sizes}
    cls = decl.ctypes_struct(sizes)
    area = b"".join(a + b"\0" for a in argv)
    fields = {mem.name for mem in decl.members}
    e = cls(hdr=EventHeader(ts_ns=5, pid=4, tid=4, ppid=1, comm=b"sh", cgroup_id=8))
    for k, v in (("args_size", len(area)), ("args_count", len(argv)), ("flags", flags),
                 ("ret", 0)):
        if k in fields:
            setattr(e, k, v)
    if "filename" in fields:
        e.filename = b"/bin/sh"
    off = decl.offsets(sizes)[decl.members[-1].name]
    return bytes(e)[:off] + area


@pytest.mark.parametrize(("argv", "flags"), [
    ([b"ls", b"-l"], 0),
    ([b"a" * 400, b"b"], 0),                         # longer than arg_size: truncated
    ([b"x"] * 40, 0),                                # more than max_args
    ([b"caf\xc3\xa9", b"\xff\xfe"], 0),              # UTF-8, and bytes that are not
    ([], 0), ([b""], 0),
])
def test_exec_argv_byte_for_byte(argv: list[bytes], flags: int) -> None:
    m = unloaded("exec")
    m._args_offset = m.EVENT.offsets({s: 1 for s in m.EVENT.sizes})[m.EVENT.members[-1].name]
    ref, fast = pair(m.EVENT, "exec", tables=m.decode_tables(), hooks=m.decode_hooks(),
                     options=m.options.model_dump())
    from agent.monitors.exec.monitor import EXEC_F_ARGS_CUT, EXEC_F_ARGS_TRUNCATED

    for f in (flags, EXEC_F_ARGS_TRUNCATED, EXEC_F_ARGS_CUT):
        same(ref, fast, exec_record(m, argv, f))


# -- records from the kernel ---------------------------------------------------------------
def capture(m: Any, raws: list[bytes]) -> None:
    """Keep every raw record the monitor's reader hands over (set before load)."""
    on_record = m._on_record

    def keep(raw: bytes) -> int:
        raws.append(bytes(raw))
        return int(on_record(raw))

    m._on_record = keep


def workload(tmp: Path) -> None:
    """Processes doing what every monitor sees: exec with argv (one not UTF-8), file
    opens (one failing), a loopback TCP connection, slow syscalls."""
    (tmp / "f").write_text("x")
    subprocess.run(["/bin/sh", "-c", f"cat {tmp}/f {tmp}/missing; sleep 0.01",
                    "arg\u00e9", "\udcff"], check=False, capture_output=True)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    for s in (a, c, srv):
        s.close()
    subprocess.run([sys.executable, "-c", "import os; os.getpid()"], check=True)


KERNEL_OPTIONS: dict[str, dict[str, Any]] = {
    "exec": {}, "file": {}, "net": {}, "syscall": {"slow_threshold_us": 0},
    "func": {"patterns": ["c:getpid"], "events": True},
}


@pytest.mark.parametrize("name", sorted(KERNEL_OPTIONS))
def test_kernel_records_byte_for_byte(kernel: None, name: str, tmp_path: Path) -> None:
    raws: list[bytes] = []
    sink = CollectingSink()
    transport = TransportSettings(decoder="compiled")
    with loaded_monitor(name, sink, transport=transport, before_load=lambda m: capture(m, raws),
                        **KERNEL_OPTIONS[name]) as m:
        workload(tmp_path)
        for _ in range(10):
            m.poll(50)
        assert raws, f"{name}: no record from the kernel"
        ref = EventDecoder(m.EVENT, name, m._clock, tables=m.decode_tables(),
                           hooks=m.decode_hooks(), options=m.options.model_dump(),
                           identity=m.ctx.identity, cgroups=m.ctx.cgroups)
        fast = m.decoder
        assert type(fast).__name__ == "Decoder"
        assert any(type(e) is not dict for e in sink.events)  # written by the C code
        for raw in raws:
            same(ref, fast, raw)
        # What the sink received is what the compiled decoder gave: same bytes again.
        assert [as_bytes(e) for e in sink.events[: len(raws)]] == [
            encode_event(ref.decode(r)) for r in raws[: len(sink.events)]]
