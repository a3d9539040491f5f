/* The file monitor's shared layouts, defined once: agent/monitors/file/monitor.py
 * mirrors every struct and constant here with ctypes and tests/monitors/test_file.py
 * compiles this header with gcc to check that both agree.
 *
 * Structs are naturally aligned with explicit padding, multiples of 8 bytes.
 */
#ifndef EBPF_AGENT_FILE_H
#define EBPF_AGENT_FILE_H

#include "types.h"  /* agent/bpf/: struct event_hdr */

/* Bytes kept of each path, NUL included (PATH_MAX is 4096; longer ones are cut and
 * flagged). A power of two: the BPF side masks offsets with FILE_PATH_SIZE - 1. */
#define FILE_PATH_SIZE 256
/* Prefix filters: at most FILE_MAX_PREFIXES to include and as many to exclude, each at
 * most FILE_PREFIX_SIZE - 1 bytes. */
#define FILE_MAX_PREFIXES 8
#define FILE_PREFIX_SIZE 128
/* Directory levels the kernel walks up to make a relative path absolute; mount
 * crossings count as levels too. Deeper directories leave the path unresolved. */
#define FILE_MAX_DEPTH 32
#define FILE_MAX_WALK 48

/* file_event.op: the syscall. */
#define FILE_OP_OPEN       0
#define FILE_OP_OPENAT     1
#define FILE_OP_OPENAT2    2
#define FILE_OP_CREAT      3
#define FILE_OP_UNLINK     4
#define FILE_OP_UNLINKAT   5
#define FILE_OP_RMDIR      6
#define FILE_OP_RENAME     7
#define FILE_OP_RENAMEAT   8
#define FILE_OP_RENAMEAT2  9
#define FILE_OP_MKDIR      10
#define FILE_OP_MKDIRAT    11
#define FILE_NR_OPS        12

/* file_event.res / res2: how the path became absolute. */
#define FILE_RES_ABSOLUTE  0  /* the caller gave an absolute path */
#define FILE_RES_CWD       1  /* relative to the working directory (AT_FDCWD) */
#define FILE_RES_DIRFD     2  /* relative to the open directory dirfd */
#define FILE_RES_NONE      3  /* relative, and the directory could not be known */
#define FILE_RES_UNREAD    4  /* the path could not be read from the caller's memory */

/* file_event.evflags */
#define FILE_EF_PATH_CUT   1  /* path longer than FILE_PATH_SIZE - 1 bytes: cut */
#define FILE_EF_PATH2_CUT  2
#define FILE_EF_LATE       4  /* (kernel only) a path was unreadable at sys_enter: read at sys_exit */

/* file_config.flags */
#define FILE_CFG_ARMED        1  /* report at all: set once targets and prefixes are in place */
#define FILE_CFG_WRITES_ONLY  2  /* opens for writing/creating/truncating, removes, renames, mkdirs */
#define FILE_CFG_ERRORS_ONLY  4  /* calls that failed */

/* file_counters[] indices (the monitor's own; common.h's counters[] is shared). */
#define FILE_CNT_TOP_NEW     0  /* paths inserted into file_top (evictions: this - entries) */
#define FILE_CNT_FILTERED    1  /* calls of targets the prefix filter dropped at sys_enter */
#define FILE_CNT_UNRESOLVED  2  /* relative paths whose directory could not be known */
#define FILE_CNT_DIR_WALKS   3  /* relative paths whose directory was walked (not kept: file.c file_dirs) */
#define FILE_NR_COUNTERS     4

struct file_config {
    u32 flags;                 /* FILE_CFG_* */
    u32 n_include;             /* file_prefixes[0 .. n_include) */
    u32 n_exclude;             /* file_prefixes[FILE_MAX_PREFIXES .. + n_exclude) */
    u32 _pad;
};

struct file_prefix {
    u32 len;                   /* bytes of s compared (no NUL) */
    u32 _pad;
    char s[FILE_PREFIX_SIZE];
};

/* One call: sent at sys_exit with its return value. Calls without a second path are
 * sent without path2 (offsetof(struct file_event, path2) bytes). */
struct file_event {
    struct event_hdr hdr;      /* ts_ns: at sys_enter */
    s64 ret;                   /* fd, 0, or -errno */
    u64 flags;                 /* open flags (openat2: open_how.flags), unlinkat's flag,
                                * renameat2's flags; 0 for the others */
    u32 mode;                  /* open/creat/mkdir mode */
    s32 dirfd;                 /* the *at calls' directory fd (AT_FDCWD = -100) */
    s32 dirfd2;                /* renameat/renameat2: newdfd */
    u32 evflags;               /* FILE_EF_* */
    u16 op;                    /* FILE_OP_* */
    u8 res;                    /* FILE_RES_* of path */
    u8 res2;                   /* FILE_RES_* of path2 */
    u32 _pad;
    char path[FILE_PATH_SIZE];  /* absolute when res < FILE_RES_NONE */
    char path2[FILE_PATH_SIZE]; /* renames: the new name */
};

/* file_top: per path, the calls that passed the kernel filters (errors_only aside). */
struct file_top_key {
    char path[FILE_PATH_SIZE];
};

struct file_top_val {
    u64 calls;
    u64 opens;                 /* open, openat, openat2, creat */
    u64 failures;              /* calls that returned -errno */
    u32 last_errno;
    u32 _pad;
};

#endif
