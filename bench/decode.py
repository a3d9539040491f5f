"""What decoding one record costs on the poller thread: ``parse_event`` of the exec,
syscall and func monitors on records built here (no kernel), best of several rounds.
Where the tree has the compiled per-event path (agent/monitors/compiled.py), also, side
by side: the Python decoder + encode_event (record -> JSON bytes, what the pipeline did
per event), the compiled decoder (record -> Record carrying the same bytes), and the
compiled decoder plus the four keys the stream hub reads per event.

    .venv/bin/python bench/decode.py                     # this tree
    .venv/bin/python bench/decode.py --src /tmp/main     # another tree (git archive)

Only names both trees have are used (the ctypes mirrors and parse_event), so a tree
from before the event declarations runs it too.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def header() -> Any:
    from agent.model.events import EventHeader

    return EventHeader(ts_ns=time.monotonic_ns(), pid=4242, tid=4243, ppid=1, uid=1000,
                       gid=1000, comm=b"bench")


def exec_record() -> tuple[Any, bytes]:
    from agent.model.targets import TargetSet
    from agent.monitors.contract import MonitorContext
    from agent.monitors.exec.monitor import ExecMonitor, ExecOptions, exec_event_struct
    from tests.support.monitors import NullSink

    m = ExecMonitor(ExecOptions(), MonitorContext(targets=TargetSet(), sink=NullSink()))
    cls = exec_event_struct(20, 128)
    args = b"/usr/bin/python3\0-c\0print(1)\0"
    e = cls(hdr=header(), ret=0, args_count=3, args_size=len(args), flags=0,
            filename=b"/usr/bin/python3")
    ctypes.memmove(ctypes.addressof(e) + cls.args.offset, args, len(args))  # type: ignore[attr-defined]
    return m, bytes(e)[: cls.args.offset + len(args)]  # type: ignore[attr-defined]


def syscall_record() -> tuple[Any, bytes]:
    from agent.model.targets import TargetSet
    from agent.monitors.contract import MonitorContext
    from agent.monitors.syscall.monitor import SyscallEvent, SyscallMonitor, SyscallOptions
    from tests.support.monitors import NullSink

    m = SyscallMonitor(SyscallOptions(), MonitorContext(targets=TargetSet(), sink=NullSink()))
    return m, bytes(SyscallEvent(hdr=header(), latency_ns=52_000, ret=-2, nr=257))


def func_record() -> tuple[Any, bytes]:
    from agent.kernel.symbols import Probe
    from agent.model.targets import TargetSet
    from agent.monitors.contract import MonitorContext
    from agent.monitors.func.monitor import (
        FUNC_F_LATENCY,
        FuncEvent,
        FuncMonitor,
        FuncOptions,
    )
    from tests.support.monitors import NullSink

    m = FuncMonitor(FuncOptions(patterns=["c:getpid"]),
                    MonitorContext(targets=TargetSet(), sink=NullSink()))
    m.probes = [Probe("uprobe", "/usr/lib/x86_64-linux-gnu/libc.so.6", "getpid", 0x1000)]
    return m, bytes(FuncEvent(hdr=header(), latency_ns=1234, probe_id=0, flags=FUNC_F_LATENCY))


def best_ns(parse: Callable[[bytes], Any], raw: bytes, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(n):
            parse(raw)
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100_000, help="records per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--src", type=Path, default=REPO,
                        help="the tree to import agent/ and tests/ from")
    args = parser.parse_args()
    sys.path.insert(0, str(args.src))
    import agent

    print(f"agent from {Path(agent.__file__ or '').parent}")
    for name, build in (("exec", exec_record), ("syscall", syscall_record),
                        ("func", func_record)):
        monitor, raw = build()
        monitor.parse_event(raw)  # warm: tables, decoders
        ns = best_ns(monitor.parse_event, raw, args.n, args.rounds)
        print(f"{name:8s} parse_event {ns / 1000:6.2f} us/record ({len(raw)} bytes)")
        try:
            from agent.monitors import compiled
        except ImportError:
            continue
        compare(name, monitor, raw, compiled, args.n, args.rounds)


def compare(name: str, m: Any, raw: bytes, compiled: Any, n: int, rounds: int) -> None:
    from agent.model.events import encode_event

    def make(mode: str) -> Any:
        return compiled.make_decoder(m.EVENT, m.name, m._clock, mode,
                                     tables=m.decode_tables(), hooks=m.decode_hooks(),
                                     options=m.options.model_dump(), identity=m.ctx.identity,
                                     cgroups=m.ctx.cgroups)

    py = make("python").decode
    fast = make("compiled").decode
    fast(raw)  # warm: a LOOKUP table filled on first use (syscall names) goes to Python once
    assert encode_event(py(raw)) == fast(raw).data

    def python_bytes(r: bytes) -> bytes:
        return encode_event(py(r))

    def compiled_keys(r: bytes) -> Any:
        e = fast(r)
        get = e.get
        return e.data, get("monitor"), get("pid"), get("uid"), get("comm")

    def python_keys(r: bytes) -> Any:
        e = py(r)
        get = e.get
        return encode_event(e), get("monitor"), get("pid"), get("uid"), get("comm")

    a = best_ns(python_bytes, raw, n, rounds)
    b = best_ns(fast, raw, n, rounds)
    c = best_ns(python_keys, raw, n, rounds)
    d = best_ns(compiled_keys, raw, n, rounds)
    print(f"{name:8s} record -> JSON bytes: python {a / 1000:5.2f} us, compiled "
          f"{b / 1000:5.2f} us ({a / b:.1f}x); with the hub's 4 keys: python "
          f"{c / 1000:5.2f} us, compiled {d / 1000:5.2f} us ({c / d:.1f}x)")


if __name__ == "__main__":
    main()
