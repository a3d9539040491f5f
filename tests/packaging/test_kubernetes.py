"""packaging/kubernetes/ validated offline by kubernetes-validate --strict, the properties an
operator relies on, and the readiness probe's command run against a real agent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.api import start_agent

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "packaging" / "kubernetes"
VALIDATE = REPO / ".venv" / "bin" / "kubernetes-validate"
MANIFESTS = sorted(K8S.glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return doc


def offline_env() -> dict[str, str]:
    """Any attempt to download a schema would fail: the check is offline."""
    dead = "http://127.0.0.1:9"
    return {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead,
            "https_proxy": dead, "NO_PROXY": ""}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_kubernetes_validate_strict(manifest: Path) -> None:
    done = subprocess.run([str(VALIDATE), "--strict", str(manifest)], capture_output=True,
                          text=True, env=offline_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " passed for resource " in done.stdout + done.stderr


def test_strict_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    bad = tmp_path / "daemonset.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text().replace("hostPID:", "hostPid:"))
    done = subprocess.run([str(VALIDATE), "--strict", str(bad)], capture_output=True,
                          text=True, env=offline_env(), timeout=120)
    assert done.returncode != 0
    assert "'hostPid' was unexpected" in done.stdout + done.stderr


def test_manifest_set_is_complete() -> None:
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS}
    assert kinds == {"Namespace", "DaemonSet", "Service", "NetworkPolicy"}


def test_daemonset_runs_the_agent_as_documented() -> None:
    ds = load("daemonset.yaml")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork")
    sec = container["securityContext"]
    assert sec["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON"]}
    assert sec["privileged"] is False and sec["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf", "/lib/modules", "/usr/src",
                 "/run/secrets/ebpf-agent"):
        assert mounts[path]["readOnly"] is True, path
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "ebpf-agent-token"
    env = {e["name"]: e for e in container["env"]}
    assert env["EBPF_AGENT_TOKEN_FILE"]["value"] == "/run/secrets/ebpf-agent/token"
    assert "EBPF_AGENT_TOKEN" not in env  # the token only as a mounted Secret file
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "/ready" in container["readinessProbe"]["exec"]["command"][-1]
    assert set(container["resources"]) == {"requests", "limits"}


def test_service_and_network_policy_select_the_agents() -> None:
    labels = load("daemonset.yaml")["spec"]["template"]["metadata"]["labels"]
    svc = load("service.yaml")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == labels
    assert svc["spec"]["ports"] == [{"name": "api", "port": 8765, "targetPort": "api",
                                     "protocol": "TCP"}]
    policy = load("networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"] == labels
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ebpf-agent-controller"}}}]


def test_readiness_probe_command_against_a_real_agent(tmp_path: Path) -> None:
    """The probe's exact command (with this venv's python) passes against a ready agent
    with the mounted token and fails with a wrong one: /ready needs the token."""
    container = load("daemonset.yaml")["spec"]["template"]["spec"]["containers"][0]
    command = container["readinessProbe"]["exec"]["command"]
    assert command[0] == "/opt/ebpf-agent/.venv/bin/python"
    command = [str(REPO / ".venv" / "bin" / "python"), *command[1:]]
    agent = start_agent(tmp_path, {"monitors": {}}, token="k8s-token-0123456789")
    try:
        token_file = tmp_path / "token"
        env = {**os.environ, "POD_IP": "127.0.0.1", "EBPF_AGENT_TOKEN_FILE": str(token_file)}
        port = agent.url.rsplit(":", 1)[1]
        command[-1] = command[-1].replace(":8765/", f":{port}/")
        token_file.write_text("k8s-token-0123456789\n")
        assert subprocess.run(command, env=env, capture_output=True).returncode == 0
        token_file.write_text("wrong\n")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 1 and "401" in done.stderr
    finally:
        assert agent.stop() == 0
