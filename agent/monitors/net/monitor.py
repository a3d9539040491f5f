"""NetMonitor: TCP connections (IPv4 and IPv6): connect, accept and close events with
exact byte counts, and per-endpoint totals aggregated in the kernel.

The kernel side (net.c) says how each event is attributed to the socket's owner, and
what cannot be known. Byte counts come from ``struct tcp_sock`` at the close, read at
offsets from the running kernel's BTF: ``bytes_sent`` is ``bytes_acked`` (what the peer
acknowledged), ``bytes_received`` is ``bytes_received`` (what arrived in order), the
figures ``ss -ti`` shows as bytes_acked and bytes_received.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from typing import Annotated, Any, ClassVar, Literal

import annotated_types
from pydantic import Field, field_validator

from agent.kernel.btf import BTFError, vmlinux_btf
from agent.kernel.maps import lookup_batch
from agent.kernel.syscalls import errno_name
from agent.model.event_decl import Decode, EventDecl, EventField, Member
from agent.model.events import EventHeader
from agent.monitors.bcc import BccMonitor
from agent.monitors.contract import (
    MetricSeries,
    MonitorError,
    MonitorOptions,
    MonitorStatsQuery,
)
from agent.monitors.decoder import Hook
from agent.monitors.registry import register_monitor

# -- mirrors of net.h (tests/monitors/test_net.py checks them with gcc) ----------------
NET_CONNECT, NET_ACCEPT, NET_CLOSE = 1, 2, 3
NET_F_PASSIVE = 1
NET_F_LOCAL_FIN = 4
NET_F_PEER_FIN = 8
NET_F_RESET_RECEIVED = 16
NET_F_RESET_SENT = 32
NET_F_ESTABLISHED = 64
NET_F_FIN_SENT = 128
NET_EV = {"connect": 1, "accept": 2, "close": 4}
NET_CFG_NO_LOOPBACK = 1
NET_CFG_PORTS_INCLUDE = 2
NET_CFG_PORTS_EXCLUDE = 4
NET_CFG_ADDRS_INCLUDE = 8
NET_CFG_ADDRS_EXCLUDE = 16
NET_AF_INET, NET_AF_INET6 = 2, 10
NET_DIR_OUT, NET_DIR_IN = 0, 1
NET_COUNTERS = ("owners_full", "endpoints_new")  # NET_CNT_* order

KINDS = {NET_CONNECT: "connect", NET_ACCEPT: "accept", NET_CLOSE: "close"}
FAMILIES = {NET_AF_INET: "ipv4", NET_AF_INET6: "ipv6"}
DIRECTIONS = {NET_DIR_OUT: "out", NET_DIR_IN: "in"}
EventKind = Literal["connect", "accept", "close"]
ALL_EVENTS: tuple[EventKind, ...] = ("connect", "accept", "close")
MAX_FILTER_ENTRIES = 64  # per include/exclude list; also the kernel maps' sizes

# Members of kernel structs the program reads (BTF offsets, -D OFF_<STRUCT>_<MEMBER>).
BTF_MEMBERS = (
    ("tcp_sock", "bytes_acked"),
    ("tcp_sock", "bytes_received"),
    ("tcp_sock", "total_retrans"),
    ("tcp_sock", "snd_una"),
    ("tcp_sock", "write_seq"),
    ("sock_common", "skc_flags"),  # sock.sk_flags: #define'd to __sk_common.skc_flags
    ("sock", "sk_err"),
    ("task_struct", "files"),
    ("files_struct", "fdt"),
    ("fdtable", "fd"),
    ("fdtable", "max_fds"),
    ("file", "private_data"),
    ("socket", "sk"),
)


class NetConfig(ctypes.Structure):
    _fields_ = [("events", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class NetAddrKey(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16),
                ("_pad", ctypes.c_uint8 * 4)]


class NetOwner(ctypes.Structure):
    _fields_ = [
        ("hdr", EventHeader),
        ("established_ns", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("family", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("_pad2", ctypes.c_uint32),
    ]


class NetEpKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint8 * 16),
        ("port", ctypes.c_uint16),
        ("direction", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8),
        ("_pad2", ctypes.c_uint32),
    ]


class NetEpValue(ctypes.Structure):
    _fields_ = [
        ("connections", ctypes.c_uint64),
        ("failures", ctypes.c_uint64),
        ("bytes_sent", ctypes.c_uint64),
        ("bytes_received", ctypes.c_uint64),
    ]


# -- the event, declared once (agent/model/event_decl.py): ctypes mirror, decoder, model
# (OpenAPI NetEvent), CSV columns and console line derive from it ---------------------------
CLOSE_ONLY = "; None for connect and accept"
NET_EVENT = EventDecl(
    struct="net_event", header="net.h",
    doc="A TCP connection event. The common fields name the socket's owner: the task "
        "that connected (connect(2)) or accepted (accept(2)/accept4(2)) it, also for "
        "events the kernel raised in softirq; ts_ns is the moment of the event.",
    members=(
        Member("duration_ns", "u64"),
        Member("bytes_sent", "u64"),
        Member("bytes_received", "u64"),
        Member("saddr", "u8", 16),       # AF_INET: the first 4 bytes
        Member("daddr", "u8", 16),
        Member("retransmits", "u32"),
        Member("error", "s32"),          # sock.sk_err: errno or 0
        Member("sport", "u16"),
        Member("dport", "u16"),
        Member("family", "u16"),
        Member("kind", "u8"),
        Member("_pad", "u8"),
        Member("flags", "u32"),          # NET_F_*
        Member("_pad2", "u32"),
    ),
    fields=(
        EventField("event", "string",
                   "connect: an active open ended (established or failed); accept: "
                   "accept(2) returned a passive connection; close: an established "
                   "connection closed", Decode.ENUM, source="kind",
                   arg=KINDS),
        EventField("direction", "string", "out: connected; in: accepted",
                   Decode.HOOK, arg="net"),
        EventField("family", "string", "ipv4 or ipv6: the socket's family (an IPv6 socket "
                   "may carry IPv4-mapped addresses)", Decode.ENUM,
                   arg=FAMILIES),
        EventField("saddr", "string", "local address", Decode.INET, arg="family"),
        EventField("sport", "integer", "local port"),
        EventField("daddr", "string", "remote address", Decode.INET, arg="family"),
        EventField("dport", "integer", "remote port"),
        EventField("error", "string",
                   "connect: None when established, else the errno name (ECONNREFUSED, "
                   "ETIMEDOUT...) or 'closed' (the socket was closed before the handshake "
                   "ended); close: the socket's pending error (ECONNRESET after a reset, "
                   "ETIMEDOUT when retransmissions gave up) or None; accept: None",
                   Decode.HOOK, arg="net", nullable=True),
        EventField("duration_ns", "integer",
                   "connect: from SYN sent to the result; accept: time in the accept "
                   "queue; close: from ESTABLISHED to CLOSE"),
        EventField("bytes_sent", "integer", "close: payload bytes acknowledged by the "
                   "peer (tcp_sock.bytes_acked less SYN and FIN)" + CLOSE_ONLY,
                   Decode.HOOK, arg="net", nullable=True),
        EventField("bytes_received", "integer", "close: payload bytes received "
                   "(tcp_sock.bytes_received less FIN)" + CLOSE_ONLY,
                   Decode.HOOK, arg="net", nullable=True),
        EventField("retransmits", "integer", "close: segments retransmitted "
                   "(tcp_sock.total_retrans)" + CLOSE_ONLY, Decode.HOOK, arg="net",
                   nullable=True),
        EventField("closed_by", "string", "close: local or peer, the side that ended the "
                   "connection first (FIN or reset); local also when the local kernel "
                   "gave up (timeout)" + CLOSE_ONLY, Decode.HOOK, arg="net", nullable=True),
        EventField("reset", "string", "close: sent or received when a reset ended the "
                   "connection (one sent by an abortive close(2), SO_LINGER 0, follows "
                   "the close and is not seen)" + CLOSE_ONLY, Decode.HOOK, arg="net",
                   nullable=True),
    ),
    console="{event} pid={pid} comm={comm} {saddr}:{sport} -> {daddr}:{dport} "
            "error={error} sent={bytes_sent} received={bytes_received} "
            "closed_by={closed_by}",
)
NetEvent = NET_EVENT.ctypes_struct(name="NetEvent")


def endpoint_addr(raw: bytes) -> str:
    """An aggregation key's address: IPv4-mapped ones as IPv4."""
    a = ipaddress.IPv6Address(raw)
    return str(a.ipv4_mapped or a)


def addr_key(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> NetAddrKey:
    """An LPM trie key for a network, IPv4 ones as their IPv4-mapped IPv6 prefix."""
    if network.version == 4:
        mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + network.network_address.packed)
        raw, bits = mapped.packed, 96 + network.prefixlen
    else:
        raw, bits = network.network_address.packed, network.prefixlen
    return NetAddrKey(bits, (ctypes.c_uint8 * 16)(*raw), (ctypes.c_uint8 * 4)())


def closed_by(flags: int) -> str:
    if flags & NET_F_LOCAL_FIN:
        return "local"
    if flags & NET_F_PEER_FIN or flags & NET_F_RESET_RECEIVED:
        return "peer"
    return "local"


def reset_of(flags: int) -> str | None:
    if flags & NET_F_RESET_RECEIVED:
        return "received"
    if flags & NET_F_RESET_SENT:
        return "sent"
    return None


def event_error(kind: int, flags: int, error: int) -> str | None:
    """connect: None when established, else why not; close: the socket's pending
    error, if any; accept: None."""
    if kind == NET_ACCEPT or (kind == NET_CONNECT and flags & NET_F_ESTABLISHED):
        return None
    if error:
        return errno_name(error)
    if kind == NET_CONNECT:
        # The kernel sets sk_err before a failed handshake's CLOSE (tcp_reset,
        # tcp_write_err); none means the application closed the socket first.
        return "ECONNREFUSED" if flags & NET_F_RESET_RECEIVED else "closed"
    return None


def decode_net(raw: bytes, m: dict[str, Any]) -> dict[str, Any]:
    """The fields of NET_EVENT that depend on several members (its HOOK "net")."""
    kind, flags = m["kind"], m["flags"]
    close = kind == NET_CLOSE
    return {
        "direction": "in" if flags & NET_F_PASSIVE else "out",
        "error": event_error(kind, flags, m["error"]),
        "bytes_sent": m["bytes_sent"] if close else None,
        "bytes_received": m["bytes_received"] if close else None,
        "retransmits": m["retransmits"] if close else None,
        "closed_by": closed_by(flags) if close else None,
        "reset": reset_of(flags) if close else None,
    }


# -- options -------------------------------------------------------------------------------
Port = Annotated[int, annotated_types.Ge(1), annotated_types.Le(65535)]


class NetOptions(MonitorOptions):
    events: list[EventKind] = Field(
        default_factory=lambda: list(ALL_EVENTS), min_length=1,
        description="which events to send (['close'] for closes only); the stats "
        "aggregate every connection regardless")
    ports_include: list[Port] = Field(
        default_factory=list, max_length=MAX_FILTER_ENTRIES,
        description="only connections whose local or remote port is one of these "
        "(empty: any)")
    ports_exclude: list[Port] = Field(
        default_factory=list, max_length=MAX_FILTER_ENTRIES,
        description="no connection whose local or remote port is one of these")
    addrs_include: list[str] = Field(
        default_factory=list, max_length=MAX_FILTER_ENTRIES,
        description="only connections whose remote address is in one of these networks "
        "(CIDR, IPv4 or IPv6; empty: any)")
    addrs_exclude: list[str] = Field(
        default_factory=list, max_length=MAX_FILTER_ENTRIES,
        description="no connection whose remote address is in one of these networks")
    loopback: bool = Field(
        True, description="include connections to loopback addresses (127/8, ::1)")
    max_sockets: int = Field(
        65536, ge=1024, le=1 << 20,
        description="open TCP sockets whose owner the kernel remembers; a socket beyond "
        "it is counted (owners_full) and not reported")
    max_endpoints: int = Field(
        4096, ge=64, le=1 << 20,
        description="remote endpoints aggregated in the kernel (least recently updated "
        "ones are evicted, counted in the stats)")
    metrics_top: int = Field(
        20, ge=1, le=200,
        description="Prometheus series for this many endpoints (top by connections and "
        "top by bytes)")

    @field_validator("ports_include", "ports_exclude")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @field_validator("addrs_include", "addrs_exclude")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for a in v:
            try:
                out.append(str(ipaddress.ip_network(a, strict=False)))
            except ValueError as e:
                raise ValueError(f"{a!r} is not an address or network: {e}") from None
        return out

    def config_flags(self) -> int:
        return (
            (0 if self.loopback else NET_CFG_NO_LOOPBACK)
            | (NET_CFG_PORTS_INCLUDE if self.ports_include else 0)
            | (NET_CFG_PORTS_EXCLUDE if self.ports_exclude else 0)
            | (NET_CFG_ADDRS_INCLUDE if self.addrs_include else 0)
            | (NET_CFG_ADDRS_EXCLUDE if self.addrs_exclude else 0)
        )


# Options held in maps: changing only these needs no reload.
LIVE_OPTIONS = {"events", "ports_include", "ports_exclude", "addrs_include", "addrs_exclude",
                "loopback", "metrics_top"}


class NetStatsQuery(MonitorStatsQuery):
    limit: int = Field(20, ge=1, le=10000, description="rows in each top list")


def endpoint_row(key: NetEpKey, value: NetEpValue) -> dict[str, Any]:
    return {
        "direction": DIRECTIONS.get(key.direction, str(key.direction)),
        "address": endpoint_addr(bytes(key.addr)),
        "port": key.port,
        "connections": value.connections,
        "failures": value.failures,
        "bytes_sent": value.bytes_sent,
        "bytes_received": value.bytes_received,
    }


def endpoint_label(row: dict[str, Any]) -> str:
    addr = row["address"]
    host = f"[{addr}]" if ":" in addr else addr
    return f"{row['direction']}:{host}:{row['port']}"


# The stats' top lists, each describing itself for clients that merge them (ebpf-agentctl
# stats net, the console): the columns naming a row, and the columns whose sum orders it.
TOP_KEY = ["direction", "address", "port"]
TOP_LISTS = {"by_connections": ["connections", "failures"],
             "by_bytes": ["bytes_sent", "bytes_received"]}


def top_lists(rows: list[dict[str, Any]], limit: int) -> dict[str, dict[str, Any]]:
    """The endpoints with most connections (attempts: established plus failed) and with
    most bytes (both ways); ties in a stable order."""
    def ranked(cols: list[str]) -> list[dict[str, Any]]:
        return sorted(rows, key=lambda r: (-sum(r[c] for c in cols),
                                           r["direction"], r["address"], r["port"]))[:limit]

    return {name: {"key": TOP_KEY, "sort": cols, "rows": ranked(cols)}
            for name, cols in TOP_LISTS.items()}


@register_monitor("net", "TCP connections: connect, accept, close with exact bytes; "
                         "per-endpoint totals")
class NetMonitor(BccMonitor[NetOptions]):
    """TCP connections."""

    Options = NetOptions
    StatsQuery = NetStatsQuery
    EVENT = NET_EVENT
    BPF_SOURCE = "net.c"
    REQUIRED_TRACEPOINTS = (
        "sock:inet_sock_set_state",
        "tcp:tcp_receive_reset",
        "tcp:tcp_send_reset",
        "syscalls:sys_exit_accept",
        "syscalls:sys_exit_accept4",
    )
    SNAPSHOT_FIELDS: ClassVar[tuple[str, ...]] = (
        "timestamp", "direction", "address", "port", "connections", "failures",
        "bytes_sent", "bytes_received",
    )

    _configured = False

    def extra_cflags(self) -> dict[str, int | str]:
        try:
            btf = vmlinux_btf()
            offsets = {f"OFF_{s.upper()}_{m.upper()}": btf.member_offset(s, m)
                       for s, m in BTF_MEMBERS}
            # sock_common members are read from a struct sock: where it holds them.
            offsets["OFF_SOCK_SK_FLAGS"] = (btf.member_offset("sock", "__sk_common")
                                            + offsets.pop("OFF_SOCK_COMMON_SKC_FLAGS"))
        except BTFError as e:
            raise MonitorError(f"net: {e}") from e
        return {
            **offsets,
            "MAX_SOCKETS": self.options.max_sockets,
            "MAX_ENDPOINTS": self.options.max_endpoints,
            "MAX_PORT_FILTERS": MAX_FILTER_ENTRIES,
            "MAX_ADDR_FILTERS": MAX_FILTER_ENTRIES,
        }

    # -- configuration maps ------------------------------------------------------------
    def set_targets(self, targets: Any) -> None:
        # The first call is load()'s, before the programs match anything (TF_READY):
        # the filters are in place before the first event can pass.
        if self.bpf is not None and not self._configured:
            self._write_config(self.options)
            self._configured = True
        super().set_targets(targets)

    def _write_config(self, opts: NetOptions) -> None:
        cfg = self.bpf[b"net_config"]
        # Narrow first: a filter being added is written before it is switched on, one
        # being removed is switched off before its map is emptied.
        old = cfg[ctypes.c_int(0)]
        cfg[ctypes.c_int(0)] = NetConfig(
            old.events & sum(NET_EV[k] for k in opts.events),
            old.flags & opts.config_flags() | (opts.config_flags() & NET_CFG_NO_LOOPBACK))
        self._sync_ports("port_include", opts.ports_include)
        self._sync_ports("port_exclude", opts.ports_exclude)
        self._sync_networks("addr_include", opts.addrs_include)
        self._sync_networks("addr_exclude", opts.addrs_exclude)
        cfg[ctypes.c_int(0)] = NetConfig(sum(NET_EV[k] for k in opts.events), opts.config_flags())

    def _sync_ports(self, name: str, ports: list[int]) -> None:
        table = self.bpf[name.encode()]
        present = {k.value for k in table}
        for p in present - set(ports):
            del table[table.Key(p)]
        for p in set(ports) - present:
            table[table.Key(p)] = table.Leaf(1)

    def _sync_networks(self, name: str, networks: list[str]) -> None:
        table = self.bpf[name.encode()]
        for k in list(table.keys()):
            del table[k]
        for n in networks:
            key = addr_key(ipaddress.ip_network(n))
            table[table.Key.from_buffer_copy(bytes(key))] = table.Leaf(1)

    def apply_options(self, options: MonitorOptions) -> bool:
        """Events, filters and loopback live in maps: they change without a reload."""
        if not isinstance(options, NetOptions) or self.bpf is None:
            return False
        if options.model_dump(exclude=LIVE_OPTIONS) != self.options.model_dump(
                exclude=LIVE_OPTIONS):
            return False
        self._write_config(options)
        self.options = options
        return True

    # -- events ------------------------------------------------------------------------
    def decode_hooks(self) -> dict[str, Hook]:
        return {"net": decode_net}

    # -- aggregation -------------------------------------------------------------------
    def endpoint_rows(self) -> list[dict[str, Any]]:
        if self.bpf is None:
            return []
        return [endpoint_row(k, v) for k, v in lookup_batch(self.bpf[b"endpoints"])]

    def _net_counters(self) -> dict[str, int]:
        table = self.bpf[b"net_counters"]
        return {n: int(sum(table[ctypes.c_int(i)])) for i, n in enumerate(NET_COUNTERS)}

    def stats(self, limit: int = 20) -> dict[str, Any]:  # type: ignore[override]
        """Per remote endpoint (outbound: remote address and port; inbound: remote
        address and the local port), since the monitor loaded: two top lists."""
        rows = self.endpoint_rows()
        counters = self._net_counters() if self.bpf is not None else {}
        new = counters.get("endpoints_new", 0)
        return {
            "endpoints": len(rows),
            "max_endpoints": self.options.max_endpoints,
            "evictions": max(0, new - len(rows)),
            "top_lists": top_lists(rows, limit),
        }

    def metric_series(self) -> list[MetricSeries]:
        """Bounded: the endpoints in the top ``metrics_top`` by connections or by bytes."""
        tops = top_lists(self.endpoint_rows(), self.options.metrics_top)
        rows = {endpoint_label(r): r for t in tops.values() for r in t["rows"]}
        return [
            MetricSeries(name, doc, "endpoint", {label: r[field] for label, r in rows.items()})
            for name, field, doc in (
                ("connections", "connections", "established TCP connections per endpoint"),
                ("failures", "failures", "failed TCP connects per endpoint"),
                ("sent_bytes", "bytes_sent", "bytes acknowledged by the peer, closed "
                 "connections, per endpoint"),
                ("received_bytes", "bytes_received", "bytes received, closed connections, "
                 "per endpoint"),
            )
        ]

    def snapshot_rows(self) -> list[dict[str, Any]]:
        now = self._clock.iso(time.monotonic_ns())
        rows = sorted(self.endpoint_rows(), key=lambda r: (r["direction"], r["address"],
                                                          r["port"]))
        return [{"timestamp": now, **r} for r in rows]

    def kernel_counters(self) -> dict[str, int]:
        out = super().kernel_counters()
        if self.bpf is not None:
            out["owners_full"] = self._net_counters()["owners_full"]
        return out

