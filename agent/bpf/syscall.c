/* SyscallMonitor: every system call of the target tasks, aggregated in the kernel.
 *
 * raw_syscalls:sys_enter (args->id) stamps the start time of the calling thread;
 * raw_syscalls:sys_exit (args->id, args->ret) counts the call: count, errors and errno,
 * latency sum/min/max and a log2 histogram per syscall, and per (process, syscall) when
 * PER_PROCESS is set. The tracepoints are defined in include/trace/events/syscalls.h and
 * fire from the generic syscall entry/exit work (kernel/entry/common.c); their argument
 * structs come from the live format files, so no kernel struct is read here.
 *
 * Nothing crosses to userspace per call: userspace reads the tables (batch lookups) and
 * only calls slower than sc_config.slow_ns are submitted as events.
 *
 * The hot-path tables are per-CPU: TRACEPOINT_PROBE programs are attached through perf
 * events and run from perf_trace_<class>(), which holds preemption disabled around them
 * (include/trace/perf.h: guard(preempt_notrace), kept for syscall events since those
 * became faultable in 6.14), so plain increments on this CPU's copy need no atomic
 * instruction. Userspace sums the copies and merges min/max. (Raw tracepoints would
 * skip building the perf record, but newer kernels may run raw-tracepoint programs on
 * syscall events with only migration disabled.)
 */
#include "common.h"
#include "syscall.h"

#ifndef MAX_SYSCALLS
#define MAX_SYSCALLS 512        /* a power of two above the highest syscall number */
#endif
#ifndef MAX_THREADS
#define MAX_THREADS 32768       /* threads that made a syscall while targeted, alive */
#endif
#ifndef MAX_ERRNO_KEYS
#define MAX_ERRNO_KEYS 4096     /* (syscall, errno, generation) triples */
#endif
#ifndef MAX_PROC_ENTRIES
#define MAX_PROC_ENTRIES 16384  /* (process, syscall, generation) triples */
#endif
/* exit(2) and exit_group(2) never return (kernel/exit.c: do_exit() is __noreturn), so
 * sys_exit never fires for them: they are counted at sys_enter, without latency.
 * Userspace passes this machine's numbers (x86_64: 60 and 231). */
#ifndef NR_EXIT
#error "NR_EXIT must be defined"
#endif
#ifndef NR_EXIT_GROUP
#error "NR_EXIT_GROUP must be defined"
#endif

/* include/linux/err.h: a return value in [-MAX_ERRNO, -1] is an error (the same test as
 * glibc's INTERNAL_SYSCALL_ERROR_P); other negative values (e.g. a high address from
 * mmap on some machines, fcntl(F_GETOWN) of a process group) are results. */
#define SC_MAX_ERRNO 4095

/* Start time of the current syscall per thread id. An entry lives as long as its
 * thread: sys_enter writes the time in place, sys_exit reads it and writes 0, and
 * sched_process_exit deletes it. Rewriting in place avoids a hash insert and delete
 * (bucket lock, element allocation) on every call. A zero means "no call in flight
 * that we stamped": a call that began before the monitor loaded, in a task that was
 * not a target then, or one that skipped sys_enter (a seccomp or ptrace denial returns
 * before trace_sys_enter() but still passes through sys_exit). */
BPF_HASH(sc_start, u32, u64, MAX_THREADS);
BPF_ARRAY(sc_config, struct sc_config, 1);
BPF_PERCPU_ARRAY(sc_stats, struct sc_stat, SC_GENERATIONS * MAX_SYSCALLS);
#ifdef WITH_HISTOGRAM
BPF_PERCPU_ARRAY(sc_hist, u64, SC_GENERATIONS * MAX_SYSCALLS * SC_HIST_SLOTS);
#endif
BPF_PERCPU_HASH(sc_errnos, struct sc_errno_key, u64, MAX_ERRNO_KEYS);
#ifdef PER_PROCESS
BPF_PERCPU_HASH(sc_procs, struct sc_proc_key, struct sc_proc_stat, MAX_PROC_ENTRIES);
#endif
BPF_PERCPU_ARRAY(sc_counters, u64, SC_NR_COUNTERS);

static __always_inline void sc_count(u32 idx)
{
    u64 *v = sc_counters.lookup(&idx);
    if (v)
        *v += 1;
}

/* floor(log2(v)), 0 for v <= 1, clamped to the last slot. */
static __always_inline u32 log2_slot(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8)  { v >>= 8;  r += 8; }
    if (v >> 4)  { v >>= 4;  r += 4; }
    if (v >> 2)  { v >>= 2;  r += 2; }
    if (v >> 1)  { r += 1; }
    return r < SC_HIST_SLOTS ? r : SC_HIST_SLOTS - 1;
}

static __always_inline void add_errno(u32 nr, u32 gen, long ret)
{
    struct sc_errno_key key = {.nr = nr, .err = (u16)(-ret), .gen = (u16)gen};
    u64 zero = 0;
    /* Errors are the slow path: a hash with one entry per (syscall, errno) seen. */
    u64 *v = sc_errnos.lookup_or_try_init(&key, &zero);
    if (v)
        *v += 1;
    else
        sc_count(SC_CNT_ERRNO_FULL);
}

#ifdef PER_PROCESS
static __always_inline void add_process(u32 tgid, u32 nr, u32 gen, u64 lat, int returned,
                                        int failed)
{
    struct sc_proc_key key = {.tgid = tgid, .nr = (u16)nr, .gen = (u16)gen};
    struct sc_proc_stat *p = sc_procs.lookup(&key);
    if (!p) {
        struct sc_proc_stat init = {};
        bpf_get_current_comm(&init.comm, sizeof(init.comm));
        sc_procs.insert(&key, &init);  /* BPF_NOEXIST: another CPU may have won */
        p = sc_procs.lookup(&key);
        if (!p) {
            sc_count(SC_CNT_PROC_FULL);
            return;
        }
    }
    p->count++;
    if (failed)
        p->errors++;
    if (returned) {
        p->total_ns += lat;
        if (lat > p->max_ns)
            p->max_ns = lat;
    }
}
#endif

/* Count one call of `nr` in generation `gen`; `returned` is 0 for exit/exit_group,
 * which have no latency and no return value. */
static __always_inline void account(u32 tgid, u32 nr, u32 gen, u64 lat, long ret,
                                    int returned)
{
    if (nr >= MAX_SYSCALLS) {
        sc_count(SC_CNT_NR_RANGE);
        return;
    }
    u32 idx = gen * MAX_SYSCALLS + nr;
    struct sc_stat *s = sc_stats.lookup(&idx);
    if (!s)
        return;
    int failed = returned && ret < 0 && ret >= -SC_MAX_ERRNO;
    s->count++;
    count(CNT_SEEN);
    if (returned) {
        s->total_ns += lat;
        /* 0 marks "unset": a call takes tens of ns at least between the two tracepoints */
        if (!s->min_ns || lat < s->min_ns)
            s->min_ns = lat;
        if (lat > s->max_ns)
            s->max_ns = lat;
#ifdef WITH_HISTOGRAM
        u32 h = idx * SC_HIST_SLOTS + log2_slot(lat);
        u64 *slot = sc_hist.lookup(&h);
        if (slot)
            *slot += 1;
#endif
    }
    if (failed) {
        s->errors++;
        add_errno(nr, gen, ret);
    }
#ifdef PER_PROCESS
    add_process(tgid, nr, gen, lat, returned, failed);
#endif
}

static __always_inline struct sc_config *config(void)
{
    u32 zero = 0;
    return sc_config.lookup(&zero);
}

TRACEPOINT_PROBE(raw_syscalls, sys_enter)
{
    /* An array lookup: the verifier inlines it into an address computation. */
    struct sc_config *cfg = config();
    if (!cfg || !(cfg->flags & SC_CFG_ARMED))
        return 0;
    if (!current_matches())
        return 0;
    u32 nr = args->id;
    u64 id = bpf_get_current_pid_tgid();
    if (nr == NR_EXIT || nr == NR_EXIT_GROUP) {
        account(id >> 32, nr, cfg->gen & 1, 0, 0, 0);
        return 0;
    }
    u32 tid = (u32)id;
    u64 now = bpf_ktime_get_ns();
    u64 *start = sc_start.lookup(&tid);
    if (start) {
        *start = now;
        return 0;
    }
    if (sc_start.update(&tid, &now))
        count(CNT_PENDING_FULL);  /* this thread's calls go uncounted until room frees */
    return 0;
}

static __always_inline void submit_slow(void *ctx, u64 id, u32 nr, u64 start, u64 lat,
                                        long ret)
{
    struct syscall_event e = {};
    e.ts_ns = start;
    e.latency_ns = lat;
    e.ret = ret;
    e.pid = id >> 32;
    e.tid = (u32)id;
    e.nr = nr;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    submit_event(ctx, &e, sizeof(e));
}

/* Only stamped calls are counted, so the target filter decided at sys_enter holds here:
 * a filtered task costs this one lookup. A successful execve(2) returns here in the new
 * image with the same tid (unless a non-leader thread exec'd: de_thread() in fs/exec.c
 * gives it the leader's pid: that call is then lost, and the entry of its old tid stays
 * until the tid is reused). */
TRACEPOINT_PROBE(raw_syscalls, sys_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u64 *start_p = sc_start.lookup(&tid);
    if (!start_p)
        return 0;
    u64 start = *start_p;
    if (!start)
        return 0;
    *start_p = 0;
    u64 lat = bpf_ktime_get_ns() - start;
    struct sc_config *cfg = config();
    if (!cfg)
        return 0;
    u32 nr = args->id;
    long ret = args->ret;
    account(id >> 32, nr, cfg->gen & 1, lat, ret, 1);
    if ((cfg->flags & SC_CFG_SLOW) && lat > cfg->slow_ns)
        submit_slow(args, id, nr, start, lat, ret);
    return 0;
}

/* Attached by agent/monitors/syscall.py to sched:sched_process_exit (common.h already
 * has the TRACEPOINT_PROBE of that name). It fires in do_exit() for every exiting
 * thread, current being that thread (include/trace/events/sched.h). */
int sc_task_exit(void *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    sc_start.delete(&tid);
    return 0;
}
