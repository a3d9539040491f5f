"""The compiled per-event path: an event declaration turned into the table of operations
agent/monitors/fastpath.c interprets (the extension ``agent.monitors._fastpath``, built
from that file when the project is installed: setup.py).

``compiled_decoder(...)`` gives an object with ``decode(raw)`` like EventDecoder's, that
returns a ``Record``: the event's JSON bytes (``.data``, byte for byte what
``encode_event(EventDecoder.decode(raw))`` gives) and a read-only mapping of the event.
Consumers that only need the bytes and the common keys (the stream hub's filters, the
NATS exporter's subject, the JSONL writer) never build a dict; the CSV and console
writers read the other fields, which builds the dict once, on their writer thread.

The table has one operation per JSON field, in order: the kind (fastpath.c ``K_*``), the
key as JSON text, the member's offset, size and signedness, the ``when`` condition, and
the kind's argument in a form C reads without Python (constants and enum names already
as JSON text, errno names as a 4095-entry tuple). HOOK and LOOKUP call back into Python
(the hook, the table); so does WORKLOAD on a miss of its last-id cache (the
CgroupResolver). Whatever the C code cannot write exactly as orjson would (bytes that
are not UTF-8, values of other types) it hands to the Python decoder for that record.

The GIL stays held: one record is about a microsecond of work, less than releasing and
taking the GIL back costs, and the callbacks above need it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from agent.kernel.cgroups import CgroupResolver, default_resolver
from agent.kernel.identity import ProcessIdentity, local_identity
from agent.kernel.syscalls import errno_name
from agent.model.event_decl import C_TYPES, Decode, EventDecl, EventField
from agent.model.events import HEADER, MonotonicClock
from agent.model.workload import UNKNOWN
from agent.monitors.decoder import MAX_ERRNO, EventDecoder, Hook

log = logging.getLogger(__name__)

try:
    from agent.monitors import _fastpath  # type: ignore[attr-defined]
except ImportError as e:  # not built (an install without gcc): the Python path
    _fastpath = None
    IMPORT_ERROR: str | None = str(e)
else:
    IMPORT_ERROR = None
    Mapping.register(_fastpath.Record)  # a read-only mapping of the event

# The header members a Record answers from, in fastpath.c's H_* order.
HEADER_MEMBERS = ("ts_ns", "pid", "tid", "ppid", "uid", "gid", "comm", "start_ns",
                  "parent_start_ns", "cgroup_id")
SIGNED = {"s8", "s16", "s32", "s64"}


class Decoding(Protocol):
    def decode(self, raw: bytes) -> Any: ...


def available() -> bool:
    return _fastpath is not None


def _errno_table() -> tuple[bytes, ...]:
    return tuple(orjson.dumps(errno_name(-n)) for n in range(1, MAX_ERRNO + 1))


_ERRNOS: tuple[bytes, ...] | None = None


def build_ops(decl: EventDecl, monitor: str, *, tables: Mapping[str, Mapping[Any, Any]],
              options: Mapping[str, Any]) -> tuple[list[tuple[Any, ...]], int]:
    """The operation table of ``decl`` (header fields first) and the fixed part's size."""
    global _ERRNOS
    assert _fastpath is not None
    fp = _fastpath
    own = decl.offsets({n: 0 for n in decl.sizes})
    hdr = HEADER.offsets()
    fixed = max((own[m.name] + _size(m.ctype, m.count) for m in decl.members
                 if not isinstance(m.count, str)), default=0)
    fixed = max(fixed, *(hdr[m.name] + _size(m.ctype, m.count) for m in HEADER.members))

    def where(d: EventDecl, name: str) -> tuple[int, int, int]:
        m = d.member(name)
        off = (hdr if d is HEADER else own)[name]
        return off, _size(m.ctype, m.count), int(m.ctype in SIGNED)

    ops: list[tuple[Any, ...]] = []
    entries: list[tuple[EventDecl, EventField]] = [(HEADER, f) for f in HEADER.fields]
    entries += [(decl, f) for f in decl.fields]
    for n, (d, f) in enumerate(entries):
        kind = d.kind(f)
        src = d.source(f)
        off, size, signed = where(d, src) if src is not None else (0, 0, 0)
        when_off = when_size = when_mask = 0
        if f.when is not None:
            when_off, when_size, _ = where(d, f.when[0])
            when_mask = int(f.when[1])
        key = (b"," if n else b"") + orjson.dumps(f.name) + b":"
        arg: Any = None
        off2 = size2 = 0
        name = f.arg if isinstance(f.arg, str) else f.name
        if kind is Decode.INT:
            code = fp.K_INT
        elif kind is Decode.CSTR:
            code = fp.K_CSTR
        elif kind is Decode.BYTES_HEX:
            code = fp.K_HEX
        elif kind is Decode.INET:
            code = fp.K_INET
            if f.arg is not None:
                off2, size2, _ = where(d, f.arg)
        elif kind is Decode.NET16:
            code = fp.K_NET16
        elif kind is Decode.FLAG:
            code, arg = fp.K_FLAG, int(f.arg)
        elif kind is Decode.ENUM:
            code = fp.K_ENUM
            arg = tuple((int(k), orjson.dumps(v)) for k, v in dict(f.arg).items())
        elif kind is Decode.ERRNO:
            if _ERRNOS is None:
                _ERRNOS = _errno_table()
            code, arg = fp.K_ERRNO, _ERRNOS
        elif kind is Decode.LOOKUP:
            if name not in tables:
                raise ValueError(f"{decl.struct}: field {f.name} needs the table {name!r}")
            table = tables[name]
            code, arg = fp.K_LOOKUP, table if isinstance(table, dict) else dict(table)
        elif kind is Decode.OPTION:
            if name not in options:
                raise ValueError(f"{decl.struct}: field {f.name} needs the option {name!r}")
            code, arg = fp.K_CONST, orjson.dumps(options[name])
        elif kind is Decode.HOOK:
            code, arg = fp.K_HOOK, f.name
        elif kind is Decode.MONITOR:
            code, arg = fp.K_CONST, orjson.dumps(monitor)
        elif kind is Decode.WALLTIME:
            code = fp.K_WALLTIME
        elif kind is Decode.PROCESS_ID:
            code = fp.K_PROCESS_ID
            off2, size2, _ = where(d, f.arg)
        elif kind is Decode.WORKLOAD:
            code, arg = fp.K_WORKLOAD, int(f.arg)
        else:
            raise ValueError(f"{decl.struct}: field {f.name}: unknown kind {kind}")
        ops.append((code, key, off, size, signed, when_off, when_size, when_mask, arg,
                    off2, size2))
    return ops, fixed


def _size(ctype: str, count: int | str) -> int:
    if isinstance(count, str):
        return 0
    return count if count else ctypes.sizeof(C_TYPES[ctype][0])


def compiled_decoder(reference: EventDecoder, monitor: str, clock: MonotonicClock, *,
                     tables: Mapping[str, Mapping[Any, Any]] | None = None,
                     hooks: Mapping[str, Hook] | None = None,
                     options: Mapping[str, Any] | None = None,
                     identity: ProcessIdentity | None = None,
                     cgroups: CgroupResolver | None = None) -> Decoding:
    """The compiled decoder of ``reference``'s declaration; ``reference`` (the Python
    decoder of the same declaration, monitor and clock) decodes what it hands back."""
    if _fastpath is None:
        raise RuntimeError(f"the compiled event path is not built: {IMPORT_ERROR}")
    decl = reference.decl
    ops, fixed = build_ops(decl, monitor, tables=tables or {}, options=options or {})
    fixed = max(fixed, reference.size)
    hook_call: Any = None
    if any(decl.kind(f) is Decode.HOOK for f in decl.fields):
        hook_call = _hook_caller(decl, reference, hooks or {})
    ident = identity or local_identity()
    hdr = HEADER.offsets()
    return _fastpath.Decoder(
        ops, fixed, tuple(hdr[m] for m in HEADER_MEMBERS), monitor, hook_call,
        reference.decode, (cgroups or default_resolver()).resolve, UNKNOWN, orjson.loads,
        ident.boot.encode(), clock.offset_ns, ident.ns_per_tick)


def _hook_caller(decl: EventDecl, reference: EventDecoder,
                 hooks: Mapping[str, Hook]) -> Any:
    """raw -> {field: value} of every HOOK field, each hook called once, with the
    members dict the Python decoder gives it."""
    from agent.model.event_decl import unpacker

    fixed, names = unpacker(decl)
    own = [(i, n) for i, n in enumerate(names) if not n.startswith("hdr.")]
    used = list(dict.fromkeys(f.arg for f in decl.fields if decl.kind(f) is Decode.HOOK))
    for name in used:
        if name not in hooks:
            raise ValueError(f"{decl.struct}: needs the hook {name!r}")
    fns = [hooks[name] for name in used]
    unpack = fixed.unpack_from

    def call(raw: bytes) -> dict[str, Any]:
        values = unpack(raw)
        members = {n: values[i] for i, n in own}
        if len(fns) == 1:
            return fns[0](raw, members)
        out: dict[str, Any] = {}
        for fn in fns:
            out.update(fn(raw, dict(members)))
        return out

    return call


def make_decoder(decl: EventDecl, monitor: str, clock: MonotonicClock, mode: str, *,
                 tables: Mapping[str, Mapping[Any, Any]] | None = None,
                 hooks: Mapping[str, Hook] | None = None,
                 options: Mapping[str, Any] | None = None,
                 identity: ProcessIdentity | None = None,
                 cgroups: CgroupResolver | None = None) -> Decoding:
    """The decoder a monitor uses: ``mode`` "python" (the reference), "compiled" (the
    extension; RuntimeError without it) or "auto" (compiled when built)."""
    reference = EventDecoder(decl, monitor, clock, tables=tables, hooks=hooks,
                             options=options, identity=identity, cgroups=cgroups)
    if mode == "python" or (mode == "auto" and _fastpath is None):
        return reference
    return compiled_decoder(reference, monitor, clock, tables=tables, hooks=hooks,
                            options=options, identity=identity, cgroups=cgroups)

