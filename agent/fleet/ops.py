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
from collections import defaultdict
from pathlib import Path
from typing import Any

from agent.fleet.client import AgentClient, HostResult
from agent.fleet.yamlfile import read_yaml_mapping

TARGET_KINDS = ("pids", "uids", "comms")


class UsageError(Exception):
    """Bad arguments or files (exit code 2)."""


# -- status ------------------------------------------------------------------------------
async def status(c: AgentClient) -> dict[str, Any]:
    health, monitors, targets, stats = await asyncio.gather(
        c.get("/health"), c.get("/monitors"), c.get("/targets"), c.get("/stats"))
    rate = sum(float(m.get("events_per_second", 0) or 0)
               for m in stats.get("monitors", {}).values())
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
    result: dict[str, Any] = await c.get("/capabilities")
    return result


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
        result: dict[str, Any] = await c.post(f"/monitors/{monitor}/start", **kw)
        return result

    return op


def stop(monitor: str) -> Any:
    async def op(c: AgentClient) -> dict[str, Any]:
        result: dict[str, Any] = await c.post(f"/monitors/{monitor}/stop")
        return result

    return op


async def renew_leases(c: AgentClient, lease_s: float | None = None,
                       monitors: list[str] | None = None) -> dict[str, float]:
    """Renews every lease the agent holds (or those of ``monitors``) for its own length
    (or ``lease_s``); returns {monitor: lease_s} renewed."""
    renewed: dict[str, float] = {}
    for m in await c.get("/monitors"):
        lease = m.get("lease")
        if monitors and m["name"] not in monitors:
            continue
        if lease is None and not (monitors and lease_s and m.get("state") == "running"):
            continue
        length = float(lease_s or lease["lease_s"])
        await c.post(f"/monitors/{m['name']}/lease", json={"lease_s": length})
        renewed[m["name"]] = length
    return renewed


# -- targets -----------------------------------------------------------------------------
def parse_target_values(kind: str, values: list[str]) -> list[Any]:
    if kind not in TARGET_KINDS:
        raise UsageError(f"targets: kind must be one of {', '.join(TARGET_KINDS)}")
    if kind == "comms":
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
        if action == "get":
            result: dict[str, Any] = await c.get("/targets")
            return result
        if action == "set":
            return dict(await c.put(f"/targets/{kind}", json=values))
        if action == "add":
            return dict(await c.post(f"/targets/{kind}", json=values))
        if action == "remove":
            result = await c.get("/targets")
            for v in values or []:
                result = await c.delete(f"/targets/{kind}/{v}")
            return dict(result)
        raise UsageError(f"targets: unknown action {action!r}")

    return op


# -- stats -------------------------------------------------------------------------------
def stats(monitor: str | None, limit: int | None = None, sort: str | None = None) -> Any:
    async def op(c: AgentClient) -> dict[str, Any]:
        if monitor is None:
            return dict((await c.get("/stats")).get("monitors", {}))
        # The whole syscall table (a few hundred rows at most): the fleet-wide top list
        # is summed over every host's full table, not over each host's top N.
        limit_ = None if monitor == "syscall" else limit
        params = {k: v for k, v in (("limit", limit_), ("sort", sort)) if v is not None}
        return {monitor: await c.get(f"/monitors/{monitor}/stats", params=params)}

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
        return list(r["changes"])

    return op


def apply(desired: dict[str, Any]) -> Any:
    """GET /state for the ETag, then PUT with If-Match: a concurrent change by someone
    else is a 412, not silently overwritten."""

    async def op(c: AgentClient) -> list[dict[str, Any]]:
        current = await c.request("GET", "/state")
        r = await c.put("/state", json=desired, headers={"If-Match": current.headers["etag"]})
        return list(r["changes"])

    return op


def describe_change(ch: dict[str, Any]) -> str:
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
