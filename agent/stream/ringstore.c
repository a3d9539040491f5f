/* The stream hub's ring store compiled: what EventHub.offer does per event (agent/stream/
 * ring.py PyRingStore is the reference and the fallback; tests/stream/test_ring.py
 * compares both byte for byte).
 *
 * offer(event, data) copies the event's SSE frame ("id: N\nevent: M\ndata: <json>\n\n")
 * into the hub's byte ring and its filter keys into the hub's flat arrays (the same
 * bytearray and array objects the Python readers slice: their buffers are held here, so
 * they cannot be resized while this object lives), evicting the oldest events in the way
 * first, exactly as PyRingStore.offer does.
 *
 * Threading: the values are read from the event (which may call back into Python: a
 * mapping's __getitem__, a new monitor's registration) before anything is written;
 * from there to the end of the store nothing calls Python code, so with the GIL held the
 * store is one step for every other thread (the reference needs a lock for that): a
 * reader on the event loop sees the ring before or after an event, never half of it.
 * Then, if no wake-up is pending, one is scheduled (the hub's schedule(): one loop
 * callback per burst of events).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define NONE LLONG_MIN /* a key the event does not carry (agent/stream/ring.py NONE) */

enum { A_BUF, A_OFF, A_LEN, A_HDR, A_MON, A_PID, A_UID, A_COMM, A_CGID, A_PROCID, A_AT,
       A_N };
/* The attributes of RingArrays (agent/stream/ring.py) and their item sizes. */
static const char *A_NAMES[A_N] = {"buf", "off", "len", "hdr", "mon", "pid", "uid", "comm",
                                   "cgid", "procid", "at"};
static const Py_ssize_t A_ITEM[A_N] = {1, 8, 4, 2, 2, 8, 8, 8, 8, 8, 8};

enum { K_MONITOR, K_PID, K_UID, K_COMM, K_CGROUP_ID, K_PROCESS_ID, K_N };
static const char *K_NAMES[K_N] = {"monitor", "pid", "uid", "comm", "cgroup_id", "process_id"};
static PyObject *keys[K_N];
static PyObject *empty_str;

typedef struct {
    PyObject_HEAD
    Py_buffer views[A_N];
    int held;                 /* how many of views are held */
    PyObject *monitor_ids;    /* dict: name -> id */
    PyObject *monitor_heads;  /* list: id -> b"\nevent: <name>\ndata: " */
    PyObject *reg;            /* name -> id (adds to both) */
    PyObject *schedule;       /* () -> None: a wake-up for the event loop */
    PyObject *clock;          /* () -> int ns, or None: CLOCK_MONOTONIC (arrival times) */
    long long capacity, replay_bytes;
    long long head, next, first, oversized;
    int wake_pending;
} RingStore;

/* event.get(key): a new reference, or NULL (with an error set only on a real error). */
static PyObject *get(PyObject *ev, PyObject *key) {
    if (PyDict_Check(ev)) {
        PyObject *v = PyDict_GetItemWithError(ev, key);
        Py_XINCREF(v);
        return v;
    }
    PyObject *v = PyObject_GetItem(ev, key);
    if (!v && PyErr_ExceptionMatches(PyExc_KeyError))
        PyErr_Clear();
    return v;
}

/* An int key (pid, uid): its value when it is an int in (NONE, 2**63), else NONE. */
static long long int_key(PyObject *v) {
    if (!v || !PyLong_CheckExact(v))
        return NONE;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (x == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return NONE;
    }
    return x;
}

/* A str key (comm, process_id): hash(str), else NONE. -1 with an error: failed. */
static int hash_key(PyObject *v, long long *out) {
    if (!v || !PyUnicode_CheckExact(v)) {
        *out = NONE;
        return 0;
    }
    Py_hash_t h = PyObject_Hash(v);
    if (h == -1 && PyErr_Occurred())
        return -1;
    *out = (long long)h;
    return 0;
}

/* ``o`` (a new reference, or NULL with an error set) as a long long; the reference is
 * released. -1 on an error. */
static int take_ll(PyObject *o, long long *out) {
    if (!o)
        return -1;
    *out = PyLong_AsLongLong(o);
    Py_DECREF(o);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *RingStore_offer(RingStore *r, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "offer(event, data)");
        return NULL;
    }
    PyObject *ev = args[0], *data = args[1];
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "offer: data must be bytes");
        return NULL;
    }
    /* -- read the event (may run Python code) -------------------------------------- */
    PyObject *v[K_N];
    for (int k = 0; k < K_N; k++) {
        v[k] = get(ev, keys[k]);
        if (!v[k] && PyErr_Occurred()) {
            for (int j = 0; j < k; j++)
                Py_XDECREF(v[j]);
            return NULL;
        }
    }
    PyObject *monitor = v[K_MONITOR];
    long long pid = int_key(v[K_PID]), uid = int_key(v[K_UID]);
    long long cgid = int_key(v[K_CGROUP_ID]);
    if (cgid < 0) /* cgroup ids are u64: above the signed range they are kept as NONE */
        cgid = NONE;
    long long comm, procid;
    PyObject *result = NULL, *head = NULL;
    long long mid = -1;
    if (hash_key(v[K_COMM], &comm) < 0 || hash_key(v[K_PROCESS_ID], &procid) < 0)
        goto done;
    if (!monitor) {
        monitor = empty_str;
        Py_INCREF(monitor);
    } else if (!PyUnicode_CheckExact(monitor)) {
        PyObject *s = PyObject_Str(monitor);
        Py_DECREF(monitor);
        monitor = s;
    }
    v[K_MONITOR] = monitor; /* released at done */
    if (!monitor)
        goto done;
    PyObject *id = PyDict_GetItemWithError(r->monitor_ids, monitor);
    if (id) {
        Py_INCREF(id);
    } else {
        if (PyErr_Occurred())
            goto done;
        id = PyObject_CallOneArg(r->reg, monitor);
    }
    if (take_ll(id, &mid) < 0)
        goto done;
    if (mid < 0 || mid > 0xffff || mid >= PyList_GET_SIZE(r->monitor_heads)) {
        PyErr_SetString(PyExc_ValueError, "offer: no frame head for this monitor id");
        goto done;
    }
    head = PyList_GET_ITEM(r->monitor_heads, mid);
    Py_INCREF(head); /* released at done */
    if (!PyBytes_Check(head)) {
        PyErr_SetString(PyExc_TypeError, "offer: a frame head is not bytes");
        goto done;
    }
    long long fake_now = 0; /* a test's clock: read here, where Python code may run */
    if (r->clock != Py_None && take_ll(PyObject_CallNoArgs(r->clock), &fake_now) < 0)
        goto done;

    /* -- the store (no Python code from here to its end) ---------------------------- */
    {
        long long seq = r->next, cap = r->capacity, buf_size = r->replay_bytes;
        char digits[24];
        int nd = snprintf(digits, sizeof digits, "%lld", seq);
        Py_ssize_t hlen = PyBytes_GET_SIZE(head), dlen = PyBytes_GET_SIZE(data);
        long long size = 4 + nd + hlen + dlen + 2;
        if (size > buf_size) {
            /* Cannot be kept: published (counted, numbered) but born evicted. */
            r->oversized++;
            r->next = r->first = seq + 1;
            r->head = 0;
        } else {
            long long start = r->head, tail = r->head;
            int wrapped = start + size > buf_size;
            if (wrapped)
                start = 0; /* the tail of the buffer is given up this round */
            long long end = start + size;
            int64_t *off = r->views[A_OFF].buf;
            uint32_t *ln = r->views[A_LEN].buf;
            long long first = r->first;
            if (seq - first >= cap)
                first = seq - cap + 1;
            while (first < seq) { /* evict (advance first) before overwriting */
                long long i = first % cap, o = off[i];
                int in_the_way = wrapped ? (o < end || o + (long long)ln[i] > tail)
                                         : (o < end && o + (long long)ln[i] > start);
                if (!in_the_way)
                    break;
                first++;
            }
            r->first = first;
            char *p = (char *)r->views[A_BUF].buf + start;
            memcpy(p, "id: ", 4);
            memcpy(p + 4, digits, nd);
            memcpy(p + 4 + nd, PyBytes_AS_STRING(head), hlen);
            memcpy(p + 4 + nd + hlen, PyBytes_AS_STRING(data), dlen);
            memcpy(p + 4 + nd + hlen + dlen, "\n\n", 2);
            long long i = seq % cap;
            off[i] = start;
            ln[i] = (uint32_t)size;
            ((uint16_t *)r->views[A_HDR].buf)[i] = (uint16_t)(4 + nd + hlen);
            ((uint16_t *)r->views[A_MON].buf)[i] = (uint16_t)mid;
            ((int64_t *)r->views[A_PID].buf)[i] = pid;
            ((int64_t *)r->views[A_UID].buf)[i] = uid;
            ((int64_t *)r->views[A_COMM].buf)[i] = comm;
            ((int64_t *)r->views[A_CGID].buf)[i] = cgid;
            ((int64_t *)r->views[A_PROCID].buf)[i] = procid;
            /* The arrival time, in the same step as the store: never decreasing in
             * sequence order (what a subscriber's max_lag search relies on).
             * CLOCK_MONOTONIC is Python's time.monotonic_ns() on Linux. */
            long long now = fake_now;
            if (r->clock == Py_None) {
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                now = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
            }
            ((int64_t *)r->views[A_AT].buf)[i] = now;
            r->head = end;
            r->next = seq + 1;
        }
    }
    /* -- one wake-up per burst --------------------------------------------------------- */
    if (!r->wake_pending) {
        r->wake_pending = 1;
        PyObject *out = PyObject_CallNoArgs(r->schedule);
        if (!out)
            goto done;
        Py_DECREF(out);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(head);
    for (int k = 0; k < K_N; k++)
        Py_XDECREF(v[k]);
    return result;
}

static PyObject *RingStore_arm(RingStore *r, PyObject *Py_UNUSED(unused)) {
    r->wake_pending = 0;
    Py_RETURN_NONE;
}

static void release(RingStore *r) {
    for (int a = 0; a < r->held; a++)
        PyBuffer_Release(&r->views[a]);
    r->held = 0;
}

static int RingStore_init(RingStore *r, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"arrays", "monitor_ids", "monitor_heads", "register",
                             "schedule", "clock", NULL};
    PyObject *arrays, *ids, *heads, *reg, *schedule, *clock = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO!O!OO|O", kwlist, &arrays, &PyDict_Type,
                                     &ids, &PyList_Type, &heads, &reg, &schedule, &clock))
        return -1;
    if (r->held) {
        PyErr_SetString(PyExc_RuntimeError, "RingStore is initialised once");
        return -1;
    }
    for (int a = 0; a < A_N; a++) {
        PyObject *o = PyObject_GetAttrString(arrays, A_NAMES[a]);
        if (!o) {
            release(r);
            return -1;
        }
        int rc = PyObject_GetBuffer(o, &r->views[a], PyBUF_WRITABLE | PyBUF_FORMAT);
        Py_DECREF(o);
        if (rc < 0) {
            release(r);
            return -1;
        }
        r->held = a + 1;
        if (r->views[a].itemsize != A_ITEM[a]) {
            PyErr_Format(PyExc_TypeError, "RingStore: arrays.%s has items of %zd bytes, not %zd",
                         A_NAMES[a], r->views[a].itemsize, A_ITEM[a]);
            release(r);
            return -1;
        }
    }
    r->replay_bytes = r->views[A_BUF].len;
    r->capacity = r->views[A_OFF].len / 8;
    for (int a = A_LEN; a < A_N; a++) {
        if (r->views[a].len / A_ITEM[a] != r->capacity) {
            PyErr_Format(PyExc_ValueError, "RingStore: arrays.%s has not %lld slots",
                         A_NAMES[a], r->capacity);
            release(r);
            return -1;
        }
    }
    if (r->capacity < 1) {
        PyErr_SetString(PyExc_ValueError, "RingStore: no slots");
        release(r);
        return -1;
    }
    Py_INCREF(ids);
    Py_INCREF(heads);
    Py_INCREF(reg);
    Py_INCREF(schedule);
    Py_INCREF(clock);
    r->monitor_ids = ids;
    r->monitor_heads = heads;
    r->reg = reg;
    r->schedule = schedule;
    r->clock = clock;
    r->head = 0;
    r->next = r->first = 1;
    r->oversized = 0;
    r->wake_pending = 0;
    return 0;
}

static int RingStore_traverse(RingStore *r, visitproc visit, void *arg) {
    for (int a = 0; a < r->held; a++)
        Py_VISIT(r->views[a].obj);
    Py_VISIT(r->monitor_ids);
    Py_VISIT(r->monitor_heads);
    Py_VISIT(r->reg);
    Py_VISIT(r->schedule);
    Py_VISIT(r->clock);
    return 0;
}

static int RingStore_clear(RingStore *r) {
    release(r);
    Py_CLEAR(r->monitor_ids);
    Py_CLEAR(r->monitor_heads);
    Py_CLEAR(r->reg);
    Py_CLEAR(r->schedule);
    Py_CLEAR(r->clock);
    return 0;
}

static void RingStore_dealloc(RingStore *r) {
    PyObject_GC_UnTrack(r);
    RingStore_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef RingStore_methods[] = {
    {"offer", (PyCFunction)(void (*)(void))RingStore_offer, METH_FASTCALL,
     "offer(event, data): store the event's frame and filter keys (a poller thread)"},
    {"arm", (PyCFunction)RingStore_arm, METH_NOARGS,
     "the next offer schedules a wake-up"},
    {NULL}};

static PyMemberDef RingStore_members[] = {
    {"capacity", T_LONGLONG, offsetof(RingStore, capacity), READONLY, "slots"},
    {"replay_bytes", T_LONGLONG, offsetof(RingStore, replay_bytes), READONLY, "ring bytes"},
    {"head", T_LONGLONG, offsetof(RingStore, head), READONLY, "where the next frame goes"},
    {"next", T_LONGLONG, offsetof(RingStore, next), READONLY, "the next sequence number"},
    {"first", T_LONGLONG, offsetof(RingStore, first), READONLY, "the oldest one kept"},
    {"oversized", T_LONGLONG, offsetof(RingStore, oversized), READONLY,
     "events larger than the byte ring (published, not kept)"},
    {"wake_pending", T_INT, offsetof(RingStore, wake_pending), READONLY,
     "a wake-up is scheduled (or nobody waits)"},
    {NULL}};

static PyTypeObject RingStoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.stream._ringstore.RingStore",
    .tp_basicsize = sizeof(RingStore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The hub's ring store (agent/stream/ring.py PyRingStore: the reference)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RingStore_init,
    .tp_dealloc = (destructor)RingStore_dealloc,
    .tp_traverse = (traverseproc)RingStore_traverse,
    .tp_clear = (inquiry)RingStore_clear,
    .tp_methods = RingStore_methods,
    .tp_members = RingStore_members,
};

/* -- WebSocket messages from SSE frames (agent/stream/wire.py: the reference) ---------- */
typedef struct {
    char *p;
    size_t len, cap;
} out_t;

static int out_put(out_t *o, const char *s, size_t n) {
    if (o->len + n > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        while (cap < o->len + n)
            cap *= 2;
        char *p = PyMem_Realloc(o->p, cap);
        if (!p) {
            PyErr_NoMemory();
            return -1;
        }
        o->p = p;
        o->cap = cap;
    }
    memcpy(o->p + o->len, s, n);
    o->len += n;
    return 0;
}

/* A monitor name as a JSON string, as orjson writes it: '"', '\\' and bytes below 0x20
 * escaped (\b \t \n \f \r by name, the rest as \u00XX), everything else as is. */
static int out_json_str(out_t *o, const unsigned char *s, size_t n) {
    static const char HEX[] = "0123456789abcdef";
    if (out_put(o, "\"", 1) < 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        char esc[6];
        const char *e = NULL;
        size_t en = 2;
        switch (c) {
        case '"': e = "\\\""; break;
        case '\\': e = "\\\\"; break;
        case '\b': e = "\\b"; break;
        case '\t': e = "\\t"; break;
        case '\n': e = "\\n"; break;
        case '\f': e = "\\f"; break;
        case '\r': e = "\\r"; break;
        default:
            if (c < 0x20) {
                memcpy(esc, "\\u00", 4);
                esc[4] = HEX[c >> 4];
                esc[5] = HEX[c & 15];
                e = esc;
                en = 6;
            }
        }
        if (e ? out_put(o, e, en) < 0 : out_put(o, (const char *)&c, 1) < 0)
            return -1;
    }
    return out_put(o, "\"", 1);
}

static int bad_frame(void) {
    PyErr_SetString(PyExc_ValueError, "not a run of SSE event frames");
    return -1;
}

/* Each frame "id: N\nevent: M\ndata: J\n\n" of ``frames`` as {"id":N,"event":"M","data":J},
 * appended to ``o`` (separated by ``sep`` when ``list`` is NULL) or to ``list`` as bytes. */
static int ws_objects(const char *s, Py_ssize_t n, out_t *o, PyObject *list, int first) {
    const char *end = s + n;
    while (s < end) {
        if (end - s < 4 || memcmp(s, "id: ", 4))
            return bad_frame();
        const char *id = s + 4, *nl = memchr(id, '\n', end - id);
        if (!nl || nl == id || end - nl < 8 || memcmp(nl, "\nevent: ", 8))
            return bad_frame();
        for (const char *d = id; d < nl; d++)
            if (*d < '0' || *d > '9')
                return bad_frame();
        const char *name = nl + 8, *nl2 = memchr(name, '\n', end - name);
        if (!nl2 || end - nl2 < 7 || memcmp(nl2, "\ndata: ", 7))
            return bad_frame();
        const char *json = nl2 + 7, *nl3 = memchr(json, '\n', end - json);
        if (!nl3 || end - nl3 < 2 || nl3[1] != '\n')
            return bad_frame();
        size_t start = o->len;
        if (!list && !first && out_put(o, ",", 1) < 0)
            return -1;
        if (out_put(o, "{\"id\":", 6) < 0 || out_put(o, id, nl - id) < 0 ||
            out_put(o, ",\"event\":", 9) < 0 ||
            out_json_str(o, (const unsigned char *)name, nl2 - name) < 0 ||
            out_put(o, ",\"data\":", 8) < 0 || out_put(o, json, nl3 - json) < 0 ||
            out_put(o, "}", 1) < 0)
            return -1;
        if (list) {
            PyObject *b = PyBytes_FromStringAndSize(o->p + start, o->len - start);
            if (!b || PyList_Append(list, b) < 0) {
                Py_XDECREF(b);
                return -1;
            }
            Py_DECREF(b);
            o->len = start;
        }
        first = 0;
        s = nl3 + 2;
    }
    return 0;
}

static int missed_object(out_t *o, long long missed) {
    char tmp[64];
    int k = snprintf(tmp, sizeof tmp, "{\"event\":\"dropped\",\"missed\":%lld}", missed);
    return out_put(o, tmp, k);
}

static PyObject *ws_array(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer frames;
    long long missed;
    if (!PyArg_ParseTuple(args, "y*L:ws_array", &frames, &missed))
        return NULL;
    out_t o = {0};
    PyObject *res = NULL;
    if (out_put(&o, "[", 1) < 0 || (missed && missed_object(&o, missed) < 0) ||
        ws_objects(frames.buf, frames.len, &o, NULL, !missed) < 0 || out_put(&o, "]", 1) < 0)
        goto done;
    res = PyBytes_FromStringAndSize(o.p, o.len);
done:
    PyMem_Free(o.p);
    PyBuffer_Release(&frames);
    return res;
}

static PyObject *ws_messages(PyObject *Py_UNUSED(mod), PyObject *args) {
    Py_buffer frames;
    long long missed;
    if (!PyArg_ParseTuple(args, "y*L:ws_messages", &frames, &missed))
        return NULL;
    out_t o = {0};
    PyObject *list = PyList_New(0);
    if (!list)
        goto fail;
    if (missed) {
        if (missed_object(&o, missed) < 0)
            goto fail;
        PyObject *b = PyBytes_FromStringAndSize(o.p, o.len);
        if (!b || PyList_Append(list, b) < 0) {
            Py_XDECREF(b);
            goto fail;
        }
        Py_DECREF(b);
        o.len = 0;
    }
    if (ws_objects(frames.buf, frames.len, &o, list, 1) < 0)
        goto fail;
    PyMem_Free(o.p);
    PyBuffer_Release(&frames);
    return list;
fail:
    Py_XDECREF(list);
    PyMem_Free(o.p);
    PyBuffer_Release(&frames);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"ws_array", ws_array, METH_VARARGS,
     "ws_array(frames, missed) -> bytes: SSE event frames as one JSON array of WebSocket "
     "objects (agent/stream/wire.py)"},
    {"ws_messages", ws_messages, METH_VARARGS,
     "ws_messages(frames, missed) -> list[bytes]: one WebSocket object per frame"},
    {NULL}};

static struct PyModuleDef ringstore_module = {
    PyModuleDef_HEAD_INIT, "agent.stream._ringstore",
    "The stream hub's ring store compiled (agent/stream/ring.py) and the WebSocket messages "
    "built from its frames (agent/stream/wire.py).", -1, module_methods,
    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__ringstore(void) {
    if (PyType_Ready(&RingStoreType) < 0)
        return NULL;
    for (int k = 0; k < K_N; k++) {
        keys[k] = PyUnicode_InternFromString(K_NAMES[k]);
        if (!keys[k])
            return NULL;
    }
    empty_str = PyUnicode_InternFromString("");
    if (!empty_str)
        return NULL;
    PyObject *m = PyModule_Create(&ringstore_module);
    if (!m)
        return NULL;
    Py_INCREF(&RingStoreType);
    if (PyModule_AddObject(m, "RingStore", (PyObject *)&RingStoreType) < 0) {
        Py_DECREF(&RingStoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
