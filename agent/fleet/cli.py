"""``ebpf-agentctl``: drive many ebpf-agent hosts (status, start/stop, targets, stats,
merged events, desired state). Exit code 0 only when every selected host succeeded;
1 when some failed (one line per failed host on stderr); 2 for usage errors."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from agent.fleet import kubernetes, ops, workload
from agent.fleet.client import DEFAULT_PARALLEL, DEFAULT_TIMEOUT_S, Fleet, HostResult, tls_verify
from agent.fleet.events import MergedEvents, event_line, filters_of, nats_events
from agent.fleet.inventory import INVENTORY_ENV, InventoryError, resolve_hosts
from agent.fleet.render import table

PROG = "ebpf-agentctl"
EXIT_OK, EXIT_HOSTS_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    # Global options work before and after the command (SUPPRESS: an absent one after it
    # does not overwrite one given before).
    def add_globals(p: argparse.ArgumentParser, suppress: bool) -> None:
        d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
        p.add_argument("--inventory", "-i", type=Path, default=d(None),
                       help=f"YAML inventory (default: ${INVENTORY_ENV})")
        p.add_argument("--host", action="append", default=d([]), metavar="NAME=URL",
                       help="a host (repeatable), in addition to the inventory")
        p.add_argument("--select", "-l", action="append", default=d([]), metavar="KEY=VALUE",
                       help="only hosts whose label KEY (or name) is VALUE (repeatable: AND)")
        p.add_argument("--token", default=d(os.environ.get("EBPF_AGENTCTL_TOKEN")),
                       help="token for hosts the inventory gives none (EBPF_AGENTCTL_TOKEN)")
        p.add_argument("--output", "-o", choices=["table", "json"], default=d("table"))
        p.add_argument("--parallel", type=int, default=d(DEFAULT_PARALLEL),
                       help=f"hosts contacted at once (default {DEFAULT_PARALLEL})")
        p.add_argument("--timeout", type=float, default=d(DEFAULT_TIMEOUT_S),
                       help=f"seconds per host (default {DEFAULT_TIMEOUT_S:g})")
        p.add_argument("--insecure", action="store_true", default=d(False),
                       help="do not verify TLS certificates")
        p.add_argument("--cacert", default=d(None), help="CA bundle for the agents' TLS")

    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    add_globals(p, False)
    common = argparse.ArgumentParser(add_help=False)
    add_globals(common, True)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("status", parents=[common], help="per host: reachable, version, monitors, "
                   "targets, event rate")
    sub.add_parser("capabilities", parents=[common], help="what each host's kernel supports")

    s = sub.add_parser("start", parents=[common], help="start (or re-option) a monitor")
    s.add_argument("monitor")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--body", help="the options as one JSON object")
    s.add_argument("--lease", type=float, metavar="SECONDS",
                   help="the monitor stops by itself unless renewed (events/keepalive renew)")

    s = sub.add_parser("stop", parents=[common], help="stop a monitor")
    s.add_argument("monitor")

    s = sub.add_parser("keepalive", parents=[common],
                       help="renew the hosts' leases until interrupted (or --duration)")
    s.add_argument("monitors", nargs="*", metavar="MONITOR")
    s.add_argument("--lease", type=float, metavar="SECONDS",
                   help="renew for this long (default: each lease's own length)")
    s.add_argument("--duration", type=float, help="stop after this many seconds")
    s.add_argument("--once", action="store_true", help="renew once and exit")

    s = sub.add_parser("targets", parents=[common], help="get or edit targets on every host")
    s.add_argument("action", choices=["get", "set", "add", "remove"])
    s.add_argument("kind", nargs="?", choices=list(ops.TARGET_KINDS))
    s.add_argument("values", nargs="*")

    s = sub.add_parser("stats", parents=[common], help="one table across hosts")
    s.add_argument("monitor", nargs="?")
    s.add_argument("--limit", type=int, default=10, help="rows of per-host/fleet top lists")
    s.add_argument("--sort", choices=["count", "time"], default="count")

    s = sub.add_parser("events", parents=[common], help="the hosts' event streams, merged")
    s.add_argument("--monitor", action="append", default=[])
    s.add_argument("--pid", type=int, action="append", default=[])
    s.add_argument("--uid", type=int, action="append", default=[])
    s.add_argument("--comm", action="append", default=[])
    s.add_argument("--container", dest="container_id", action="append", default=[],
                   metavar="PREFIX", help="container id prefix (hex)")
    s.add_argument("--cgroup", action="append", default=[], metavar="PATH",
                   help="cgroup path (relative to the cgroup2 root) and its subtree")
    s.add_argument("--unit", action="append", default=[], help="systemd unit (exact)")
    s.add_argument("--process-id", dest="process_id", action="append", default=[],
                   metavar="ID", help="process instance id (exact)")
    s.add_argument("--from", dest="source", metavar="nats://HOST:PORT",
                   help="read the fleet stream from NATS instead of each host")
    s.add_argument("--subject", default="ebpf.>", help="NATS subject (with --from)")
    s.add_argument("--nats-token", default=os.environ.get("EBPF_AGENTCTL_NATS_TOKEN"))
    s.add_argument("--nats-creds", help="NATS credentials file")
    s.add_argument("--duration", type=float, help="stop after this many seconds")
    s.add_argument("--count", type=int, help="stop after this many events")
    s.add_argument("--max-lag-ms", dest="max_lag_ms", type=int, metavar="MS",
                   help="each host skips ahead (counted as missed) when this stream falls "
                   "this far behind; 0: never (default: the agent's stream.max_lag_ms)")
    s.add_argument("--no-renew", action="store_true", help="do not renew the hosts' leases")
    s.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds without data (not even a heartbeat) before a host counts "
                   "as down")

    s = sub.add_parser("processes", parents=[common],
                       help="each host's process table, merged (a host column)")
    alive = s.add_mutually_exclusive_group()
    alive.add_argument("--alive", dest="alive", action="store_const", const=True,
                       help="only live processes")
    alive.add_argument("--exited", dest="alive", action="store_const", const=False,
                       help="only exited processes still in the table")
    s.add_argument("--comm", help="process name (exact)")
    s.add_argument("--container", dest="container_id", metavar="PREFIX",
                   help="container id prefix (hex)")
    s.add_argument("--cgroup", metavar="PATH", help="cgroup path and its subtree")
    s.add_argument("--limit", type=int, default=100, help="processes per host (default 100)")
    one = s.add_mutually_exclusive_group()
    one.add_argument("--pid", type=int, help="one live process: its ancestors and children")
    one.add_argument("--id", dest="process_id", metavar="PROCESS_ID",
                     help="one process (live or exited) by its process_id, with lineage")

    sub.add_parser("containers", parents=[common],
                   help="containers seen in each host's events, with counts per monitor")

    for name, what in (("apply", "make the hosts match a desired-state file"),
                       ("diff", "show what apply would change")):
        s = sub.add_parser(name, parents=[common], help=what)
        s.add_argument("file", type=Path)
    # Dispatched in main() before parsing (it reads stdin and contacts no host); listed
    # here for --help.
    s = sub.add_parser("inventory", help="inventory from-kubernetes: an inventory from "
                       "`kubectl get endpoints -o json` on stdin")
    s.add_argument("source", choices=["from-kubernetes"])
    return p


# -- output ------------------------------------------------------------------------------
def _errors(results: list[HostResult[Any]]) -> int:
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"{PROG}: {r.host.name}: {r.error}", file=sys.stderr)
    return EXIT_HOSTS_FAILED if failed else EXIT_OK


def _json(results: list[HostResult[Any]], **extra: Any) -> None:
    doc = {
        "ok": all(r.ok for r in results),
        "hosts": {r.host.name: ({"ok": True, "result": r.value} if r.ok else
                                {"ok": False, "error": r.error, "status": r.status})
                  for r in results},
        **extra,
    }
    print(json.dumps(doc, indent=2, default=str))


def _monitor_cell(m: dict[str, Any]) -> str:
    text = f"{m['name']}:{m['state']}"
    if m.get("lease"):
        text += f"(lease {m['lease']['remaining_s']:.0f}s)"
    return text


def _targets_cell(t: dict[str, Any]) -> str:
    parts = [f"{k}={','.join(map(str, t.get(k) or []))}" for k in ops.TARGET_KINDS
             if t.get(k)]
    return " ".join(parts) or "(all)"


def show_status(results: list[HostResult[Any]], output: str) -> None:
    if output == "json":
        _json(results)
        return
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.host.name, "DOWN", "", "", "", r.error or ""])
            continue
        v = r.value
        running = [m for m in v["monitors"] if m["state"] in ("running", "failed")]
        rows.append([r.host.name, "up", v.get("version") or "",
                     " ".join(_monitor_cell(m) for m in running) or "-",
                     _targets_cell(v["targets"]), f"{v['events_per_second']:g}"])
    print(table(["HOST", "STATE", "VERSION", "MONITORS", "TARGETS", "EVENTS/S"], rows))


def show_simple(results: list[HostResult[Any]], output: str, what: str) -> None:
    if output == "json":
        _json(results)
        return
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.host.name, "FAILED", r.error or ""])
        elif what == "monitor":
            v = r.value
            lease = f" lease {v['lease']['lease_s']:g}s" if v.get("lease") else ""
            rows.append([r.host.name, v["state"], (v.get("reason") or "") + lease])
        elif what == "targets":
            rows.append([r.host.name, "ok", _targets_cell(r.value)])
        elif what == "capabilities":
            v = r.value
            mons = " ".join(f"{m['name']}:{'yes' if m.get('supported') else 'no'}"
                            for m in v.get("monitors", []))
            rows.append([r.host.name, v.get("kernel", ""), mons])
        elif what == "keepalive":
            rows.append([r.host.name, "ok", " ".join(f"{k}:{v:g}s" for k, v in r.value.items())
                         or "(no lease)"])
    head = {"capabilities": ["HOST", "KERNEL", "MONITORS"]}.get(what, ["HOST", "RESULT", ""])
    print(table(head, rows))


def show_stats(results: list[HostResult[Any]], output: str, monitor: str | None,
               limit: int, sort: str) -> None:
    fleet_top = ops.fleet_syscalls(results, limit, sort) if monitor == "syscall" else None
    # Top lists any monitor's stats describe (``top_lists``), merged over the hosts.
    tops = ops.fleet_top_lists(results, monitor, limit) if monitor else {}
    if output == "json":
        fleet = {**({"syscalls": fleet_top} if fleet_top is not None else {}),
                 **({"top_lists": tops} if tops else {})}
        _json(results, **({"fleet": fleet} if fleet else {}))
        return
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.host.name, "-", "FAILED", "", "", "", r.error or ""])
            continue
        for name, m in sorted(r.value.items()):
            rows.append([r.host.name, name, m.get("state", ""), m.get("events_delivered", ""),
                         m.get("events_dropped_kernel", ""), m.get("events_per_second", ""), ""])
    print(table(["HOST", "MONITOR", "STATE", "DELIVERED", "DROPPED", "EVENTS/S", ""], rows))
    if fleet_top is not None:
        print("\nfleet-wide syscalls (summed over hosts):")
        print(table(["SYSCALL", "COUNT", "ERRORS", "TIME_MS", "HOSTS"],
                    [[t["name"], t["count"], t["errors"], round(t["total_ns"] / 1e6, 1),
                      t["hosts"]] for t in fleet_top]))
        for r in results:
            if r.ok and r.value.get("syscall", {}).get("syscalls"):
                print(f"\n{r.host.name}:")
                print(table(["SYSCALL", "COUNT", "ERRORS"],
                            [[s["name"], s["count"], s.get("errors", 0)]
                             for s in r.value["syscall"]["syscalls"][:limit]]))
    for name, merged in tops.items():
        print(f"\nfleet-wide {name} (summed over each host's top {limit}):")
        cols = list(merged[0]) if merged else ["hosts"]
        print(table([c.upper() for c in cols], [[t.get(c, "") for c in cols] for t in merged]))


def show_changes(results: list[HostResult[Any]], output: str, verb: str) -> None:
    if output == "json":
        _json(results)
        return
    for r in results:
        if not r.ok:
            print(f"{r.host.name}: FAILED: {r.error}")
        elif not r.value:
            print(f"{r.host.name}: in sync")
        else:
            for ch in r.value:
                print(f"{r.host.name}: {verb}{ops.describe_change(ch)}")


# -- commands ----------------------------------------------------------------------------
async def _run(args: argparse.Namespace, fleet: Fleet) -> int:
    cmd, out = args.command, args.output
    if cmd == "status":
        results = await fleet.each(ops.status)
        show_status(results, out)
    elif cmd == "capabilities":
        results = await fleet.each(ops.capabilities)
        show_simple(results, out, "capabilities")
    elif cmd == "start":
        options = ops.parse_options(args.option, args.body)
        results = await fleet.each(ops.start(args.monitor, options, args.lease))
        show_simple(results, out, "monitor")
    elif cmd == "stop":
        results = await fleet.each(ops.stop(args.monitor))
        show_simple(results, out, "monitor")
    elif cmd == "targets":
        if args.action == "get":
            results = await fleet.each(ops.targets("get"))
        else:
            if not args.kind or not args.values:
                raise ops.UsageError(f"targets {args.action}: give a kind and values")
            values = ops.parse_target_values(args.kind, args.values)
            results = await fleet.each(ops.targets(args.action, args.kind, values))
        show_simple(results, out, "targets")
    elif cmd == "stats":
        results = await fleet.each(ops.stats(args.monitor, args.limit, args.sort))
        show_stats(results, out, args.monitor, args.limit, args.sort)
    elif cmd in ("apply", "diff"):
        desired = ops.load_state_file(args.file)
        op = ops.apply(desired) if cmd == "apply" else ops.diff(desired)
        results = await fleet.each(op)
        show_changes(results, out, "" if cmd == "apply" else "would ")
    elif cmd == "keepalive":
        return await _keepalive(args, fleet)
    elif cmd == "events":
        return await _events(args, fleet)
    elif cmd == "processes":
        return await _processes(args, fleet)
    elif cmd == "containers":
        results = await fleet.each(workload.containers_op)
        rows = workload.merged(results, "containers")
        if out == "json":
            _json(results, containers=rows)
        else:
            print(table(workload.CONTAINER_HEAD, [workload.container_row(c) for c in rows]))
    else:  # pragma: no cover - argparse limits the choices
        raise ops.UsageError(f"unknown command {cmd}")
    return _errors(results)


async def _processes(args: argparse.Namespace, fleet: Fleet) -> int:
    if args.pid is not None or args.process_id is not None:
        results = await fleet.each(workload.lineage_op(args.pid, args.process_id))
        found = [r for r in results if r.ok]
        if args.output == "json":
            _json(results)
        else:
            print(table(workload.LINEAGE_HEAD,
                        [row for r in found for row in workload.lineage_rows(r.host.name,
                                                                             r.value)]))
        # Not found on some hosts is the normal case (a pid lives on one host): failed
        # only when no host has it or a host could not answer.
        missing = [r for r in results if not r.ok and r.status == 404]
        broken = [r for r in results if not r.ok and r.status != 404]
        for r in broken:
            print(f"{PROG}: {r.host.name}: {r.error}", file=sys.stderr)
        if not found:
            for r in missing:
                print(f"{PROG}: {r.host.name}: {r.error}", file=sys.stderr)
        return EXIT_HOSTS_FAILED if broken or not found else EXIT_OK
    f = workload.ProcessFilter(args.alive, args.comm, args.container_id, args.cgroup,
                               args.limit)
    results = await fleet.each(workload.processes_op(f))
    rows = workload.merged(results, "processes")
    if args.output == "json":
        _json(results, processes=rows)
    else:
        print(table(workload.PROCESS_HEAD, [workload.process_row(p) for p in rows]))
    return _errors(results)


async def _keepalive(args: argparse.Namespace, fleet: Fleet) -> int:
    loop = asyncio.get_running_loop()
    deadline = None if args.duration is None else loop.time() + args.duration
    while True:
        results = await fleet.each(lambda c: ops.renew_leases(c, args.lease, args.monitors))
        if args.once or args.output == "json":
            show_simple(results, args.output, "keepalive")
        else:
            _errors(results)
        lengths = [v for r in results if r.ok and r.value for v in r.value.values()]
        wait = max(0.5, min(60.0, min(lengths) / 3)) if lengths else 30.0
        if args.once or (deadline is not None and loop.time() + wait > deadline):
            return _errors(results) if args.once else EXIT_OK
        await asyncio.sleep(wait)


def _emitter(output: str) -> Any:
    out = sys.stdout

    def emit(ev: dict[str, Any]) -> None:
        if output == "json":
            out.write(orjson.dumps(ev).decode() + "\n")
        else:
            out.write(event_line(ev) + "\n")
        out.flush()

    return emit


def _notice(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


async def _events(args: argparse.Namespace, fleet: Fleet | None) -> int:
    try:
        filters = filters_of(args.monitor, args.pid, args.uid, args.comm,
                             process_id=args.process_id, container_id=args.container_id,
                             cgroup=args.cgroup, unit=args.unit)
    except ValueError as e:
        raise ops.UsageError(str(e)) from None
    if args.max_lag_ms is not None and args.max_lag_ms < 0:
        raise ops.UsageError("--max-lag-ms: 0 (never skip) or a positive number of ms")
    emit = _emitter(args.output)
    if args.source:
        if not args.source.startswith(("nats://", "tls://")):
            raise ops.UsageError("--from: expected nats://HOST:PORT")
        if args.max_lag_ms is not None:
            raise ops.UsageError("--max-lag-ms: the hosts' streams only, not --from")
        await nats_events(args.source, args.subject, filters, emit, _notice, args.duration,
                          args.count, token=args.nats_token, creds=args.nats_creds)
        return EXIT_OK
    assert fleet is not None
    merged = MergedEvents(fleet, filters, emit, _notice, renew=not args.no_renew,
                          idle_timeout=args.idle_timeout, max_events=args.count,
                          max_lag_ms=args.max_lag_ms)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, merged.stop)
    streams = await merged.run(args.duration)
    down = [s for s in streams.values() if not s.up]
    for s in down:
        print(f"{PROG}: {s.host.name}: down at the end ({s.error})", file=sys.stderr)
    return EXIT_HOSTS_FAILED if down else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A comm holding a byte that is not UTF-8 is a lone surrogate: printed as \udcXX
    # (as the agent's JSON writes it) instead of failing the output.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError):  # replaced by a non-file (tests)
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    if argv[:2] == ["inventory", "from-kubernetes"]:
        return kubernetes.main(argv[2:])
    args = _parser().parse_args(argv)
    try:
        if args.parallel < 1 or args.timeout <= 0:
            raise ops.UsageError("--parallel must be >= 1 and --timeout > 0")
        fleet = None
        if not (args.command == "events" and args.source and not args.inventory
                and not args.host):
            hosts = resolve_hosts(args.inventory, args.host, args.select, args.token)
            fleet = Fleet(hosts, args.parallel, args.timeout,
                          tls_verify(args.insecure, args.cacert))
        if fleet is None:
            return asyncio.run(_events(args, None))
        return asyncio.run(_run(args, fleet))
    except (InventoryError, ops.UsageError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
