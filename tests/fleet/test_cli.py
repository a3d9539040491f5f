"""ebpf-agentctl against fake agents served in-process (real HTTP, fake monitors): every
command, output formats, exit codes, per-host errors, timeouts, merged events, leases."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.fleet import Background, FakeAgent, TcpProxy, agentctl, fake_agents, free_port

TOKEN = "fleet-token-0123456789"


@pytest.fixture
def agents() -> Iterator[list[FakeAgent]]:
    with fake_agents(["a", "b", "c"], TOKEN, stream={"heartbeat_s": 0.5}) as agents:
        yield agents


def hosts(agents: list[FakeAgent]) -> list[str]:
    out = ["--token", TOKEN]
    for a in agents:
        out += ["--host", f"{a.name}={a.url}"]
    return out


def api(agent: FakeAgent, method: str, path: str, **kw: object) -> httpx.Response:
    return httpx.request(method, agent.url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=10, **kw)  # type: ignore[arg-type]


def test_status_start_stop_targets_on_every_host(agents: list[FakeAgent]) -> None:
    r = agentctl(*hosts(agents), "start", "fake", "--option", "level=4", "--lease", "300")
    assert r.returncode == 0, r.stderr
    assert [line.split()[:2] for line in r.stdout.splitlines()[1:]] == [
        ["a", "running"], ["b", "running"], ["c", "running"]]
    for a in agents:
        info = api(a, "GET", "/monitors/fake").json()
        assert info["options"]["level"] == 4 and info["lease"]["lease_s"] == 300

    r = agentctl(*hosts(agents), "targets", "add", "pids", "10,11", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True
    assert {n: h["result"]["pids"] for n, h in doc["hosts"].items()} == {
        "a": [10, 11], "b": [10, 11], "c": [10, 11]}
    r = agentctl(*hosts(agents), "targets", "remove", "pids", "10")
    assert r.returncode == 0 and r.stdout.count("pids=11") == 3
    r = agentctl(*hosts(agents), "targets", "set", "comms", "bash", "sh")
    assert r.returncode == 0 and all(api(a, "GET", "/targets").json()["comms"] == ["bash", "sh"]
                                     for a in agents)

    r = agentctl(*hosts(agents), "status", "-o", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for name in "abc":
        status = doc["hosts"][name]["result"]
        assert status["reachable"] is True and status["version"]
        fake = next(m for m in status["monitors"] if m["name"] == "fake")
        assert fake["state"] == "running" and fake["lease"]["lease_s"] == 300
        assert status["targets"]["pids"] == [11]
    table = agentctl(*hosts(agents), "status").stdout.splitlines()
    assert table[0].split()[:3] == ["HOST", "STATE", "VERSION"]
    assert all(" up " in line and "fake:running" in line for line in table[1:])

    r = agentctl(*hosts(agents), "stats", "fake")
    assert r.returncode == 0 and r.stdout.count(" running ") == 3
    r = agentctl(*hosts(agents), "capabilities", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["hosts"]["a"]["result"]["kernel"] == "test"

    r = agentctl(*hosts(agents), "stop", "fake")
    assert r.returncode == 0
    assert all(api(a, "GET", "/monitors/fake").json()["state"] == "stopped" for a in agents)


def test_failures_are_per_host_lines_and_exit_1(agents: list[FakeAgent]) -> None:
    dead = f"dead=http://127.0.0.1:{free_port()}"
    args = ["--host", f"a={agents[0].url}", "--host", dead, "--token", TOKEN]
    r = agentctl(*args, "status")
    assert r.returncode == 1
    assert r.stderr.strip() == ("ebpf-agentctl: dead: unreachable (All connection attempts "
                                "failed)")
    assert "DOWN" in next(line for line in r.stdout.splitlines() if line.startswith("dead"))

    # A wrong token is a 401 line; an agent's refusal carries its reason.
    inv = ["--host", f"a={agents[0].url}", "--host", f"b={agents[1].url}"]
    r = agentctl(*inv, "--token", "wrong", "status")
    assert r.returncode == 1
    assert "ebpf-agentctl: a: 401 missing or wrong token" in r.stderr.splitlines()
    r = agentctl(*inv, "--token", TOKEN, "start", "needy")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith("ebpf-agentctl: a: 409 needy cannot run on this kernel")
    r = agentctl(*inv, "--token", TOKEN, "start", "fake", "--option", "level=99", "-o", "json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["hosts"]["b"]["status"] == 422
    assert "level: Input should be less than or equal to 10" in doc["hosts"]["b"]["error"]

    # Usage errors: exit 2, nothing contacted.
    assert agentctl("status").returncode == 2
    r = agentctl(*inv, "--select", "role=db", "status")
    assert r.returncode == 2 and "matches no host" in r.stderr


@pytest.fixture
def silent_host() -> Iterator[str]:
    """Accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    t.join(5)
    for s in held:
        s.close()
    server.close()


def test_a_silent_host_times_out_alone(agents: list[FakeAgent], silent_host: str) -> None:
    # The timeout applies to the answering hosts too: their first status (fresh agents)
    # took over 1 s on a loaded machine, so they timed out as well. They answer once
    # first, with the default timeout; then 5 s leaves them room.
    r = agentctl(*hosts(agents), "status")
    assert r.returncode == 0, r.stderr
    for parallel in ("1", "8"):
        r = agentctl(*hosts(agents), "--host", f"slow={silent_host}", "--timeout", "5",
                     "--parallel", parallel, "status", "-o", "json")
        assert r.returncode == 1
        doc = json.loads(r.stdout)
        assert doc["hosts"]["slow"]["error"] == "timeout (no answer in 5s)"
        assert all(doc["hosts"][n]["ok"] for n in "abc"), doc["hosts"]


def test_inventory_select_and_environment(agents: list[FakeAgent], tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN)
    inv = tmp_path / "fleet-inventory.yaml"
    entries = "".join(
        f"  - {{name: {a.name}, url: '{a.url}', "
        f"labels: {{role: {'db' if a.name == 'c' else 'web'}}}}}\n" for a in agents)
    inv.write_text(f"defaults:\n  token_file: {tmp_path / 'token'}\nhosts:\n{entries}")
    r = agentctl("-i", str(inv), "--select", "role=web", "start", "fake")
    assert r.returncode == 0, r.stderr
    assert [api(a, "GET", "/monitors/fake").json()["state"] for a in agents] == [
        "running", "running", "stopped"]
    import os

    env = {**os.environ, "EBPF_AGENTCTL_INVENTORY": str(inv)}
    r = agentctl("status", "--select", "role=db", "-o", "json", env=env)
    assert r.returncode == 0 and list(json.loads(r.stdout)["hosts"]) == ["c"]


def test_apply_and_diff(agents: list[FakeAgent], tmp_path: Path) -> None:
    api(agents[1], "POST", "/monitors/plain/start")
    desired = tmp_path / "fleet.yaml"
    desired.write_text("monitors:\n  fake: {level: 5}\ntargets:\n  uids: [1000]\n")
    r = agentctl(*hosts(agents), "diff", str(desired))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "a: would start fake (level=5, label=\"x\")" in lines
    assert "b: would stop plain" in lines
    assert "c: would edit targets uids: +1000" in lines
    assert all(api(a, "GET", "/state").json()["monitors"].keys() <= {"plain"} for a in agents)

    r = agentctl(*hosts(agents), "apply", str(desired))
    assert r.returncode == 0, r.stderr
    assert "b: stop plain" in r.stdout.splitlines()
    for a in agents:
        state = api(a, "GET", "/state").json()
        assert state["monitors"] == {"fake": {"level": 5, "label": "x"}}
        assert state["targets"]["uids"] == [1000]
    r = agentctl(*hosts(agents), "diff", str(desired))
    assert r.stdout.splitlines() == ["a: in sync", "b: in sync", "c: in sync"]

    # A start that fails on one host: that host is rolled back and reported; others apply.
    bad = tmp_path / "bad.yaml"
    bad.write_text("monitors:\n  fake: {level: 6}\n  needy: {}\n")
    r = agentctl(*hosts(agents), "apply", str(bad))
    assert r.returncode == 1
    assert "rolled back" in r.stderr
    assert all(api(a, "GET", "/state").json()["monitors"]["fake"]["level"] == 5 for a in agents)
    (tmp_path / "broken.yaml").write_text("monitors: [1]\n")
    assert agentctl(*hosts(agents), "apply", str(tmp_path / "broken.yaml")).returncode == 2


def sleep_past(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


# Leases granted before the controller starts: its first renewal comes once it started
# (ebpf-agentctl takes seconds to start on a loaded machine), so a lease shorter than
# that expires before the state the tests need (renewals running).
LEASE_S = 8


def test_events_merged_tagged_and_a_host_going_down(agents: list[FakeAgent]) -> None:
    for a in agents:  # events renews the leases while it runs
        api(a, "POST", "/monitors/fake/start", params={"lease_s": LEASE_S})
    granted = time.monotonic()
    ev = Background(*hosts(agents), "events", "-o", "json", "--monitor", "fake")
    try:
        for name in "abc":
            ev.wait_line(ev.err, lambda s, n=name: s == f"ebpf-agentctl: {n}: streaming")
        for a in agents:
            a.fake.inbox.put({"pid": 4242, "marker": f"m1-{a.name}"})
        for a in agents:
            line = ev.wait_line(ev.out, lambda s, a=a: f"m1-{a.name}" in s)
            assert json.loads(line) == {"host": a.name, "monitor": "fake", "pid": 4242,
                                        "marker": f"m1-{a.name}"}
        agents[1].server.stop()
        ev.wait_line(ev.err, lambda s: s.startswith("ebpf-agentctl: b: down"))
        start = len(ev.out)
        agents[0].fake.inbox.put({"pid": 1, "marker": "m2-a"})
        agents[2].fake.inbox.put({"pid": 1, "marker": "m2-c"})
        ev.wait_line(ev.out, lambda s: "m2-a" in s, start=start)
        ev.wait_line(ev.out, lambda s: "m2-c" in s, start=start)
        sleep_past(granted + LEASE_S + 1)  # past the lease granted at the start
        for a in (agents[0], agents[2]):
            assert api(a, "GET", "/monitors/fake").json()["state"] == "running"
    finally:
        code = ev.stop()
    assert code == 1  # b was down at the end
    assert any("b: down at the end" in line for line in ev.err)
    markers = [json.loads(line)["marker"] for line in ev.out]
    assert sorted(markers) == ["m1-a", "m1-b", "m1-c", "m2-a", "m2-c"]  # each exactly once


def test_leases_renewed_while_keepalive_runs(agents: list[FakeAgent]) -> None:
    r = agentctl(*hosts(agents), "start", "fake", "--lease", str(LEASE_S))
    assert r.returncode == 0, r.stderr
    granted = time.monotonic()
    keep = Background(*hosts(agents), "keepalive")
    try:
        sleep_past(granted + LEASE_S + 2)  # past the lease: only renewals kept it
        assert all(api(a, "GET", "/monitors/fake").json()["state"] == "running" for a in agents)
    finally:
        keep.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [api(a, "GET", "/monitors/fake").json() for a in agents]
        if all(s["state"] == "stopped" for s in states):
            break
        time.sleep(0.2)
    assert all(s["reason"].startswith("lease expired at") for s in states)


def test_events_resume_with_last_event_id_after_a_disconnect(agents: list[FakeAgent]) -> None:
    """The agent stays up while the connection is cut: what it published meanwhile comes
    from its replay buffer when the controller reconnects, each event once."""
    a = agents[0]
    proxy = TcpProxy(int(a.url.rsplit(":", 1)[1])).up()
    api(a, "POST", "/monitors/fake/start")
    ev = Background("--token", TOKEN, "--host", f"a={proxy.url}", "events", "-o", "json")
    try:
        ev.wait_line(ev.err, lambda s: s == "ebpf-agentctl: a: streaming")
        a.fake.inbox.put({"pid": 1, "marker": "r1"})
        ev.wait_line(ev.out, lambda s: '"r1"' in s)
        proxy.down()
        ev.wait_line(ev.err, lambda s: s.startswith("ebpf-agentctl: a: down"))
        for m in ("r2", "r3"):  # published while the controller cannot read
            a.fake.inbox.put({"pid": 1, "marker": m})
        deadline = time.monotonic() + 15
        while api(a, "GET", "/stats").json()["streams"]["published"] < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proxy.up()
        ev.wait_line(ev.err, lambda s: s.startswith("ebpf-agentctl: a: back, resuming after id"))
        ev.wait_line(ev.out, lambda s: '"r3"' in s)
        a.fake.inbox.put({"pid": 1, "marker": "r4"})
        ev.wait_line(ev.out, lambda s: '"r4"' in s)
    finally:
        code = ev.stop()
        proxy.down()
    assert code == 0
    assert [json.loads(line)["marker"] for line in ev.out] == ["r1", "r2", "r3", "r4"]


@pytest.mark.parametrize(("option", "bound"), [([], 0), (["--max-lag-ms", "250"], 250),
                                               (["--max-lag-ms", "0"], 0)])
def test_events_asks_each_host_for_its_max_lag(agents: list[FakeAgent], option: list[str],
                                               bound: int) -> None:
    """--max-lag-ms is each host's max_lag_ms query parameter: the agents' /stats show it
    on the controller's subscription (these agents' own stream.max_lag_ms is 0)."""
    ev = Background(*hosts(agents), "events", "-o", "json", *option)
    try:
        for name in "abc":
            ev.wait_line(ev.err, lambda s, n=name: s == f"ebpf-agentctl: {n}: streaming")
        for a in agents:
            subs = api(a, "GET", "/stats").json()["streams"]["subscribers"]
            assert [(s["kind"], s["max_lag_ms"]) for s in subs] == [("sse", bound)]
    finally:
        ev.stop()


@pytest.mark.parametrize(("args", "message"), [
    (["--max-lag-ms", "-1"], "--max-lag-ms: 0 (never skip) or a positive number of ms"),
    (["--max-lag-ms", "100", "--from", "nats://127.0.0.1:1"],
     "--max-lag-ms: the hosts' streams only, not --from"),
])
def test_events_refuses_a_max_lag_it_cannot_apply(agents: list[FakeAgent], args: list[str],
                                                  message: str) -> None:
    r = agentctl(*hosts(agents), "events", *args)
    assert r.returncode == 2
    assert message in r.stderr
