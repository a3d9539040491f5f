"""export.nats against a real NATS server (nats-server -js, started on loopback by the
test): every event published once with host and Nats-Msg-Id, the accounting
produced = published + dropped across a server restart, a full buffer counted, per-monitor
switches, `ebpf-agentctl events --from nats://`, and a real exec from the kernel."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import ConfigError, load_settings
from tests.support.api import start_agent
from tests.support.fleet import (
    Background,
    FakeAgent,
    NatsServer,
    fake_agents,
    nats_server,
    stream_info,
    stream_messages,
)

TOKEN = "nats-token-0123456789"


def export_config(server: NatsServer, host: str, **nats: Any) -> dict[str, Any]:
    return {"export": {"host_name": host, "nats": {"enabled": True, "url": server.url,
                                                    "reconnect_max_s": 0.5, **nats}}}


def api(agent: FakeAgent, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, agent.url + path, headers={"Authorization": f"Bearer {TOKEN}"},
                         timeout=10, **kw)


def export_stats(agent: FakeAgent) -> dict[str, Any]:
    return dict(api(agent, "GET", "/stats").json()["export"]["nats"])


def wait_settled(agent: FakeAgent, produced: int, timeout: float = 60) -> dict[str, Any]:
    """Until the exporter saw ``produced`` events and holds none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = export_stats(agent)
        if s["produced"] == produced and s["buffered"] == 0:
            return s
        time.sleep(0.1)
    raise AssertionError(f"not settled in {timeout}s: {export_stats(agent)}")


def wait_stats(agent: FakeAgent, ready: Callable[[dict[str, Any]], bool],
               timeout: float = 30) -> dict[str, Any]:
    """Until the exporter's stats satisfy ``ready``; those stats."""
    deadline = time.monotonic() + timeout
    while not ready(s := export_stats(agent)):
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    return s


def wait_produced(agent: FakeAgent, produced: int, timeout: float = 30) -> None:
    wait_stats(agent, lambda s: s["produced"] >= produced, timeout)


def emit(agent: FakeAgent, start: int, stop: int) -> None:
    for n in range(start, stop):
        agent.fake.inbox.put({"pid": 100, "n": n})


def test_every_event_once_across_a_server_restart(tmp_path: Path) -> None:
    with nats_server(tmp_path) as server, \
            fake_agents(["a"], TOKEN, **export_config(server, "host-a.example")) as (agent,):
        api(agent, "POST", "/monitors/fake/start")
        emit(agent, 0, 1500)
        # `produced` counts events buffered, not sent: it can reach 1,500 before the first
        # connection, and a kill then makes the restart that first connection. Wait for
        # the connection and for acknowledged publishes.
        up = wait_stats(agent, lambda s: s["connected"] and s["published"] >= 1)
        assert up["connects"] == 1 and up["dropped"] == 0
        # Mid-stream every time (the first 1,500 may all be acknowledged by now): with
        # the server frozen, the next 1,500 go to the open connection and none of them
        # can be acknowledged; the server then dies under them.
        server.freeze()
        emit(agent, 1500, 3000)
        held = wait_stats(agent, lambda s: s["produced"] == 3000)
        assert held["connects"] == 1 and held["buffered"] >= 1500, held
        server.kill()
        down = wait_stats(agent, lambda s: not s["connected"])
        assert down["produced"] == down["published"] + down["dropped"] + down["buffered"]
        assert down["buffered"] >= 1500 and down["dropped"] == 0, down
        server.start()  # same port, same JetStream store
        emit(agent, 3000, 4500)
        final = wait_settled(agent, 4500)
        assert final["produced"] == final["published"] + final["dropped"] == 4500
        assert final["dropped"] == 0  # the buffer held everything during the outage
        assert final["connects"] >= 2

        messages = asyncio.run(stream_messages(server.url))
        assert len(messages) == final["published"] == 4500
        bodies = [json.loads(m.data) for m in messages]
        assert sorted(b["n"] for b in bodies) == list(range(4500))  # each exactly once
        assert bodies[0] == {"host": "host-a.example", "monitor": "fake", "pid": 100, "n": 0}
        ids = [m.headers["Nats-Msg-Id"] for m in messages]
        assert len(set(ids)) == 4500 and all(i.startswith("host-a.example:") for i in ids)
        assert {m.subject for m in messages} == {"ebpf.host-a_example.fake"}

        config = asyncio.run(stream_info(server.url)).config  # created with its limits
        assert config.subjects == ["ebpf.>"] and config.max_bytes == 1 << 30
        assert config.max_age == 86400 and config.duplicate_window == 120

        metrics = api(agent, "GET", "/metrics").text
        assert 'ebpf_agent_export_events_produced_total{exporter="nats"} 4500.0' in metrics
        assert 'ebpf_agent_export_events_published_total{exporter="nats"} 4500.0' in metrics


def test_a_full_buffer_is_counted(tmp_path: Path) -> None:
    with nats_server(tmp_path) as server, \
            fake_agents(["a"], TOKEN, **export_config(server, "a", buffer=100)) as (agent,):
        api(agent, "POST", "/monitors/fake/start")
        emit(agent, 0, 50)
        wait_settled(agent, 50)
        server.kill()
        emit(agent, 50, 1050)  # 1000 events, room for 100 (plus a batch in flight)
        wait_produced(agent, 1050)
        server.start()
        final = wait_settled(agent, 1050)
        assert final["dropped_buffer_full"] >= 1050 - 50 - 100 - 256
        assert final["dropped"] == final["dropped_buffer_full"]
        assert final["produced"] == final["published"] + final["dropped"]
        messages = asyncio.run(stream_messages(server.url))
        assert len(messages) == final["published"]
        metrics = api(agent, "GET", "/metrics").text
        assert f'reason="buffer_full"}} {float(final["dropped"])}' in metrics


def test_per_monitor_switch_and_events_from_nats(tmp_path: Path) -> None:
    with nats_server(tmp_path) as server, \
            fake_agents(["h1"], TOKEN, **export_config(server, "h1", monitors={"plain": False})
                        ) as (h1,), \
            fake_agents(["h2"], TOKEN, **export_config(server, "h2")) as (h2,):
        for a in (h1, h2):
            api(a, "POST", "/monitors/fake/start")
            api(a, "POST", "/monitors/plain/start")
        reader = Background("events", "--from", server.url, "-o", "json", "--count", "3",
                            "--duration", "60")
        try:
            reader.wait_line(reader.err, lambda s: "subscribed to ebpf.>" in s)
            for a in (h1, h2):
                # Both monitors poll one queue and publish {"monitor": "fake", **event}:
                # the event names its monitor, whichever of the two takes it.
                a.fake.inbox.put({"pid": 7, "tag": f"x-{a.name}"})
                a.fake.inbox.put({"monitor": "plain", "pid": 8, "tag": f"y-{a.name}"})
            assert reader.proc.wait(60) == 0
        finally:
            reader.stop()
        got = sorted((e["host"], e["monitor"], e["tag"]) for e in map(json.loads, reader.out))
        assert got == [("h1", "fake", "x-h1"), ("h2", "fake", "x-h2"), ("h2", "plain", "y-h2")]
        # h1's plain event went through its pipeline and was not exported
        # (monitors: {plain: false}); h2 exported both.
        deadline = time.monotonic() + 30
        while delivered(h1) < 2:
            assert time.monotonic() < deadline, delivered(h1)
            time.sleep(0.05)
        s1, s2 = wait_settled(h1, 1), wait_settled(h2, 2)
        subjects = sorted(m.subject for m in asyncio.run(stream_messages(server.url)))
        assert subjects == ["ebpf.h1.fake", "ebpf.h2.fake", "ebpf.h2.plain"]
        assert (s1["published"], s2["published"]) == (1, 2)


def delivered(agent: FakeAgent) -> int:
    """Events the agent's fake and plain monitors handed to its pipeline."""
    return sum(api(agent, "GET", f"/monitors/{m}/stats").json()["events_delivered"]
               for m in ("fake", "plain"))


def test_token_authentication(tmp_path: Path) -> None:
    secret = "nats-secret-42"
    server = NatsServer(tmp_path / "js", extra=("--auth", secret)).start()
    try:
        with fake_agents(["good"], TOKEN, **export_config(server, "good", token=secret,
                                                           stream="AUTHED")) as (good,), \
                fake_agents(["bad"], TOKEN, **export_config(server, "bad", token="wrong",
                                                            stream="AUTHED")) as (bad,):
            for a in (good, bad):
                api(a, "POST", "/monitors/fake/start")
                emit(a, 0, 10)
            wait_settled(good, 10)
            # Not only the 10 events buffered: also a connection attempt refused (the
            # events can be buffered before the exporter's first attempt ends).
            stats = wait_stats(bad, lambda s: s["produced"] >= 10
                               and s["last_error"] is not None)
            assert stats["connected"] is False and stats["published"] == 0
            assert "Authorization" in (stats["last_error"] or ""), stats["last_error"]
            assert stats["produced"] == stats["buffered"] == 10
            messages = asyncio.run(stream_messages(server.url, "AUTHED", token=secret))
            assert [json.loads(m.data)["host"] for m in messages] == ["good"] * 10
    finally:
        server.stop()


def test_export_config_validation() -> None:
    with pytest.raises(ConfigError, match="export.nats.url"):
        load_settings(None, {"export": {"nats": {"url": "http://x:1"}}})
    with pytest.raises(ConfigError, match="export.nats.buffer"):
        load_settings(None, {"export": {"nats": {"buffer": 0}}})
    s = load_settings(None, {"export": {"nats": {"url": "nats://a:1, nats://b:2"}}})
    assert s.export.nats.servers() == ["nats://a:1", "nats://b:2"]


def test_a_real_exec_reaches_nats(tmp_path: Path, kernel: None) -> None:
    with nats_server(tmp_path) as server:
        agent = start_agent(tmp_path, {**export_config(server, "kernel-host")}, token=TOKEN)
        try:
            marker = f"nats-marker-{time.time_ns()}"
            reader = Background("events", "--from", server.url, "-o", "json", "--monitor",
                                "exec", "--duration", "60")
            try:
                reader.wait_line(reader.err, lambda s: "subscribed" in s)
                proc = subprocess.run(["/bin/echo", marker], capture_output=True, check=True)
                assert proc.returncode == 0
                line = reader.wait_line(reader.out, lambda s: marker in s)
            finally:
                reader.stop()
            ev = json.loads(line)
            assert ev["host"] == "kernel-host" and ev["argv"] == ["/bin/echo", marker]
            assert ev["filename"] == "/bin/echo" and ev["ret"] == 0
            stats = agent.get("/stats").json()["export"]["nats"]
            assert stats["produced"] == stats["published"] + stats["dropped"] + stats["buffered"]
        finally:
            assert agent.stop() == 0
        stats_msgs = asyncio.run(stream_messages(server.url))
        assert sum(marker in m.data.decode() for m in stats_msgs) == 1


def test_net_and_file_started_by_desired_state_reach_nats(tmp_path: Path, kernel: None) -> None:
    """The two newest monitors through the paths a controller uses: PUT /state starts
    them with options, GET /state gives them back, their events reach the bus."""
    from tests.support.tcp import server, start_client

    watched = tmp_path / "watched"
    watched.mkdir()
    desired = {"monitors": {"net": {"events": ["close"], "loopback": True},
                            "file": {"include_prefixes": [f"{watched}/"]}}}
    with nats_server(tmp_path) as nats:
        agent = start_agent(tmp_path, {**export_config(nats, "state-host")}, token=TOKEN)
        try:
            r = agent.request("PUT", "/state", json=desired)
            assert r.status_code == 200, r.text
            state = agent.get("/state").json()["monitors"]
            assert state["net"]["events"] == ["close"]
            assert state["file"]["include_prefixes"] == [f"{watched}/"]
            (watched / "created").write_bytes(b"x")
            with server("127.0.0.1", 1, 300) as srv:
                cli = start_client("127.0.0.1", srv.port, 700)
                assert srv.received() == [700]
            want = {("file", f"{watched}/created"), ("net", srv.port)}
            found: dict[tuple[str, Any], dict[str, Any]] = {}
            deadline = time.monotonic() + 30
            while set(found) != want and time.monotonic() < deadline:
                for m in asyncio.run(stream_messages(nats.url)):
                    e = json.loads(m.data)
                    key = (("file", e.get("path")) if e["monitor"] == "file"
                           else ("net", e.get("dport")))
                    if key in want:
                        found[key] = e
                time.sleep(0.5)
        finally:
            assert agent.stop() == 0
    assert set(found) == want
    f, n = found[("file", f"{watched}/created")], found[("net", srv.port)]
    assert (f["host"], f["op"], f["ret"] >= 0, f["pid"]) == (
        "state-host", "openat", True, os.getpid())  # this test wrote the file
    assert (n["host"], n["event"], n["pid"], n["sport"], n["bytes_sent"],
            n["bytes_received"]) == ("state-host", "close", cli.pid, cli.sport, 700, 300)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_buffered_never_exceeds_capacity_and_last_error_clears(tmp_path: Path) -> None:
    """A batch in flight is part of the buffer: with the server frozen (acknowledgements
    never come) the exporter holds exactly its capacity, not capacity + a batch; the
    error of the outage is gone once it reconnected."""
    from agent.config import NatsExportSettings
    from agent.export.nats import NatsExporter

    with nats_server(tmp_path) as server:
        cfg = NatsExportSettings(enabled=True, url=server.url, buffer=50, batch=20,
                                 publish_timeout_s=1, reconnect_min_s=0.1,
                                 reconnect_max_s=0.3)
        exporter = NatsExporter(cfg, "h")
        exporter.start()
        try:
            wait_for(lambda: exporter.connected)
            server.freeze()  # stopped: no acknowledgement from here on
            for n in range(20):
                exporter.offer({"monitor": "fake", "n": n}, b'{"monitor":"fake","n":%d}' % n)
            # The first batch went out and timed out: it is held in flight.
            wait_for(lambda: exporter.last_error is not None)
            for n in range(20, 500):
                exporter.offer({"monitor": "fake", "n": n}, b'{"monitor":"fake","n":%d}' % n)
            frozen = exporter.stats()
            assert frozen["buffered"] == frozen["capacity"] == 50, frozen
            assert frozen["dropped_buffer_full"] == 450
            assert frozen["produced"] == 500 == (frozen["published"] + frozen["dropped"]
                                                 + frozen["buffered"])
            assert frozen["last_error"]
        finally:
            server.thaw()
        wait_for(lambda: exporter.stats()["published"] == 50, timeout=60)
        settled = exporter.stats()
        assert (settled["buffered"], settled["connected"], settled["last_error"]) == (
            0, True, None), settled
        exporter.stop()


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
