"""``ebpf-agent``: check, run (foreground monitors to console/CSV/JSONL), serve (REST API)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from agent import logsetup
from agent.config import (
    DEFAULT_CONFIG,
    ConfigError,
    Settings,
    absolute_paths,
    config_warnings,
    load_settings,
)
from agent.core.failures import (
    EXIT_CONFIG,
    EXIT_UNSUPPORTED,
    OptionsInvalid,
    UnknownMonitor,
    failure_of,
)
from agent.model.targets import TargetError
from agent.monitors.registry import MonitorRegistry, discover_monitors


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ebpf-agent", description=__doc__)
    p.add_argument("--config", type=Path, default=None,
                   help=f"YAML config (default: {DEFAULT_CONFIG})")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    # The same options after the subcommand (`ebpf-agent serve --config F`); SUPPRESS
    # keeps an absent one from overwriting the value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    common.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", parents=[common], help="report what this kernel supports")
    check.add_argument("--json", action="store_true", help="machine-readable report")

    run = sub.add_parser("run", parents=[common], help="run monitors in the foreground")
    run.add_argument("monitors", nargs="+", metavar="MONITOR")
    run.add_argument("--pid", type=int, action="append", default=[], help="target pid")
    run.add_argument("--uid", type=int, action="append", default=[], help="target uid")
    run.add_argument("--comm", action="append", default=[], help="target process name")
    run.add_argument("--cgroup", action="append", default=[],
                     help="target cgroup v2 path, relative to its root (its subtree)")
    run.add_argument("--container", action="append", default=[],
                     help="target container id prefix (12-64 hex digits)")
    run.add_argument("--no-follow-children", action="store_true")
    run.add_argument("--output-dir", type=Path)
    run.add_argument("--format", action="append", choices=["console", "csv", "jsonl"],
                     help="output format (repeatable; default console)")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--option", action="append", default=[], metavar="MONITOR.KEY=JSON",
                     help="monitor option, e.g. exec.max_args=40")
    run.add_argument("--export", action="append", choices=["nats"], default=[],
                     help="also publish every event (export.nats in the config: server, "
                     "subject, ...)")

    serve = sub.add_parser("serve", parents=[common], help="run the REST API")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--daemon", action="store_true", help="detach (double fork)")
    serve.add_argument("--pid-file", type=Path)
    return p


def _settings(args: argparse.Namespace, registry: MonitorRegistry) -> Settings:
    overrides: dict[str, Any] = {}
    if args.log_level:
        overrides["logging"] = {"level": args.log_level}
    if args.command == "run":
        if args.output_dir:
            overrides["output"] = {"directory": str(args.output_dir)}
        if "nats" in args.export:
            overrides["export"] = {"nats": {"enabled": True}}
        if args.pid or args.uid or args.comm or args.cgroup or args.container or \
                args.no_follow_children:
            overrides["targets"] = {"pids": args.pid, "uids": args.uid, "comms": args.comm,
                                    "cgroups": args.cgroup, "containers": args.container,
                                    "follow_children": not args.no_follow_children}
    if args.command == "serve":
        api = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if api:
            overrides["api"] = api
        if args.pid_file:
            overrides["pid_file"] = str(args.pid_file)
    path = args.config if args.config is not None else DEFAULT_CONFIG
    settings = load_settings(path if path.exists() or args.config else None, overrides, registry)
    return absolute_paths(settings)


def _run_options(args: argparse.Namespace, settings: Settings) -> dict[str, dict[str, Any]]:
    options = {name: dict(settings.monitors[name].options) if name in settings.monitors else {}
               for name in args.monitors}
    for item in args.option:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or name not in options:
            raise CliError(f"--option {item!r}: expected MONITOR.KEY=VALUE for a monitor being run",
                           EXIT_CONFIG)
        try:
            options[name][field] = json.loads(value)
        except json.JSONDecodeError:
            options[name][field] = value
    return options


def cmd_check(args: argparse.Namespace, registry: MonitorRegistry) -> int:
    from agent.kernel.capabilities import build_report

    # The configuration is checked too: an invalid one is a config error (exit 2), one
    # that is valid but likely wrong gets a warning on stderr.
    for warning in config_warnings(_settings(args, registry)):
        print(f"ebpf-agent: config warning: {warning}", file=sys.stderr)
    report = build_report(registry)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(f"kernel {report.kernel} ({report.machine})")
        for name, f in report.features.items():
            print(f"  {'ok ' if f.available else 'no '} {name:15} {f.detail}")
        print("monitors:")
        for m in report.monitors:
            print(f"  {'ok ' if m.supported else 'no '} {m.name:15} {m.reason or ''}".rstrip())
            if m.tracepoints:  # a monitor's other hooks (uprobes) depend on its options
                print(f"       {'':15} tracepoints: {', '.join(m.tracepoints)}")
    return 0 if any(m.supported for m in report.monitors) else EXIT_UNSUPPORTED


def cmd_run(args: argparse.Namespace, registry: MonitorRegistry, settings: Settings) -> int:
    from agent.core.agent import Agent
    from agent.kernel.capabilities import build_report

    for name in args.monitors:
        if name not in registry:
            raise CliError(f"unknown monitor {name!r} (known: {', '.join(registry.names())})",
                           EXIT_CONFIG)
    options = _run_options(args, settings)
    if os.geteuid() != 0:
        raise CliError("ebpf-agent run needs root (loading eBPF programs)", EXIT_UNSUPPORTED)
    report = build_report(registry)
    agent = Agent(settings, registry, report, streams=False,
                  formats=args.format or ["console"])
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        agent.start()
        for name in args.monitors:
            try:
                agent.manager.start_monitor(name, options[name])
            except Exception as e:
                failure = failure_of(e, checks_input=True)
                if failure is None:
                    raise
                raise CliError(_refusal(name, e), failure.exit_code) from None
        print(f"ebpf-agent: running {', '.join(args.monitors)}; Ctrl-C to stop", file=sys.stderr)
        done.wait(args.duration)
    finally:
        agent.shutdown()
    return 0


def _refusal(name: str, e: Exception) -> str:
    """One line: what was refused and why."""
    if isinstance(e, OptionsInvalid):
        return f"{name}: " + "; ".join(
            ": ".join(filter(None, (".".join(map(str, x["loc"])), x["msg"]))) for x in e.errors)
    if isinstance(e, UnknownMonitor):
        return f"unknown monitor {name!r}"
    if isinstance(e, ValueError):  # func patterns, output paths: the API's 422s
        return f"{name}: {e}"
    return str(e)


def cmd_serve(args: argparse.Namespace, registry: MonitorRegistry, settings: Settings) -> int:
    from agent.api.server import serve

    return serve(settings, registry, daemon=args.daemon)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        registry = discover_monitors()
        if args.command == "check":
            return cmd_check(args, registry)
        settings = _settings(args, registry)
        try:
            # Never blocks a caller: a bounded queue written by one thread (agent/logsetup.py)
            logsetup.configure(settings.logging.level, settings.logging.file)
        except OSError as e:
            raise ConfigError(f"logging.file {settings.logging.file}: {e.strerror}") from None
        for warning in config_warnings(settings):
            logging.getLogger("agent.config").warning("%s", warning)
        if args.command == "run":
            return cmd_run(args, registry, settings)
        return cmd_serve(args, registry, settings)
    except ConfigError as e:
        print(f"ebpf-agent: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except TargetError as e:
        print(f"ebpf-agent: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except CliError as e:
        print(f"ebpf-agent: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
