"""`ebpf-agentctl inventory from-kubernetes` (agent/fleet/kubernetes.py): kubectl's JSON for
the agents' Service in, inventory YAML out."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.fleet.kubernetes import InventoryError, inventory_from_kubernetes

REPO = Path(__file__).resolve().parents[2]

# `kubectl -n ebpf-agent get endpoints ebpf-agent -o json`, trimmed to what matters.
ENDPOINTS: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Endpoints",
    "metadata": {"name": "ebpf-agent", "namespace": "ebpf-agent"},
    "subsets": [{
        "addresses": [
            {"ip": "10.244.1.7", "nodeName": "node-b",
             "targetRef": {"kind": "Pod", "name": "ebpf-agent-x2k9p", "namespace": "ebpf-agent"}},
            {"ip": "10.244.0.5", "nodeName": "node-a",
             "targetRef": {"kind": "Pod", "name": "ebpf-agent-7fq4d", "namespace": "ebpf-agent"}},
        ],
        "notReadyAddresses": [
            {"ip": "10.244.2.9", "nodeName": "node-c",
             "targetRef": {"kind": "Pod", "name": "ebpf-agent-zz81m"}},
        ],
        "ports": [{"name": "api", "port": 8765, "protocol": "TCP"}],
    }],
}

SLICES: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [{
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "ebpf-agent-abcde", "namespace": "ebpf-agent"},
        "addressType": "IPv6",
        "endpoints": [
            {"addresses": ["fd00::7"], "conditions": {"ready": True}, "nodeName": "node-a",
             "targetRef": {"kind": "Pod", "name": "ebpf-agent-7fq4d"}},
            {"addresses": ["fd00::9"], "conditions": {"ready": False}, "nodeName": "node-c"},
        ],
        "ports": [{"name": "api", "port": 8765, "protocol": "TCP"}],
    }],
}


def test_endpoints_become_one_host_per_ready_node() -> None:
    inventory, not_ready = inventory_from_kubernetes(ENDPOINTS, token_file="/etc/ctl/token")
    assert inventory == {
        "defaults": {"token_file": "/etc/ctl/token"},
        "hosts": [
            {"name": "node-a", "url": "http://10.244.0.5:8765",
             "labels": {"namespace": "ebpf-agent", "node": "node-a", "pod": "ebpf-agent-7fq4d"}},
            {"name": "node-b", "url": "http://10.244.1.7:8765",
             "labels": {"namespace": "ebpf-agent", "node": "node-b", "pod": "ebpf-agent-x2k9p"}},
        ],
    }
    assert not_ready == 1


def test_endpoint_slices_ipv6_and_https() -> None:
    inventory, not_ready = inventory_from_kubernetes(SLICES, scheme="https")
    assert inventory == {"hosts": [
        {"name": "node-a", "url": "https://[fd00::7]:8765",
         "labels": {"namespace": "ebpf-agent", "node": "node-a", "pod": "ebpf-agent-7fq4d"}},
    ]}
    assert not_ready == 1


@pytest.mark.parametrize(("doc", "message"), [
    ({"kind": "Service", "metadata": {"name": "x"}}, "expected Endpoints or EndpointSlice"),
    ({**ENDPOINTS, "subsets": [{**ENDPOINTS["subsets"][0],
                                "ports": [{"name": "metrics", "port": 9090},
                                          {"name": "other", "port": 1}]}]},
     "no port named 'api' (ports: metrics, other)"),
    ([1, 2], "expected a JSON object"),
])
def test_wrong_input_is_refused_with_the_reason(doc: Any, message: str) -> None:
    with pytest.raises(InventoryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        inventory_from_kubernetes(doc)


def run_cli(stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    ctl = str(REPO / ".venv" / "bin" / "ebpf-agentctl")
    return subprocess.run([ctl, "inventory", "from-kubernetes", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO, timeout=60)


def test_command_reads_kubectl_json_on_stdin_and_prints_yaml() -> None:
    done = run_cli(json.dumps(ENDPOINTS), "--token-file", "/etc/ctl/token")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout) == inventory_from_kubernetes(
        ENDPOINTS, token_file="/etc/ctl/token")[0]
    assert done.stderr == "ebpf-agentctl: 1 agent(s) not ready, left out\n"


def test_command_exits_2_on_bad_input() -> None:
    done = run_cli("not json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("ebpf-agentctl: inventory from-kubernetes: ")


def test_output_is_an_inventory_ebpf_agentctl_loads(tmp_path: Path) -> None:
    from agent.fleet.inventory import load_inventory

    token = tmp_path / "token"
    token.write_text("fleet-token-0123456789\n")
    token.chmod(0o600)
    done = run_cli(json.dumps(ENDPOINTS), "--token-file", str(token))
    assert done.returncode == 0, done.stderr
    path = tmp_path / "inventory.yaml"
    path.write_text(done.stdout)
    hosts = load_inventory(path, token_fallback=None)
    assert [(h.name, h.url, h.token, h.labels["node"]) for h in hosts] == [
        ("node-a", "http://10.244.0.5:8765", "fleet-token-0123456789", "node-a"),
        ("node-b", "http://10.244.1.7:8765", "fleet-token-0123456789", "node-b"),
    ]
