"""Event declarations: what they refuse, and the models, columns and layouts derived
from them (the gcc side is in tests/monitors/test_common.py and each monitor's tests)."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from agent.model.event_decl import Csv, Decode, EventDecl, EventField, Member
from agent.model.events import (
    COMMON_FIELDS,
    ENRICHED_FIELDS,
    HEADER,
    EventHeader,
    EventModel,
)


def decl(members: tuple[Member, ...], fields: tuple[EventField, ...]) -> EventDecl:
    return EventDecl(struct="x_event", header="x.h", members=members, fields=fields)


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Member("a", "u128"), "unknown C type"),
    (lambda: Member("a", "u32", 4), "arrays only of char or u8"),
    (lambda: Member("a", "char"), "char needs a length"),
    (lambda: EventField("a", "float", "x"), "unknown JSON type"),
    (lambda: decl((Member("a", "u32"), Member("a", "u32")), ()), "member is declared twice"),
    (lambda: decl((Member("a", "u32"),), (EventField("a", "integer", "x"),) * 2),
     "field is declared twice"),
    (lambda: decl((Member("t", "char", "N"), Member("a", "u32")), ()),
     "only the last member may have a named size"),
    (lambda: decl((Member("a", "u32"),), (EventField("b", "integer", "x"),)),
     "no member .b.; give a decode kind"),
    (lambda: decl((Member("a", "u32"),), (EventField("b", "integer", "x", source="c"),)),
     "no member 'c'"),
    (lambda: decl((Member("a", "u32"),), (EventField("a", "integer", "x", when=("f", 1)),)),
     "no member 'f' for 'when'"),
    (lambda: decl((Member("a", "u32"),), (EventField("b", "string", "x", Decode.ENUM,
                                                     source="a"),)), "enum needs an arg"),
])
def test_declarations_refused(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_the_common_header() -> None:
    assert COMMON_FIELDS == ("monitor", "timestamp", "ts_ns", "pid", "tid", "ppid", "uid",
                             "gid", "comm", "process_id", "parent_process_id", "cgroup_id",
                             "cgroup", "container_id", "pod_uid", "unit")
    # The fields a stage adds (processes.event_ancestors) follow, optional.
    assert tuple(EventModel.model_fields) == (*COMMON_FIELDS, "ancestors")
    assert tuple(ENRICHED_FIELDS) == ("ancestors",)
    assert ctypes.sizeof(EventHeader) == 72
    assert HEADER.unpack_format() == (
        "=QIIIIII16sQQQ", ("ts_ns", "pid", "tid", "ppid", "uid", "gid", "_pad", "comm",
                           "start_ns", "parent_start_ns", "cgroup_id"))


def test_model_columns_and_layout() -> None:
    d = decl(
        (Member("flags", "u32"), Member("ret", "s32"), Member("v", "u16"),
         Member("name", "char", 5), Member("tail", "char", "N")),
        (EventField("ret", "integer", "r"),
         EventField("err", "string", "e", Decode.ERRNO, source="ret", nullable=True),
         EventField("name", "string", "n", csv=Csv.NONE),
         EventField("v", "integer", "v", when=("flags", 1))))
    model = d.model("XEvent", base=EventModel)
    schema = model.model_json_schema()
    assert list(schema["properties"]) == [*COMMON_FIELDS, "ancestors", "ret", "err", "name", "v"]
    assert schema["required"] == [*COMMON_FIELDS, "ret", "err", "name"]
    assert schema["properties"]["err"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert schema["properties"]["v"]["default"] is None
    assert schema["additionalProperties"] is False
    assert d.csv_columns == ("ret", "err", "v")
    assert d.sizes == ("N",)
    # 72 header bytes, 4 + 4 + 2 + 5, the tail right after (char: no alignment).
    assert d.offsets({"N": 3}) == {"flags": 72, "ret": 76, "v": 80, "name": 82, "tail": 87}
    assert ctypes.sizeof(d.ctypes_struct({"N": 3})) == 96  # padded to u64 alignment
    fmt, names = d.unpack_format()
    assert fmt == "=QIIIIII16sQQQIiH5s" and names[-4:] == ("flags", "ret", "v", "name")


@pytest.mark.parametrize(("field", "message"), [
    (EventField("raw", "string", "u8[] without a kind"), "u8 raw\\[4\\] is bytes"),
    (EventField("raw", "string", "x", Decode.INET, arg="fam"), "no member 'fam' for the family"),
])
def test_byte_members_need_a_kind(field: EventField, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decl((Member("raw", "u8", 4),), (field,))
