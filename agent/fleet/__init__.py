"""The fleet controller behind ``ebpf-agentctl``: an importable async API.

- ``inventory``: hosts (YAML inventory or NAME=URL), labels, selection, tokens
- ``client``: ``Fleet.each(op)`` with bounded concurrency and per-host timeouts
- ``ops``: what each command does on one agent (status, start, stop, targets, stats,
  leases, apply/diff of a desired state)
- ``events``: the merged event stream (SSE per host, or NATS)
"""

from agent.fleet.client import AgentClient, AgentError, Fleet, HostResult
from agent.fleet.inventory import Host, InventoryError, default_token, resolve_hosts

__all__ = ["AgentClient", "AgentError", "Fleet", "Host", "HostResult", "InventoryError",
           "default_token", "resolve_hosts"]
