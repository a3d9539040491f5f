/* ExecMonitor: execve(2) and execveat(2) through the syscalls tracepoints.
 * sys_enter reads filename and argv while the caller's memory still exists; the event
 * waits in `pending` until sys_exit supplies the return value, then goes out once.
 */
#include "common.h"
#include "exec.h"

#ifndef MAX_PENDING
#define MAX_PENDING 4096
#endif

/* Keyed by tgid: an exec from a non-leader thread comes back at sys_exit as the leader
 * (the kernel's de_thread() gives it the tgid as pid), so a tid key would be lost. */
BPF_HASH(pending, u32, struct exec_event, MAX_PENDING);
BPF_PERCPU_ARRAY(scratch, struct exec_event, 1);

static __always_inline int read_args(struct exec_event *e, const char *const *argv)
{
    #pragma unroll
    for (int i = 0; i < ARGS_MAX; i++) {
        const char *argp = NULL;
        if (bpf_probe_read_user(&argp, sizeof(argp), &argv[i])) {
            e->flags |= EXEC_F_ARGS_TRUNCATED;  /* unreadable (not faulted in): say so */
            return 0;
        }
        if (!argp)
            return 0;
        u32 off = e->args_size;
        if (off > ARGS_AREA - ARG_SLOT)
            return 0;
        int len = bpf_probe_read_user_str(&e->args[off], ARG_SLOT, argp);
        if (len <= 0) {
            e->flags |= EXEC_F_ARGS_TRUNCATED;
            return 0;
        }
        e->args_count++;
        e->args_size += len;
    }
    const char *more = NULL;
    bpf_probe_read_user(&more, sizeof(more), &argv[ARGS_MAX]);
    if (more)
        e->flags |= EXEC_F_ARGS_TRUNCATED;
    return 0;
}

static __always_inline int on_enter(const char *filename, const char *const *argv)
{
    u32 flags = active_filters();
    if (!(flags & TF_READY) || !current_pid_uid_match(flags))
        return 0;
    u32 zero = 0;
    struct exec_event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    fill_event_hdr(&e->hdr, bpf_ktime_get_ns());
    e->ret = 0;
    e->args_count = 0;
    e->args_size = 0;
    e->flags = 0;
    if (flags & TF_COMMS) {
        struct comm_key key = {};
        bpf_get_current_comm(&key.comm, sizeof(key.comm));
        if (target_comms.lookup(&key))
            e->flags |= EXEC_F_COMM_MATCHED;
    }
    bpf_probe_read_user_str(e->filename, sizeof(e->filename), filename);
    read_args(e, argv);
    u32 tgid = e->hdr.pid;
    if (pending.update(&tgid, e))
        count(CNT_PENDING_FULL);
    return 0;
}

static __always_inline int on_exit(void *ctx, long ret)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exec_event *e = pending.lookup(&tgid);
    if (!e)
        return 0;
    e->ret = ret;
    bpf_get_current_comm(&e->hdr.comm, sizeof(e->hdr.comm));
    u32 flags = active_filters();
    if ((flags & TF_COMMS) && !(e->flags & EXEC_F_COMM_MATCHED)) {
        struct comm_key key = {};
        __builtin_memcpy(key.comm, e->hdr.comm, sizeof(key.comm));
        if (!target_comms.lookup(&key)) {
            pending.delete(&tgid);
            return 0;
        }
    }
    count(CNT_SEEN);
    u64 size = offsetof(struct exec_event, args) + (u64)e->args_size;
    if (size > sizeof(*e))
        size = sizeof(*e);
    /* Keep clang from handing the helper a copy of size taken before the clamp. */
    asm volatile("" : "+r"(size));
    submit_event(ctx, e, size);
    pending.delete(&tgid);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve)
{
    return on_enter(args->filename, args->argv);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execveat)
{
    return on_enter(args->filename, args->argv);
}

/* Tracepoint sched:sched_process_exec fires in exec_binprm() once the new image is in
 * place, only for an exec that succeeds. The kernel has just copied argv onto the new
 * stack (mm->arg_start..arg_end), so those pages are present.
 * The caller's argv read at sys_enter may not be: a BPF program cannot fault pages in,
 * and a child fresh from fork() often has not touched the (file-backed) page holding
 * its argument strings yet; that read then comes back empty. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exec_event *e = pending.lookup(&tgid);
    if (!e)
        return 0;
    u64 task = bpf_get_current_task();
    u64 mm = 0, start = 0, end = 0;
    bpf_probe_read_kernel(&mm, sizeof(mm), (void *)(task + OFF_TASK_STRUCT_MM));
    bpf_probe_read_kernel(&start, sizeof(start), (void *)(mm + OFF_MM_STRUCT_ARG_START));
    bpf_probe_read_kernel(&end, sizeof(end), (void *)(mm + OFF_MM_STRUCT_ARG_END));
    if (!start || end <= start)
        return 0;
    u64 len = end - start;
    u32 cut = 0;
    if (len > ARGS_AREA) {
        len = ARGS_AREA;
        cut = EXEC_F_ARGS_CUT;
    }
    asm volatile("" : "+r"(len));
    if (bpf_probe_read_user(e->args, len, (void *)start) == 0) {
        e->args_size = len;
        /* Authoritative: forget what the sys_enter read could or could not see. */
        e->flags = (e->flags & ~EXEC_F_ARGS_TRUNCATED) | EXEC_F_ARGS_RAW | cut;
    }
    if (!e->filename[0])
        TP_DATA_LOC_READ_STR(e->filename, filename, sizeof(e->filename));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_execve)
{
    return on_exit(args, args->ret);
}

TRACEPOINT_PROBE(syscalls, sys_exit_execveat)
{
    return on_exit(args, args->ret);
}
