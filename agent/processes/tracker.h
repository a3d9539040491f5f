/* The process tracker's record, defined once: agent/processes/records.py mirrors it
 * (tests/processes/test_records.py compiles this header with gcc and compares). */
#ifndef EBPF_AGENT_TRACKER_H
#define EBPF_AGENT_TRACKER_H

/* From processes.argv_bytes as a -D flag (ProcessTracker.cflags). */
#ifndef ARGS_AREA
#error "ARGS_AREA must be defined (processes.argv_bytes)"
#endif
#define COMM_LEN 16
#define FILENAME_SIZE 256
#define CGROUP_PATH_SIZE 256

#define PROC_FORK 1
#define PROC_EXEC 2
#define PROC_EXIT 3

#define PROC_F_ARGS_CUT 1     /* the argument area was longer than ARGS_AREA */

/* A fork (the new process, sent by its parent), an exec (the new image) or the exit of
 * a process's last thread. Fork and exit records end before filename. */
struct proc_record {
    u64 ts_ns;                 /* bpf_ktime_get_ns() */
    u64 start_ns;              /* the process's leader start_boottime */
    u64 parent_start_ns;       /* real_parent->group_leader->start_boottime */
    u64 cgroup_id;             /* the task's cgroup v2 id (fork: the parent's) */
    u32 kind;                  /* PROC_FORK, PROC_EXEC, PROC_EXIT */
    u32 pid;                   /* tgid */
    u32 ppid;                  /* real_parent->tgid */
    u32 uid;
    u32 gid;
    s32 status;                /* exit: the wait status waitpid(2) reports */
    u32 flags;                 /* PROC_F_* */
    u32 args_size;             /* exec: bytes used in args */
    char comm[COMM_LEN];
    char filename[FILENAME_SIZE];
    char args[ARGS_AREA];
};

/* A cgroup created while the tracker ran (cgroup:cgroup_mkdir), by id. */
struct cgroup_path {
    char path[CGROUP_PATH_SIZE];
};

#endif
