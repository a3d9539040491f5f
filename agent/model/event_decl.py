"""An event declared once: a table of its C members and of its JSON fields, from which
everything else is derived.

A monitor's event is ``struct <x>_event { struct event_hdr hdr; ...members }`` in its C
header. Its declaration lists

* the **members** after the header, in C order (name, C type, array length): the ctypes
  layout (``EventDecl.ctypes_struct``), the offsets and the ``struct`` unpack format
  derive from them, and tests/support/layout.py checks them against gcc;
* the **fields** of the event, in the order they appear in JSON and CSV after the common
  ones (name, JSON type, description, how each is decoded, its CSV rendering): the
  pydantic model (OpenAPI component ``<Name>Event``), ``csv_columns`` and ``csv_row``
  derive from them, and agent/monitors/decoder.py decodes records with them;
* a console template, rendered by agent/monitors/decoder.py.

The common header (``struct event_hdr``) is declared the same way in agent/model/events.py.

Everything here is plain data (strings, ints, dicts of constants): a decoder written in
another language can be generated from the same table. How a field gets its value is one
of a few named kinds (``Decode``), never a function per field; the one escape is a
``HOOK`` the monitor implements, for what a table cannot say (exec's argument area).

Example (the syscall monitor's slow-call event)::

    SYSCALL_EVENT = EventDecl(
        struct="syscall_event", header="syscall.h",
        doc="A call slower than slow_threshold_us (comm: at sys_exit).",
        members=(Member("latency_ns", "u64"), Member("ret", "s64"),
                 Member("nr", "u32"), Member("_pad", "u32")),
        fields=(
            EventField("syscall", "string", "the native name of nr", Decode.LOOKUP, source="nr"),
            EventField("nr", "integer", "the syscall number"),
            EventField("latency_ns", "integer", "from sys_enter to sys_exit"),
            EventField("ret", "integer", "the raw return value: -errno on failure"),
        ),
        console="pid={pid} comm={comm} {syscall} = {ret:errno} {latency_ns:us}us",
    )

A field named like a member takes its value (``INT``, or ``CSTR`` for a char array) unless
it says otherwise; ``source`` names another member.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, create_model
from pydantic import Field as ModelField

# C type -> (ctypes type, struct format character). Arrays only of bytes (char, u8).
C_TYPES: dict[str, tuple[Any, str]] = {
    "u8": (ctypes.c_uint8, "B"), "s8": (ctypes.c_int8, "b"),
    "u16": (ctypes.c_uint16, "H"), "s16": (ctypes.c_int16, "h"),
    "u32": (ctypes.c_uint32, "I"), "s32": (ctypes.c_int32, "i"),
    "u64": (ctypes.c_uint64, "Q"), "s64": (ctypes.c_int64, "q"),
    "char": (ctypes.c_char, "c"),
}
BYTE_TYPES = ("char", "u8")

JSON_TYPES: dict[str, Any] = {
    "integer": int, "string": str, "boolean": bool,
    "string[]": list[str], "integer[]": list[int],
}


class Decode(StrEnum):
    """How a field gets its value from the record (``arg`` is the kind's parameter)."""

    INT = "int"            # the member's integer value
    CSTR = "cstr"          # char[]: bytes up to the first NUL, UTF-8, undecodable bytes
                           # as \\udcXX (surrogateescape: encode() gives them back)
    BYTES_HEX = "hex"      # char[]/u8[]: the bytes as lower-case hex
    INET = "inet"          # u8[4] or u8[16]: an IPv4 or IPv6 address as text; with arg,
                           # the member holding the address family (AF_INET 2: the first
                           # 4 bytes, AF_INET6 10: 16 bytes, anything else: null)
    NET16 = "net16"        # u16 in network byte order (a port) as a number
    FLAG = "flag"          # bool(member & arg)
    ENUM = "enum"          # arg: {value: name}; a value not in it is written as its number
    ERRNO = "errno"        # a return value: its errno name (ENOENT) when in [-4095, -1],
                           # else null
    LOOKUP = "lookup"      # table[member], a table the monitor supplies when it loads
                           # (decode_tables(); arg: its name, default the field's)
    OPTION = "option"      # the monitor's option named arg (default: the field's name)
    HOOK = "hook"          # the monitor's decode_hooks()[arg] (raw record, members) ->
                           # {field: value}, called once per record for all its fields
    # The common header only:
    MONITOR = "monitor"    # the monitor's name
    WALLTIME = "walltime"  # CLOCK_MONOTONIC ns -> ISO 8601 UTC, ns precision
    PROCESS_ID = "process_id"  # (pid member, arg: its start-time member) -> process id
                               # (agent/kernel/identity.py); null for pid 0
    WORKLOAD = "workload"  # a cgroup id -> field arg of its Workload (path, container
                           # id, pod uid, unit: agent/model/workload.py), resolved once
                           # per record


class Csv(StrEnum):
    """How a field is written in its CSV column."""

    VALUE = "value"  # as is (the csv module writes str())
    JSON = "json"    # as JSON text: lists keep their boundaries, commas and newlines
    NONE = "none"    # no column


@dataclass(frozen=True)
class Member:
    """A C member of the event struct. ``count``: array length (char/u8 only), a number
    or the name of a size given at layout time (sizes that come from options, like
    exec's argument area); a named size makes the member a variable tail: it is not
    unpacked, a HOOK reads it from the raw record at its offset."""

    name: str
    ctype: str
    count: int | str = 0

    def __post_init__(self) -> None:
        if self.ctype not in C_TYPES:
            raise ValueError(f"member {self.name}: unknown C type {self.ctype!r}")
        if self.count and self.ctype not in BYTE_TYPES:
            raise ValueError(f"member {self.name}: arrays only of char or u8")
        if self.ctype == "char" and not self.count:
            raise ValueError(f"member {self.name}: char needs a length")

    @property
    def c_decl(self) -> str:
        return f"{self.ctype} {self.name}" + (f"[{self.count}]" if self.count else "")


@dataclass(frozen=True)
class EventField:
    """A field of the decoded event (JSON key, OpenAPI property, CSV column).

    ``when=(member, mask)``: the field is present only when ``member & mask`` (optional
    in the schema, null when absent); ``nullable``: always present, may be null."""

    name: str
    json: str
    description: str
    decode: Decode | None = None  # None: INT, or CSTR for a char member of that name
    source: str | None = None     # the member decoded; default: the member of that name
    arg: Any = None
    csv: Csv = Csv.VALUE
    when: tuple[str, int] | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.json not in JSON_TYPES:
            raise ValueError(f"field {self.name}: unknown JSON type {self.json!r}")


@dataclass(frozen=True)
class EventDecl:
    """One event: the C struct ``struct`` of the monitor's ``header`` file (after
    ``struct event_hdr hdr``, or the header itself for the common one), its fields,
    the model's description ``doc`` and a console template."""

    struct: str
    header: str
    members: tuple[Member, ...]
    fields: tuple[EventField, ...]
    doc: str = ""
    # str.format template of the console line after "<timestamp> <monitor> "; a spec
    # names a rendering of agent/monitors/decoder.py (errno, us, words, opt_ns...).
    # "": pid, tid, comm, then name=value of every field.
    console: str = ""
    with_header: bool = True  # False for the common header itself
    sizes: tuple[str, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.struct}: a member is declared twice")
        keys = [f.name for f in self.fields]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{self.struct}: a field is declared twice")
        tails = [m for m in self.members if isinstance(m.count, str)]
        if tails and self.members[-1] is not tails[0] or len(tails) > 1:
            raise ValueError(f"{self.struct}: only the last member may have a named size")
        for f in self.fields:
            kind = self.kind(f)
            src = self.source(f)
            if src is not None and src not in names:
                raise ValueError(f"field {f.name}: no member {src!r} in {self.struct}")
            if f.when is not None and f.when[0] not in names:
                raise ValueError(f"field {f.name}: no member {f.when[0]!r} for 'when'")
            if kind is Decode.INET and f.arg is not None and f.arg not in names:
                raise ValueError(f"field {f.name}: no member {f.arg!r} for the family")
            if kind in (Decode.ENUM, Decode.FLAG, Decode.HOOK) and f.arg is None:
                raise ValueError(f"field {f.name}: {kind.value} needs an arg")
        object.__setattr__(self, "sizes", tuple(str(m.count) for m in tails))

    # -- fields --------------------------------------------------------------------
    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def kind(self, f: EventField) -> Decode:
        if f.decode is not None:
            return f.decode
        name = f.source or f.name
        m = next((m for m in self.members if m.name == name), None)
        if m is None:
            raise ValueError(f"field {f.name}: no member {name!r}; give a decode kind")
        if m.count and m.ctype != "char":
            raise ValueError(f"field {f.name}: {m.c_decl} is bytes; give a decode kind")
        return Decode.CSTR if m.ctype == "char" else Decode.INT

    def source(self, f: EventField) -> str | None:
        """The member a field is decoded from (None for kinds that read none)."""
        if f.source is not None:
            return f.source
        if self.kind(f) in (Decode.OPTION, Decode.HOOK, Decode.MONITOR):
            return None
        return f.name

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def csv_columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.csv != Csv.NONE)

    # -- layout --------------------------------------------------------------------
    def ctypes_struct(self, sizes: Mapping[str, int] | None = None,
                      name: str = "") -> type[ctypes.Structure]:
        """The ctypes mirror of the C struct (``hdr`` first unless this is the header),
        with the named sizes given."""
        return type(name or self.struct, (ctypes.Structure,),
                    {"_fields_": self.ctypes_fields(sizes)})

    def ctypes_fields(self, sizes: Mapping[str, int] | None = None) -> list[tuple[str, Any]]:
        """``_fields_`` of the ctypes mirror."""
        fields: list[tuple[str, Any]] = []
        if self.with_header:
            from agent.model.events import EventHeader

            fields.append(("hdr", EventHeader))
        for m in self.members:
            ctype = C_TYPES[m.ctype][0]
            count = (sizes or {})[m.count] if isinstance(m.count, str) else m.count
            fields.append((m.name, ctype * count if m.count else ctype))
        return fields

    def offsets(self, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
        """Each member's offset in the record (the header's members too, for the
        header's own declaration)."""
        cls = self.ctypes_struct({n: 1 for n in self.sizes} | dict(sizes or {}))
        return {m.name: getattr(cls, m.name).offset for m in self.members}

    def unpack_format(self) -> tuple[str, tuple[str, ...]]:
        """A ``struct`` format of the fixed part of the record (the header, when there
        is one, then every member before a variable tail) with the padding the C
        compiler puts in, and the names of the values it yields (header members named
        ``hdr.<name>``)."""
        layout: list[tuple[str, int, Member]] = []
        if self.with_header:
            from agent.model.events import HEADER

            layout += [(f"hdr.{m.name}", off, m) for m, off in
                       zip(HEADER.members, HEADER.offsets().values(), strict=True)]
        own = self.offsets()
        layout += [(m.name, own[m.name], m) for m in self.members if not isinstance(m.count, str)]
        fmt, pos, names = "=", 0, []
        for name, off, m in layout:
            fmt += "x" * (off - pos)
            if m.count:
                fmt += f"{m.count}s"
                pos = off + int(m.count)
            else:
                fmt += C_TYPES[m.ctype][1]
                pos = off + ctypes.sizeof(C_TYPES[m.ctype][0])
            names.append(name)
        return fmt, tuple(names)

    # -- derived models ------------------------------------------------------------
    def model(self, name: str, base: type[BaseModel] | None = None) -> type[BaseModel]:
        """The pydantic model of the event (its fields after ``base``'s), described by
        ``doc``: the OpenAPI component."""
        definitions: dict[str, Any] = {}
        for f in self.fields:
            typ = JSON_TYPES[f.json]
            if f.when is not None:
                definitions[f.name] = (typ | None, ModelField(None, description=f.description))
            elif f.nullable:
                definitions[f.name] = (typ | None, ModelField(description=f.description))
            else:
                definitions[f.name] = (typ, ModelField(description=f.description))
        if base is None:
            return create_model(name, __config__=ConfigDict(extra="forbid"),
                                __doc__=self.doc or None, **definitions)
        return create_model(name, __base__=base, __doc__=self.doc or None, **definitions)

    def csv_row(self, event: Mapping[str, Any], common: tuple[str, ...]) -> list[Any]:
        """The CSV row of an event: the ``common`` columns, then this event's."""
        row = [event.get(k) for k in common]
        for f in self.fields:
            if f.csv == Csv.VALUE:
                row.append(event.get(f.name))
            elif f.csv == Csv.JSON:
                row.append(json_text(event.get(f.name)))
        return row


def json_text(value: Any) -> str:
    """JSON text of a value; strings with surrogate-escaped bytes as \\udcXX escapes
    (orjson refuses them; the stdlib writes them)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False)


def unpacker(decl: EventDecl) -> tuple[struct.Struct, tuple[str, ...]]:
    fmt, names = decl.unpack_format()
    return struct.Struct(fmt), names
