/* NetMonitor: TCP connections (IPv4 and IPv6) from sock:inet_sock_set_state, with exact
 * byte counts read from struct tcp_sock at close.
 *
 * Attribution. A TCP socket changes state in two kinds of context: in the syscall of
 * its owner (connect(2) sets SYN_SENT in tcp_v4_connect/tcp_v6_connect; close(2) sets
 * FIN_WAIT1 or LAST_ACK), and in softirq while a segment is processed (SYN_SENT ->
 * ESTABLISHED when the SYN-ACK arrives, a passive socket's whole handshake, resets,
 * timeouts, TIME_WAIT), where `current` is whatever task the CPU was running (over
 * loopback often the peer). So the owner is recorded once in process context, in
 * `owners` keyed by the socket's address, and every later event of that socket carries
 * the recorded task:
 * - an active open: at CLOSE -> SYN_SENT, in connect(2);
 * - a passive open: the socket becomes ESTABLISHED in softirq before any task has it;
 *   it is remembered as unowned and gets its owner when accept(2)/accept4(2) returns
 *   its file descriptor (sys_exit_accept*: fd -> file -> socket -> sock, BTF offsets).
 * The target filter applies at those two points; a socket whose owner is not a target
 * is forgotten, and with it all its later events.
 * Not known: a socket passed to another process (SCM_RIGHTS, fork) stays attributed to
 * the task that connected or accepted it; connections opened before the monitor loaded,
 * and sockets accepted other than by accept(2)/accept4(2) (io_uring), are not reported.
 *
 * Kernel structs are read only at offsets from the running kernel's BTF (-D OFF_*:
 * NetMonitor.extra_cflags), never through header types (docs/kernel.md).
 */
#include "common.h"
#include "net.h"

#ifndef OFF_TCP_SOCK_BYTES_ACKED
#error "OFF_TCP_SOCK_BYTES_ACKED must be defined (BTF offset)"
#endif

BPF_HASH(owners, u64, struct net_owner, MAX_SOCKETS);
BPF_TABLE("lru_hash", struct net_ep_key, struct net_ep_value, endpoints, MAX_ENDPOINTS);
BPF_ARRAY(net_config, struct net_config, 1);
BPF_PERCPU_ARRAY(net_counters, u64, NET_NR_COUNTERS);
BPF_HASH(port_include, u16, u8, MAX_PORT_FILTERS);
BPF_HASH(port_exclude, u16, u8, MAX_PORT_FILTERS);
BPF_LPM_TRIE(addr_include, struct net_addr_key, u8, MAX_ADDR_FILTERS);
BPF_LPM_TRIE(addr_exclude, struct net_addr_key, u8, MAX_ADDR_FILTERS);

static __always_inline void net_count(u32 idx)
{
    u64 *v = net_counters.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline struct net_config *config(void)
{
    u32 zero = 0;
    return net_config.lookup(&zero);
}

/* The tracepoint's connection into an owner record: addresses as 16 bytes (IPv4 as
 * ::ffff:a.b.c.d), ports in host order (the tracepoint applies ntohs). A macro: BCC
 * defines the tracepoint's argument struct only inside the probe. */
#define CONN_FROM_ARGS(o, args) do {                                        \
    (o)->sport = (args)->sport;                                             \
    (o)->dport = (args)->dport;                                             \
    (o)->family = (args)->family;                                           \
    if ((args)->family == NET_AF_INET) {                                    \
        (o)->saddr[10] = (o)->saddr[11] = 0xff;                             \
        (o)->daddr[10] = (o)->daddr[11] = 0xff;                             \
        __builtin_memcpy((o)->saddr + 12, (args)->saddr, 4);                \
        __builtin_memcpy((o)->daddr + 12, (args)->daddr, 4);                \
    } else {                                                                \
        __builtin_memcpy((o)->saddr, (args)->saddr_v6, 16);                 \
        __builtin_memcpy((o)->daddr, (args)->daddr_v6, 16);                 \
    }                                                                       \
} while (0)

static __always_inline int is_loopback(const u8 *a)
{
    u64 hi = 0;
    u32 mid = 0;
    __builtin_memcpy(&hi, a, 8);
    __builtin_memcpy(&mid, a + 8, 4);
    if (hi)
        return 0;
    if (mid == 0xffff0000)          /* ::ffff:0:0/96 (bytes 00 00 ff ff), then 127/8 */
        return a[12] == 127;
    u32 lo = 0;
    __builtin_memcpy(&lo, a + 12, 4);
    return mid == 0 && lo == 0x01000000;  /* ::1 (bytes ... 00 00 00 01) */
}

/* The include/exclude options and the loopback switch, on a connection's local port,
 * remote port and remote address. A local port of 0 (not chosen yet: SYN_SENT) cannot
 * decide a port rule: `partial` lets it through, to be decided at the handshake's end. */
static __always_inline int conn_passes(struct net_config *cfg, u16 lport, u16 rport,
                                       const u8 *raddr, int partial)
{
    u32 f = cfg->flags;
    if ((f & NET_CFG_NO_LOOPBACK) && is_loopback(raddr))
        return 0;
    if ((f & NET_CFG_PORTS_INCLUDE) && !port_include.lookup(&rport)
        && !port_include.lookup(&lport) && !(partial && lport == 0))
        return 0;
    if ((f & NET_CFG_PORTS_EXCLUDE) && (port_exclude.lookup(&rport) || port_exclude.lookup(&lport)))
        return 0;
    if (f & (NET_CFG_ADDRS_INCLUDE | NET_CFG_ADDRS_EXCLUDE)) {
        struct net_addr_key key = {.prefixlen = 128};
        __builtin_memcpy(key.addr, raddr, 16);
        if ((f & NET_CFG_ADDRS_INCLUDE) && !addr_include.lookup(&key))
            return 0;
        if ((f & NET_CFG_ADDRS_EXCLUDE) && addr_exclude.lookup(&key))
            return 0;
    }
    return 1;
}

static __always_inline void ep_add(struct net_owner *o, u64 conns, u64 fails, u64 sent, u64 recv)
{
    struct net_ep_key key = {};
    __builtin_memcpy(key.addr, o->daddr, 16);
    if (o->flags & NET_F_PASSIVE) {
        key.port = o->sport;
        key.direction = NET_DIR_IN;
    } else {
        key.port = o->dport;
        key.direction = NET_DIR_OUT;
    }
    struct net_ep_value *v = endpoints.lookup(&key);
    if (!v) {
        struct net_ep_value zero = {};
        if (endpoints.insert(&key, &zero) == 0)
            net_count(NET_CNT_ENDPOINTS_NEW);
        v = endpoints.lookup(&key);
        if (!v)
            return;
    }
    /* Atomic: the same endpoint is updated from softirq on any CPU. */
    if (conns)
        __sync_fetch_and_add(&v->connections, conns);
    if (fails)
        __sync_fetch_and_add(&v->failures, fails);
    if (sent)
        __sync_fetch_and_add(&v->bytes_sent, sent);
    if (recv)
        __sync_fetch_and_add(&v->bytes_received, recv);
}

/* What a close reads from struct tcp_sock. */
struct net_payload {
    u64 sent;
    u64 received;
    u32 retransmits;
};

/* Payload bytes both ways, at the close. tcp_sock.bytes_acked and bytes_received count
 * sequence space (RFC 4898 tcpEStatsAppHCThruOctetsAcked/Received), where a SYN and a
 * FIN take one number each: bytes_acked includes our SYN (an active open: snd_una starts
 * at the ISN; a passive socket's starts after it, tcp_create_openreq_child) and our FIN
 * once acknowledged (snd_una reached write_seq after a FIN was queued: the socket
 * entered FIN_WAIT1 or LAST_ACK, tcp_close_state); bytes_received includes the peer's
 * FIN once it arrived (tcp_fin() sets SOCK_DONE, net/ipv4/tcp_input.c). */
static __always_inline void payload_bytes(struct net_owner *o, u64 sk, struct net_payload *p)
{
    u64 acked = 0, received = 0, sk_flags = 0;
    u32 snd_una = 0, write_seq = 0;
    p->retransmits = 0;
    bpf_probe_read_kernel(&acked, sizeof(acked), (void *)(sk + OFF_TCP_SOCK_BYTES_ACKED));
    bpf_probe_read_kernel(&received, sizeof(received), (void *)(sk + OFF_TCP_SOCK_BYTES_RECEIVED));
    bpf_probe_read_kernel(&p->retransmits, sizeof(p->retransmits),
                          (void *)(sk + OFF_TCP_SOCK_TOTAL_RETRANS));
    bpf_probe_read_kernel(&snd_una, sizeof(snd_una), (void *)(sk + OFF_TCP_SOCK_SND_UNA));
    bpf_probe_read_kernel(&write_seq, sizeof(write_seq), (void *)(sk + OFF_TCP_SOCK_WRITE_SEQ));
    bpf_probe_read_kernel(&sk_flags, sizeof(sk_flags), (void *)(sk + OFF_SOCK_SK_FLAGS));
    if (!(o->flags & NET_F_PASSIVE) && acked)
        acked--;
    if ((o->flags & NET_F_FIN_SENT) && snd_una == write_seq && acked)
        acked--;
    if ((sk_flags & (1 << NET_SOCK_DONE)) && received)
        received--;
    p->sent = acked;
    p->received = received;
}

/* Whether the options ask for events of this kind (net_config.events): the event is
 * built only then; the aggregation does not depend on it. */
static __always_inline int wanted(u32 bit)
{
    struct net_config *cfg = config();
    return cfg && (cfg->events & bit);
}

/* The fields every event has, from the owner record; `e` is zeroed. */
static __always_inline void fill_event(struct net_event *e, struct net_owner *o, u8 kind,
                                       u64 now, u64 duration_ns)
{
    __builtin_memcpy(&e->hdr, &o->hdr, sizeof(e->hdr));
    e->hdr.ts_ns = now;
    if (o->family == NET_AF_INET) {  /* the event: IPv4 in the first 4 bytes */
        __builtin_memcpy(e->saddr, o->saddr + 12, 4);
        __builtin_memcpy(e->daddr, o->daddr + 12, 4);
    } else {
        __builtin_memcpy(e->saddr, o->saddr, 16);
        __builtin_memcpy(e->daddr, o->daddr, 16);
    }
    e->duration_ns = duration_ns;
    e->sport = o->sport;
    e->dport = o->dport;
    e->family = o->family;
    e->kind = kind;
    e->flags = o->flags;
}

/* The socket's pending error (sock.sk_err): errno or 0. */
static __always_inline void read_sk_err(struct net_event *e, u64 sk)
{
    bpf_probe_read_kernel(&e->error, sizeof(e->error), (void *)(sk + OFF_SOCK_SK_ERR));
}

static __always_inline void send_event(void *ctx, struct net_event *e)
{
    count(CNT_SEEN);
    submit_event(ctx, e, sizeof(*e));
}

/* An active open's result (the handshake's end, SYN_SENT -> ESTABLISHED or CLOSE):
 * the endpoint's connections or failures, the connect event. */
static __always_inline void on_connect_result(void *ctx, struct net_owner *o, u64 sk,
                                              int established)
{
    u64 now = bpf_ktime_get_ns();
    if (established) {
        o->flags |= NET_F_ESTABLISHED;
        o->established_ns = now;
        ep_add(o, 1, 0, 0, 0);
    } else {
        ep_add(o, 0, 1, 0, 0);
    }
    if (!wanted(NET_EV_CONNECT))
        return;
    struct net_event e = {};
    fill_event(&e, o, NET_CONNECT, now, now - o->hdr.ts_ns);
    read_sk_err(&e, sk);
    send_event(ctx, &e);
}

/* An owned connection reached CLOSE: its bytes into the endpoint, the close event. */
static __always_inline void on_close(void *ctx, struct net_owner *o, u64 sk)
{
    struct net_payload p;
    payload_bytes(o, sk, &p);
    ep_add(o, 0, 0, p.sent, p.received);
    if (!wanted(NET_EV_CLOSE))
        return;
    u64 now = bpf_ktime_get_ns();
    struct net_event e = {};
    fill_event(&e, o, NET_CLOSE, now, o->established_ns ? now - o->established_ns : 0);
    e.bytes_sent = p.sent;
    e.bytes_received = p.received;
    e.retransmits = p.retransmits;
    read_sk_err(&e, sk);
    send_event(ctx, &e);
}

/* connect(2), process context: the owner is the current task. `o` holds the
 * connection (zeroed otherwise); the local port is not chosen yet (0). */
static __always_inline void on_syn_sent(struct net_owner *o, u64 sk)
{
    struct net_config *cfg = config();
    if (!cfg || !current_matches())
        return;
    if (!conn_passes(cfg, o->sport, o->dport, o->daddr, 1))
        return;
    fill_event_hdr(&o->hdr, bpf_ktime_get_ns());
    if (owners.update(&sk, o))
        net_count(NET_CNT_OWNERS_FULL);
}

/* A passive socket completed its handshake (softirq): unowned until accept(2). */
static __always_inline void on_passive_established(struct net_owner *o, u64 sk)
{
    o->flags = NET_F_PASSIVE | NET_F_UNOWNED | NET_F_ESTABLISHED;
    o->established_ns = bpf_ktime_get_ns();
    if (owners.update(&sk, o))
        net_count(NET_CNT_OWNERS_FULL);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != NET_IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int old = args->oldstate, new = args->newstate;
    int syn_sent = new == NET_TCP_SYN_SENT;
    if (syn_sent || (old == NET_TCP_SYN_RECV && new == NET_TCP_ESTABLISHED)) {
        struct net_owner o = {};
        CONN_FROM_ARGS(&o, args);
        if (syn_sent)
            on_syn_sent(&o, sk);
        else
            on_passive_established(&o, sk);
        return 0;
    }
    /* Of the other changes, only these touch the owner record: the handshake's end, a
     * FIN queued (FIN_WAIT1, LAST_ACK) or received (CLOSE_WAIT), the end (CLOSE).
     * FIN_WAIT2, CLOSING, TIME_WAIT, LISTEN and a request's SYN_RECV return here,
     * before the lookup. */
    if (old != NET_TCP_SYN_SENT && new != NET_TCP_FIN_WAIT1 && new != NET_TCP_CLOSE_WAIT
        && new != NET_TCP_LAST_ACK && new != NET_TCP_CLOSE)
        return 0;
    struct net_owner *o = owners.lookup(&sk);
    if (!o)
        return 0;
    /* The clock only where an event or a duration needs it: bpf_ktime_get_ns() costs
     * as much as several kernel reads, and most state changes need neither. */
    if (old == NET_TCP_SYN_SENT) {
        /* The handshake's end: the local port is known now. */
        struct net_config *cfg = config();
        o->sport = args->sport;
        if (!cfg || !conn_passes(cfg, o->sport, o->dport, o->daddr, 0)) {
            owners.delete(&sk);
            return 0;
        }
        on_connect_result(args, o, sk, new == NET_TCP_ESTABLISHED);
        if (new != NET_TCP_ESTABLISHED)
            owners.delete(&sk);
        return 0;
    }
    if (new == NET_TCP_FIN_WAIT1 || new == NET_TCP_LAST_ACK)
        o->flags |= NET_F_FIN_SENT;
    if (old == NET_TCP_ESTABLISHED && new == NET_TCP_FIN_WAIT1)
        o->flags |= NET_F_LOCAL_FIN;
    else if (old == NET_TCP_ESTABLISHED && new == NET_TCP_CLOSE_WAIT)
        o->flags |= NET_F_PEER_FIN;
    if (new != NET_TCP_CLOSE)
        return 0;
    if (!(o->flags & NET_F_UNOWNED))
        on_close(args, o, sk);
    owners.delete(&sk);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    u64 sk = (u64)args->skaddr;
    struct net_owner *o = owners.lookup(&sk);
    if (o)
        o->flags |= NET_F_RESET_RECEIVED;
    return 0;
}

/* A raw tracepoint: the tracepoint's argument struct names enum sk_rst_reason, which
 * the kernel headers BCC compiles against may lack. Its first argument is the socket
 * (TP_PROTO(const struct sock *sk, ...), include/trace/events/tcp.h), NULL when the
 * reset answers a segment no socket owns. */
RAW_TRACEPOINT_PROBE(tcp_send_reset)
{
    u64 sk = ctx->args[0];
    if (!sk)
        return 0;
    struct net_owner *o = owners.lookup(&sk);
    if (o)
        o->flags |= NET_F_RESET_SENT;
    return 0;
}

/* The sock behind a file descriptor of the current task: task->files->fdt->fd[fd]
 * ->private_data (a struct socket for a socket's file) ->sk. A descriptor that is not a
 * socket's gives some pointer that `owners` does not hold. */
static __always_inline u64 fd_sock(long fd)
{
    u64 task = bpf_get_current_task();
    u64 files = 0, fdt = 0, fds = 0, file = 0, socket = 0, sk = 0;
    u32 max_fds = 0;
    bpf_probe_read_kernel(&files, sizeof(files), (void *)(task + OFF_TASK_STRUCT_FILES));
    bpf_probe_read_kernel(&fdt, sizeof(fdt), (void *)(files + OFF_FILES_STRUCT_FDT));
    bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + OFF_FDTABLE_MAX_FDS));
    if (fd < 0 || fd >= max_fds)
        return 0;
    bpf_probe_read_kernel(&fds, sizeof(fds), (void *)(fdt + OFF_FDTABLE_FD));
    bpf_probe_read_kernel(&file, sizeof(file), (void *)(fds + fd * sizeof(u64)));
    bpf_probe_read_kernel(&socket, sizeof(socket), (void *)(file + OFF_FILE_PRIVATE_DATA));
    bpf_probe_read_kernel(&sk, sizeof(sk), (void *)(socket + OFF_SOCKET_SK));
    return sk;
}

static __always_inline int on_accept_exit(void *ctx, long ret)
{
    if (ret < 0)
        return 0;
    u64 sk = fd_sock(ret);
    struct net_owner *o = sk ? owners.lookup(&sk) : 0;
    if (!o || !(o->flags & NET_F_UNOWNED))
        return 0;  /* not a TCP socket seen becoming ESTABLISHED since the monitor loaded */
    struct net_config *cfg = config();
    if (!cfg || !current_matches() || !conn_passes(cfg, o->sport, o->dport, o->daddr, 0)) {
        owners.delete(&sk);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
    fill_event_hdr(&o->hdr, now);
    o->flags &= ~NET_F_UNOWNED;
    ep_add(o, 1, 0, 0, 0);
    if (!wanted(NET_EV_ACCEPT))
        return 0;
    struct net_event e = {};
    fill_event(&e, o, NET_ACCEPT, now, now - o->established_ns);  /* in the accept queue */
    send_event(ctx, &e);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4)
{
    return on_accept_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept)
{
    return on_accept_exit(args, args->ret);
}
