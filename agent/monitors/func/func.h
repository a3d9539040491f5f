/* FuncMonitor's shared definitions, defined once: agent/monitors/func/monitor.py mirrors
 * the structs with ctypes and tests/monitors/test_func.py compiles this header with gcc
 * to check that both agree on every offset and the size.
 */
#ifndef EBPF_AGENT_FUNC_H
#define EBPF_AGENT_FUNC_H

#include "types.h"  /* agent/bpf/: struct event_hdr */

/* Latency histogram: slot 0 counts 0 ns, slot i >= 1 counts [2^(i-1), 2^i) ns, the last
 * slot everything above (2^38 ns is about 4.6 minutes). */
#define FUNC_HIST_SLOTS 40

#define FUNC_F_LATENCY 1         /* latency_ns is set: the event was sent at return */

/* func_counters[] indices (per CPU); monitor.py FUNC_COUNTERS mirrors this list. */
#define FCNT_SUPPRESSED    0     /* events refused by the in-kernel rate limit */
#define FCNT_NO_ENTRY      1     /* a return without its entry (table full, attached mid-call) */
#define NR_FUNC_COUNTERS   4

/* One per resolved function, in a per-CPU array indexed by probe id: the hot path
 * touches only this CPU's copy, userspace sums the copies. */
struct func_stats {
    u64 count;                   /* calls seen at entry (after target filtering) */
    u64 total_ns;                /* sum of latencies of calls that returned */
    u64 hist[FUNC_HIST_SLOTS];   /* log2 of latency in ns */
};

/* Latency: entry time of a call in flight, by thread and function. */
struct func_entry_key {
    u32 tid;
    u32 probe_id;
};

/* The rate limit's window, shared by all CPUs (a plain array, not per CPU). */
struct func_rate {
    u64 window_start_ns;
    u64 sent;                    /* events admitted in this window */
};

struct func_event {
    struct event_hdr hdr;        /* common.h; ts_ns: at entry */
    u64 latency_ns;              /* valid when flags & FUNC_F_LATENCY */
    u32 probe_id;                /* index into the monitor's resolved probe list */
    u32 flags;                   /* FUNC_F_* */
};

#endif
