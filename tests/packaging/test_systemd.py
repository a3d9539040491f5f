"""packaging/systemd/ebpf-agent.service checked by systemd's own tools, and its token
wiring (LoadCredential= + token_file) exercised with a real agent."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.api import Agent, free_port, wait_until_ready, write_config

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "ebpf-agent.service"
AGENT_BIN = REPO / ".venv" / "bin" / "ebpf-agent"
# `systemd-analyze security --offline=true` of the unit before issue 11 (commit 5c5974a).
BASELINE_EXPOSURE = 4.6

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze missing (make install installs it)")


def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout's binary (/opt/ebpf-agent does not
    exist here, and verify checks that the binary does)."""
    text = UNIT.read_text()
    text, n = re.subn(r"^ExecStart=\S+", f"ExecStart={AGENT_BIN}", text, flags=re.M)
    assert n == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    done = subprocess.run(["systemd-analyze", "verify", str(unit_copy(tmp_path))],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def test_unit_exposure_is_no_worse_than_before(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(unit_copy(tmp_path))], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", done.stdout)
    assert m, done.stdout[-2000:]
    exposure = float(m.group(1))
    with capsys.disabled():
        print(f"\n[systemd] {UNIT.name}: exposure {exposure} {m.group(2)} "
              f"(before issue 11: {BASELINE_EXPOSURE})")
    assert exposure <= BASELINE_EXPOSURE


def unit_environment(credentials_dir: Path) -> dict[str, str]:
    """The unit's Environment= assignments, with %d (the credentials directory) expanded
    as systemd expands it."""
    env = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value.replace("%d", str(credentials_dir))
    return env


def test_unit_loads_the_token_as_a_credential() -> None:
    text = UNIT.read_text()
    assert re.search(r"^LoadCredential=token:/etc/ebpf-agent/token$", text, re.M)
    assert "EBPF_AGENT_TOKEN=" not in text  # the token itself is never in the environment
    assert unit_environment(Path("/run/credentials/ebpf-agent.service")) == {
        "EBPF_AGENT_TOKEN_FILE": "/run/credentials/ebpf-agent.service/token"}


def test_agent_reads_the_token_from_the_credentials_directory(tmp_path: Path) -> None:
    """What systemd does with LoadCredential=, without systemd: the token file in a
    credentials directory, the unit's Environment= lines, a real `ebpf-agent serve`."""
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "token").write_text("credential-token-0123456789\n")
    (creds / "token").chmod(0o400)  # as systemd leaves a credential: root-only, read-only
    port = free_port()
    config = write_config(tmp_path, {"monitors": {}})
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(AGENT_BIN), "--config", str(config), "serve", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            env={**env, **unit_environment(creds)})
    token = "credential-token-0123456789"
    agent = Agent(proc, f"http://127.0.0.1:{port}", token, log,
                  {"Authorization": f"Bearer {token}"})
    try:
        wait_until_ready(agent)
        assert agent.get("/monitors").status_code == 200
        with httpx.Client(base_url=agent.url, timeout=30) as c:
            assert c.get("/monitors").status_code == 401
            assert c.get("/monitors", headers={"Authorization": "Bearer wrong"}).status_code \
                == 401
    finally:
        assert agent.stop() == 0
