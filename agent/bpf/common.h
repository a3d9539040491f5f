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
#ifndef MAX_TARGET_CGROUPS
#error "MAX_TARGET_CGROUPS must be defined (targets.max_cgroups)"
#endif
#ifndef MAX_TARGET_CONTAINERS
#error "MAX_TARGET_CONTAINERS must be defined (targets.max_containers)"
#endif
#ifndef RINGBUF_PAGES
#error "RINGBUF_PAGES must be defined (transport.ringbuf_pages)"
#endif
#ifndef MAX_FOLLOWED
#define MAX_FOLLOWED 65536
#endif
/* Cgroups of targeted containers (and their own sub-cgroups need no entry: the
 * ancestor walk finds the container's). */
#ifndef MAX_CONTAINER_CGROUPS
#define MAX_CONTAINER_CGROUPS 16384
#endif
#ifndef CGROUP_VERDICTS
#define CGROUP_VERDICTS 4096
#endif

#include "types.h"

/* target_pids: PID_TARGET / PID_FOLLOWED values (types.h). */
BPF_HASH(target_pids, u32, u8, MAX_TARGET_PIDS + MAX_FOLLOWED);
BPF_HASH(target_uids, u32, u8, MAX_TARGET_UIDS);
BPF_HASH(target_comms, struct comm_key, u8, MAX_TARGET_COMMS);
/* [0]: TF_* flags; [TF_CGROUP_GEN], [TF_CGROUP_EPOCH]: the generations of
 * target_cgroups, userspace's and the kernel's (types.h). */
BPF_ARRAY(target_flags, u32, TF_ENTRIES);
/* cgroup v2 id -> CG_* kinds. A plain hash: container cgroups added by the kernel never
 * evict an operator's path; a full map is counted (CNT_CGROUPS_FULL). */
BPF_HASH(target_cgroups, u64, u8, MAX_TARGET_CGROUPS + MAX_CONTAINER_CGROUPS);
BPF_LPM_TRIE(target_containers, struct container_key, u8, MAX_TARGET_CONTAINERS);
/* Per current cgroup id: what the ancestor walk found (an LRU: it bounds itself). */
BPF_TABLE("lru_hash", u64, struct cgroup_verdict, cgroup_verdicts, CGROUP_VERDICTS);
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

/* The CG_* kinds of the current task's cgroup and of its ancestors. A cgroup v2 path
 * target matches its whole subtree: bpf_get_current_ancestor_cgroup_id(level)
 * (bpf-helpers(7)) gives the id of the task's ancestor cgroup at each level, the root
 * being level 0, the task's own cgroup its deepest level, and 0 beyond it. */
static __always_inline u32 cgroup_ancestry_kinds(u64 cg)
{
    u32 kinds = 0;
    for (int level = 0; level < CGROUP_MAX_LEVELS; level++) {
        u64 anc = bpf_get_current_ancestor_cgroup_id(level);
        if (!anc)
            break;
        u8 *k = target_cgroups.lookup(&anc);
        if (k)
            kinds |= *k;
        if (anc == cg)
            return kinds;
    }
    u8 *own = target_cgroups.lookup(&cg);  /* deeper than CGROUP_MAX_LEVELS */
    if (own)
        kinds |= *own;
    return kinds;
}

#ifdef CGROUP_SLOT
/* The last verdict of this CPU, in front of cgroup_verdicts: a task looping on
 * syscalls finds its cgroup here at the cost of an array access (inlined by the
 * verifier) and a few compares, where an LRU hash lookup is a call that hashes the key
 * and walks its bucket (and sets the entry's reference bit when it is clear).
 *
 * One CPU's programs can still interleave on its slot: a program interrupted by
 * another one (a softirq's), or preempted where the kernel runs programs with
 * migration disabled only (uprobes: bpf_prog_run_array_uprobe()). So it is a
 * sequence lock of one CPU: seq is odd while a writer fills the slot, and only the
 * writer whose compare-and-swap made it odd writes; a reader takes the fields only
 * when seq was even and unchanged around its reads. seq only grows, so an unchanged
 * value means no write happened in between. All of it happens on one CPU (this
 * CPU's copy, migration disabled), which sees its own accesses in program order:
 * only the compiler must not reorder them (the barriers). Compiled in with CGROUP_SLOT
 * (BccMonitor.cflags: kernels with BPF_CMPXCHG, Linux 5.12+). */
struct cgroup_slot {
    u64 seq;
    u64 cg;
    u32 gen;
    u32 epoch;
    u32 kinds;
    u32 _pad;
};
BPF_PERCPU_ARRAY(cgroup_last, struct cgroup_slot, 1);

#define CG_BARRIER() asm volatile("" ::: "memory")
#define CG_READ_ONCE(x) (*(volatile typeof(x) *)&(x))

static __always_inline int cgroup_slot_get(struct cgroup_slot *s, u64 cg, u32 gen,
                                           u32 epoch, u32 *kinds)
{
    u64 seq = CG_READ_ONCE(s->seq);
    CG_BARRIER();
    if ((seq & 1) || s->cg != cg || s->gen != gen || s->epoch != epoch)
        return 0;
    u32 k = s->kinds;
    CG_BARRIER();
    if (CG_READ_ONCE(s->seq) != seq)
        return 0;
    *kinds = k;
    return 1;
}

static __always_inline void cgroup_slot_put(struct cgroup_slot *s, u64 cg, u32 gen,
                                            u32 epoch, u32 kinds)
{
    u64 seq = CG_READ_ONCE(s->seq);
    if ((seq & 1) || __sync_val_compare_and_swap(&s->seq, seq, seq + 1) != seq)
        return;  /* another program on this CPU is writing it: leave it to that one */
    CG_BARRIER();
    s->cg = cg;
    s->gen = gen;
    s->epoch = epoch;
    s->kinds = kinds;
    CG_BARRIER();
    CG_READ_ONCE(s->seq) = seq + 2;
}
#endif

/* The cgroup and container filters. The ancestor walk costs a helper call and a lookup
 * per level, too much for every syscall: its result is cached per cgroup id, tagged
 * with the generation userspace bumps after changing target_cgroups and the epoch the
 * kernel bumps after removing from it (cgroup_rmdir below). Both are read before the
 * walk, so a walk that raced a change carries the old value and is never used. The
 * kernel's insertions (cgroup_mkdir below) need no bump: they are of new ids, with no
 * verdicts cached yet for them or for any cgroup under them. A task moved to another
 * cgroup has another id, hence another verdict. */
static __always_inline int cgroup_match(u32 flags)
{
    u32 need = ((flags & TF_CGROUPS) ? CG_PATH : 0) | ((flags & TF_CONTAINERS) ? CG_CONTAINER : 0);
    u64 cg = bpf_get_current_cgroup_id();
    u32 idx = TF_CGROUP_GEN;
    u32 *genp = target_flags.lookup(&idx);
    u32 gen = genp ? *genp : 0;
    idx = TF_CGROUP_EPOCH;
    u32 *epochp = target_flags.lookup(&idx);
    u32 epoch = epochp ? *epochp : 0;
    u32 kinds;
#ifdef CGROUP_SLOT
    u32 zero = 0;
    struct cgroup_slot *slot = cgroup_last.lookup(&zero);
    if (slot && cgroup_slot_get(slot, cg, gen, epoch, &kinds))
        return (kinds & need) == need;
#endif
    struct cgroup_verdict *v = cgroup_verdicts.lookup(&cg);
    if (v && v->gen == gen && v->epoch == epoch) {
        kinds = v->kinds;
    } else {
        kinds = cgroup_ancestry_kinds(cg);
        struct cgroup_verdict fresh = {.gen = gen, .epoch = epoch, .kinds = kinds};
        cgroup_verdicts.update(&cg, &fresh);
    }
#ifdef CGROUP_SLOT
    if (slot)
        cgroup_slot_put(slot, cg, gen, epoch, kinds);
#endif
    return (kinds & need) == need;
}

/* Pid, uid, cgroup and container filters for the current task; comm is separate
 * because the exec monitor also accepts the comm a process takes after exec. Each
 * helper call is paid only when its filter is on: on a busy hook (every syscall) they
 * are the cost. */
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
    if ((flags & (TF_CGROUPS | TF_CONTAINERS)) && !cgroup_match(flags))
        return 0;
    return 1;
}

static __always_inline int current_matches(void)
{
    u32 flags = active_filters();
    /* No target: one test of the flags word (ready, no filter on). */
    if ((flags & (TF_READY | TF_FILTERS)) == TF_READY)
        return 1;
    if (!(flags & TF_READY))
        return 0;
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

/* A container's cgroup, targeted from its creation. Tracepoint cgroup:cgroup_mkdir
 * (fields root, level, id, path as __data_loc: /sys/kernel/tracing/events/cgroup/
 * cgroup_mkdir/format) fires inside mkdir(2) on the cgroup filesystem, in
 * cgroup_mkdir() before kernfs_activate() makes the directory visible: no process can
 * be moved in before this program has run, so the container's first event matches.
 * The last path component names the container as workload.py's container_of() reads
 * it: [docker-|cri-containerd-|crio-|libpod-]<64 hex>[.scope], preceded by "/"
 * (crio-conmon-/libpod-conmon- scopes hold the runtime's monitor: never matched). */
#define CG_TAIL 128  /* the end of the path read: "/cri-containerd-<64>.scope" is 86 */
struct cgroup_name_scratch {
    char tail[CG_TAIL];
    struct container_key key;
};
BPF_PERCPU_ARRAY(cgroup_name_buf, struct cgroup_name_scratch, 1);

#define CG_AT(s, i) ((s)->tail[(i) & (CG_TAIL - 1)])

/* tail[at - len, at) == name, preceded by "/". */
static __always_inline int cgroup_name_before(struct cgroup_name_scratch *s, u32 at,
                                              const char *name, u32 len)
{
    if (at < len + 1)
        return 0;
    for (u32 i = 0; i < len; i++)
        if (CG_AT(s, at - len + i) != name[i])
            return 0;
    return CG_AT(s, at - len - 1) == '/';
}

TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
    /* Not gated on TF_CONTAINERS: while userspace switches a container target on, it
     * fills target_containers and then walks the hierarchy; a container made meanwhile
     * is matched here (an empty trie is one failed lookup per mkdir). */
    if (args->root != CGROUP2_HIERARCHY)
        return 0;
    u32 zero = 0;
    struct cgroup_name_scratch *s = cgroup_name_buf.lookup(&zero);
    if (!s)
        return 0;
    u32 loc = args->data_loc_path;
    u32 off = loc & 0xFFFF, len = loc >> 16;  /* len counts the NUL */
    if (len < CONTAINER_ID_LEN + 2)
        return 0;
    u32 n = len - 1;
    u32 take = n < CG_TAIL ? n : CG_TAIL;
    asm volatile("" : "+r"(take));
    if (take == 0 || take > CG_TAIL)
        return 0;
    if (bpf_probe_read_kernel(s->tail, take, (char *)args + off + n - take))
        return 0;
    u32 end = take;
    if (end >= 6 && CG_AT(s, end - 6) == '.' && CG_AT(s, end - 5) == 's' &&
        CG_AT(s, end - 4) == 'c' && CG_AT(s, end - 3) == 'o' && CG_AT(s, end - 2) == 'p' &&
        CG_AT(s, end - 1) == 'e')
        end -= 6;
    if (end < CONTAINER_ID_LEN + 1)
        return 0;
    u32 start = end - CONTAINER_ID_LEN;
    for (u32 i = 0; i < CONTAINER_ID_LEN; i++) {
        char c = CG_AT(s, start + i);
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
        s->key.id[i] = c;
    }
    char sep = CG_AT(s, start - 1);
    if (sep == '-') {
        u32 at = start - 1;
        if (!cgroup_name_before(s, at, "docker", 6) &&
            !cgroup_name_before(s, at, "cri-containerd", 14) &&
            !cgroup_name_before(s, at, "crio", 4) &&
            !cgroup_name_before(s, at, "libpod", 6))
            return 0;
    } else if (sep != '/') {
        return 0;
    }
    s->key.prefixlen = CONTAINER_ID_LEN * 8;
    if (!target_containers.lookup(&s->key))
        return 0;
    u64 id = args->id;
    u8 kind = CG_CONTAINER;
    if (target_cgroups.update(&id, &kind))
        count(CNT_CGROUPS_FULL);
    return 0;
}

/* A removed cgroup's id is never reused (cgroup ids are 64-bit kernfs node ids): its
 * container entry and cached verdict only take room. An operator's path stays listed
 * (userspace reports it as no longer existing). Tracepoint cgroup:cgroup_rmdir.
 * rmdir(2) of a cgroup needs it unpopulated, yet a task past cgroup_exit() in its
 * do_exit() still has it as its cgroup (and a dying child cgroup has it as an
 * ancestor): the epoch bump after a removal makes every cached verdict stale, those of
 * this id included, wherever a program may have cached them meanwhile. */
TRACEPOINT_PROBE(cgroup, cgroup_rmdir)
{
    if (args->root != CGROUP2_HIERARCHY)
        return 0;
    u64 id = args->id;
    u8 *kind = target_cgroups.lookup(&id);
    if (kind && *kind == CG_CONTAINER) {
        target_cgroups.delete(&id);
        u32 idx = TF_CGROUP_EPOCH;
        u32 *epoch = target_flags.lookup(&idx);
        if (epoch)
            __sync_fetch_and_add(epoch, 1);
    }
    cgroup_verdicts.delete(&id);
    return 0;
}

#ifdef USE_RINGBUF
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
#endif

/* Ring buffer notification: flags 0 to bpf_ringbuf_output(), the kernel's adaptive
 * mode: the commit wakes the consumer when it had read everything before this record
 * (the buffer was empty to it), so an event at a low rate is delivered at once. Under
 * load the consumer is behind and is not woken per event (it batches:
 * agent/monitors/ringbuf.py). No forced wake-up on top (BPF_RB_FORCE_WAKEUP): none is
 * needed, since the consumer sleeps only after finding the buffer empty and the ring
 * buffer's poll reports unread data level-triggered; and each wake-up is an irq_work
 * the committing program pays (a self-interrupt, costly in a VM). */
#define RINGBUF_NOTIFY 0

/* Submit one event; a full buffer is a counted drop, never a silent one. */
static __always_inline void submit_event(void *ctx, void *data, u64 size)
{
#ifdef USE_RINGBUF
    int err = events.ringbuf_output(data, size, RINGBUF_NOTIFY);
#else
    int err = events.perf_submit(ctx, data, size);
#endif
    count(err ? CNT_DROPPED : CNT_SUBMITTED);
}

#endif /* EBPF_AGENT_COMMON_H */
