/* The syscall monitor's shared layouts, defined once: agent/monitors/syscall/monitor.py
 * mirrors every struct here with ctypes and tests/monitors/test_syscall.py compiles this
 * header with gcc to check that both agree on every offset and size.
 *
 * Every struct is made of naturally aligned fields with explicit padding, a multiple
 * of 8 bytes long: BCC's per-CPU tables require 8-byte multiples (each CPU's copy is
 * round_up(value_size, 8) in the kernel's batch and lookup buffers).
 */
#ifndef EBPF_AGENT_SYSCALL_H
#define EBPF_AGENT_SYSCALL_H

#include "types.h"  /* agent/bpf/: struct event_hdr */

#define SC_COMM_LEN 16

/* Latency histogram: slot i counts calls with floor(log2(latency_ns)) == i, i.e. in
 * [2^i, 2^(i+1)) ns; slot 0 also takes 0 ns and the last slot has no upper bound
 * (2^31 ns, about 2.1 s and more). */
#define SC_HIST_SLOTS 32

/* Window generations: the statistics exist twice, the kernel writes generation
 * sc_config.gen, userspace reads and clears the other one after a switch (reset). */
#define SC_GENERATIONS 2

/* sc_counters[] indices (monitor-specific; common.h's counters[] is shared). */
#define SC_CNT_PROC_FULL    0  /* per-process table full: call counted per syscall only */
#define SC_CNT_ERRNO_FULL   1  /* errno table full: error counted, its errno not */
#define SC_CNT_NR_RANGE     2  /* syscall number outside the table (e.g. the x32 bit) */
#define SC_CNT_NR_CLEARED   3  /* counts-only build: number -1 at sys_exit (rt_sigreturn,
                                * uretprobe trampoline, tracer skip: syscall.c) */
#define SC_NR_COUNTERS      4

/* sc_config.flags */
#define SC_CFG_ARMED 1  /* count at all: set once the target filter is in place */
#define SC_CFG_SLOW  2  /* submit slow-call events */

/* sc_config[0]: written by userspace at any time, read by the programs. All zero (as
 * the map starts) means "do nothing", so no call is counted or streamed in the moment
 * between attaching and writing the targets and the configuration. */
struct sc_config {
    u64 slow_ns;               /* with SC_CFG_SLOW: an event when latency > slow_ns */
    u32 gen;                   /* generation the kernel writes now: 0 or 1 */
    u32 flags;                 /* SC_CFG_* */
};

/* Per syscall, per CPU, per generation: sc_stats[gen * MAX_SYSCALLS + nr]. The latency
 * fields stay 0 in the build without latency (syscall.c, WITH_LATENCY unset). */
struct sc_stat {
    u64 count;                 /* calls that returned, plus exit/exit_group at entry */
    u64 errors;                /* returns in [-4095, -1] (the kernel's MAX_ERRNO) */
    u64 total_ns;              /* sum of latencies of the calls that returned */
    u64 min_ns;                /* 0: no returning call on this CPU yet */
    u64 max_ns;
};

/* sc_errnos key: error returns by syscall and errno. */
struct sc_errno_key {
    u32 nr;
    u16 err;                   /* -ret: 1..4095 (ERESTARTSYS and kin are 512..530) */
    u16 gen;
};

/* sc_procs key and value: per process (tgid) and syscall, when PER_PROCESS is set. */
struct sc_proc_key {
    u32 tgid;
    u16 nr;
    u16 gen;
};

struct sc_proc_stat {
    u64 count;
    u64 errors;
    u64 total_ns;
    u64 max_ns;
    char comm[SC_COMM_LEN];    /* set on the CPU that created the entry, zero on others */
};

/* A slow call (latency > sc_config.slow_ns), submitted at sys_exit (latency build). */
struct syscall_event {
    struct event_hdr hdr;      /* common.h; ts_ns: at sys_enter; comm at sys_exit: after
                                * a successful execve, the new one */
    u64 latency_ns;
    s64 ret;                   /* raw return value: -errno on failure */
    u32 nr;
    u32 _pad;
};

#endif
