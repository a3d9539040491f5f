/* The exec event, defined once: agent/monitors/exec/monitor.py builds its ctypes mirror
 * from the same macros and tests/monitors/test_exec_struct.py compiles this header with
 * gcc to check that both agree on every offset and the size. */
#ifndef EBPF_AGENT_EXEC_H
#define EBPF_AGENT_EXEC_H

#include "types.h"  /* agent/bpf/: struct event_hdr */

/* From the options (max_args, arg_size) as -D flags: ExecMonitor.extra_cflags. */
#ifndef ARGS_MAX
#error "ARGS_MAX must be defined (arguments kept per exec)"
#endif
#ifndef ARG_SIZE
#error "ARG_SIZE must be defined (bytes kept per argument)"
#endif
/* Each argument is read with room for ARG_SIZE + 1 bytes and a NUL: a read that fills
 * the slot means the argument was longer than ARG_SIZE, i.e. truncated. */
#define ARG_SLOT (ARG_SIZE + 2)
#define ARGS_AREA (ARGS_MAX * ARG_SLOT)
#define FILENAME_SIZE 256

#define EXEC_F_ARGS_TRUNCATED 1   /* more than ARGS_MAX arguments, or unreadable ones */
#define EXEC_F_COMM_MATCHED   2   /* the caller's comm matched the comm filter */
/* args holds the new image's argument area (mm->arg_start..arg_end) as the kernel
 * laid it out: every argument NUL-terminated, args_count not set; userspace splits. */
#define EXEC_F_ARGS_RAW       4
#define EXEC_F_ARGS_CUT       8   /* that area was longer than ARGS_AREA */

struct exec_event {
    struct event_hdr hdr;      /* common.h; ts_ns, ids and uid/gid at sys_enter, comm at
                                * sys_exit: after a successful exec, the new program's */
    s32 ret;                   /* 0 or -errno from sys_exit */
    u32 args_count;
    u32 args_size;             /* bytes used in args: NUL-terminated strings back to back */
    u32 flags;                 /* EXEC_F_* */
    char filename[FILENAME_SIZE];
    char args[ARGS_AREA];
};

#endif
