"""NetMonitor: its C/Python layouts, and the exact events of TCP connections between a
server and a client process the test starts (own pids and comms), over loopback and
across a veth pair between two network namespaces, IPv4 and IPv6: every connection
once, exact payload bytes both ways, the owner of every event on both sides, refused
and reset connections, the in-kernel filters and targets, the per-endpoint stats."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config import TransportSettings
from agent.model.events import Event
from agent.model.targets import TargetSet
from agent.monitors.net import monitor as net
from agent.monitors.net.monitor import NetMonitor, NetOptions
from tests.support.filters import filter_tests
from tests.support.layout import assert_constants, assert_event_layout, assert_layout
from tests.support.monitors import CollectingSink, loaded_monitor
from tests.support.tcp import CLIENT_COMM, SERVER_COMM, Client, server, start_client

HEADER = NetMonitor.source_dir() / "net.h"
DEFINES = {"MAX_SOCKETS": 1024, "MAX_ENDPOINTS": 64, "MAX_PORT_FILTERS": 4,
           "MAX_ADDR_FILTERS": 4}
MB = 1 << 20


# -- layouts and pure functions --------------------------------------------------------------
def test_event_layout() -> None:
    assert_event_layout(net.NET_EVENT, NetMonitor.source_dir(), DEFINES)


@pytest.mark.parametrize("struct_name, cls", [
    ("net_owner", net.NetOwner), ("net_ep_key", net.NetEpKey),
    ("net_ep_value", net.NetEpValue), ("net_config", net.NetConfig),
    ("net_addr_key", net.NetAddrKey),
])
def test_layout(struct_name: str, cls: type) -> None:
    assert_layout(HEADER, struct_name, cls, DEFINES)


def test_constants() -> None:
    assert_constants(HEADER, {
        "NET_CONNECT": net.NET_CONNECT, "NET_ACCEPT": net.NET_ACCEPT, "NET_CLOSE": net.NET_CLOSE,
        "NET_F_PASSIVE": net.NET_F_PASSIVE, "NET_F_LOCAL_FIN": net.NET_F_LOCAL_FIN,
        "NET_F_PEER_FIN": net.NET_F_PEER_FIN, "NET_F_RESET_RECEIVED": net.NET_F_RESET_RECEIVED,
        "NET_F_RESET_SENT": net.NET_F_RESET_SENT, "NET_F_ESTABLISHED": net.NET_F_ESTABLISHED,
        "NET_F_FIN_SENT": net.NET_F_FIN_SENT,
        "NET_EV_CONNECT": net.NET_EV["connect"], "NET_EV_ACCEPT": net.NET_EV["accept"],
        "NET_EV_CLOSE": net.NET_EV["close"],
        "NET_CFG_NO_LOOPBACK": net.NET_CFG_NO_LOOPBACK,
        "NET_CFG_PORTS_INCLUDE": net.NET_CFG_PORTS_INCLUDE,
        "NET_CFG_PORTS_EXCLUDE": net.NET_CFG_PORTS_EXCLUDE,
        "NET_CFG_ADDRS_INCLUDE": net.NET_CFG_ADDRS_INCLUDE,
        "NET_CFG_ADDRS_EXCLUDE": net.NET_CFG_ADDRS_EXCLUDE,
        "NET_AF_INET": net.NET_AF_INET, "NET_AF_INET6": net.NET_AF_INET6,
        "NET_DIR_OUT": net.NET_DIR_OUT, "NET_DIR_IN": net.NET_DIR_IN,
        "NET_NR_COUNTERS": len(net.NET_COUNTERS),
    }, DEFINES)


@pytest.mark.parametrize("options, error", [
    ({"ports_include": [0]}, "greater than or equal to 1"),
    ({"ports_exclude": [70000]}, "less than or equal to 65535"),
    ({"addrs_include": ["10.0.0.0/33"]}, "not an address or network"),
    ({"addrs_exclude": ["example.com"]}, "not an address or network"),
    ({"events": []}, "at least 1"),
    ({"events": ["listen"]}, "connect"),
    ({"max_endpoints": 1}, "greater than or equal"),
    ({"unknown": 1}, "Extra inputs"),
])
def test_bad_options_are_refused(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        NetOptions(**options)


def test_options_normalised() -> None:
    o = NetOptions(ports_include=[80, 22, 80], addrs_include=["10.1.2.3/8", "::1"])
    assert o.ports_include == [22, 80]
    assert o.addrs_include == ["10.0.0.0/8", "::1/128"]
    assert o.config_flags() == net.NET_CFG_PORTS_INCLUDE | net.NET_CFG_ADDRS_INCLUDE
    assert NetOptions(loopback=False).config_flags() == net.NET_CFG_NO_LOOPBACK


@pytest.mark.parametrize("network, prefixlen, raw", [
    ("127.0.0.0/8", 104, "::ffff:127.0.0.0"),
    ("10.1.2.3/32", 128, "::ffff:10.1.2.3"),
    ("::1/128", 128, "::1"),
    ("fd00::/8", 8, "fd00::"),
])
def test_addr_key(network: str, prefixlen: int, raw: str) -> None:
    key = net.addr_key(ipaddress.ip_network(network))
    assert key.prefixlen == prefixlen
    assert bytes(key.addr) == ipaddress.IPv6Address(raw).packed


def test_top_lists_and_labels() -> None:
    rows = [
        {"direction": "out", "address": "10.0.0.1", "port": 80, "connections": 5,
         "failures": 0, "bytes_sent": 10, "bytes_received": 10},
        {"direction": "in", "address": "::1", "port": 22, "connections": 1,
         "failures": 0, "bytes_sent": 1000, "bytes_received": 0},
        {"direction": "out", "address": "10.0.0.2", "port": 443, "connections": 0,
         "failures": 9, "bytes_sent": 0, "bytes_received": 0},
    ]
    tops = net.top_lists(rows, 2)
    assert [r["port"] for r in tops["by_connections"]["rows"]] == [443, 80]
    assert [r["port"] for r in tops["by_bytes"]["rows"]] == [22, 80]
    assert tops["by_bytes"]["key"] == ["direction", "address", "port"]
    assert tops["by_bytes"]["sort"] == ["bytes_sent", "bytes_received"]
    assert [net.endpoint_label(r) for r in rows] == [
        "out:10.0.0.1:80", "in:[::1]:22", "out:10.0.0.2:443"]


@dataclass
class Pair:
    """Two network namespaces joined by one veth pair, IPv4 and IPv6 addresses that
    exist only inside them."""

    server_ns: str
    client_ns: str
    server_v4: str
    server_v6: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def veth_pair() -> Iterator[Pair]:
    tag = f"nt{os.getpid() % 10000:04d}{random.randrange(100):02d}"
    n = random.randrange(1, 255)
    pair = Pair(f"{tag}-s", f"{tag}-c", f"10.232.{n}.1", f"fd00:232:{n:x}::1")
    made: list[str] = []
    try:
        for ns in (pair.server_ns, pair.client_ns):
            _ip("netns", "add", ns)
            made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", pair.server_ns, "link", "add", "vs", "type", "veth", "peer", "name", "vc")
        _ip("-n", pair.server_ns, "link", "set", "vc", "netns", pair.client_ns)
        for ns, dev, last in ((pair.server_ns, "vs", 1), (pair.client_ns, "vc", 2)):
            _ip("-n", ns, "addr", "add", f"10.232.{n}.{last}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"fd00:232:{n:x}::{last}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        for ns in reversed(made):
            with contextlib.suppress(Exception):
                _ip("netns", "del", ns)


# -- waiting for events -----------------------------------------------------------------------
def of_port(port: int) -> Any:
    return lambda e: port in (e["sport"], e["dport"])


def wait_for(m: NetMonitor, sink: CollectingSink, pred: Any, count: int,
             timeout: float = 10.0) -> list[Event]:
    """Poll until ``count`` events match (returned), then a little longer: a duplicate
    would show."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m.poll(50)
        if len([e for e in sink.events if pred(e)]) >= count:
            break
    for _ in range(4):
        m.poll(25)
    return [e for e in sink.events if pred(e)]


@pytest.fixture(scope="module")
def monitor() -> Iterator[tuple[NetMonitor, CollectingSink]]:
    from tests.support.kernel import require_kernel

    require_kernel()
    sink = CollectingSink()
    with loaded_monitor("net", sink) as m:
        yield m, sink


def fresh(monitor: tuple[NetMonitor, CollectingSink]) -> tuple[NetMonitor, CollectingSink]:
    m, sink = monitor
    m.poll(10)
    sink.events.clear()
    return m, sink


def check_connection(events: list[Event], srv_pid: int, cli: Client, host: str,
                     sport_srv: int, sent: int, reply: int) -> None:
    """The four events of one connection, exactly: the client's connect and close, the
    server's accept and close."""
    mine = [e for e in events if cli.sport in (e["sport"], e["dport"])]
    kinds = sorted((e["event"], e["direction"]) for e in mine)
    assert kinds == [("accept", "in"), ("close", "in"), ("close", "out"), ("connect", "out")]
    fam = "ipv6" if ":" in host else "ipv4"
    for e in mine:
        NetMonitor.EventModel.model_validate(e)
        out = e["direction"] == "out"
        assert (e["pid"], e["comm"]) == ((cli.pid, CLIENT_COMM) if out else
                                         (srv_pid, SERVER_COMM)), e
        assert e["family"] == fam
        local, remote = (cli.sport, sport_srv) if out else (sport_srv, cli.sport)
        assert (e["sport"], e["dport"]) == (local, remote)
        assert e["error"] is None
    by = {(e["event"], e["direction"]): e for e in mine}
    c_close, s_close = by[("close", "out")], by[("close", "in")]
    assert (c_close["bytes_sent"], c_close["bytes_received"]) == (sent, reply)
    assert (s_close["bytes_sent"], s_close["bytes_received"]) == (reply, sent)
    # The client shuts its side down first (shutdown(SHUT_WR)), then the server closes.
    assert (c_close["closed_by"], s_close["closed_by"]) == ("local", "peer")
    assert c_close["reset"] is None and s_close["reset"] is None
    assert by[("connect", "out")]["bytes_sent"] is None


# -- loopback and namespaces ------------------------------------------------------------------
SIZES = [(1234, 5678), (5 * MB + 7, 3 * MB + 1), (0, 1)]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_loopback_connections_exactly(monitor, host: str) -> None:
    m, sink = fresh(monitor)
    clients = []
    for sent, reply in SIZES:
        with server(host, 1, reply) as srv:
            cli = start_client(host, srv.port, sent)
            assert srv.received() == [sent] and cli.received == reply
            clients.append((srv, cli, sent, reply))
    for srv, cli, sent, reply in clients:
        assert cli.sport is not None
        events = wait_for(m, sink, of_port(cli.sport), 4)
        check_connection(events, srv.proc.pid, cli, host, srv.port, sent, reply)


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_connections_across_namespaces(monitor, v6: bool) -> None:
    m, sink = fresh(monitor)
    with veth_pair() as pair:
        host = pair.server_v6 if v6 else pair.server_v4
        with server(host, 3, 2 * MB + 3, netns=pair.server_ns) as srv:
            clients = [start_client(host, srv.port, n, netns=pair.client_ns)
                       for n in (100, 4 * MB + 1, 65536)]
            assert srv.received() == [100, 4 * MB + 1, 65536]
        assert [c.received for c in clients] == [2 * MB + 3] * 3
        events = wait_for(m, sink, of_port(srv.port), 12)
        assert len(events) == 12  # every connection exactly once, four events each
        for cli, sent in zip(clients, (100, 4 * MB + 1, 65536), strict=True):
            check_connection(events, srv.proc.pid, cli, host, srv.port, sent, 2 * MB + 3)
            e = next(e for e in events if e["event"] == "connect" and e["sport"] == cli.sport)
            assert e["daddr"] == host and e["saddr"] == host[:-1] + "2"


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_refused_connect(monitor, host: str) -> None:
    m, sink = fresh(monitor)
    with server(host, 0, 0) as srv:  # a port that was bound and is closed now
        port = srv.port
    cli = start_client(host, port, 10)
    assert cli.received == "refused"
    events = wait_for(m, sink, lambda e: e["dport"] == port and e["pid"] == cli.pid, 1)
    assert len(events) == 1
    e = events[0]
    assert (e["event"], e["direction"], e["error"], e["comm"]) == (
        "connect", "out", "ECONNREFUSED", CLIENT_COMM)
    assert e["bytes_sent"] is None and e["closed_by"] is None


@pytest.mark.usefixtures("kernel")
def test_reset_connection(monitor) -> None:
    """The server closes each accepted connection with a reset (SO_LINGER 0)."""
    m, sink = fresh(monitor)
    with server("127.0.0.1", 1, 0, reset=True) as srv:
        cli = start_client("127.0.0.1", srv.port, 0, wait=True)
        assert srv.received() == [0]
    assert (cli.sport is not None, cli.received) == (True, "reset")
    events = wait_for(m, sink, of_port(cli.sport), 4)
    by = {(e["event"], e["direction"]): e for e in events}
    assert sorted(by) == [("accept", "in"), ("close", "in"), ("close", "out"),
                          ("connect", "out")]
    c_close, s_close = by[("close", "out")], by[("close", "in")]
    assert (c_close["pid"], c_close["reset"], c_close["error"], c_close["closed_by"]) == (
        cli.pid, "received", "ECONNRESET", "peer")
    assert (s_close["pid"], s_close["closed_by"]) == (srv.proc.pid, "local")


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("transport, kinds, host", [
    ("perf", ["connect", "accept", "close"], "::1"),
    ("perf", ["close"], "127.0.0.1"),
    ("ringbuf", ["close"], "::1"),
    ("ringbuf", ["connect", "accept"], "127.0.0.1"),
])
def test_transports_and_event_kinds(transport: str, kinds: list[str], host: str) -> None:
    """Exact fields on both transports, only the kinds asked for (the others are not
    built), and the per-endpoint stats exact whichever kinds are emitted."""
    sink = CollectingSink()
    with loaded_monitor("net", sink, transport=TransportSettings(kind=transport),
                        events=kinds) as m:
        assert m.use_ringbuf is (transport == "ringbuf")
        clients = []
        with server(host, 2, 5678) as srv:
            for sent in (1234, 0):
                cli = start_client(host, srv.port, sent)
                assert cli.received == 5678
                clients.append((cli, sent))
            assert srv.received() == [1234, 0]
        per_connection = [k for k in kinds for _side in (["out", "in"] if k == "close" else [k])]
        events = wait_for(m, sink, of_port(srv.port), 2 * len(per_connection))
        stats = m.stats(limit=10000)
    assert sorted(e["event"] for e in events) == sorted(2 * per_connection)
    for cli, sent in clients:
        mine = [e for e in events if cli.sport in (e["sport"], e["dport"])]
        for e in mine:
            NetMonitor.EventModel.model_validate(e)
            out = e["direction"] == "out"
            assert (e["pid"], e["comm"], e["daddr"]) == (
                (cli.pid, CLIENT_COMM, host) if out else (srv.proc.pid, SERVER_COMM, host))
            assert e["error"] is None
            if e["event"] == "close":
                assert (e["bytes_sent"], e["bytes_received"]) == (
                    (sent, 5678) if out else (5678, sent))
            else:
                assert e["bytes_sent"] is None and e["retransmits"] is None
    rows = {(r["direction"], r["port"]): r for r in stats["top_lists"]["by_bytes"]["rows"]
            if r["address"] == host}
    got = {d: (r["connections"], r["failures"], r["bytes_sent"], r["bytes_received"])
           for (d, port), r in rows.items() if port == srv.port}
    assert got == {"out": (2, 0, 1234, 2 * 5678), "in": (2, 0, 2 * 5678, 1234)}


# -- filters and targets ----------------------------------------------------------------------
def connections_seen(m: NetMonitor, sink: CollectingSink, host: str,
                     expect_events: int) -> tuple[int, list[Event]]:
    """One connection of 1000 bytes each way to a new server; its events."""
    with server(host, 1, 1000) as srv:
        cli = start_client(host, srv.port, 1000)
        assert srv.received() == [1000]
    events = wait_for(m, sink, of_port(srv.port), expect_events, timeout=10 if expect_events
                      else 1.0)
    assert cli.sport is not None
    return srv.port, events


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("options, host, want", [
    ({}, "127.0.0.1", {"connect", "accept", "close"}),
    ({"events": ["close"]}, "127.0.0.1", {"close"}),
    ({"events": ["connect", "accept"]}, "::1", {"connect", "accept"}),
    ({"loopback": False}, "127.0.0.1", set()),
    ({"loopback": False}, "::1", set()),
    ({"addrs_include": ["::1"]}, "127.0.0.1", set()),
    ({"addrs_include": ["::1"]}, "::1", {"connect", "accept", "close"}),
    ({"addrs_include": ["127.0.0.0/8"]}, "127.0.0.1", {"connect", "accept", "close"}),
    ({"addrs_exclude": ["127.0.0.1/32"]}, "127.0.0.1", set()),
    ({"ports_include": [1]}, "127.0.0.1", set()),
])
def test_filters(monitor, options: dict[str, Any], host: str, want: set[str]) -> None:
    """Applied live to the running programs (apply_options: maps, no reload), then back."""
    m, sink = fresh(monitor)
    assert m.apply_options(NetOptions(**options))
    try:
        _port, events = connections_seen(m, sink, host, 4 if want else 0)
    finally:
        assert m.apply_options(NetOptions())
    kinds = {e["event"] for e in events}
    assert kinds == want
    if want == {"connect", "accept", "close"}:
        assert len(events) == 4


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize("option", ["ports_include", "ports_exclude"])
def test_port_filters_let_exactly_the_right_server_through(monitor, option: str) -> None:
    m, sink = fresh(monitor)
    with server("127.0.0.1", 1, 10) as wanted, server("127.0.0.1", 1, 10) as other:
        # Include the one, or exclude the other: the same connections pass.
        port = wanted.port if option == "ports_include" else other.port
        assert m.apply_options(NetOptions(**{option: [port]}))
        try:
            start_client("127.0.0.1", wanted.port, 10)
            start_client("127.0.0.1", other.port, 10)
            wanted.received(), other.received()
        finally:
            assert m.apply_options(NetOptions())
        assert len(wait_for(m, sink, of_port(wanted.port), 4)) == 4
        assert wait_for(m, sink, of_port(other.port), 0, timeout=0.5) == []


@pytest.mark.usefixtures("kernel")
def test_comm_target_keeps_only_the_client_side(monitor) -> None:
    """Targets apply where the owner is known: connect(2) and accept(2)."""
    m, sink = fresh(monitor)
    m.set_targets(TargetSet(comms=frozenset({CLIENT_COMM})))
    try:
        port, events = connections_seen(m, sink, "127.0.0.1", 2)
    finally:
        m.set_targets(TargetSet())
    assert sorted((e["event"], e["comm"]) for e in events) == [
        ("close", CLIENT_COMM), ("connect", CLIENT_COMM)]


@pytest.mark.usefixtures("kernel")
def test_stats_per_endpoint(monitor) -> None:
    m, sink = fresh(monitor)
    with server("127.0.0.1", 3, 700) as srv:
        for _ in range(3):
            start_client("127.0.0.1", srv.port, 300)
        srv.received()
    wait_for(m, sink, of_port(srv.port), 12)
    stats = m.stats(limit=10000)
    rows = {(r["direction"], r["address"], r["port"]): r
            for r in stats["top_lists"]["by_bytes"]["rows"]}
    out = rows[("out", "127.0.0.1", srv.port)]
    inbound = rows[("in", "127.0.0.1", srv.port)]
    assert (out["connections"], out["failures"], out["bytes_sent"], out["bytes_received"]) \
        == (3, 0, 900, 2100)
    assert (inbound["connections"], inbound["bytes_sent"], inbound["bytes_received"]) \
        == (3, 2100, 900)
    assert stats["evictions"] == 0 and stats["endpoints"] >= 2
    series = m.metric_series()
    assert {s.name for s in series} == {"connections", "failures", "sent_bytes",
                                        "received_bytes"}
    assert all(len(s.values) <= 2 * m.options.metrics_top for s in series)
    assert m.kernel_counters()["owners_full"] == 0
    snap = [r for r in m.snapshot_rows() if r["port"] == srv.port and r["direction"] == "out"]
    assert len(snap) == 1 and tuple(snap[0]) == NetMonitor.SNAPSHOT_FIELDS
    assert (snap[0]["connections"], snap[0]["bytes_sent"]) == (3, 900)


# -- the common header and stream filters (tests/support/filters.py): the workload's
# loopback connect, owned by the workload (run as nobody) ----------------------------------
filter_events, test_common_fields_of_a_known_process, test_stream_filter = filter_tests(
    "net", lambda e, binary: e["event"] == "connect")
