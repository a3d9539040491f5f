"""The fleet inventory: which agents the controller drives, with their tokens and labels.

YAML::

    defaults:                  # applied to every host (a host's own keys win)
      token_file: /etc/ebpf-agentctl/token
      labels: {env: prod}
    hosts:
      - {name: web1, url: "https://10.0.0.1:8765", labels: {role: web}}
      - {name: db1, url: "https://10.0.0.2:8765", token: "...", labels: {role: db}}

or ``--host NAME=URL`` (repeatable). ``--select key=value`` keeps the hosts whose labels
(plus ``name``) match every selector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.auth_files import DEFAULT_RUNTIME_DIR, read_token_if_readable, token_path
from agent.fleet.yamlfile import read_yaml_mapping

# Where the agent writes the token it generates when none is configured; read when the
# inventory gives a host no token (the controller runs on that host, or as an admin who
# copied it).
# The token `ebpf-agent serve` generates when none is configured (agent/auth_files.py).
DEFAULT_TOKEN_FILE = token_path(DEFAULT_RUNTIME_DIR)
INVENTORY_ENV = "EBPF_AGENTCTL_INVENTORY"
HOST_KEYS = {"name", "url", "token", "token_file", "labels"}


class InventoryError(Exception):
    """A problem with the inventory or the host selection (exit code 2)."""


@dataclass(frozen=True)
class Host:
    name: str
    url: str
    token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def matches(self, selectors: dict[str, str]) -> bool:
        return all((self.name if k == "name" else self.labels.get(k)) == v
                   for k, v in selectors.items())


def default_token(path: Path = DEFAULT_TOKEN_FILE) -> str | None:
    """The agent's generated token when this user may read it, else None."""
    return read_token_if_readable(path)


def _read_token_file(path: str | Path, where: str) -> str:
    try:
        value = Path(path).expanduser().read_text().strip()
    except OSError as e:
        raise InventoryError(f"{where}: token_file {path}: {e.strerror}") from None
    if not value:
        raise InventoryError(f"{where}: token_file {path} is empty")
    return value


def _host(entry: Any, defaults: dict[str, Any], where: str,
          token_fallback: Path | None) -> Host:
    if not isinstance(entry, dict):
        raise InventoryError(f"{where}: expected a mapping with name and url")
    unknown = set(entry) - HOST_KEYS
    if unknown:
        raise InventoryError(f"{where}: unknown keys: {', '.join(sorted(unknown))}")
    merged = {**defaults, **entry}
    merged["labels"] = {**(defaults.get("labels") or {}), **(entry.get("labels") or {})}
    name, url = merged.get("name"), merged.get("url")
    if not isinstance(name, str) or not name:
        raise InventoryError(f"{where}: name is required")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InventoryError(f"{where} ({name}): url must be http(s)://host:port")
    token = merged.get("token")
    if "token" in entry and "token_file" in entry:
        raise InventoryError(f"{where} ({name}): token and token_file exclude each other")
    if "token" in entry:
        token = entry["token"]
    elif merged.get("token_file"):
        token = _read_token_file(merged["token_file"], f"{where} ({name})")
    if token is not None and not isinstance(token, str):
        raise InventoryError(f"{where} ({name}): token must be a string")
    if token is None and token_fallback is not None:
        token = default_token(token_fallback)
    labels = merged["labels"]
    if not isinstance(labels, dict):
        raise InventoryError(f"{where} ({name}): labels must be a mapping")
    return Host(name, url.rstrip("/"), token, {str(k): str(v) for k, v in labels.items()})


def load_inventory(path: Path, token_fallback: Path | None = DEFAULT_TOKEN_FILE) -> list[Host]:
    data = read_yaml_mapping(path, InventoryError, required="hosts", required_type=list,
                             hint="a 'hosts' list", allowed={"hosts", "defaults"})
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - (HOST_KEYS - {"name"}):
        raise InventoryError(f"{path}: defaults: a mapping of url/token/token_file/labels")
    hosts = [_host(entry, defaults, f"{path}: hosts[{i}]", token_fallback)
             for i, entry in enumerate(data["hosts"])]
    _unique(hosts, str(path))
    return hosts


def parse_host_arg(value: str, token_fallback: Path | None = DEFAULT_TOKEN_FILE) -> Host:
    """``NAME=URL``."""
    name, sep, url = value.partition("=")
    if not sep or not name:
        raise InventoryError(f"--host {value!r}: expected NAME=URL")
    return _host({"name": name, "url": url}, {}, "--host", token_fallback)


def parse_selectors(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, want = v.partition("=")
        if not sep or not key:
            raise InventoryError(f"--select {v!r}: expected key=value")
        out[key] = want
    return out


def resolve_hosts(inventory: Path | None, host_args: list[str], selectors: list[str],
                  token: str | None = None,
                  token_fallback: Path | None = DEFAULT_TOKEN_FILE) -> list[Host]:
    """The selected hosts: --inventory (or $EBPF_AGENTCTL_INVENTORY) plus --host."""
    if inventory is None and not host_args and os.environ.get(INVENTORY_ENV):
        inventory = Path(os.environ[INVENTORY_ENV])
    hosts = load_inventory(inventory, None) if inventory is not None else []
    hosts += [parse_host_arg(h, None) for h in host_args]
    # For hosts that have none: --token / EBPF_AGENTCTL_TOKEN, else the local agent's
    # generated token. In that order: a token file some agent on this machine happens
    # to have written must not override the token given on the command line.
    if token is None and token_fallback is not None:
        token = default_token(token_fallback)
    if token is not None:
        hosts = [h if h.token else Host(h.name, h.url, token, h.labels) for h in hosts]
    _unique(hosts, "hosts")
    if not hosts:
        raise InventoryError(f"no hosts: give --inventory FILE (or {INVENTORY_ENV}) or "
                             "--host NAME=URL")
    wanted = parse_selectors(selectors)
    selected = [h for h in hosts if h.matches(wanted)]
    if not selected:
        raise InventoryError(f"--select {' '.join(selectors)} matches no host")
    return selected


def _unique(hosts: list[Host], where: str) -> None:
    seen: set[str] = set()
    for h in hosts:
        if h.name in seen:
            raise InventoryError(f"{where}: host name {h.name!r} appears twice")
        seen.add(h.name)
