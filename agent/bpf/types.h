/* What kernel programs and userspace share, in plain C: constants, map keys and the
 * event header. No BPF macros here, so that gcc compiles this file (and every monitor
 * header including it) for the layout checks (tests/support/layout.py); common.h
 * includes it for the programs. The integer types (u64, u32...) come from the includer.
 */
#ifndef EBPF_AGENT_TYPES_H
#define EBPF_AGENT_TYPES_H

#define COMM_LEN 16
#define ERR_EEXIST 17  /* EEXIST, errno(3) */

/* target_flags[0]: which filters are active (userspace sets a bit when a set is non-empty). */
#define TF_PIDS   1
#define TF_UIDS   2
#define TF_COMMS  4
#define TF_FOLLOW 8
/* Set by userspace once the target maps are written. Programs attach when BCC loads
 * them, before that: until then nothing matches, instead of everything. */
#define TF_READY  16
#define TF_CGROUPS    32  /* operator cgroup paths: ids with CG_PATH in target_cgroups */
#define TF_CONTAINERS 64  /* container prefixes: ids with CG_CONTAINER in target_cgroups */
#define TF_FILTERS (TF_PIDS | TF_UIDS | TF_COMMS | TF_CGROUPS | TF_CONTAINERS)
/* target_flags[TF_CGROUP_GEN]: the generation of target_cgroups, bumped by userspace
 * after every change it makes there; a cached verdict of another generation is stale.
 * target_flags[TF_CGROUP_EPOCH]: the same for the kernel's own removals from
 * target_cgroups (common.h cgroup_rmdir), which only the kernel bumps. */
#define TF_CGROUP_GEN   1
#define TF_CGROUP_EPOCH 2
#define TF_ENTRIES      3

/* counters[] indices; agent/monitors/bcc.py KERNEL_COUNTERS mirrors this list. */
#define CNT_SEEN          0  /* events that matched the targets in the kernel */
#define CNT_SUBMITTED     1  /* handed to the ring/perf buffer */
#define CNT_DROPPED       2  /* the buffer was full: lost in the kernel */
#define CNT_FOLLOW_FULL   3  /* a child could not be followed: followed_pids full */
#define CNT_PENDING_FULL  4  /* monitor-specific in-flight table full */
#define CNT_CGROUPS_FULL  5  /* a container's new cgroup could not be targeted: target_cgroups full */
#define NR_COUNTERS       6

struct comm_key { char comm[COMM_LEN]; };

/* target_pids holds the operator's pids (PID_TARGET) and their descendants, added at
 * fork and removed at exit (PID_FOLLOWED), in one map: a task that is not a target
 * costs a single lookup on every hook. A plain hash, so that followed children can
 * never evict an operator's pid; a full map is counted (CNT_FOLLOW_FULL). */
#define PID_TARGET   1
#define PID_FOLLOWED 2

/* target_cgroups values: why a cgroup id is a target (a bit mask; the task matches
 * when the kinds its cgroup and ancestors carry include every active kind: AND). */
#define CG_PATH      1  /* an operator's path (targets.cgroups) */
#define CG_CONTAINER 2  /* named after a container whose id has a targeted prefix */

/* bpf_get_current_ancestor_cgroup_id(level) is asked for levels 0..CGROUP_MAX_LEVELS-1;
 * a cgroup deeper than that is matched by its own id only. */
#define CGROUP_MAX_LEVELS 32
/* The hierarchy id of cgroup v2 (the default hierarchy) in the cgroup:cgroup_mkdir and
 * cgroup_rmdir tracepoints' `root` field; v1 hierarchies are numbered from 1. */
#define CGROUP2_HIERARCHY 0

/* target_containers: an LPM trie of container id prefixes, the ASCII hex digits;
 * prefixlen counts bits (8 per digit). A lookup with all 64 digits and prefixlen 512
 * finds the longest targeted prefix of that id, if any. */
#define CONTAINER_ID_LEN 64
struct container_key {
    u32 prefixlen;
    char id[CONTAINER_ID_LEN];
};

/* cgroup_verdicts: the kinds (CG_*) a cgroup and its ancestors carry, cached per
 * current cgroup id, valid while gen and epoch equal target_flags[TF_CGROUP_GEN] and
 * target_flags[TF_CGROUP_EPOCH]. */
struct cgroup_verdict {
    u32 gen;
    u32 epoch;
    u32 kinds;
};

/* The start of every monitor's event: who and when, with one meaning everywhere.
 * agent/model/events.py HEADER declares it and turns it into the common fields
 * (monitor, timestamp, ts_ns, pid, tid, ppid, uid, gid, comm, process_id,
 * parent_process_id, cgroup_id and the workload fields) of every event.
 * 72 bytes, 8-aligned: the monitor's own fields follow without padding surprises. */
struct event_hdr {
    u64 ts_ns;                 /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    u32 pid;                   /* tgid */
    u32 tid;
    u32 ppid;                  /* real_parent->tgid, through BTF offsets */
    u32 uid;                   /* real uid and gid of the task */
    u32 gid;
    u32 _pad;
    char comm[COMM_LEN];       /* the task's comm when filled (a monitor may refresh it) */
    u64 start_ns;              /* group_leader->start_boottime: with pid, the process id */
    u64 parent_start_ns;       /* real_parent->group_leader->start_boottime */
    u64 cgroup_id;             /* bpf_get_current_cgroup_id(): the cgroup v2 id */
};

#endif /* EBPF_AGENT_TYPES_H */
