"""An ebpf-agentctl inventory from the agents' Kubernetes Service endpoints.

    kubectl -n ebpf-agent get endpoints ebpf-agent -o json \\
      | ebpf-agentctl inventory from-kubernetes --token-file ~/.config/ebpf-agent/token \\
      > inventory.yaml

(standalone until the subcommand is wired: ``python -m agent.fleet.kubernetes``). Reads a
v1 Endpoints object, a discovery.k8s.io/v1 EndpointSlice (``kubectl get endpointslices
-l kubernetes.io/service-name=ebpf-agent -o json``; Endpoints is deprecated since
Kubernetes 1.33) or a List of either, and prints YAML: ``defaults:`` (token_file) and
``hosts:``, one per ready agent pod: ``{name, url, labels}``, named after the node the pod
runs on (one agent per node: the DaemonSet). Pods that are not ready are left out and
counted on stderr. The URL is the pod IP, the address the agent binds and trusts as Host.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

PORT_NAME = "api"


class InventoryError(ValueError):
    """Input that is not Endpoints/EndpointSlice JSON, or lacks the API port."""


def _objects(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise InventoryError("expected a JSON object (kubectl get ... -o json)")
    if doc.get("kind", "").endswith("List") or "items" in doc:
        items = doc.get("items") or []
        return [item for item in items if isinstance(item, dict)]
    return [doc]


def _port(ports: list[dict[str, Any]], name: str, where: str) -> int:
    for p in ports or []:
        if p.get("name") == name or (len(ports) == 1 and not p.get("name")):
            return int(p["port"])
    names = ", ".join(str(p.get("name")) for p in ports or []) or "none"
    raise InventoryError(f"{where}: no port named {name!r} (ports: {names})")


def _host(ip: str, port: int, scheme: str, address: dict[str, Any],
          namespace: str) -> dict[str, Any]:
    node = address.get("nodeName")
    ref = address.get("targetRef") or {}
    labels = {"namespace": namespace}
    if node:
        labels["node"] = node
    if ref.get("kind") == "Pod" and ref.get("name"):
        labels["pod"] = ref["name"]
    host = f"[{ip}]" if ":" in ip else ip
    return {"name": node or ref.get("name") or ip, "url": f"{scheme}://{host}:{port}",
            "labels": labels}


def endpoints_to_hosts(doc: Any, *, port_name: str = PORT_NAME,
                       scheme: str = "http") -> tuple[list[dict[str, Any]], int]:
    """Inventory hosts (sorted by name) and the number of not-ready addresses skipped."""
    hosts: list[dict[str, Any]] = []
    not_ready = 0
    for obj in _objects(doc):
        kind = obj.get("kind")
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "")
        where = f"{kind} {namespace}/{meta.get('name', '?')}"
        if kind == "Endpoints":
            for subset in obj.get("subsets") or []:
                port = _port(subset.get("ports") or [], port_name, where)
                for address in subset.get("addresses") or []:
                    hosts.append(_host(address["ip"], port, scheme, address, namespace))
                not_ready += len(subset.get("notReadyAddresses") or [])
        elif kind == "EndpointSlice":
            endpoints = obj.get("endpoints") or []
            if not endpoints:
                continue
            port = _port(obj.get("ports") or [], port_name, where)
            for ep in endpoints:
                # EndpointSlice: ready unset means ready (the API's documented default).
                if (ep.get("conditions") or {}).get("ready") is False:
                    not_ready += 1
                    continue
                for ip in (ep.get("addresses") or [])[:1]:  # addresses of one pod
                    hosts.append(_host(ip, port, scheme, ep, namespace))
        else:
            raise InventoryError(f"{kind or 'an object without kind'}: expected Endpoints "
                                 "or EndpointSlice")
    hosts.sort(key=lambda h: (h["name"], h["url"]))
    return hosts, not_ready


def inventory_from_kubernetes(doc: Any, *, token_file: str | None = None,
                              port_name: str = PORT_NAME,
                              scheme: str = "http") -> tuple[dict[str, Any], int]:
    """The inventory (``defaults`` when ``token_file``, then ``hosts``) and the number of
    agents left out because they were not ready."""
    hosts, not_ready = endpoints_to_hosts(doc, port_name=port_name, scheme=scheme)
    inventory: dict[str, Any] = {}
    if token_file:
        inventory["defaults"] = {"token_file": token_file}
    inventory["hosts"] = hosts
    return inventory, not_ready


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ebpf-agentctl inventory from-kubernetes",
        description="Inventory YAML from `kubectl get endpoints|endpointslices -o json` "
                    "on stdin.")
    parser.add_argument("--token-file", help="defaults.token_file for every host")
    parser.add_argument("--port-name", default=PORT_NAME, help="the Service port (api)")
    parser.add_argument("--scheme", choices=["http", "https"], default="http")
    args = parser.parse_args(argv)
    try:
        inventory, not_ready = inventory_from_kubernetes(
            json.load(sys.stdin), token_file=args.token_file, port_name=args.port_name,
            scheme=args.scheme)
    except (InventoryError, KeyError, TypeError, ValueError) as e:  # JSONDecodeError too
        print(f"ebpf-agentctl: inventory from-kubernetes: {e}", file=sys.stderr)
        return 2
    if not_ready:
        print(f"ebpf-agentctl: {not_ready} agent(s) not ready, left out", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(inventory, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
