"""CPU time per event of the poller's path after parsing: MonitorSink.publish (count,
latency sample, encode once) offering to the hub and a JSONL writer, as `serve` with the
default JSONL output runs it. Measured as the poller thread's own CPU time
(time.thread_time_ns), best of --rounds, so other processes on a shared machine disturb
it less than wall time would; the writer thread drains meanwhile, as in the agent.

    .venv/bin/python bench/pipeline.py [--events 200000] [--rounds 5]

Then the whole poller path from a syscall record (decode + publish), side by side for
the Python decoder (a dict, encoded in publish) and the compiled one (a Record carrying
its bytes: agent/monitors/compiled.py), in the same run; and the hub's ring store alone
(EventHub.offer of a compiled Record), the Python reference against the compiled store
(agent/stream/ring.py); and the reading side, CPU per event on the event loop for one
subscriber (monitor filter, as bench/stream.py's clients): an SSE chunk, a WebSocket
batch=true array built per event (read_events + ws_array: the path before issue 19) and
from the SSE frames (read_sse + ws_array_of: compiled, and the Python reference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.core.pipeline import MonitorSink  # noqa: E402
from agent.model.events import Event  # noqa: E402
from agent.output.writer import OutputWriter  # noqa: E402
from agent.stream import ring  # noqa: E402
from agent.stream.hub import EventHub  # noqa: E402

# A syscall-monitor event as bench/stream.py's flood produces them.
EVENT: Event = {
    "monitor": "syscall", "timestamp": "2026-12-03T13:36:59.336018198Z", "ts_ns": 0,
    "pid": 2690, "tid": 2690, "ppid": 2574, "uid": 0, "gid": 0, "comm": "getppid_loop",
    "nr": 110, "name": "getppid", "ret": 2574, "latency_ns": 312,
}


class JsonlOnly:
    """What OutputWriter asks of a monitor, for a JSONL-only writer."""

    CSV_FIELDS = ()

    def console_line(self, e: Event) -> str:
        return ""

    def csv_row(self, e: Event) -> list[Any]:
        return []


def one_round(directory: Path, events: int) -> float:
    hub = EventHub(store="python")
    writer = OutputWriter("syscall", ["jsonl"], directory, JsonlOnly(), queue_size=1 << 20)
    sink = MonitorSink(consumers=[hub, writer])
    sink.sample_mask = 15  # under load: one latency sample in 16 events
    publish = sink.publish
    t0 = time.thread_time_ns()
    for _ in range(events):
        publish(EVENT)
    cpu = (time.thread_time_ns() - t0) / events
    writer.close()
    return cpu


def syscall_decoders() -> tuple[bytes, dict[str, Any]]:
    from agent.model.events import EventHeader
    from agent.model.targets import TargetSet
    from agent.monitors import compiled
    from agent.monitors.contract import MonitorContext
    from agent.monitors.syscall.monitor import SyscallEvent, SyscallMonitor, SyscallOptions
    from tests.support.monitors import NullSink

    m = SyscallMonitor(SyscallOptions(), MonitorContext(targets=TargetSet(), sink=NullSink()))
    raw = bytes(SyscallEvent(hdr=EventHeader(ts_ns=time.monotonic_ns(), pid=2690, tid=2690,
                                             ppid=2574, comm=b"getppid_loop"),
                             latency_ns=312, ret=2574, nr=110))
    out = {}
    for mode in ("python", "compiled"):
        d = compiled.make_decoder(m.EVENT, "syscall", m._clock, mode, tables=m.decode_tables(),
                                  options=m.options.model_dump())
        d.decode(raw)  # warm the name table
        out[mode] = d.decode
    return raw, out


def record_round(directory: Path, events: int, decode: Any, raw: bytes,
                 store: str = "python") -> float:
    hub = EventHub(store=store)
    writer = OutputWriter("syscall", ["jsonl"], directory, JsonlOnly(), queue_size=1 << 20)
    sink = MonitorSink(consumers=[hub, writer])
    sink.sample_mask = 15
    publish = sink.publish
    t0 = time.thread_time_ns()
    for _ in range(events):
        publish(decode(raw))
    cpu = (time.thread_time_ns() - t0) / events
    writer.close()
    return cpu


def store_round(events: int, store: str, record: Any) -> float:
    """EventHub.offer alone (the ring store), thread CPU per event."""
    hub = EventHub(store=store)
    offer, data = hub.offer, record.data
    t0 = time.thread_time_ns()
    for _ in range(events):
        offer(record, data)
    return (time.thread_time_ns() - t0) / events


def read_round(record: Any, how: str) -> float:
    """One subscriber reading a full ring; thread CPU per event read."""
    from agent.stream.hub import Filters
    from agent.stream.wire import py_ws_array_of, sse_chunk, ws_array, ws_array_of

    hub = EventHub(capacity=1 << 17)
    sub = hub.subscribe("ws", Filters(monitors=frozenset({"syscall"})), last_event_id=0)
    for _ in range(1 << 17):
        hub.offer(record, record.data)
    n = 0
    t0 = time.thread_time_ns()
    while True:
        if how == "sse":
            b = sub.read_sse(8192)
            body = sse_chunk(b)
        elif how == "ws per event":
            b = sub.read(512)
            body = ws_array(b)
        else:
            b = sub.read_sse(512)
            body = ws_array_of(b) if how == "ws from frames" else py_ws_array_of(b)
        if not b.count:
            break
        n += b.count
        assert body
    return (time.thread_time_ns() - t0) / n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        best = min(one_round(Path(tmp), args.events) for _ in range(args.rounds))
    print(f"MonitorSink.publish -> hub (Python store) + JSONL writer: {best:.0f} ns of "
          f"poller CPU per event (best of {args.rounds} rounds of {args.events:,})")
    raw, decoders = syscall_decoders()
    with tempfile.TemporaryDirectory() as tmp:
        best_of = {mode: min(record_round(Path(tmp), args.events, d, raw)
                             for _ in range(args.rounds)) for mode, d in decoders.items()}
        if ring.compiled_available():
            best_of["all compiled"] = min(
                record_round(Path(tmp), args.events, decoders["compiled"], raw, "compiled")
                for _ in range(args.rounds))
    py, fast = best_of["python"], best_of["compiled"]
    print(f"syscall record -> decode + publish -> hub + JSONL writer: python decoder "
          f"{py:.0f} ns, compiled {fast:.0f} ns of poller CPU per event ({py / fast:.2f}x)"
          " (both with the Python ring store)")
    if "all compiled" in best_of:
        both = best_of["all compiled"]
        print(f"  compiled decoder + compiled ring store: {both:.0f} ns ({py / both:.2f}x the "
              f"python path, {fast / both:.2f}x compiled decoder + Python store)")
        record = decoders["compiled"](raw)
        stores = {s: min(store_round(args.events, s, record) for _ in range(args.rounds))
                  for s in ("python", "compiled")}
        print(f"EventHub.offer alone (ring store): python {stores['python']:.0f} ns, compiled "
              f"{stores['compiled']:.0f} ns per event "
              f"({stores['python'] / stores['compiled']:.2f}x)")
        ways = ("sse", "ws per event", "ws from frames", "ws from frames (python)")
        reads = {w: min(read_round(record, w) for _ in range(args.rounds)) for w in ways}
        print("reading side, event loop CPU per event (one subscriber, monitor filter): "
              + ", ".join(f"{w} {ns:.0f} ns" for w, ns in reads.items()))
    else:
        print(f"compiled ring store not built: {ring.IMPORT_ERROR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
