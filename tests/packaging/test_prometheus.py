"""The agent's metrics and the Prometheus files checked by Prometheus itself: promtool on a
live /metrics with every monitor running, promtool on packaging/prometheus/, and a real
Prometheus server scraping two real agents with bearer tokens."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.api import Agent, free_port, start_agent, wait_until_ready

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging" / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool missing (make install installs prometheus)")


def promtool(*args: str, stdin: bytes | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, cwd=cwd,
                          timeout=60)


# -- packaging/prometheus ------------------------------------------------------------------
@pytest.fixture
def installed(tmp_path: Path) -> Path:
    """packaging/prometheus as an operator installs it: the files unchanged, plus the
    token file the scrape config reads (relative to the config)."""
    for f in PACKAGING.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "ebpf-agent.token").write_text("scrape-token\n")
    return tmp_path


def test_scrape_config_passes_promtool_check_config(installed: Path) -> None:
    done = promtool("check", "config", str(installed / "prometheus.yml"))
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    assert b"SUCCESS" in done.stdout


def test_alert_rules_pass_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(PACKAGING / "alerts.yml"))
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    rules = yaml.safe_load((PACKAGING / "alerts.yml").read_text())["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"EbpfAgentKernelDrops", "EbpfAgentUserspaceDrops", "EbpfAgentMonitorFailed",
            "EbpfAgentSubscriberFallingBehind", "EbpfAgentMemoryHigh"} <= names
    assert f"SUCCESS: {len(rules)} rules found".encode() in done.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", "alerts_test.yml", cwd=PACKAGING)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


# -- /metrics of a live agent --------------------------------------------------------------
@pytest.mark.kernel
def test_metrics_with_every_monitor_pass_promtool(kernel: None, tmp_path: Path) -> None:
    agent = start_agent(tmp_path, {"monitors": {
        "exec": {"enabled": True},
        "syscall": {"enabled": True, "options": {"per_process": True}},
        "func": {"enabled": True, "options": {"patterns": ["c:getpid"]}},
    }})
    try:
        states = {m["name"]: m["state"] for m in agent.get("/monitors").json()}
        assert {k: states[k] for k in ("exec", "syscall", "func")} == {
            "exec": "running", "syscall": "running", "func": "running"}
        subprocess.run(["/bin/true"], check=True)
        subprocess.run(["python3", "-c", "import os; [os.getpid() for _ in range(100)]"],
                       check=True)
        metrics = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the per-function series has a call
            metrics = agent.get("/metrics").content
            if re.search(rb'^ebpf_agent_func_calls_total\{function="[^"]*:getpid"\} [1-9]',
                         metrics, re.M):
                break
            time.sleep(0.5)
    finally:
        assert agent.stop() == 0
    text = metrics.decode()
    for series in (  # one of each kind, the per-syscall and per-function ones included
        'ebpf_agent_monitor_events_delivered_total{monitor="exec"}',
        'ebpf_agent_syscall_calls_total{syscall="execve"}',
        'ebpf_agent_func_calls_total{function="libc.so.6:getpid"}',
        'ebpf_agent_event_delivery_latency_seconds_bucket{le="+Inf",monitor="exec"}',
        'ebpf_agent_api_request_duration_seconds_bucket{le="+Inf",method="GET",'
        'route="/monitors",status="200"}',
        'ebpf_agent_monitor_failed{monitor="func"} 0.0',
    ):
        assert series in text, series
    done = promtool("check", "metrics", stdin=metrics)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


# -- a real Prometheus server --------------------------------------------------------------
class Prometheus:
    def __init__(self, tmp_path: Path, scrape_configs: list[dict[str, Any]]) -> None:
        config = yaml.safe_load((PACKAGING / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s",
                            "scrape_timeout": "1s"}
        config["rule_files"] = [str(PACKAGING / "alerts.yml")]
        config["scrape_configs"] = scrape_configs
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]

    def wait(self, what: str, check: Any, timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                last = check()
                if last:
                    return last
            time.sleep(0.5)
        raise AssertionError(f"{what} not within {timeout}s; last: {last}\n"
                             f"{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def two_agents(kernel: None, tmp_path: Path) -> Iterator[dict[str, Agent]]:
    """Two real agents with their own tokens, counting only execs of a program named
    PROBE (a comm target), so the counts are exact whatever else runs on the host. Each
    also has a `read`-scope token named "prometheus": what the scrape uses."""
    agents: dict[str, Agent] = {}
    try:
        for name in ("a", "b"):
            d = tmp_path / f"agent-{name}"
            d.mkdir()
            config = {"targets": {"comms": [PROBE]},
                      "tokens": [{"name": "prometheus", "scope": "read",
                                  "token": read_token(name)}]}
            agents[name] = start_agent(d, config, token=f"token-{name}-0123456789abcdef",
                                       wait_ready=False)
        for agent in agents.values():
            wait_until_ready(agent)
        yield agents
    finally:
        for agent in agents.values():
            agent.stop()


def read_token(agent_name: str) -> str:
    return f"read-{agent_name}-0123456789abcdef"


PROBE = "i11promprobe"


def test_prometheus_scrapes_two_agents_with_bearer_tokens(
        two_agents: dict[str, Agent], tmp_path: Path) -> None:
    # The shipped job as the template: its metrics path and authorization, with each
    # agent's token in its own credentials file (a job per token).
    template = next(j for j in yaml.safe_load((PACKAGING / "prometheus.yml").read_text())
                    ["scrape_configs"] if j["job_name"] == "ebpf-agent")
    jobs = []
    for name, agent in two_agents.items():
        token_file = tmp_path / f"token-{name}"
        token_file.write_text(read_token(name))
        # The read token scrapes but cannot change anything.
        refused = httpx.post(f"{agent.url}/monitors/exec/stop",
                             headers={"Authorization": f"Bearer {read_token(name)}"})
        assert refused.status_code == 403, refused.text
        job = {**template, "job_name": f"ebpf-agent-{name}",
               "authorization": {**template["authorization"],
                                 "credentials_file": str(token_file)},
               "static_configs": [{"targets": [agent.url.removeprefix("http://")]}]}
        jobs.append(job)
    (tmp_path / "prom").mkdir()
    prom = Prometheus(tmp_path / "prom", jobs)
    try:
        def targets_up() -> bool:
            active = prom.api("targets")["activeTargets"]
            return len(active) == 2 and all(t["health"] == "up" for t in active)

        prom.wait("both targets up", targets_up)
        query = 'ebpf_agent_monitor_events_delivered_total{monitor="exec"}'

        def counts() -> dict[str, float]:
            result = prom.api("query", query=query)["result"]
            return {r["metric"]["job"].removeprefix("ebpf-agent-"): float(r["value"][1])
                    for r in result}

        before = prom.wait("the exec counter of both agents", lambda: len(counts()) == 2
                           and counts())
        probe = tmp_path / PROBE
        shutil.copy("/bin/true", probe)
        for _ in range(5):
            subprocess.run([str(probe)], check=True)
        after = prom.wait("both counters up by 5",
                          lambda: (c := counts()) and all(
                              c[n] >= before[n] + 5 for n in ("a", "b")) and c)
        assert after == {n: before[n] + 5 for n in ("a", "b")}, (before, after)
        # The alert rules loaded in the real server; healthy agents raise none of the
        # down/drop/failure alerts. (The delivery latency one depends on this machine's
        # load: a pending p99 > 1 s is possible on a busy 2-core VM, so it is not judged.)
        groups = prom.api("rules")["groups"]
        assert [g["name"] for g in groups] == ["ebpf-agent"]
        assert len(groups[0]["rules"]) == 7
        alerts = prom.api("alerts")["alerts"]
        assert [a for a in alerts if a["labels"]["alertname"]
                != "EbpfAgentDeliveryLatencyHigh"] == [], alerts
    finally:
        prom.stop()
