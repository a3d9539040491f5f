"""The desired-state document of ``GET /state`` / ``PUT /state``: the running monitors
with their options and the targets, tagged with a hash (the ETag).

Pure functions: the manager applies a document in one control-thread command
(commands.ApplyState, MonitorManager._apply_state), all or nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

from agent.model.targets import KINDS, TargetLimits, TargetSet, check_capacity, validate_values
from agent.monitors.contract import MonitorOptions


def etag_of(doc: dict[str, Any]) -> str:
    """A hash of the document. ASCII JSON: a comm holding a byte that is not UTF-8 is a
    lone surrogate (\\udcXX), which orjson and UTF-8 refuse; ``ensure_ascii`` writes it
    as an escape, so hashing never fails after a change was applied."""
    text = json.dumps(doc, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("ascii")).hexdigest()
    return f'"{digest[:32]}"'


def state_doc(options: Mapping[str, MonitorOptions], targets: TargetSet) -> dict[str, Any]:
    """``options``: the running monitors' options by name."""
    monitors = {name: opts.model_dump(mode="json") for name, opts in sorted(options.items())}
    return {"monitors": monitors, "targets": targets.as_dict()}


def parse_state(desired: Any,
                parse_options: Callable[[str, dict[str, Any] | None, tuple[str | int, ...]],
                                        MonitorOptions],
                limits: TargetLimits) -> tuple[dict[str, MonitorOptions], TargetSet | None]:
    """The document checked: ValueError (422), UnknownMonitor (404), OptionsInvalid."""
    if not isinstance(desired, dict):
        raise ValueError("the state must be an object")
    unknown = set(desired) - {"monitors", "targets"}
    if unknown:
        raise ValueError(f"unknown keys: {', '.join(sorted(unknown))}")
    raw = desired.get("monitors")
    if not isinstance(raw, dict):
        raise ValueError("monitors: expected an object of monitor name: options")
    monitors: dict[str, MonitorOptions] = {}
    for name, options in raw.items():
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"monitors.{name}: options must be an object")
        monitors[name] = parse_options(name, options, ("monitors", name))  # 404 / 422
    targets = None
    if desired.get("targets") is not None:
        t = desired["targets"]
        if not isinstance(t, dict):
            raise ValueError("targets: expected an object")
        extra = set(t) - {*KINDS, "follow_children"}
        if extra:
            raise ValueError(f"targets: unknown keys: {', '.join(sorted(extra))}")
        follow = t.get("follow_children", True)
        if not isinstance(follow, bool):
            raise ValueError("targets.follow_children: expected true or false")
        values = {kind: validate_values(kind, t.get(kind) or []) for kind in KINDS}
        targets = TargetSet(values["pids"], values["uids"], values["comms"], follow,
                            cgroups=values["cgroups"], containers=values["containers"])
        check_capacity(targets, limits)
    return monitors, targets


def state_changes(running: Mapping[str, MonitorOptions], current: TargetSet,
                  monitors: Mapping[str, MonitorOptions],
                  targets: TargetSet | None) -> list[dict[str, Any]]:
    """What makes ``running``/``current`` match ``monitors``/``targets``."""
    out: list[dict[str, Any]] = []
    for name in sorted(set(running) - set(monitors)):
        out.append({"action": "stop", "monitor": name})
    for name, options in sorted(monitors.items()):
        now = running.get(name)
        new = options.model_dump(mode="json")
        if now is None:
            out.append({"action": "start", "monitor": name, "options": new})
        elif now != options:
            old = now.model_dump(mode="json")
            diff = {k: {"from": old.get(k), "to": v} for k, v in new.items()
                    if old.get(k) != v}
            out.append({"action": "options", "monitor": name, "changes": diff})
    if targets is not None:
        for kind in KINDS:
            old_v, new_v = current.get(kind), targets.get(kind)
            if old_v != new_v:
                out.append({"action": "targets", "kind": kind,
                            "add": sorted(new_v - old_v), "remove": sorted(old_v - new_v)})
        if targets.follow_children != current.follow_children:
            out.append({"action": "targets", "kind": "follow_children",
                        "from": current.follow_children, "to": targets.follow_children})
    return out
