/* SyscallMonitor: every system call of the target tasks, aggregated in the kernel.
 *
 * Programs are raw tracepoints on raw_syscalls:sys_enter and sys_exit (fired from the
 * generic syscall entry/exit work): the kernel passes the tracepoint's arguments as
 * they are, ctx->args[0] = struct pt_regs *, ctx->args[1] = the syscall number at
 * sys_enter and the return value at sys_exit. A
 * perf-attached tracepoint (TRACEPOINT_PROBE) would first build a perf record (buffer
 * allocation, the argument copy, perf_trace_run_bpf_submit), a measurable cost per
 * syscall for a pair of empty programs (bench/RESULTS.md, "overhead (syscall monitor)").
 *
 * Two builds, chosen by the latency option (agent/monitors/syscall/monitor.py):
 * - WITH_LATENCY: sys_enter stamps the calling thread's start time and syscall number
 *   (sc_start); sys_exit counts the call: count, errors and errno, latency sum/min/max
 *   and a log2 histogram per syscall, and per (process, syscall) when PER_PROCESS is
 *   set. The target filter is decided at sys_enter.
 * - without: only sys_exit, filtered there, counting calls, errors and errnos (no
 *   latency, no start table). The syscall number is read from pt_regs (below).
 *   exit(2) and exit_group(2) are not counted in this build: they never reach sys_exit,
 *   and every way to see them costs every other syscall. A raw sys_enter program is
 *   the floor again; the syscalls:sys_enter_exit{,_group} events register
 *   perf_syscall_enter() on sys_enter, which returns after a bit test but still costs
 *   every syscall enough to lose the lead over syscount-bpfcc (figures in
 *   bench/RESULTS.md, "overhead (syscall monitor)"); sched_process_exit cannot tell a thread that
 *   called exit/exit_group from one killed by a signal or by a sibling's exit_group
 *   without reading pt_regs through the task's stack, whose layout BTF does not give.
 *
 * Nothing crosses to userspace per call: userspace reads the tables (batch lookups) and
 * only calls slower than sc_config.slow_ns are submitted as events (latency build).
 *
 * Per-CPU tables and preemption. The hot-path tables are per-CPU and updated with plain
 * read-modify-write on this CPU's copy, which is only safe if nothing else runs on this
 * CPU in between. The programs run in task context at syscall entry and exit, never
 * from an interrupt, so the one thing that could interleave two updates on a CPU is a
 * preemption followed by another task's syscall. Since Linux 6.14 syscall tracepoints
 * are "faultable" (their probes run with preemption enabled), and each tracer disables
 * it around its programs itself: raw tracepoint programs through the kernel's
 * __BPF_DECLARE_TRACE_SYSCALL (preempt_disable_notrace() around bpf_trace_runN()),
 * perf-attached ones in perf_syscall_enter()/perf_trace_<class>()
 * (guard(preempt_notrace)). Before 6.14 every tracepoint probe ran under
 * rcu_read_lock_sched(), preemption off. So on the kernels this runs on
 * (docs/kernel.md) the increments need no atomic instruction; userspace sums the copies
 * and merges min/max. A future
 * kernel may run syscall tracepoint programs preemptibly (migration disabled only): a
 * program preempted between its load and store could then lose another task's update
 * on that CPU (a count off by one, rarely), and the generation switch's settle time
 * (monitor.py) would no longer bound the programs still writing the old generation.
 */
#include "common.h"
#include "syscall.h"

/* From the options and the syscall table as -D flags (SyscallMonitor.extra_cflags). */
#ifndef MAX_SYSCALLS
#error "MAX_SYSCALLS must be defined (a power of two above the highest syscall number)"
#endif
#ifndef MAX_THREADS
#error "MAX_THREADS must be defined (max_threads: targeted threads alive)"
#endif
#ifndef MAX_PROC_ENTRIES
#error "MAX_PROC_ENTRIES must be defined (max_process_entries)"
#endif
#ifndef MAX_ERRNO_KEYS
#define MAX_ERRNO_KEYS 4096     /* (syscall, errno, generation) triples */
#endif
/* exit(2) and exit_group(2) never return (the kernel's do_exit() is __noreturn), so
 * sys_exit never fires for them: the latency build counts them at sys_enter, without
 * latency. Userspace passes this machine's numbers (x86_64: 60 and 231). */
#ifndef NR_EXIT
#error "NR_EXIT must be defined"
#endif
#ifndef NR_EXIT_GROUP
#error "NR_EXIT_GROUP must be defined"
#endif
#ifndef WITH_LATENCY
/* The syscall number's offset in struct pt_regs (x86_64: orig_ax, arm64: syscallno),
 * read by userspace from the running kernel's BTF. pt_regs is the architecture's
 * syscall ABI, but the offset still comes from BTF rather than from the build's
 * headers (docs/kernel.md). */
#ifndef OFF_PT_REGS_SYSCALL_NR
#error "OFF_PT_REGS_SYSCALL_NR must be defined"
#endif
#endif

/* The kernel's MAX_ERRNO: a return value in [-MAX_ERRNO, -1] is an error (the same test as
 * glibc's INTERNAL_SYSCALL_ERROR_P); other negative values (e.g. a high address from
 * mmap on some machines, fcntl(F_GETOWN) of a process group) are results. */
#define SC_MAX_ERRNO 4095

#ifdef WITH_LATENCY
/* The call in flight of one thread: when it entered and which syscall it is. */
struct sc_start {
    u64 start_ns;              /* 0: no call in flight that we stamped */
    u32 nr;
    u32 _pad;
};

/* Start time and number of the current syscall per thread id. An entry lives as long as
 * its thread: sys_enter writes it in place, sys_exit reads it and zeroes start_ns, and
 * sched_process_exit deletes it. Rewriting in place avoids a hash insert and delete
 * (bucket lock, element allocation) on every call. A zero start_ns means "no call in
 * flight that we stamped": a call that began before the monitor loaded, in a task that
 * was not a target then, or one that skipped sys_enter: a seccomp or ptrace denial
 * returns before trace_sys_enter() (in the kernel's syscall_trace_enter()) but
 * still passes through sys_exit. Such calls are not counted in this build.
 * Storing the number at sys_enter also spares sys_exit a read of pt_regs. */
#ifdef SC_TASK_STORAGE
/* Task-local storage (BPF_MAP_TYPE_TASK_STORAGE, Linux 5.11+, raw tracepoints since
 * bpf_tracing_func_proto() offers it): the entry hangs off the task itself, so a lookup
 * is a pointer walk with a per-map cache slot instead of hashing the tid into a shared
 * table, and the kernel frees it with the task (no sched_process_exit program). */
BPF_TASK_STORAGE(sc_start, struct sc_start);
#else
BPF_HASH(sc_start, u32, struct sc_start, MAX_THREADS);
#endif
#endif
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

#ifdef WITH_HISTOGRAM
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
#endif

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
static __always_inline void add_process(u32 nr, u32 gen, u64 lat, int returned, int failed)
{
    struct sc_proc_key key = {
        .tgid = bpf_get_current_pid_tgid() >> 32, .nr = (u16)nr, .gen = (u16)gen};
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
#ifdef WITH_LATENCY
    if (returned) {
        p->total_ns += lat;
        if (lat > p->max_ns)
            p->max_ns = lat;
    }
#endif
}
#endif

/* Count one call of `nr` in generation `gen`; `returned` is 0 for exit/exit_group,
 * which have no return value (and no latency); `lat` is used in the latency build. */
static __always_inline void account(u32 nr, u32 gen, u64 lat, long ret, int returned)
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
#ifdef WITH_LATENCY
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
#endif
    if (failed) {
        s->errors++;
        add_errno(nr, gen, ret);
    }
#ifdef PER_PROCESS
    add_process(nr, gen, lat, returned, failed);
#endif
}

static __always_inline struct sc_config *config(void)
{
    u32 zero = 0;
    return sc_config.lookup(&zero);
}

/* The configuration when counting is on (SC_CFG_ARMED) and current is a target. */
static __always_inline struct sc_config *armed_for_current(void)
{
    /* An array lookup: the verifier inlines it into an address computation. */
    struct sc_config *cfg = config();
    if (!cfg || !(cfg->flags & SC_CFG_ARMED))
        return 0;
    if (!current_matches())
        return 0;
    return cfg;
}

#ifdef WITH_LATENCY

RAW_TRACEPOINT_PROBE(sys_enter)
{
    struct sc_config *cfg = armed_for_current();
    if (!cfg)
        return 0;
    /* TP_PROTO(struct pt_regs *regs, long id): id is syscall_get_nr() after ptrace and
     * seccomp had their say, the number sys_exit will see in pt_regs. */
    u32 nr = (u32)ctx->args[1];
    if (nr == NR_EXIT || nr == NR_EXIT_GROUP) {
        account(nr, cfg->gen & 1, 0, 0, 0);
        return 0;
    }
    u64 now = bpf_ktime_get_ns();
#ifdef SC_TASK_STORAGE
    struct sc_start *s = sc_start.task_storage_get(bpf_get_current_task_btf(), 0,
                                                   BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!s) {
        count(CNT_PENDING_FULL);  /* no memory for this task's slot: call uncounted */
        return 0;
    }
    s->start_ns = now;
    s->nr = nr;
    return 0;
#else
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sc_start *s = sc_start.lookup(&tid);
    if (s) {
        /* Only this thread reads or writes its entry: no torn pair. */
        s->start_ns = now;
        s->nr = nr;
        return 0;
    }
    struct sc_start init = {.start_ns = now, .nr = nr};
    if (sc_start.update(&tid, &init))
        count(CNT_PENDING_FULL);  /* this thread's calls go uncounted until room frees */
    return 0;
#endif
}

static __always_inline void submit_slow(void *ctx, u32 nr, u64 start, u64 lat, long ret)
{
    struct syscall_event e = {};
    fill_event_hdr(&e.hdr, start);
    e.latency_ns = lat;
    e.ret = ret;
    e.nr = nr;
    submit_event(ctx, &e, sizeof(e));
}

/* Only stamped calls are counted, so the target filter decided at sys_enter holds here:
 * a filtered task costs this one lookup. A successful execve(2) returns here in the new
 * image with the same tid (unless a non-leader thread exec'd: the kernel's de_thread()
 * gives it the leader's pid: that call is then lost, and the entry of its old tid stays
 * until the tid is reused). */
RAW_TRACEPOINT_PROBE(sys_exit)
{
#ifdef SC_TASK_STORAGE
    struct sc_start *s = sc_start.task_storage_get(bpf_get_current_task_btf(), 0, 0);
#else
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct sc_start *s = sc_start.lookup(&tid);
#endif
    if (!s)
        return 0;
    u64 start = s->start_ns;
    if (!start)
        return 0;
    s->start_ns = 0;
    u32 nr = s->nr;
    u64 lat = bpf_ktime_get_ns() - start;
    struct sc_config *cfg = config();
    if (!cfg)
        return 0;
    long ret = (long)ctx->args[1];  /* TP_PROTO(struct pt_regs *regs, long ret) */
    account(nr, cfg->gen & 1, lat, ret, 1);
    if ((cfg->flags & SC_CFG_SLOW) && lat > cfg->slow_ns)
        submit_slow(ctx, nr, start, lat, ret);
    return 0;
}

/* Attached by agent/monitors/syscall/monitor.py to sched:sched_process_exit (common.h already
 * has the TRACEPOINT_PROBE of that name). It fires in do_exit() for every exiting
 * thread, current being that thread (tracepoint sched:sched_process_exit). */
#ifndef SC_TASK_STORAGE
int sc_task_exit(void *ctx)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    sc_start.delete(&tid);
    return 0;
}
#endif

#else /* !WITH_LATENCY: counts, errors and errnos at sys_exit only; no exit/exit_group */

/* Every call of a target that reaches sys_exit is counted, under the number the kernel
 * dispatched (syscall_get_nr(): the low 32 bits of orig_ax on x86_64, syscallno on
 * arm64, as raw_syscalls:sys_exit's `id` field). Unlike the latency build this also
 * counts calls already in flight when counting starts, and calls denied before
 * sys_enter (a seccomp SECCOMP_RET_ERRNO or ptrace skip), with the error they return;
 * the target filter is applied at exit, so after an execve(2) the new comm decides. */
RAW_TRACEPOINT_PROBE(sys_exit)
{
    struct sc_config *cfg = armed_for_current();
    if (!cfg)
        return 0;
    s32 nr = -1;
    if (bpf_probe_read_kernel(&nr, sizeof(nr),
                              (void *)(ctx->args[0] + OFF_PT_REGS_SYSCALL_NR))) {
        sc_count(SC_CNT_NR_RANGE);
        return 0;
    }
    /* A call whose number the kernel itself set to -1 before returning: sys_exit reads
     * pt_regs after the call ran, and a few calls clear the number on purpose.
     * - rt_sigreturn(2), the return from every signal handler: restore_sigcontext()
     *   (x86-64) sets regs->orig_ax = -1 "to disable syscall
     *   checks", so the interrupted call is not restarted a second time (arm64:
     *   forget_syscall() in restore_sigframe(), syscallno = NO_SYSCALL).
     * - the uretprobe trampoline's syscall (Linux 6.11+, x86_64): sys_uretprobe()
     *   sets regs->orig_ax = -1. Any uretprobe on a
     *   function the target runs (anyone's: a probe on libc fires in every process
     *   mapping it) makes one such call per probed return.
     * - a call a ptrace tracer skipped by writing -1 as the number.
     * The latency build sees their real numbers at sys_enter (rt_sigreturn, uretprobe).
     * Here they are counted, exactly, in nr_cleared, apart from nr_out_of_range. */
    if (nr == -1) {
        sc_count(SC_CNT_NR_CLEARED);
        return 0;
    }
    account((u32)nr, cfg->gen & 1, 0, (long)ctx->args[1], 1);
    return 0;
}

#endif /* WITH_LATENCY */
