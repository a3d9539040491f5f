#!/usr/bin/env python3
"""Writes docs/ui.png: the /ui console of a real agent with live events.

Run as root from the repository (the agent loads BPF programs):
    .venv/bin/python scripts/screenshot.py [--out docs/ui.png]

It starts `ebpf-agent serve` on a free loopback port with a throw-away token and
config, logs in with headless Debian chromium (Playwright), starts nothing by hand (exec
and syscall are autostarted), runs a few commands so that events appear, picks a
syscall for the histogram and takes the picture. Everything is removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.browser import browser_problem, chromium  # noqa: E402

WORKLOAD = [
    ["uname", "-sr"],
    ["ls", "-l", "/etc/hostname"],
    ["sh", "-c", "echo backup started; sleep 0.1"],
    ["date", "+%F %T"],
    ["/bin/echo", "argv is shown as text:", "<img src=x onerror=alert(1)>"],
    ["id", "-u"],
    ["cat", "/proc/loadavg"],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(tmp: Path, token: str, port: int) -> subprocess.Popen[bytes]:
    config = {
        "api": {"runtime_dir": str(tmp / "run"), "port": port},
        "output": {"directory": str(tmp / "out"), "formats": []},
        "tokens": [{"name": "operator", "scope": "control", "token": token}],
        "monitors": {"exec": {"enabled": True}, "syscall": {"enabled": True}},
    }
    path = tmp / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBPF_AGENT_")}
    log = open(tmp / "agent.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([str(REPO / ".venv" / "bin" / "ebpf-agent"), "--config",
                             str(path), "serve"], stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, token: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the agent exited with {proc.returncode}")
        try:
            r = httpx.get(f"{url}/ready", headers={"Authorization": f"Bearer {token}"})
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the agent did not become ready")


def take(url: str, token: str, out: Path) -> None:
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1440, "height": 1400})
        page.set_default_timeout(30_000)
        page.goto(f"{url}/ui")
        page.get_by_test_id("token-input").fill(token)
        page.get_by_test_id("login").click()
        page.get_by_test_id("monitor-exec-state").wait_for()
        time.sleep(1.5)  # the event stream connects
        for _ in range(3):
            for cmd in WORKLOAD:
                subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        time.sleep(3.5)  # stats, syscall tables and histogram refresh
        rows = page.locator("#sc-time tbody tr")
        if rows.count():
            rows.first.click()
            time.sleep(3.5)
        page.get_by_test_id("who").scroll_into_view_if_needed()  # the click scrolled
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ui.png")
    args = parser.parse_args()
    if (problem := browser_problem()) is not None:
        print(f"screenshot.py: {problem}", file=sys.stderr)
        return 1
    token = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="ebpf-agent-shot-") as d:
        proc = start_agent(Path(d), token, port)
        try:
            wait_ready(url, token, proc)
            take(url, token, args.out)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
