"""What each ``ebpf-agentctl`` command does on one agent (the Python API under the CLI).

Every function takes an AgentClient and returns plain data; ``Fleet.each`` runs it on the
selected hosts. Example::

    import asyncio
    from agent.fleet import Fleet, Host, ops

    fleet = Fleet([Host("web1", "http://10.0.0.1:8765", token="...")])
    for r in asyncio.run(fleet.each(ops.status)):
        print(r.host.name, r.value if r.ok else r.error)
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections import defaultdict
from pathlib import Path
from typing import Any

from agent.fleet.client import AgentClient, BadAnswer, HostResult, expect, member
from agent.fleet.yamlfile import read_yaml_mapping

TARGET_KINDS = ("pids", "uids", "comms", "cgroups", "containers")


class UsageError(Exception):
    """Bad arguments or files (exit code 2)."""


# -- status ------------------------------------------------------------------------------
def monitor_entries(monitors: list[Any], what: str) -> list[dict[str, Any]]:
    """The monitor objects of a /monitors answer, each with a name and a state."""
    out = []
    for i, m in enumerate(monitors):
        m = expect(m, dict, f"{what}[{i}]")
        member(m, "name", str, f"{what}[{i}]")
        member(m, "state", str, f"{what}[{i}]")
        if m.get("lease") is not None:
            lease = member(m, "lease", dict, f"{what}[{i}]")
            for key in ("lease_s", "remaining_s"):
                member(lease, key, float, f"{what}[{i}].lease")
        out.append(m)
    return out


def stats_entries(stats: dict[str, Any], what: str) -> dict[str, dict[str, Any]]:
    """{monitor: stats object} of a /stats answer."""
    per = expect(stats.get("monitors", {}), dict, f"{what}.monitors")
    return {str(k): expect(v, dict, f"{what}.monitors.{k}") for k, v in per.items()}


async def status(c: AgentClient) -> dict[str, Any]:
    health, monitors, targets, stats = await asyncio.gather(
        c.get_object("/health"), c.get_list("/monitors"), c.get_object("/targets"),
        c.get_object("/stats"))
    monitors = monitor_entries(monitors, "the answer to GET /monitors")
    per = stats_entries(stats, "the answer to GET /stats")
    try:
        rate = sum(float(m.get("events_per_second", 0) or 0) for m in per.values())
    except (TypeError, ValueError):
        raise BadAnswer("bad answer: GET /stats: an events_per_second is not a number") \
            from None
    out = {
        "reachable": True,
        "version": health.get("version"),
        "monitors": [{k: m[k] for k in ("name", "state", "options", "reason", "lease")
                      if k in m} for m in monitors],
        "targets": targets,
        "events_per_second": round(rate, 1),
    }
    if stats.get("export"):
        out["export"] = stats["export"]
    return out


async def capabilities(c: AgentClient) -> dict[str, Any]:
    result = await c.get_object("/capabilities")
    what = "the answer to GET /capabilities"
    for i, m in enumerate(expect(result.get("monitors", []), list, f"{what}.monitors")):
        member(expect(m, dict, f"{what}.monitors[{i}]"), "name", str, f"{what}.monitors[{i}]")
    return result


def monitor_answer(value: Any, what: str) -> dict[str, Any]:
    """A monitor object (start, stop): a name and a state."""
    return monitor_entries([value], what)[0] if isinstance(value, dict) else \
        expect(value, dict, what)


# -- monitors ----------------------------------------------------------------------------
def parse_options(items: list[str], body: str | None) -> dict[str, Any] | None:
    """``--body JSON`` and ``--option key=value`` (values parsed as JSON when they are)."""
    options: dict[str, Any] | None = None
    if body is not None:
        try:
            options = json.loads(body)
        except json.JSONDecodeError as e:
            raise UsageError(f"--body: invalid JSON: {e}") from None
        if not isinstance(options, dict):
            raise UsageError("--body: expected a JSON object")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        options = options if options is not None else {}
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def start(monitor: str, options: dict[str, Any] | None, lease_s: float | None) -> Any:
    async def op(c: AgentClient) -> dict[str, Any]:
        params = {"lease_s": lease_s} if lease_s is not None else {}
        kw: dict[str, Any] = {"params": params}
        if options is not None:
            kw["json"] = options
        return monitor_answer(await c.post(f"/monitors/{monitor}/start", **kw),
                              f"the answer to POST /monitors/{monitor}/start")

    return op


def stop(monitor: str) -> Any:
    async def op(c: AgentClient) -> dict[str, Any]:
        return monitor_answer(await c.post(f"/monitors/{monitor}/stop"),
                              f"the answer to POST /monitors/{monitor}/stop")

    return op


async def renew_leases(c: AgentClient, lease_s: float | None = None,
                       monitors: list[str] | None = None) -> dict[str, float]:
    """Renews every lease the agent holds (or those of ``monitors``) for its own length
    (or ``lease_s``); returns {monitor: lease_s} renewed."""
    renewed: dict[str, float] = {}
    for m in monitor_entries(await c.get_list("/monitors"), "the answer to GET /monitors"):
        lease: dict[str, Any] = m.get("lease") or {}
        if monitors and m["name"] not in monitors:
            continue
        if not lease and not (monitors and lease_s and m.get("state") == "running"):
            continue
        length = float(lease_s or lease["lease_s"])
        await c.post(f"/monitors/{m['name']}/lease", json={"lease_s": length})
        renewed[m["name"]] = length
    return renewed


# -- targets -----------------------------------------------------------------------------
def parse_target_values(kind: str, values: list[str]) -> list[Any]:
    if kind not in TARGET_KINDS:
        raise UsageError(f"targets: kind must be one of {', '.join(TARGET_KINDS)}")
    if kind in ("comms", "cgroups", "containers"):
        return list(values)
    out = []
    for v in values:
        for part in v.split(","):
            if not part.strip().isdigit():
                raise UsageError(f"targets {kind}: {part!r} is not a number")
            out.append(int(part))
    return out


def targets(action: str, kind: str | None = None, values: list[Any] | None = None) -> Any:
    async def op(c: AgentClient) -> dict[str, Any]:
        what = f"the answer to {action} targets"
        if action == "get":
            return await c.get_object("/targets")
        if action == "set":
            return dict(expect(await c.put(f"/targets/{kind}", json=values), dict, what))
        if action == "add":
            return dict(expect(await c.post(f"/targets/{kind}", json=values), dict, what))
        if action == "remove":
            result = await c.get_object("/targets")
            for v in values or []:
                # One path segment whatever the value holds ("/", "?", "%", ...).
                value = urllib.parse.quote(str(v), safe="", errors="surrogateescape")
                result = expect(await c.delete(f"/targets/{kind}/{value}"), dict, what)
            return dict(result)
        raise UsageError(f"targets: unknown action {action!r}")

    return op


# -- stats -------------------------------------------------------------------------------
def stats(monitor: str | None, limit: int | None = None, sort: str | None = None) -> Any:
    async def op(c: AgentClient) -> dict[str, Any]:
        if monitor is None:
            return stats_entries(await c.get_object("/stats"), "the answer to GET /stats")
        # The whole syscall table (a few hundred rows at most): the fleet-wide top list
        # is summed over every host's full table, not over each host's top N.
        limit_ = None if monitor == "syscall" else limit
        params = {k: v for k, v in (("limit", limit_), ("sort", sort)) if v is not None}
        path = f"/monitors/{monitor}/stats"
        result = await c.get_object(path, params=params)
        if monitor == "syscall":
            what = f"the answer to GET {path}"
            rows = expect(result.get("syscalls") or [], list, f"{what}.syscalls")
            for i, row in enumerate(rows):
                row = expect(row, dict, f"{what}.syscalls[{i}]")
                member(row, "name", str, f"{what}.syscalls[{i}]")
                for key in ("count", "errors", "total_ns"):
                    if row.get(key) is not None:
                        member(row, key, int, f"{what}.syscalls[{i}]")
        return {monitor: result}

    return op


def fleet_syscalls(results: list[HostResult[Any]], limit: int = 10,
                   sort: str = "count") -> list[dict[str, Any]]:
    """The syscall table summed over every host that answered."""
    total: dict[str, dict[str, Any]] = defaultdict(lambda: {"count": 0, "errors": 0,
                                                            "total_ns": 0, "hosts": 0})
    for r in results:
        if not r.ok or not r.value:
            continue
        table = (r.value.get("syscall") or {}).get("syscalls") or []
        for row in table:
            t = total[row["name"]]
            t["count"] += int(row.get("count", 0))
            t["errors"] += int(row.get("errors", 0))
            t["total_ns"] += int(row.get("total_ns", 0) or 0)
            t["hosts"] += 1
    key = "total_ns" if sort == "time" else "count"
    rows = [{"name": n, **v} for n, v in total.items()]
    rows.sort(key=lambda r: (-r[key], r["name"]))
    return rows[:limit]


def fleet_top_lists(results: list[HostResult[Any]], monitor: str,
                    limit: int = 10) -> dict[str, list[dict[str, Any]]]:
    """The top lists a monitor's stats describe (``top_lists``: name -> {"key": [key
    columns], "sort": a column or a list of columns whose sum orders the list, "rows":
    [...]}), each summed over the hosts that answered: rows with the same key add up their
    numeric columns, ``hosts`` counts the hosts that listed the row. Each host sends its
    own top N, so a row outside a host's top N is not counted for that host."""
    merged: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    order: dict[str, list[str]] = {}
    for r in results:
        if not r.ok or not r.value:
            continue
        lists = (r.value.get(monitor) or {}).get("top_lists") or {}
        for name, spec in lists.items():
            keys = tuple(spec.get("key") or ())
            sort = spec.get("sort") or []
            order[name] = [sort] if isinstance(sort, str) else list(sort)
            rows = merged.setdefault(name, {})
            for row in spec.get("rows") or []:
                k = tuple(row.get(c) for c in keys)
                t = rows.setdefault(k, {**{c: row.get(c) for c in keys}, "hosts": 0})
                for col, v in row.items():
                    if col in keys or isinstance(v, bool) or not isinstance(v, int | float):
                        continue
                    t[col] = t.get(col, 0) + v
                t["hosts"] += 1
    out = {}
    for name, rows in merged.items():
        cols = order[name]
        ranked = sorted(rows.values(),
                        key=lambda t: (-sum(t.get(c, 0) for c in cols), str(list(t.values()))))
        out[name] = ranked[:limit]
    return out


# -- desired state -----------------------------------------------------------------------
def load_state_file(path: Path) -> dict[str, Any]:
    """``monitors: {name: options}`` and optional ``targets: {pids, uids, comms,
    follow_children}`` (YAML or JSON)."""
    data = read_yaml_mapping(path, UsageError, required="monitors", required_type=dict,
                             hint="'monitors' (name: options)", allowed={"monitors", "targets"})
    monitors = {name: (opts or {}) for name, opts in data["monitors"].items()}
    doc: dict[str, Any] = {"monitors": monitors}
    if data.get("targets") is not None:
        doc["targets"] = data["targets"]
    return doc


def diff(desired: dict[str, Any]) -> Any:
    async def op(c: AgentClient) -> list[dict[str, Any]]:
        r = await c.put("/state", json=desired, params={"dry_run": "true"})
        return changes_of(r, "the answer to PUT /state?dry_run=true")

    return op


def apply(desired: dict[str, Any]) -> Any:
    """GET /state for the ETag, then PUT with If-Match: a concurrent change by someone
    else is a 412, not silently overwritten."""

    async def op(c: AgentClient) -> list[dict[str, Any]]:
        current = await c.request("GET", "/state")
        etag = current.headers.get("etag")
        if not etag:
            raise BadAnswer("bad answer: GET /state has no ETag header")
        r = await c.put("/state", json=desired, headers={"If-Match": etag})
        return changes_of(r, "the answer to PUT /state")

    return op


def changes_of(answer: Any, what: str) -> list[dict[str, Any]]:
    changes = member(expect(answer, dict, what), "changes", list, what)
    for i, ch in enumerate(changes):
        member(expect(ch, dict, f"{what}.changes[{i}]"), "action", str,
               f"{what}.changes[{i}]")
    return list(changes)


def describe_change(ch: dict[str, Any]) -> str:
    try:
        return _describe_change(ch)
    except (KeyError, TypeError, AttributeError):  # an odd change: shown as it came
        return json.dumps(ch, default=str)


def _describe_change(ch: dict[str, Any]) -> str:
    action = ch.get("action")
    if action == "start":
        opts = ", ".join(f"{k}={json.dumps(v)}" for k, v in ch.get("options", {}).items())
        return f"start {ch['monitor']} ({opts})" if opts else f"start {ch['monitor']}"
    if action == "stop":
        return f"stop {ch['monitor']}"
    if action == "options":
        parts = ", ".join(f"{k}: {json.dumps(v['from'])} -> {json.dumps(v['to'])}"
                          for k, v in ch.get("changes", {}).items())
        return f"change {ch['monitor']} options: {parts}"
    if action == "targets":
        if ch["kind"] == "follow_children":
            return f"set targets follow_children: {ch['from']} -> {ch['to']}"
        edits: list[str] = []
        if ch.get("add"):
            edits.append("+" + ",".join(map(str, ch["add"])))
        if ch.get("remove"):
            edits.append("-" + ",".join(map(str, ch["remove"])))
        return f"edit targets {ch['kind']}: {' '.join(edits)}"
    return json.dumps(ch)
