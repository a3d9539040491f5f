/* Shared by every monitor program: in-kernel target filtering, followed children,
 * counters, the event header's fill helper, and the event transport (ring buffer or
 * perf buffer). Constants and layouts userspace mirrors live in types.h.
 *
 * Kernel structs are never read through header types: the headers BCC compiles
 * against may belong to another kernel (docs/kernel.md). Offsets come from the running
 * kernel's BTF as -D constants (agent/kernel/btf.py), read with bpf_probe_read_kernel.
 */
#ifndef EBPF_AGENT_COMMON_H
#define EBPF_AGENT_COMMON_H

/* Constants that must agree with a setting come only from the settings, as -D flags
 * (BccMonitor.cflags in agent/monitors/bcc.py): no default here could drift from them. */
#ifndef MAX_TARGET_PIDS
#error "MAX_TARGET_PIDS must be defined (targets.max_pids)"
#endif
#ifndef MAX_TARGET_UIDS
#error "MAX_TARGET_UIDS must be defined (targets.max_uids)"
#endif
#ifndef MAX_TARGET_COMMS
#error "MAX_TARGET_COMMS must be defined (targets.max_comms)"
#endif
#ifndef WAKEUP_EVERY
#error "WAKEUP_EVERY must be defined (transport.wakeup_every)"
#endif
#ifndef RINGBUF_PAGES
#error "RINGBUF_PAGES must be defined (transport.ringbuf_pages)"
#endif
#ifndef MAX_FOLLOWED
#define MAX_FOLLOWED 65536
#endif

#include "types.h"

/* target_pids: PID_TARGET / PID_FOLLOWED values (types.h). */
BPF_HASH(target_pids, u32, u8, MAX_TARGET_PIDS + MAX_FOLLOWED);
BPF_HASH(target_uids, u32, u8, MAX_TARGET_UIDS);
BPF_HASH(target_comms, struct comm_key, u8, MAX_TARGET_COMMS);
BPF_ARRAY(target_flags, u32, 1);
BPF_PERCPU_ARRAY(counters, u64, NR_COUNTERS);

static __always_inline void count(u32 idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline u32 active_filters(void)
{
    u32 zero = 0;
    u32 *f = target_flags.lookup(&zero);
    return f ? *f : 0;
}

static __always_inline int pid_matches(u32 tgid, u32 flags)
{
    if (!(flags & TF_PIDS))
        return 1;
    u8 *kind = target_pids.lookup(&tgid);
    return kind && (*kind == PID_TARGET || (flags & TF_FOLLOW));
}

static __always_inline int comm_matches(struct comm_key *key, u32 flags)
{
    return !(flags & TF_COMMS) || target_comms.lookup(key);
}

/* Pid and uid filters for the current task; comm is separate because the exec
 * monitor also accepts the comm a process takes after exec. Each helper call is paid
 * only when its filter is on: on a busy hook (every syscall) they are the cost. */
static __always_inline int current_pid_uid_match(u32 flags)
{
    if (flags & TF_PIDS) {
        u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (!pid_matches(tgid, flags))
            return 0;
    }
    if (flags & TF_UIDS) {
        u32 uid = (u32)bpf_get_current_uid_gid();
        if (!target_uids.lookup(&uid))
            return 0;
    }
    return 1;
}

static __always_inline int current_matches(void)
{
    u32 flags = active_filters();
    if (!(flags & TF_READY))
        return 0;
    if (!(flags & TF_FILTERS))
        return 1;
    if (!current_pid_uid_match(flags))
        return 0;
    if (flags & TF_COMMS) {
        struct comm_key key = {};
        bpf_get_current_comm(&key.comm, sizeof(key.comm));
        return comm_matches(&key, flags);
    }
    return 1;
}

/* The process ids of the current task: its tgid and its thread-group leader's start
 * time (a thread's own start_boottime is the thread's), and the same for its real
 * parent. Six bpf_probe_read_kernel calls through BTF offsets (docs/kernel.md). */
static __always_inline void current_lineage(struct event_hdr *h)
{
    u64 task = bpf_get_current_task();
    u64 leader = 0, parent = 0, parent_leader = 0;
    bpf_probe_read_kernel(&leader, sizeof(leader), (void *)(task + OFF_TASK_STRUCT_GROUP_LEADER));
    bpf_probe_read_kernel(&h->start_ns, sizeof(h->start_ns),
                          (void *)(leader + OFF_TASK_STRUCT_START_BOOTTIME));
    bpf_probe_read_kernel(&parent, sizeof(parent), (void *)(task + OFF_TASK_STRUCT_REAL_PARENT));
    bpf_probe_read_kernel(&h->ppid, sizeof(h->ppid), (void *)(parent + OFF_TASK_STRUCT_TGID));
    bpf_probe_read_kernel(&parent_leader, sizeof(parent_leader),
                          (void *)(parent + OFF_TASK_STRUCT_GROUP_LEADER));
    bpf_probe_read_kernel(&h->parent_start_ns, sizeof(h->parent_start_ns),
                          (void *)(parent_leader + OFF_TASK_STRUCT_START_BOOTTIME));
}

/* Fill the header for the current task; ts_ns is the monitor's moment of the event
 * (e.g. a call's entry), not necessarily now. The lineage reads cost: call it once
 * per submitted event, not on every hook. */
static __always_inline void fill_event_hdr(struct event_hdr *h, u64 ts_ns)
{
    u64 id = bpf_get_current_pid_tgid();
    u64 ugid = bpf_get_current_uid_gid();
    h->ts_ns = ts_ns;
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->ppid = 0;
    h->start_ns = 0;
    h->parent_start_ns = 0;
    current_lineage(h);
    h->uid = (u32)ugid;
    h->gid = ugid >> 32;
    h->_pad = 0;
    h->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

/* Follow children of targets: sched_process_fork runs in the parent (current) with
 * the child's pid (its tid: for a new thread that is not a tgid, which is harmless:
 * it is removed at that thread's exit). Tracepoint sched:sched_process_fork. */
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 flags = active_filters();
    if (!(flags & TF_PIDS) || !(flags & TF_FOLLOW))
        return 0;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!target_pids.lookup(&parent))
        return 0;
    u32 child = args->child_pid;
    u8 followed = PID_FOLLOWED;
    /* BPF_NOEXIST: never demote an operator's pid; -EEXIST is not a failure. */
    int err = target_pids.insert(&child, &followed);
    if (err && err != -ERR_EEXIST)
        count(CNT_FOLLOW_FULL);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    u8 *kind = target_pids.lookup(&tid);
    if (kind && *kind == PID_FOLLOWED)
        target_pids.delete(&tid);
    return 0;
}

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* Submit one event; a full buffer is a counted drop, never a silent one. */
static __always_inline void submit_event(void *ctx, void *data, u64 size)
{
#ifdef USE_RINGBUF
    /* Flags 0 is the kernel's adaptive notification: bpf_ringbuf_commit() wakes the
     * consumer when it had read everything before this record (the buffer was empty to
     * it), so an event at a low rate is delivered at once. Under load the consumer is
     * behind and is not woken per event (it batches: agent/monitors/ringbuf.py);
     * WAKEUP_EVERY events per CPU still force a wake-up, a backstop for a consumer that
     * went to sleep. */
    u64 flags = 0;
    u32 idx = CNT_SINCE_WAKEUP;
    u64 *since = counters.lookup(&idx);
    if (since && ++*since >= WAKEUP_EVERY) {
        *since = 0;
        flags = BPF_RB_FORCE_WAKEUP;
    }
    int err = events.ringbuf_output(data, size, flags);
#else
    int err = events.perf_submit(ctx, data, size);
#endif
    count(err ? CNT_DROPPED : CNT_SUBMITTED);
}

#endif /* EBPF_AGENT_COMMON_H */
