/* The agent's process tracker: fork, exec and exit of every process, and the path of
 * every cgroup v2 created, for the process table (agent/processes/). Not a monitor: it
 * has no targets and always runs with the agent (processes.enabled).
 *
 * Kernel structs are read only through BTF offsets passed as -D constants
 * (agent/kernel/btf.py TASK_FIELDS), never through header types (docs/kernel.md).
 */
#include "tracker.h"

#ifndef RINGBUF_PAGES
#error "RINGBUF_PAGES must be defined (processes.ringbuf_pages)"
#endif
#ifndef MAX_CGROUP_PATHS
#error "MAX_CGROUP_PATHS must be defined (processes.cgroup_paths)"
#endif

/* include/linux/sched/signal.h: "group exit in progress", set in signal_struct.flags by
 * do_group_exit() and by a fatal signal (complete_signal, zap_process); a macro, so
 * not in BTF. */
#define SIGNAL_GROUP_EXIT 0x00000004

#define CNT_DROPPED 0
#define CNT_CGROUPS 1

BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(counters, u64, 2);
BPF_PERCPU_ARRAY(scratch, struct proc_record, 1);
/* LRU: bounded, the oldest creations make room (a cgroup id is never reused). */
BPF_TABLE("lru_hash", u64, struct cgroup_path, cgroup_paths, MAX_CGROUP_PATHS);

static __always_inline void count(u32 idx)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;
}

static __always_inline u64 read_u64(u64 addr)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

static __always_inline u32 read_u32(u64 addr)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

/* The process of ``task`` (its tgid and its leader's start time) and its real parent's. */
static __always_inline struct proc_record *start_record(u64 task, u32 kind)
{
    u32 zero = 0;
    struct proc_record *r = scratch.lookup(&zero);
    if (!r)
        return 0;
    u64 ugid = bpf_get_current_uid_gid();
    r->ts_ns = bpf_ktime_get_ns();
    r->kind = kind;
    r->pid = read_u32(task + OFF_TASK_STRUCT_TGID);
    r->start_ns = read_u64(read_u64(task + OFF_TASK_STRUCT_GROUP_LEADER)
                           + OFF_TASK_STRUCT_START_BOOTTIME);
    u64 parent = read_u64(task + OFF_TASK_STRUCT_REAL_PARENT);
    r->ppid = read_u32(parent + OFF_TASK_STRUCT_TGID);
    r->parent_start_ns = read_u64(read_u64(parent + OFF_TASK_STRUCT_GROUP_LEADER)
                                  + OFF_TASK_STRUCT_START_BOOTTIME);
    r->uid = (u32)ugid;
    r->gid = ugid >> 32;
    r->cgroup_id = bpf_get_current_cgroup_id();
    r->status = 0;
    r->flags = 0;
    r->args_size = 0;
    bpf_get_current_comm(&r->comm, sizeof(r->comm));
    return r;
}

static __always_inline void send(struct proc_record *r, u64 size)
{
    if (records.ringbuf_output(r, size, 0))
        count(CNT_DROPPED);
}

/* Raw tracepoint sched_process_fork (TP_PROTO(struct task_struct *parent, struct
 * task_struct *child)), in the parent after copy_process(): the raw form gives the
 * child's task, so a new thread (pid != tgid) is told apart from a new process. The
 * child has the parent's credentials, comm and cgroup at this point (fork(2)), except
 * with clone3's CLONE_INTO_CGROUP: its first exec or its exit corrects the cgroup. */
RAW_TRACEPOINT_PROBE(sched_process_fork)
{
    u64 child = ctx->args[1];
    u32 pid = read_u32(child + OFF_TASK_STRUCT_PID);
    u32 tgid = read_u32(child + OFF_TASK_STRUCT_TGID);
    if (!pid || pid != tgid)
        return 0;
    struct proc_record *r = start_record(child, PROC_FORK);
    if (r)
        send(r, offsetof(struct proc_record, filename));
    return 0;
}

/* sched:sched_process_exec fires in exec_binprm() once the new image is in place (a
 * successful exec only): current is the new program, its argument area
 * (mm->arg_start..arg_end) was just written by the kernel, so its pages are present. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u64 task = bpf_get_current_task();
    struct proc_record *r = start_record(task, PROC_EXEC);
    if (!r)
        return 0;
    TP_DATA_LOC_READ_STR(r->filename, filename, sizeof(r->filename));
    u64 mm = read_u64(task + OFF_TASK_STRUCT_MM);
    u64 start = read_u64(mm + OFF_MM_STRUCT_ARG_START);
    u64 end = read_u64(mm + OFF_MM_STRUCT_ARG_END);
    u64 len = 0;
    if (start && end > start) {
        len = end - start;
        if (len > ARGS_AREA) {
            len = ARGS_AREA;
            r->flags |= PROC_F_ARGS_CUT;
        }
        /* Keep clang from handing the helper a copy of len taken before the clamp. */
        asm volatile("" : "+r"(len));
        if (bpf_probe_read_user(r->args, len, (void *)start))
            len = 0;
    }
    r->args_size = len;
    u64 size = offsetof(struct proc_record, args) + len;
    if (size > sizeof(*r))
        size = sizeof(*r);
    asm volatile("" : "+r"(size));
    send(r, size);
    return 0;
}

/* sched:sched_process_exit, in do_exit() after tsk->exit_code is set and before
 * exit_notify() (which reparents the children and wakes the parent's wait). Only the
 * last thread of a process (group_dead) ends the process. Its wait status is what
 * wait_task_zombie() reports: signal->group_exit_code when SIGNAL_GROUP_EXIT is set
 * (exit_group(2), a fatal signal, with 0x80 for a core dump), else the task's
 * exit_code (the last thread left with exit(2)). */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
    if (!args->group_dead)
        return 0;
    u64 task = bpf_get_current_task();
    struct proc_record *r = start_record(task, PROC_EXIT);
    if (!r)
        return 0;
    u64 signal = read_u64(task + OFF_TASK_STRUCT_SIGNAL);
    u32 sflags = read_u32(signal + OFF_SIGNAL_STRUCT_FLAGS);
    if (sflags & SIGNAL_GROUP_EXIT)
        r->status = (s32)read_u32(signal + OFF_SIGNAL_STRUCT_GROUP_EXIT_CODE);
    else
        r->status = (s32)read_u32(task + OFF_TASK_STRUCT_EXIT_CODE);
    send(r, offsetof(struct proc_record, filename));
    return 0;
}

/* cgroup:cgroup_mkdir: every hierarchy's; root 0 is the cgroup v2 (default) hierarchy,
 * whose ids are those of bpf_get_current_cgroup_id() (a v1 hierarchy numbers its own
 * nodes, so its ids would collide). The path is relative to the hierarchy's root. */
TRACEPOINT_PROBE(cgroup, cgroup_mkdir)
{
    if (args->root != 0)
        return 0;
    u64 id = args->id;
    struct cgroup_path p = {};
    TP_DATA_LOC_READ_STR(p.path, path, sizeof(p.path));
    cgroup_paths.update(&id, &p);
    count(CNT_CGROUPS);
    return 0;
}
