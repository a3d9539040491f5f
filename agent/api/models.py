"""Response and request bodies as the OpenAPI document describes them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class Open(BaseModel):
    """Documents the keys every response has; monitors may add more."""

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    detail: Any = Field(description="a message, or a list of {loc, msg, type} for 422")


class Health(BaseModel):
    status: Literal["ok"]
    version: str | None = None


class Ready(BaseModel):
    status: Literal["ready", "starting"]
    autostart_errors: dict[str, str] = Field(default_factory=dict)


class LeaseInfo(BaseModel):
    lease_s: float = Field(description="the length of the lease last granted")
    expires_at: str = Field(description="UTC; the monitor stops then unless renewed")
    remaining_s: float


class MonitorInfo(BaseModel):
    name: str
    description: str
    state: Literal["stopped", "running", "failed", "unsupported"]
    options: dict[str, Any]
    reason: str | None = Field(None, description="why it is unsupported, failed, or "
                               "stopped by an expired lease")
    lease: LeaseInfo | None = Field(None, description="present while a lease runs")
    summary: str | None = Field(
        None, description="the one-line rendering of the monitor's events, from its event "
        "declaration (as `run --format console` prints it after the time and monitor): "
        "{field} or {field:rendering}, renderings errno (\"-2 ENOENT\"), us (ns as us, "
        "one decimal), opt_ns (\" N ns\" when not null), words (a list, space-separated)")
    status: dict[str, Any] | None = Field(
        None, description="what the running monitor reports about itself beyond its "
                          "options (func: probe_scope, where its uprobes are placed)")


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_s: float | None = Field(description="seconds from now (1..604800); null removes "
                                  "the lease: the monitor runs until stopped")


class TargetsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pids: list[StrictInt] = Field(default_factory=list)
    uids: list[StrictInt] = Field(default_factory=list)
    comms: list[StrictStr] = Field(default_factory=list)
    cgroups: list[StrictStr] = Field(default_factory=list)
    containers: list[StrictStr] = Field(default_factory=list)
    follow_children: StrictBool = True


class StateDoc(BaseModel):
    monitors: dict[str, dict[str, Any]] = Field(
        description="running monitors: name -> options")
    targets: TargetKinds


class StateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    monitors: dict[str, dict[str, Any] | None] = Field(
        description="the monitors that must run, name -> options (missing options: the "
        "monitor's defaults); every other monitor is stopped")
    targets: TargetsIn | None = Field(None, description="absent: targets are left alone; "
                                      "a kind left out of it is emptied")


class StateResult(BaseModel):
    state: StateDoc
    changes: list[dict[str, Any]] = Field(description="what changed (with dry_run: what "
                                          "would change)")
    applied: bool


class TargetKinds(BaseModel):
    pids: list[int]
    uids: list[int]
    comms: list[str]
    cgroups: list[str] = Field(description="cgroup v2 paths, relative to its root; each "
                               "matches its subtree")
    containers: list[str] = Field(description="container id prefixes (12-64 hex digits)")
    follow_children: bool


class CgroupTarget(BaseModel):
    path: str
    id: int | None = Field(description="the cgroup's id (its directory's inode number) "
                           "when it was targeted: what the kernel matches")
    exists: bool = Field(description="that cgroup still exists (a cgroup made again at "
                         "the same path is another one: target the path again)")


class ContainerCgroup(BaseModel):
    id: int
    path: str


class ContainerTarget(BaseModel):
    prefix: str
    cgroups: list[ContainerCgroup] = Field(description="the cgroups named after a "
                                           "matching container now")


class Targets(TargetKinds):
    cgroup_ids: list[CgroupTarget]
    container_cgroups: list[ContainerTarget]


class MonitorStats(Open):
    name: str
    state: str


class AgentFigures(Open):
    pid: int
    uptime_s: float
    cpu_s: float
    rss_bytes: int


class StreamStats(Open):
    published: int
    capacity: int
    subscribers: list[dict[str, Any]]


class AgentStats(BaseModel):
    agent: AgentFigures
    monitors: dict[str, MonitorStats]
    streams: StreamStats
    export: dict[str, Any] | None = Field(None, description="exporters (export.nats): "
                                          "produced = published + dropped + buffered")
    processes: dict[str, Any] | None = Field(None, description="the process table (size, "
                                             "capacity, evicted, expired) and its tracker "
                                             "(state, records, ring_dropped)")


class Capabilities(Open):
    kernel: str
    machine: str
    features: dict[str, Any]
    monitors: list[dict[str, Any]]


# Target values: strict, so "12" or 1.5 for a pid are rejected rather than coerced.
TargetValues = list[StrictInt] | list[StrictStr]
FollowChildren = StrictBool

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing or wrong bearer token, session "
          "cookie or ticket"},
    403: {"model": ErrorBody, "description": "the token's scope does not allow this "
          "(read vs control), or a disallowed Origin"},
    413: {"model": ErrorBody, "description": "body larger than api.max_body_bytes"},
    503: {"model": ErrorBody, "description": "the agent is starting or shutting down"},
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {404: "unknown monitor", 409: "this kernel cannot run the monitor",
                    412: "If-Match names a state that is no longer current",
                    422: "invalid options or values; nothing was changed"}
    return {**ERROR_RESPONSES,
            **{c: {"model": ErrorBody, "description": descriptions[c]} for c in codes}}
