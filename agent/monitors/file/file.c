/* FileMonitor: calls that open, create, remove or rename a path, through the
 * syscalls:sys_enter_* / sys_exit_* tracepoints (no kprobes needed). Only the calls
 * this kernel has are compiled in (HAVE_<OP> from userspace: arm64 lacks the legacy
 * open, creat, unlink, rmdir, rename and mkdir).
 *
 * sys_enter decides: armed, target, writes_only (from the flags alone, before any
 * memory is read), then reads the path and makes it absolute, then the prefix filter.
 * A call that passes waits in file_pending (keyed by thread) for its return value;
 * sys_exit adds it to the top list, applies errors_only and submits it.
 *
 * Relative paths are resolved in the kernel at sys_enter, when the directory is the
 * one the call will use: the dentry chain of the working directory (task->fs->pwd) or
 * of dirfd's open file (task->files->fdt->fd[dirfd]->f_path), walked up to the
 * task's root (task->fs->root, so a chrooted/containerised task gets the paths it
 * would itself name), crossing mounts through struct mount. Every offset comes from
 * BTF (-D OFF_*). The path is the directory's path + "/" + the argument, not
 * normalised ("." and ".." stay as given); what cannot be known is said (res).
 */
#include "common.h"
#include "file.h"

#if !defined(MAX_PENDING) || !defined(TOP_ENTRIES) || !defined(FILE_O_ACCMODE) || \
    !defined(FILE_O_CREAT) || !defined(FILE_O_TRUNC) || !defined(FILE_O_TMPFILE) || \
    !defined(FILE_AT_FDCWD)
#error "MAX_PENDING, TOP_ENTRIES and the FILE_O_* / FILE_AT_FDCWD constants must be defined"
#endif
#if !defined(OFF_TASK_STRUCT_FS) || !defined(OFF_TASK_STRUCT_FILES) || \
    !defined(OFF_FS_STRUCT_PWD) || !defined(OFF_FS_STRUCT_ROOT) || \
    !defined(OFF_PATH_MNT) || !defined(OFF_PATH_DENTRY) || \
    !defined(OFF_FILES_STRUCT_FDT) || !defined(OFF_FDTABLE_FD) || \
    !defined(OFF_FDTABLE_MAX_FDS) || !defined(OFF_FILE_F_PATH) || \
    !defined(OFF_DENTRY_D_PARENT) || !defined(OFF_DENTRY_D_NAME) || \
    !defined(OFF_QSTR_NAME) || !defined(OFF_VFSMOUNT_MNT_ROOT) || \
    !defined(OFF_MOUNT_MNT) || !defined(OFF_MOUNT_MNT_PARENT) || \
    !defined(OFF_MOUNT_MNT_MOUNTPOINT)
#error "the BTF offsets of the path walk (OFF_*) must be defined"
#endif

/* include/linux/err.h: [-MAX_ERRNO, -1] is an error return */
#define FILE_MAX_ERRNO 4095

struct file_pending {
    struct file_event e;
    u64 uptr;                  /* the caller's path pointers, for a late read */
    u64 uptr2;
};

/* Where a walk up the directory tree is (dir_path()). */
struct file_walk {
    u64 dentry;
    u64 mnt;                   /* the struct vfsmount of dentry's mount */
    u64 mnt_root;              /* its root dentry (read once per mount) */
    u64 root_dentry;           /* the task's root: the walk ends there */
    u64 root_mnt;
    u32 n;                     /* names[] filled */
    u32 done;                  /* reached a root: names[] is the whole path */
};

/* Per-CPU work area: the event under construction, the composed path (twice the path
 * size so that a masked offset plus a full-size read stays inside), the dentry names
 * of a walk, the top-list key. */
struct file_scratch {
    struct file_pending p;
    char buf[2 * FILE_PATH_SIZE];
    u64 names[FILE_MAX_DEPTH];
    struct file_walk w;
    struct file_top_key key;
};

BPF_ARRAY(file_config, struct file_config, 1);
BPF_ARRAY(file_prefixes, struct file_prefix, 2 * FILE_MAX_PREFIXES);
BPF_HASH(file_pending, u32, struct file_pending, MAX_PENDING);
BPF_PERCPU_ARRAY(file_scratch, struct file_scratch, 1);
/* LRU: a path opened again and again stays, one seen once makes room; inserts are
 * counted (FILE_CNT_TOP_NEW) so userspace knows how many were evicted. */
BPF_TABLE("lru_hash", struct file_top_key, struct file_top_val, file_top, TOP_ENTRIES);
BPF_PERCPU_ARRAY(file_counters, u64, FILE_NR_COUNTERS);

static __always_inline void file_count(u32 idx)
{
    u64 *v = file_counters.lookup(&idx);
    if (v)
        *v += 1;
}

/* An offset into a FILE_PATH_SIZE-wide window of buf. The barrier keeps clang from
 * dropping the mask where it can prove it redundant: the verifier cannot, and would
 * refuse the access as unbounded. */
static __always_inline u32 win(u32 off)
{
    asm volatile("" : "+r"(off));
    return off & (FILE_PATH_SIZE - 1);
}

static __always_inline u64 rd(u64 addr)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (void *)addr);
    return v;
}

/* One step of the walk up from s->w.dentry: record its name and go to its parent, or
 * cross to the mount it sits on; 1 when the walk is over (s->w.done says how). The
 * walk's state lives in the map value, not in registers: each step then looks the
 * same to the verifier whatever path led to it, so it verifies the loop in a bounded
 * number of states (with the state in registers, 24 steps already exceed its
 * budget). */
static __always_inline int walk_step(struct file_scratch *s)
{
    struct file_walk *w = &s->w;
    u64 dentry = *(volatile u64 *)&w->dentry;
    u64 mnt = *(volatile u64 *)&w->mnt;
    if (dentry == w->root_dentry && mnt == w->root_mnt) {
        w->done = 1;  /* the task's root (chroot, container) */
        return 1;
    }
    u64 mount = mnt - OFF_MOUNT_MNT;  /* vfsmount is embedded in struct mount */
    if (dentry == *(volatile u64 *)&w->mnt_root) {
        /* the top of this mount: continue from where it is mounted */
        u64 parent_mount = rd(mount + OFF_MOUNT_MNT_PARENT);
        if (!parent_mount || parent_mount == mount) {
            w->done = 1;  /* the namespace's root mount */
            return 1;
        }
        w->dentry = rd(mount + OFF_MOUNT_MNT_MOUNTPOINT);
        w->mnt = parent_mount + OFF_MOUNT_MNT;
        w->mnt_root = rd(w->mnt + OFF_VFSMOUNT_MNT_ROOT);
        return 0;
    }
    u64 parent = rd(dentry + OFF_DENTRY_D_PARENT);
    if (!parent || parent == dentry) {
        w->done = 1;  /* a root that is not the task's: the path from it */
        return 1;
    }
    u32 n = *(volatile u32 *)&w->n;
    if (n >= FILE_MAX_DEPTH)
        return 1;  /* too deep: not done */
    s->names[n & (FILE_MAX_DEPTH - 1)] = rd(dentry + OFF_DENTRY_D_NAME + OFF_QSTR_NAME);
    w->n = n + 1;
    w->dentry = parent;
    return 0;
}

/* The directory a relative path is looked up from, as an absolute path in s->buf
 * (no trailing '/': "" for the root); returns its length, or -1 when it cannot be
 * known (dirfd not open, a walk longer than FILE_MAX_WALK, a path too long). */
static __always_inline int dir_path(struct file_scratch *s, int dfd)
{
    struct file_walk *w = &s->w;
    u64 task = bpf_get_current_task();
    u64 fs = rd(task + OFF_TASK_STRUCT_FS);
    if (!fs)
        return -1;
    w->root_mnt = rd(fs + OFF_FS_STRUCT_ROOT + OFF_PATH_MNT);
    w->root_dentry = rd(fs + OFF_FS_STRUCT_ROOT + OFF_PATH_DENTRY);
    if (dfd == FILE_AT_FDCWD) {
        w->mnt = rd(fs + OFF_FS_STRUCT_PWD + OFF_PATH_MNT);
        w->dentry = rd(fs + OFF_FS_STRUCT_PWD + OFF_PATH_DENTRY);
    } else {
        if (dfd < 0)
            return -1;
        u64 files = rd(task + OFF_TASK_STRUCT_FILES);
        u64 fdt = rd(files + OFF_FILES_STRUCT_FDT);
        u32 max_fds = 0;
        bpf_probe_read_kernel(&max_fds, sizeof(max_fds), (void *)(fdt + OFF_FDTABLE_MAX_FDS));
        if ((u32)dfd >= max_fds)
            return -1;
        u64 fd_array = rd(fdt + OFF_FDTABLE_FD);
        u64 file = rd(fd_array + (u64)dfd * 8);
        if (!file)
            return -1;
        w->mnt = rd(file + OFF_FILE_F_PATH + OFF_PATH_MNT);
        w->dentry = rd(file + OFF_FILE_F_PATH + OFF_PATH_DENTRY);
    }
    if (!w->mnt || !w->dentry)
        return -1;
    w->mnt_root = rd(w->mnt + OFF_VFSMOUNT_MNT_ROOT);
    w->n = 0;
    w->done = 0;
    for (int i = 0; i < FILE_MAX_WALK; i++) {
        if (walk_step(s))
            break;
    }
    if (!*(volatile u32 *)&w->done)
        return -1;
    u32 n = *(volatile u32 *)&w->n;
    if (n > FILE_MAX_DEPTH)
        return -1;
    u32 off = 0;
    for (int i = FILE_MAX_DEPTH - 1; i >= 0; i--) {
        if ((u32)i >= n)
            continue;
        if (off >= FILE_PATH_SIZE - 1)
            return -1;
        s->buf[win(off)] = '/';
        off++;
        int len = bpf_probe_read_kernel_str(&s->buf[win(off)],
                                            FILE_PATH_SIZE, (void *)s->names[i]);
        if (len < 1)
            return -1;
        off += len - 1;
    }
    if (off >= FILE_PATH_SIZE - 1)
        return -1;
    return off;
}

/* Fill `out` (FILE_PATH_SIZE bytes) with the path the call names; returns FILE_RES_*
 * and sets *cut when it was longer than the buffer. `resolve` (a constant at each call
 * site): make a relative path absolute; without it a relative path stays as given
 * (FILE_RES_NONE). */
static __always_inline u8 read_path(struct file_scratch *s, char *out, int dfd, u64 uptr,
                                    u32 *cut, int resolve)
{
    int len = bpf_probe_read_user_str(out, FILE_PATH_SIZE, (void *)uptr);
    if (len < 1) {
        out[0] = 0;
        return FILE_RES_UNREAD;
    }
    if (len == FILE_PATH_SIZE)
        *cut = 1;
    if (out[0] == '/')
        return FILE_RES_ABSOLUTE;
    if (!resolve)
        return FILE_RES_NONE;
    int off = dir_path(s, dfd);
    if (off < 0) {
        file_count(FILE_CNT_UNRESOLVED);
        return FILE_RES_NONE;
    }
    u32 o = off;
    s->buf[win(o)] = '/';
    o++;
    len = bpf_probe_read_user_str(&s->buf[win(o)], FILE_PATH_SIZE,
                                  (void *)uptr);
    if (len < 1)
        return FILE_RES_NONE;  /* read a moment ago; keep the relative path then */
    if (o + len > FILE_PATH_SIZE)
        *cut = 1;
    bpf_probe_read_kernel(out, FILE_PATH_SIZE, s->buf);
    out[FILE_PATH_SIZE - 1] = 0;
    return dfd == FILE_AT_FDCWD ? FILE_RES_CWD : FILE_RES_DIRFD;
}

static __always_inline int prefix_matches(const char *path, u32 idx)
{
    struct file_prefix *p = file_prefixes.lookup(&idx);
    if (!p)
        return 0;
    u32 len = p->len;
    for (int j = 0; j < FILE_PREFIX_SIZE; j++) {
        if ((u32)j >= len)
            return 1;
        if (path[j] != p->s[j])
            return 0;
    }
    return 1;
}

/* Include prefixes (any of them, when there are some), then no exclude prefix. A path
 * that is not absolute (res >= FILE_RES_NONE) matches no prefix. */
static __always_inline int path_wanted(struct file_config *cfg, const char *path)
{
    if (cfg->n_include) {
        int any = 0;
        for (u32 i = 0; i < FILE_MAX_PREFIXES; i++) {
            if (i >= cfg->n_include)
                break;
            if (prefix_matches(path, i)) {
                any = 1;
                break;
            }
        }
        if (!any)
            return 0;
    }
    for (u32 i = 0; i < FILE_MAX_PREFIXES; i++) {
        if (i >= cfg->n_exclude)
            break;
        if (prefix_matches(path, FILE_MAX_PREFIXES + i))
            return 0;
    }
    return 1;
}

static __always_inline int has_prefixes(struct file_config *cfg)
{
    return cfg->n_include || cfg->n_exclude;
}

static __always_inline struct file_config *file_cfg(void)
{
    u32 zero = 0;
    return file_config.lookup(&zero);
}

/* Read both paths into p->e; 0 when the prefix filter drops the call. `resolve`: as
 * read_path's (a constant: sys_enter resolves, sys_exit does not). */
static __always_inline int fill_paths(struct file_scratch *s, struct file_pending *p,
                                      struct file_config *cfg, int two, int resolve)
{
    struct file_event *e = &p->e;
    u32 cut = 0, cut2 = 0;
    e->res = read_path(s, e->path, e->dirfd, p->uptr, &cut, resolve);
    if (two)
        e->res2 = read_path(s, e->path2, e->dirfd2, p->uptr2, &cut2, resolve);
    e->evflags &= ~(FILE_EF_PATH_CUT | FILE_EF_PATH2_CUT);
    e->evflags |= (cut ? FILE_EF_PATH_CUT : 0) | (cut2 ? FILE_EF_PATH2_CUT : 0);
    if (e->res == FILE_RES_UNREAD || (two && e->res2 == FILE_RES_UNREAD))
        return 1;  /* decided at sys_exit (FILE_EF_LATE) */
    if (!has_prefixes(cfg))
        return 1;
    /* a rename matters when either name is wanted */
    if (e->res < FILE_RES_NONE && path_wanted(cfg, e->path))
        return 1;
    if (two && e->res2 < FILE_RES_NONE && path_wanted(cfg, e->path2))
        return 1;
    return 0;
}

static __always_inline int on_enter(u16 op, int dfd, const char *path, int dfd2,
                                    const char *path2, u64 flags, u32 mode, int two,
                                    int is_write)
{
    struct file_config *cfg = file_cfg();
    if (!cfg || !(cfg->flags & FILE_CFG_ARMED))
        return 0;
    if ((cfg->flags & FILE_CFG_WRITES_ONLY) && !is_write)
        return 0;
    if (!current_matches())
        return 0;
    u32 zero = 0;
    struct file_scratch *s = file_scratch.lookup(&zero);
    if (!s)
        return 0;
    struct file_pending *p = &s->p;
    struct file_event *e = &p->e;
    e->ret = 0;
    e->flags = flags;
    e->mode = mode;
    e->dirfd = dfd;
    e->dirfd2 = dfd2;
    e->evflags = 0;
    e->op = op;
    e->res = 0;
    e->res2 = 0;
    e->_pad = 0;
    e->path2[0] = 0;
    p->uptr = (u64)path;
    p->uptr2 = (u64)path2;
    if (!fill_paths(s, p, cfg, two, 1)) {
        file_count(FILE_CNT_FILTERED);
        return 0;
    }
    if (e->res == FILE_RES_UNREAD || (two && e->res2 == FILE_RES_UNREAD))
        e->evflags |= FILE_EF_LATE;
    fill_event_hdr(&e->hdr, bpf_ktime_get_ns());
    u32 tid = e->hdr.tid;
    if (file_pending.update(&tid, p))
        count(CNT_PENDING_FULL);
    return 0;
}

static __always_inline int is_open_op(u16 op)
{
    return op <= FILE_OP_CREAT;
}

static __always_inline void top_account(struct file_scratch *s, struct file_event *e,
                                        long ret)
{
    struct file_top_key *key = &s->key;
    __builtin_memset(key, 0, sizeof(*key));
    bpf_probe_read_kernel_str(key->path, sizeof(key->path), e->path);
    struct file_top_val *v = file_top.lookup(key);
    if (!v) {
        struct file_top_val init = {};
        file_top.update(key, &init);
        file_count(FILE_CNT_TOP_NEW);
        v = file_top.lookup(key);
        if (!v)
            return;
    }
    __sync_fetch_and_add(&v->calls, 1);
    if (is_open_op(e->op))
        __sync_fetch_and_add(&v->opens, 1);
    if (ret < 0 && ret >= -FILE_MAX_ERRNO) {
        __sync_fetch_and_add(&v->failures, 1);
        v->last_errno = (u32)(-ret);
    }
}

static __always_inline int on_exit(void *ctx, long ret)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct file_pending *p = file_pending.lookup(&tid);
    if (!p)
        return 0;
    struct file_config *cfg = file_cfg();
    u32 zero = 0;
    struct file_scratch *s = file_scratch.lookup(&zero);
    if (!cfg || !s) {
        file_pending.delete(&tid);
        return 0;
    }
    struct file_event *e = &p->e;
    int two = e->op >= FILE_OP_RENAME && e->op <= FILE_OP_RENAMEAT2;
    if (e->evflags & FILE_EF_LATE) {
        /* The kernel has copied the path in (getname()), so its page is present now.
         * A relative path is not resolved here: the directory may have changed with
         * the call (a rename, rmdir), and the walk would double every exit program's
         * size and the monitor's compile time for a rare case; it stays as given
         * (FILE_RES_NONE: path_from "unknown", and it matches no prefix). */
        if (!fill_paths(s, p, cfg, two, 0)) {
            file_count(FILE_CNT_FILTERED);
            file_pending.delete(&tid);
            return 0;
        }
        e->evflags &= ~FILE_EF_LATE;
    }
    e->ret = ret;
    top_account(s, e, ret);
    if ((cfg->flags & FILE_CFG_ERRORS_ONLY) && !(ret < 0 && ret >= -FILE_MAX_ERRNO)) {
        file_pending.delete(&tid);
        return 0;
    }
    count(CNT_SEEN);
    submit_event(ctx, e, two ? sizeof(*e) : offsetof(struct file_event, path2));
    file_pending.delete(&tid);
    return 0;
}

/* An open writes when its access mode is not O_RDONLY or it creates or truncates
 * (open(2)); the O_* values are this machine's, from userspace. */
static __always_inline int open_writes(u64 flags)
{
    return (flags & FILE_O_ACCMODE) != 0 ||
           (flags & (FILE_O_CREAT | FILE_O_TRUNC | FILE_O_TMPFILE)) != 0;
}

/* An open's mode is meaningful only with O_CREAT or O_TMPFILE (open(2)); else 0. */
static __always_inline u32 open_mode(u64 flags, u32 mode)
{
    return (flags & (FILE_O_CREAT | FILE_O_TMPFILE)) ? mode : 0;
}

#define FILE_EXIT(name)                          \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name)  \
    {                                            \
        return on_exit(args, args->ret);         \
    }

#ifdef HAVE_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
    u64 f = (u32)args->flags;
    return on_enter(FILE_OP_OPEN, FILE_AT_FDCWD, args->filename, 0, 0, f,
                    open_mode(f, args->mode), 0, open_writes(f));
}
FILE_EXIT(open)
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
    u64 f = (u32)args->flags;
    return on_enter(FILE_OP_OPENAT, args->dfd, args->filename, 0, 0, f,
                    open_mode(f, args->mode), 0, open_writes(f));
}
FILE_EXIT(openat)

#ifdef HAVE_OPENAT2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
    /* struct open_how { u64 flags; u64 mode; u64 resolve; } (include/uapi/linux/openat2.h) */
    u64 how[2] = {};
    bpf_probe_read_user(&how, sizeof(how), (void *)args->how);
    return on_enter(FILE_OP_OPENAT2, args->dfd, args->filename, 0, 0, how[0],
                    open_mode(how[0], (u32)how[1]), 0, open_writes(how[0]));
}
FILE_EXIT(openat2)
#endif

#ifdef HAVE_CREAT
/* creat(2) is open(path, O_CREAT|O_WRONLY|O_TRUNC, mode) */
TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
    u64 f = FILE_O_CREAT | FILE_O_WRONLY | FILE_O_TRUNC;
    return on_enter(FILE_OP_CREAT, FILE_AT_FDCWD, args->pathname, 0, 0, f, args->mode, 0, 1);
}
FILE_EXIT(creat)
#endif

#ifdef HAVE_UNLINK
TRACEPOINT_PROBE(syscalls, sys_enter_unlink)
{
    return on_enter(FILE_OP_UNLINK, FILE_AT_FDCWD, args->pathname, 0, 0, 0, 0, 0, 1);
}
FILE_EXIT(unlink)
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_unlinkat)
{
    return on_enter(FILE_OP_UNLINKAT, args->dfd, args->pathname, 0, 0, (u32)args->flag, 0, 0, 1);
}
FILE_EXIT(unlinkat)

#ifdef HAVE_RMDIR
TRACEPOINT_PROBE(syscalls, sys_enter_rmdir)
{
    return on_enter(FILE_OP_RMDIR, FILE_AT_FDCWD, args->pathname, 0, 0, 0, 0, 0, 1);
}
FILE_EXIT(rmdir)
#endif

#ifdef HAVE_RENAME
TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
    return on_enter(FILE_OP_RENAME, FILE_AT_FDCWD, args->oldname, FILE_AT_FDCWD,
                    args->newname, 0, 0, 1, 1);
}
FILE_EXIT(rename)
#endif

#ifdef HAVE_RENAMEAT
TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return on_enter(FILE_OP_RENAMEAT, args->olddfd, args->oldname, args->newdfd,
                    args->newname, 0, 0, 1, 1);
}
FILE_EXIT(renameat)
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return on_enter(FILE_OP_RENAMEAT2, args->olddfd, args->oldname, args->newdfd,
                    args->newname, args->flags, 0, 1, 1);
}
FILE_EXIT(renameat2)

#ifdef HAVE_MKDIR
TRACEPOINT_PROBE(syscalls, sys_enter_mkdir)
{
    return on_enter(FILE_OP_MKDIR, FILE_AT_FDCWD, args->pathname, 0, 0, 0, args->mode, 0, 1);
}
FILE_EXIT(mkdir)
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_mkdirat)
{
    return on_enter(FILE_OP_MKDIRAT, args->dfd, args->pathname, 0, 0, 0, args->mode, 0, 1);
}
FILE_EXIT(mkdirat)
