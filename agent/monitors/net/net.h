/* The net monitor's event, socket-owner record and aggregation entry, defined once:
 * monitor.py mirrors them with ctypes and tests/monitors/test_net.py checks both with
 * gcc (tests/support/layout.py). */
#ifndef EBPF_AGENT_NET_H
#define EBPF_AGENT_NET_H

#include "types.h"  /* agent/bpf/: struct event_hdr */

/* From the options as -D flags: NetMonitor.extra_cflags. */
#ifndef MAX_SOCKETS
#error "MAX_SOCKETS must be defined (max_sockets: sockets whose owner is remembered)"
#endif
#ifndef MAX_ENDPOINTS
#error "MAX_ENDPOINTS must be defined (max_endpoints: aggregated remote endpoints)"
#endif
#ifndef MAX_PORT_FILTERS
#error "MAX_PORT_FILTERS must be defined (entries of the port filter maps)"
#endif
#ifndef MAX_ADDR_FILTERS
#error "MAX_ADDR_FILTERS must be defined (entries of the address filter tries)"
#endif

/* TCP states (include/net/tcp_states.h) and address families (include/linux/socket.h). */
#define NET_TCP_ESTABLISHED 1
#define NET_TCP_SYN_SENT    2
#define NET_TCP_SYN_RECV    3
#define NET_TCP_FIN_WAIT1   4
#define NET_TCP_CLOSE       7
#define NET_TCP_CLOSE_WAIT  8
#define NET_TCP_LAST_ACK    9
#define NET_AF_INET         2
#define NET_AF_INET6        10
#define NET_IPPROTO_TCP     6

/* net_event.kind */
#define NET_CONNECT 1
#define NET_ACCEPT  2
#define NET_CLOSE   3

/* net_owner.flags and net_event.flags */
#define NET_F_PASSIVE        1   /* accepted (inbound); else connected (outbound) */
#define NET_F_UNOWNED        2   /* passive, established, not yet returned by accept() */
#define NET_F_LOCAL_FIN      4   /* this side closed first (ESTABLISHED -> FIN_WAIT1) */
#define NET_F_PEER_FIN       8   /* the peer closed first (ESTABLISHED -> CLOSE_WAIT) */
#define NET_F_RESET_RECEIVED 16  /* tcp:tcp_receive_reset on this socket */
#define NET_F_RESET_SENT     32  /* tcp:tcp_send_reset on this socket */
#define NET_F_ESTABLISHED    64  /* the connection reached ESTABLISHED */
#define NET_F_FIN_SENT       128 /* this side queued its FIN (entered FIN_WAIT1 or LAST_ACK) */

/* enum sock_flags (include/net/sock.h): the bit of sock.sk_flags tcp_fin() sets. */
#define NET_SOCK_DONE 1

/* net_config.events: which events go to the ring buffer (aggregation runs regardless). */
#define NET_EV_CONNECT 1
#define NET_EV_ACCEPT  2
#define NET_EV_CLOSE   4

/* net_config.flags */
#define NET_CFG_NO_LOOPBACK     1  /* drop connections whose remote address is loopback */
#define NET_CFG_PORTS_INCLUDE   2  /* port_include is non-empty: one of the ports must be in it */
#define NET_CFG_PORTS_EXCLUDE   4
#define NET_CFG_ADDRS_INCLUDE   8  /* addr_include is non-empty: the remote address must be in it */
#define NET_CFG_ADDRS_EXCLUDE   16

/* net_counters[] indices */
#define NET_CNT_OWNERS_FULL     0  /* a socket's owner could not be remembered: no events for it */
#define NET_CNT_ENDPOINTS_NEW   1  /* endpoints inserted (evictions = this - entries present) */
#define NET_NR_COUNTERS         2

/* direction in struct net_ep_key */
#define NET_DIR_OUT 0
#define NET_DIR_IN  1

struct net_config {
    u32 events;                /* NET_EV_* */
    u32 flags;                 /* NET_CFG_* */
};

/* Addresses are 16 bytes: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address
 * (::ffff:a.b.c.d), so that one filter trie and one key type serve both families. */
struct net_addr_key {
    u32 prefixlen;             /* BPF_MAP_TYPE_LPM_TRIE key: bits of addr that count */
    u8 addr[16];
    u8 _pad[4];                /* to 8 bytes; part of the trie's data, beyond any
                                * prefix used (at most 128 bits), so never compared */
};

/* Who owns a socket: recorded in process context (connect, accept), used for every later
 * event of the socket, which may run in softirq on behalf of any task. */
struct net_owner {
    struct event_hdr hdr;      /* the connecting/accepting task; ts_ns: SYN_SENT or accept */
    u64 established_ns;        /* when the connection reached ESTABLISHED (0: not yet) */
    u32 flags;                 /* NET_F_* */
    u16 sport;                 /* local port: 0 at SYN_SENT (bound after it), set later */
    u16 dport;
    u8 saddr[16];              /* IPv4-mapped for IPv4 (see struct net_addr_key) */
    u8 daddr[16];
    u16 family;
    u16 _pad;
    u32 _pad2;
};

struct net_event {
    struct event_hdr hdr;      /* the socket's owner (see struct net_owner), ts_ns: now */
    u64 duration_ns;           /* connect: SYN_SENT to result; close: ESTABLISHED to CLOSE */
    u64 bytes_sent;            /* close: tcp_sock.bytes_acked (acknowledged by the peer) */
    u64 bytes_received;        /* close: tcp_sock.bytes_received */
    u8 saddr[16];              /* AF_INET: the first 4 bytes; AF_INET6: all 16 */
    u8 daddr[16];
    u32 retransmits;           /* close: tcp_sock.total_retrans */
    s32 error;                 /* sock.sk_err at a failed connect or a close: errno or 0 */
    u16 sport;
    u16 dport;
    u16 family;                /* NET_AF_INET or NET_AF_INET6 */
    u8 kind;                   /* NET_CONNECT, NET_ACCEPT, NET_CLOSE */
    u8 _pad;
    u32 flags;                 /* NET_F_* of the socket */
    u32 _pad2;
};

/* Aggregation per remote endpoint: outbound (connect) by remote address and remote
 * port, inbound (accept) by remote address and the local port (the service; a remote
 * port of an inbound connection is ephemeral). */
struct net_ep_key {
    u8 addr[16];               /* IPv4-mapped for IPv4 */
    u16 port;
    u8 direction;              /* NET_DIR_OUT, NET_DIR_IN */
    u8 _pad;
    u32 _pad2;
};

struct net_ep_value {
    u64 connections;           /* established */
    u64 failures;              /* connects that failed */
    u64 bytes_sent;            /* of the connections closed so far */
    u64 bytes_received;
};

#endif
