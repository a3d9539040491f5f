/* FuncMonitor: call counts, latency and optional per-call events for functions picked
 * by glob patterns (uprobes for user-space symbols, kprobes for kernel functions).
 *
 * With uprobe_multi links (Linux 6.6+) one pair of programs serves every function, the
 * probe id coming from the attach cookie (FUNC_COOKIE_PROGRAMS). Otherwise this file is
 * a template: agent/monitors/func/monitor.py replaces the FUNC_PROBES marker below with one
 * tiny program per resolved function, e.g.
 *     int func_entry_3(struct pt_regs *ctx) { return on_entry(ctx, 3); }
 * (as BCC's funccount does). A uprobe cannot tell its program which attachment fired
 * it (BCC 0.26 has no attach cookies), so the probe id must be a compile-time constant
 * of a program of its own. Every program shares the inlined bodies below.
 *
 * -D constants from monitor.py: NR_PROBES, FUNC_LATENCY, FUNC_EVENTS, EVENTS_PER_SECOND,
 * MAX_INFLIGHT.
 */
#include "common.h"
#include "func.h"

/* From the options and the resolved probes as -D flags (FuncMonitor.extra_cflags). */
#if !defined(NR_PROBES) || !defined(FUNC_LATENCY) || !defined(FUNC_EVENTS)
#error "NR_PROBES, FUNC_LATENCY and FUNC_EVENTS must be defined"
#endif
#ifndef EVENTS_PER_SECOND
#error "EVENTS_PER_SECOND must be defined (events_per_second)"
#endif
#ifndef MAX_INFLIGHT
#define MAX_INFLIGHT 10240
#endif

#define NSEC_PER_SEC 1000000000ULL

BPF_PERCPU_ARRAY(func_stats, struct func_stats, NR_PROBES);
BPF_PERCPU_ARRAY(func_counters, u64, NR_FUNC_COUNTERS);
BPF_ARRAY(func_rate, struct func_rate, 1);
/* LRU: an entry whose return never comes (thread killed mid-call, longjmp or a C++
 * exception unwinding past the probed frame: the uretprobe trampoline is skipped) is
 * evicted eventually instead of filling the table for good. */
BPF_TABLE("lru_hash", struct func_entry_key, u64, func_entries, MAX_INFLIGHT);

static __always_inline void func_count(u32 idx)
{
    u64 *v = func_counters.lookup(&idx);
    if (v)
        *v += 1;
}

/* Fixed one-second window shared by all CPUs. Two CPUs opening a new window at the
 * same instant may both reset it, so a window can admit a few events over the limit;
 * an exact limit would need a lock on the hot path, not worth it for a rate cap. */
static __always_inline int rate_admit(void)
{
    u32 zero = 0;
    struct func_rate *r = func_rate.lookup(&zero);
    if (!r)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now - r->window_start_ns >= NSEC_PER_SEC) {
        r->window_start_ns = now;
        r->sent = 0;
    }
    if (r->sent >= EVENTS_PER_SECOND)
        return 0;
    lock_xadd(&r->sent, 1);
    return 1;
}

static __always_inline void emit(struct pt_regs *ctx, u32 id, u64 ts, u64 latency, u32 flags)
{
    count(CNT_SEEN);
    if (!rate_admit()) {
        func_count(FCNT_SUPPRESSED);
        return;
    }
    struct func_event e = {};
    fill_event_hdr(&e.hdr, ts);
    e.latency_ns = latency;
    e.probe_id = id;
    e.flags = flags;
    submit_event(ctx, &e, sizeof(e));
}

static __always_inline int on_entry(struct pt_regs *ctx, u32 id)
{
    if (!current_matches())
        return 0;
    struct func_stats *s = func_stats.lookup(&id);
    if (s)
        s->count += 1;  /* per-CPU and BPF programs do not nest on a CPU: no atomics */
    u64 now = bpf_ktime_get_ns();
#if FUNC_LATENCY
    struct func_entry_key key = {.tid = (u32)bpf_get_current_pid_tgid(), .probe_id = id};
    /* A recursive call overwrites its caller's entry: the inner return is measured, the
     * outer one finds nothing and counts FCNT_NO_ENTRY. */
    if (func_entries.update(&key, &now))
        count(CNT_PENDING_FULL);
#elif FUNC_EVENTS
    emit(ctx, id, now, 0, 0);
#endif
    return 0;
}

static __always_inline int on_return(struct pt_regs *ctx, u32 id)
{
    struct func_entry_key key = {.tid = (u32)bpf_get_current_pid_tgid(), .probe_id = id};
    u64 *start = func_entries.lookup(&key);
    if (!start) {
        /* Most misses are calls of processes that are not targets (no entry stored):
         * only a target's miss is worth counting, and only misses pay for the check. */
        if (current_matches())
            func_count(FCNT_NO_ENTRY);
        return 0;
    }
    u64 entry_ns = *start;
    u64 delta = bpf_ktime_get_ns() - entry_ns;
    func_entries.delete(&key);
    struct func_stats *s = func_stats.lookup(&id);
    if (s) {
        s->total_ns += delta;
        u32 slot = bpf_log2l(delta);  /* 0 for 0 ns, else floor(log2(delta)) + 1 */
        if (slot >= FUNC_HIST_SLOTS)
            slot = FUNC_HIST_SLOTS - 1;
        s->hist[slot] += 1;
    }
#if FUNC_EVENTS
    emit(ctx, id, entry_ns, delta, FUNC_F_LATENCY);
#endif
    return 0;
}

/* Never attached to a function: loaded only to ask the kernel whether it has
 * uprobe_multi links (agent/kernel/probes.py UprobeMultiLinks.create). */
int func_feature_probe(struct pt_regs *ctx)
{
    return 0;
}

#ifdef FUNC_COOKIE_PROGRAMS
/* One entry (and one return) program for every function: each uprobe_multi attach point
 * carries the function's probe id as its cookie (agent/monitors/func/cookie_links.py). */
int func_entry_any(struct pt_regs *ctx)
{
    return on_entry(ctx, (u32)bpf_get_attach_cookie(ctx));
}
#if FUNC_LATENCY
int func_return_any(struct pt_regs *ctx)
{
    return on_return(ctx, (u32)bpf_get_attach_cookie(ctx));
}
#endif
#endif

/* FUNC_PROBES */
