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
 * Composing a directory's path is most of what a relative call costs, and find, tar
 * and rm make run after run of calls in one directory: each CPU keeps the paths it
 * composed (file_dirs, below) and walks again only when one may have changed.
 *
 * A call the filters drop costs sys_exit only a look at file_inflight (no pending
 * call anywhere: nothing to find), not a lookup in file_pending.
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
    !defined(OFF_MOUNT_MNT_MOUNTPOINT) || !defined(OFF_DENTRY_D_INODE) || \
    !defined(OFF_INODE_I_INO) || !defined(OFF_INODE_I_GENERATION) || \
    !defined(OFF_MOUNT_ID)
#error "the BTF offsets of the path walk (OFF_*) must be defined"
#endif
/* struct path is { struct vfsmount *mnt; struct dentry *dentry; } (include/linux/path.h):
 * read whole, in one copy. */
#if OFF_PATH_MNT > 8 || OFF_PATH_DENTRY > 8 || OFF_PATH_MNT == OFF_PATH_DENTRY
#error "struct path is not two pointers in 16 bytes"
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

/* file_dirs: directory paths composed by dir_path(), per CPU, direct-mapped by
 * (dentry, mount). Per CPU, because only the CPU that owns a slot writes it and a
 * tracepoint program runs with preemption off: an entry is never rewritten while it is
 * read (a shared hash map's element can be recycled for another key under a reader).
 * An entry is used only while all of these still hold:
 * - the same directory: the slot's dentry and mount, and the inode behind the dentry
 *   (its address, number and generation): a dentry freed and reallocated for another
 *   directory has another inode, or the same address with another number/generation;
 *   and the mount's id (mnt_id_unique where the kernel has it): a mount freed with its
 *   namespace, with no umount(2) to see, and another allocated at its address;
 * - the same root (task->fs->root): a chrooted task composes from its own root;
 * - no rename or mount change since (file_dir_gen, bumped at the exit of rename*,
 *   mount, umount, move_mount and pivot_root: the calls that move a directory or change
 *   the mount tree; read before the walk, so a walk that raced one is stored stale);
 * - composed less than FILE_DIR_TTL_JIFFIES ago (1 s at HZ=1000, 10 s at HZ=100; jiffies
 *   because bpf_ktime_get_ns() costs as much as several reads): a directory a network
 *   filesystem's server renamed is moved in the dcache at a later lookup, with no local
 *   call to see. */
#define FILE_DIR_SLOTS 256
#define FILE_DIR_TTL_JIFFIES 1024
struct file_dir {
    u64 dentry;
    u64 mnt;
    u64 root_dentry;
    u64 root_mnt;
    u64 inode;
    u64 ino;
    u64 mnt_id;                /* struct mount at OFF_MOUNT_ID (8 bytes) */
    u64 born;                  /* bpf_jiffies64() when composed */
    u32 igen;
    u32 gen;                   /* file_dir_gen when the walk began */
    u32 len;                   /* bytes of path (no NUL; "" for the root) */
    u32 _pad;
    char path[FILE_PATH_SIZE];
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
BPF_PERCPU_ARRAY(file_dirs, struct file_dir, FILE_DIR_SLOTS);
BPF_ARRAY(file_dir_gen, u32, 1);
/* [0]: calls waiting in file_pending (at least: a replaced stale entry is not
 * subtracted). 0 lets every sys_exit return without a lookup. */
BPF_ARRAY(file_inflight, s64, 1);

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

/* A copy's size as the verifier sees it: at most 2 * FILE_PATH_SIZE - 1 (the callers
 * keep it to what fits; the mask, kept by the barrier, only bounds it for the verifier,
 * which cannot follow the comparisons clang leaves on another register). */
static __always_inline u32 size_of_copy(u32 n)
{
    asm volatile("" : "+r"(n));
    return n & (2 * FILE_PATH_SIZE - 1);
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

/* The file_dirs slot of a directory. */
static __always_inline u32 dir_slot(u64 dentry, u64 mnt)
{
    u64 h = (dentry ^ (mnt << 7)) * 0x9E3779B97F4A7C15ULL;  /* Fibonacci hashing */
    return (u32)(h >> 56) & (FILE_DIR_SLOTS - 1);
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
    u64 path[2] = {};
    bpf_probe_read_kernel(path, sizeof(path), (void *)(fs + OFF_FS_STRUCT_ROOT));
    w->root_mnt = path[OFF_PATH_MNT / 8];
    w->root_dentry = path[OFF_PATH_DENTRY / 8];
    if (dfd == FILE_AT_FDCWD) {
        bpf_probe_read_kernel(path, sizeof(path), (void *)(fs + OFF_FS_STRUCT_PWD));
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
        bpf_probe_read_kernel(path, sizeof(path), (void *)(file + OFF_FILE_F_PATH));
    }
    u64 mnt = path[OFF_PATH_MNT / 8], dentry = path[OFF_PATH_DENTRY / 8];
    if (!mnt || !dentry)
        return -1;
    w->mnt = mnt;
    w->dentry = dentry;

    u32 zero = 0;
    u32 *genp = file_dir_gen.lookup(&zero);
    u32 gen = genp ? *(volatile u32 *)genp : 0;
    u64 inode = rd(dentry + OFF_DENTRY_D_INODE);
    u64 ino = rd(inode + OFF_INODE_I_INO);
    u32 igen = 0;
    bpf_probe_read_kernel(&igen, sizeof(igen), (void *)(inode + OFF_INODE_I_GENERATION));
    u64 mnt_id = rd(mnt - OFF_MOUNT_MNT + OFF_MOUNT_ID);  /* vfsmount is in struct mount */
    u64 now = bpf_jiffies64();
    u32 slot = dir_slot(dentry, mnt);
    struct file_dir *d = file_dirs.lookup(&slot);
    if (!d)
        return -1;
    if (d->dentry == dentry && d->mnt == mnt && d->inode == inode && d->ino == ino &&
        d->igen == igen && d->mnt_id == mnt_id && d->gen == gen &&
        d->root_dentry == w->root_dentry && d->root_mnt == w->root_mnt &&
        now - d->born < FILE_DIR_TTL_JIFFIES) {
        u32 len = d->len;
        if (len < FILE_PATH_SIZE - 1) {
            bpf_probe_read_kernel(s->buf, size_of_copy(len), d->path);
            return len;
        }
    }
    file_count(FILE_CNT_DIR_WALKS);
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
    d->dentry = dentry;
    d->mnt = mnt;
    d->root_dentry = w->root_dentry;
    d->root_mnt = w->root_mnt;
    d->inode = inode;
    d->ino = ino;
    d->mnt_id = mnt_id;
    d->igen = igen;
    d->gen = gen;
    d->born = now;
    d->len = off;
    bpf_probe_read_kernel(d->path, size_of_copy(off) & (FILE_PATH_SIZE - 1), s->buf);
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
    /* The argument as read above, len bytes with its NUL, copied from out (a map
     * value) rather than read from user memory again; copies here are of the bytes
     * used, not of whole buffers: their cost grows with the size. */
    u32 n = len > FILE_PATH_SIZE - 1 ? FILE_PATH_SIZE - 1 : len;  /* o < FILE_PATH_SIZE */
    bpf_probe_read_kernel(&s->buf[win(o)], size_of_copy(n) & (FILE_PATH_SIZE - 1), out);
    u32 total = o + n;
    if (total > FILE_PATH_SIZE) {
        *cut = 1;
        total = FILE_PATH_SIZE;
    }
    bpf_probe_read_kernel(out, size_of_copy(total), s->buf);
    out[(total - 1) & (FILE_PATH_SIZE - 1)] = 0;
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
    /* BPF_NOEXIST: a stale entry of this thread (replaced below) is already counted in
     * file_inflight; an undercount would make sys_exit skip a waiting call. */
    int err = file_pending.insert(&tid, p);
    if (!err) {
        s64 *inflight = file_inflight.lookup(&zero);
        if (inflight)
            __sync_fetch_and_add(inflight, 1);
    } else if (err != -ERR_EEXIST || file_pending.update(&tid, p)) {
        count(CNT_PENDING_FULL);
    }
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

/* The call of this thread leaves file_pending. */
static __always_inline void pending_done(u32 tid, s64 *inflight)
{
    if (!file_pending.delete(&tid))
        __sync_fetch_and_add(inflight, -1);
}

static __always_inline int on_exit(void *ctx, long ret)
{
    u32 zero = 0;
    s64 *inflight = file_inflight.lookup(&zero);
    /* A thread's own sys_enter stored its call before this: if none is waiting
     * anywhere, neither is this thread's (the common case under a prefix filter). */
    if (!inflight || *(volatile s64 *)inflight <= 0)
        return 0;
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct file_pending *p = file_pending.lookup(&tid);
    if (!p)
        return 0;
    struct file_config *cfg = file_cfg();
    struct file_scratch *s = file_scratch.lookup(&zero);
    if (!cfg || !s) {
        pending_done(tid, inflight);
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
            pending_done(tid, inflight);
            return 0;
        }
        e->evflags &= ~FILE_EF_LATE;
    }
    e->ret = ret;
    top_account(s, e, ret);
    if ((cfg->flags & FILE_CFG_ERRORS_ONLY) && !(ret < 0 && ret >= -FILE_MAX_ERRNO)) {
        pending_done(tid, inflight);
        return 0;
    }
    count(CNT_SEEN);
    submit_event(ctx, e, two ? sizeof(*e) : offsetof(struct file_event, path2));
    pending_done(tid, inflight);
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

/* A directory may have moved, or the mount tree changed: the paths in file_dirs may be
 * stale (every CPU's: the generation is shared). Bumped at sys_exit, after the move,
 * whatever the result (a failed call costs one needless walk per directory). */
static __always_inline void dirs_moved(void)
{
    u32 zero = 0;
    u32 *gen = file_dir_gen.lookup(&zero);
    if (gen)
        __sync_fetch_and_add(gen, 1);
}

#define FILE_EXIT_MOVES(name)                    \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name)  \
    {                                            \
        dirs_moved();                            \
        return on_exit(args, args->ret);         \
    }

/* The calls that change the mount tree (mount(2) with MS_MOVE, umount2(2) whose
 * tracepoint is sys_exit_umount, move_mount(2), pivot_root(2)): compiled in when this
 * kernel has them (HAVE_MOVES_<NAME> from userspace). */
#define MOUNT_EXIT(name)                         \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name)  \
    {                                            \
        dirs_moved();                            \
        return 0;                                \
    }
#ifdef HAVE_MOVES_MOUNT
MOUNT_EXIT(mount)
#endif
#ifdef HAVE_MOVES_UMOUNT
MOUNT_EXIT(umount)
#endif
#ifdef HAVE_MOVES_MOVE_MOUNT
MOUNT_EXIT(move_mount)
#endif
#ifdef HAVE_MOVES_PIVOT_ROOT
MOUNT_EXIT(pivot_root)
#endif

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
FILE_EXIT_MOVES(rename)
#endif

#ifdef HAVE_RENAMEAT
TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
    return on_enter(FILE_OP_RENAMEAT, args->olddfd, args->oldname, args->newdfd,
                    args->newname, 0, 0, 1, 1);
}
FILE_EXIT_MOVES(renameat)
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
    return on_enter(FILE_OP_RENAMEAT2, args->olddfd, args->oldname, args->newdfd,
                    args->newname, args->flags, 0, 1, 1);
}
FILE_EXIT_MOVES(renameat2)

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
