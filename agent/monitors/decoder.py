"""Records -> events, and events -> console lines, driven by an event declaration
(agent/model/event_decl.py).

EventDecoder turns the declaration into one Python function, generated once per monitor
instance: a single ``struct.unpack_from`` of the record's fixed part, then a dict built
in the declared key order, each value by its field's kind (no per-field dispatch at run
time). A compiled decoder can be generated from the same table the same way.
"""

from __future__ import annotations

import ipaddress
import socket
import string
from collections.abc import Callable, Mapping
from typing import Any

from agent.kernel.cgroups import CgroupResolver, default_resolver
from agent.kernel.identity import ProcessIdentity, local_identity
from agent.kernel.syscalls import errno_name
from agent.model.event_decl import Decode, EventDecl, unpacker
from agent.model.events import HEADER, Event, MonotonicClock, decode_c_string

# (raw record, the struct's own fixed members by name) -> {field: value}
Hook = Callable[[bytes, dict[str, Any]], dict[str, Any]]

MAX_ERRNO = 4095  # the kernel's MAX_ERRNO: returns in [-MAX_ERRNO, -1] are errors


def errno_or_none(ret: int) -> str | None:
    """The errno name of a failed call's return value, None for a success."""
    return errno_name(ret) if -MAX_ERRNO <= ret < 0 else None


def inet_text(raw: bytes, family: int | None = None) -> str | None:
    """An IPv4 or IPv6 address as text: by ``family`` when given, else by length."""
    if family is None:
        family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    if family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    if family == socket.AF_INET6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return None


class EventDecoder:
    """``decode(raw)`` -> the event of one record of ``decl``, for one monitor.

    ``sizes``: the declaration's named sizes (variable tails: not unpacked, only their
    offset is needed); ``tables``: LOOKUP tables by name; ``hooks``: HOOK functions by
    name; ``options``: the monitor's options (OPTION fields, read once here)."""

    def __init__(self, decl: EventDecl, monitor: str, clock: MonotonicClock, *,
                 tables: Mapping[str, Mapping[Any, Any]] | None = None,
                 hooks: Mapping[str, Hook] | None = None,
                 options: Mapping[str, Any] | None = None,
                 identity: ProcessIdentity | None = None,
                 cgroups: CgroupResolver | None = None) -> None:
        if not decl.with_header:
            raise ValueError(f"{decl.struct}: a decoder reads whole events, header first")
        self.decl = decl
        fixed, names = unpacker(decl)
        self.size = fixed.size
        index = {n: i for i, n in enumerate(names)}
        ns: dict[str, Any] = {
            "unpack": fixed.unpack_from, "SIZE": fixed.size, "iso": clock.iso,
            "cstr": decode_c_string, "errno": errno_or_none, "MONITOR": monitor,
            "inet": inet_text, "ntohs": socket.ntohs,
            "process_id": (identity or local_identity()).from_ns,
            "workload": (cgroups or default_resolver()).resolve,
        }
        own = [n for n in names if not n.startswith("hdr.")]

        def value(prefix: str, f: Any, decl_: EventDecl, n: int) -> str:
            kind = decl_.kind(f)
            src = decl_.source(f)
            v = f"v{index[prefix + src]}" if src is not None else ""
            name = f.arg if isinstance(f.arg, str) else f.name
            if kind is Decode.INT:
                return v
            if kind is Decode.CSTR:
                return f"cstr({v})"
            if kind is Decode.BYTES_HEX:
                return f"{v}.hex()"
            if kind is Decode.INET:
                family = f"v{index[prefix + f.arg]}" if f.arg is not None else "None"
                return f"inet({v}, {family})"
            if kind is Decode.NET16:
                return f"ntohs({v})"
            if kind is Decode.FLAG:
                return f"bool({v} & {int(f.arg)})"
            if kind is Decode.ENUM:
                ns[f"e{n}"] = dict(f.arg)
                return f"(e{n}[{v}] if {v} in e{n} else str({v}))"
            if kind is Decode.ERRNO:
                return f"errno({v})"
            if kind is Decode.LOOKUP:
                if tables is None or name not in tables:
                    raise ValueError(f"{decl.struct}: field {f.name} needs the table {name!r}")
                ns[f"t{n}"] = tables[name]
                return f"t{n}[{v}]"
            if kind is Decode.OPTION:
                if options is None or name not in options:
                    raise ValueError(f"{decl.struct}: field {f.name} needs the option {name!r}")
                ns[f"c{n}"] = options[name]
                return f"c{n}"
            if kind is Decode.HOOK:
                if hooks is None or f.arg not in hooks:
                    raise ValueError(f"{decl.struct}: field {f.name} needs the hook {f.arg!r}")
                hook_vars[f.arg] = f"h{len(hook_vars)}" if f.arg not in hook_vars \
                    else hook_vars[f.arg]
                ns[f"{hook_vars[f.arg]}_fn"] = hooks[f.arg]
                return f"{hook_vars[f.arg]}[{f.name!r}]"
            if kind is Decode.MONITOR:
                return "MONITOR"
            if kind is Decode.WALLTIME:
                return f"iso({v})"
            if kind is Decode.PROCESS_ID:
                return f"process_id({v}, v{index[prefix + f.arg]})"
            if kind is Decode.WORKLOAD:
                workload_of.add(v)
                return f"w{v}[{int(f.arg)}]"
            raise ValueError(f"{decl.struct}: field {f.name}: unknown kind {kind}")

        hook_vars: dict[str, str] = {}
        workload_of: set[str] = set()  # the cgroup-id variables resolved per record
        literal: list[str] = []
        statements: list[str] = []
        entries = [("hdr.", f, HEADER) for f in HEADER.fields] if decl.with_header else []
        entries += [("", f, decl) for f in decl.fields]
        for n, (prefix, f, d) in enumerate(entries):
            expr = value(prefix, f, d, n)
            if f.when is None and not statements:
                literal.append(f"{f.name!r}: {expr}")
            elif f.when is None:
                statements.append(f"    ev[{f.name!r}] = {expr}")
            else:
                statements.append(
                    f"    if v{index[f.when[0]]} & {int(f.when[1])}:\n"
                    f"        ev[{f.name!r}] = {expr}")
        members = ", ".join(f"{m!r}: v{index[m]}" for m in own)
        lines = [
            "def decode(raw):",
            "    if len(raw) < SIZE:",
            "        raw = raw.ljust(SIZE, b'\\0')",
            f"    ({''.join(f'v{i}, ' for i in range(len(names)))}) = unpack(raw)",
            *(f"    {var} = {var}_fn(raw, {{{members}}})" for var in hook_vars.values()),
            *(f"    w{v} = workload({v})" for v in sorted(workload_of)),
            f"    ev = {{{', '.join(literal)}}}",
            *statements,
            "    return ev",
        ]
        self.source = "\n".join(lines) + "\n"
        exec(compile(self.source, f"<decoder {decl.struct}>", "exec"), ns)  # noqa: S102
        self.decode: Callable[[bytes], Event] = ns["decode"]


def _render_errno(v: Any) -> str:
    name = errno_or_none(v) if isinstance(v, int) else None
    return f"{v} {name}" if name else str(v)


# Console renderings by format spec: "{ret:errno}" -> "-2 ENOENT".
RENDERINGS: dict[str, Callable[[Any], str]] = {
    "errno": _render_errno,                                       # n, and its errno name
    "us": lambda v: f"{v / 1000:.1f}",                            # ns as us, one decimal
    "words": lambda v: " ".join(v).replace("\n", "\\n"),          # a list, space-separated
    "opt_ns": lambda v: "" if v is None else f" {v} ns",          # " N ns" when present
}


class _Console(string.Formatter):
    def get_value(self, key: Any, args: Any, kwargs: Any) -> Any:
        return kwargs.get(key)

    def format_field(self, value: Any, format_spec: str) -> str:
        render = RENDERINGS.get(format_spec)
        return render(value) if render is not None else format(value, format_spec)


_CONSOLE = _Console()


def console_template(decl: EventDecl) -> str:
    """The console template after "<timestamp> <monitor> ": the declared one, else pid,
    tid, comm and name=value of every field."""
    if decl.console:
        return decl.console
    return " ".join(["pid={pid} tid={tid} comm={comm}", *(f"{k}={{{k}}}" for k in decl.keys)])


def console_line(decl: EventDecl, event: Event) -> str:
    return f"{event['timestamp']} {event['monitor']} " + _CONSOLE.format(
        console_template(decl), **event)
