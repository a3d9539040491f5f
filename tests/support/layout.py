"""C <-> Python agreement, checked one way for every header: gcc compiles the header and
prints what it makes of it, and the ctypes mirror or Python constant must say the same.

    assert_layout("agent/monitors/func/func.h", "func_event", FuncEvent)
    assert_event_layout(ExecMonitor.EVENT, ExecMonitor.source_dir(), defines, sizes)
    assert_constants(BPF_DIR / "types.h", {"TF_PIDS": TF_PIDS, ...})

Headers are compiled as BCC sees them: agent/bpf/ and the header's own folder on the
include path, the BPF integer types defined, ``defines`` as -D constants.
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

from agent.model.event_decl import EventDecl
from agent.model.events import HEADER
from agent.monitors.bcc import BPF_DIR

REPO = BPF_DIR.parents[1]

PRELUDE = """\
#include <stdio.h>
#include <stddef.h>
typedef unsigned long long u64;
typedef long long s64;
typedef unsigned int u32;
typedef int s32;
typedef unsigned short u16;
typedef short s16;
typedef unsigned char u8;
typedef signed char s8;
"""


def _header_path(header: str | Path) -> Path:
    path = Path(header)
    return path if path.is_absolute() else REPO / path


def c_values(header: str | Path, expressions: Mapping[str, str],
             defines: Mapping[str, int | str] | None = None) -> dict[str, int]:
    """Compile ``header`` with gcc and evaluate integer C expressions (sizeof, offsetof,
    macros) in it; returns their values under the given names."""
    path = _header_path(header)
    body = "\n".join(
        f'    printf("%s %lld\\n", "{name}", (long long)({expr}));'
        for name, expr in expressions.items()
    )
    source = f'{PRELUDE}#include "{path.name}"\nint main(void)\n{{\n{body}\n    return 0;\n}}\n'
    flags = [f"-D{k}={v}" for k, v in (defines or {}).items()]
    with tempfile.TemporaryDirectory(prefix="layout-") as d:
        src, binary = Path(d) / "layout.c", Path(d) / "layout"
        src.write_text(source)
        subprocess.run(
            ["gcc", "-Wall", "-Werror", f"-I{path.parent}", f"-I{BPF_DIR}", *flags,
             "-o", str(binary), str(src)],
            check=True, capture_output=True, text=True,
        )
        out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def ctypes_layout(cls: type[ctypes.Structure]) -> dict[str, int]:
    """size, and offset and size of every field, of a ctypes structure."""
    out = {"sizeof": ctypes.sizeof(cls)}
    for name, *_ in cls._fields_:  # type: ignore[attr-defined]
        descriptor = getattr(cls, name)
        out[f"{name}.offset"] = descriptor.offset
        out[f"{name}.size"] = descriptor.size
    return out


def assert_layout(header: str | Path, struct_name: str, cls: type[ctypes.Structure],
                  defines: Mapping[str, int | str] | None = None) -> None:
    """``struct struct_name`` of ``header`` and the ctypes mirror ``cls`` have the same
    size and the same fields (every C member named in the mirror, at the same offset
    with the same size), and the size is a multiple of 8 (BCC's per-CPU maps and our
    ring records assume it)."""
    expected = ctypes_layout(cls)
    s = f"struct {struct_name}"
    expressions = {"sizeof": f"sizeof({s})"}
    for name, *_ in cls._fields_:  # type: ignore[attr-defined]
        expressions[f"{name}.offset"] = f"offsetof({s}, {name})"
        expressions[f"{name}.size"] = f"sizeof((({s} *)0)->{name})"
    got = c_values(header, expressions, defines)
    assert expected == got, f"{struct_name}: ctypes {expected} != C {got}"
    assert got["sizeof"] % 8 == 0, f"{struct_name}: {got['sizeof']} bytes, not a multiple of 8"


def struct_sizes(header: str | Path, names: list[str],
                 defines: Mapping[str, int | str] | None = None) -> dict[str, int]:
    """sizeof of structs without a ctypes mirror (BCC builds their keys and leaves)."""
    return c_values(header, {name: f"sizeof(struct {name})" for name in names}, defines)


def assert_constants(header: str | Path, constants: Mapping[str, int],
                     defines: Mapping[str, int | str] | None = None) -> None:
    """Each macro of ``header`` has the Python value given."""
    got = c_values(header, {name: name for name in constants}, defines)
    assert got == dict(constants)


def indexed(names: tuple[str, ...] | list[str], macro: str = "{}") -> dict[str, int]:
    """{macro name: index} for a Python list that mirrors C index constants, e.g.
    indexed(KERNEL_COUNTERS, "CNT_{}") == {"CNT_SEEN": 0, ...}."""
    return {macro.format(name.upper()): i for i, name in enumerate(names)}


def assert_event_layout(decl: EventDecl, directory: str | Path,
                        defines: Mapping[str, int | str] | None = None,
                        sizes: Mapping[str, int] | None = None) -> None:
    """An event declaration (agent/model/event_decl.py) against its C header in
    ``directory`` (a monitor's folder: ``Monitor.source_dir()``): the ctypes mirror
    derived from it matches gcc's struct, and the unpack format the decoder uses puts
    every member at the same offset."""
    cls = decl.ctypes_struct(sizes)
    assert_layout(Path(directory) / decl.header, decl.struct, cls, defines)
    fmt, names = decl.unpack_format()
    offsets = {**{f"hdr.{k}": v for k, v in HEADER.offsets().items()}, **decl.offsets(sizes)}
    if not decl.with_header:
        offsets = decl.offsets()
    pos = 0
    for name, code in zip(names, _format_items(fmt), strict=True):
        pos += code[0]
        assert pos == offsets[name], f"{decl.struct}.{name}: unpacked at {pos}, C {offsets[name]}"
        pos += code[1]


def _format_items(fmt: str) -> list[tuple[int, int]]:
    """(padding before, size) of each value of a struct format of ours ("=", "x", "Ns",
    single integer codes)."""
    import re
    import struct

    out, pad = [], 0
    for count, code in re.findall(r"(\d*)([xsBbHhIiQqc])", fmt.lstrip("=")):
        if code == "x":
            pad += 1
            continue
        out.append((pad, int(count) if code == "s" else struct.calcsize("=" + code)))
        pad = 0
    return out
