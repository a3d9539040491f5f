/* The per-event path compiled: one ring-buffer record -> the event's JSON bytes, the
 * same bytes agent/model/events.py encode_event(EventDecoder.decode(raw)) gives.
 *
 * Nothing here knows a monitor. agent/monitors/compiled.py turns an event declaration
 * (agent/model/event_decl.py: the common header and the monitor's fields) into a table
 * of operations, one per JSON field in order; Decoder interprets that table for each
 * record. What the table cannot say, or the compiled code cannot write exactly as
 * orjson would, goes back to the Python decoder for that record (the "fallback"):
 *
 *  - a string that is not valid UTF-8: Python decodes it with surrogateescape and
 *    encode_event then writes the whole event with json.dumps (ensure_ascii), so that
 *    record takes the Python path entirely;
 *  - a HOOK value or LOOKUP entry of a type other than None, bool, int (64-bit), str,
 *    list or tuple of those; a missing LOOKUP key or HOOK field (the Python path raises
 *    the same error, counted as a parse error by the monitor).
 *
 * decode() returns a Record: the JSON bytes (.data) plus the common header's values,
 * which is what the stream hub, the exporter and the JSONL writer read. It is a
 * read-only mapping: the common keys are answered from the header, any other key
 * builds the dict once (orjson.loads of the bytes, equal to the Python decoder's dict
 * for every record the compiled path handles).
 *
 * Strings are escaped as orjson does: '"', '\\', and bytes below 0x20 (\b \t \n \f \r
 * by name, the others as \u00XX); everything else as is (UTF-8).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

enum kind {
    K_INT, K_CSTR, K_HEX, K_INET, K_NET16, K_FLAG, K_ENUM, K_ERRNO, K_CONST, K_LOOKUP,
    K_HOOK, K_WALLTIME, K_PROCESS_ID, K_WORKLOAD, K_NKINDS
};

#define MAX_ERRNO 4095
#define FALLBACK 1 /* a writer's "cannot write this exactly": the record goes to Python */

typedef struct {
    int kind;
    char *key;            /* ,"name": (the first field without the comma) */
    Py_ssize_t key_len;
    Py_ssize_t off, size; /* the member read (size: bytes; arrays: their length) */
    int is_signed;
    Py_ssize_t when_off, when_size; /* when_size 0: always present */
    uint64_t when_mask;
    Py_ssize_t off2, size2;   /* INET: the family member (size2 0: by length);
                                 PROCESS_ID: the start-time member */
    PyObject *arg;            /* CONST: bytes; LOOKUP: dict; HOOK: field name;
                                 ERRNO: tuple of 4095 bytes; WORKLOAD: index */
    int64_t *enum_values;     /* ENUM */
    PyObject **enum_json;
    Py_ssize_t enum_n;
    Py_ssize_t index;         /* WORKLOAD: 0..3 */
} op_t;

/* Offsets of the common header's members (agent/model/events.py HEADER). */
enum { H_TS, H_PID, H_TID, H_PPID, H_UID, H_GID, H_COMM, H_START, H_PSTART, H_CGROUP, H_N };

typedef struct {
    PyObject_HEAD
    op_t *ops;
    Py_ssize_t nops;
    Py_ssize_t fixed_size;
    Py_ssize_t hdr_off[H_N];
    Py_ssize_t comm_len;
    PyObject *monitor;      /* str */
    PyObject *hook_call;    /* raw -> {field: value}, or None */
    PyObject *fallback;     /* raw -> the Python decoder's event */
    PyObject *resolve;      /* cgroup id -> Workload */
    PyObject *unknown;      /* the Workload of an unresolved id (never cached) */
    PyObject *loads;        /* orjson.loads */
    PyObject *boot;         /* bytes: 16 hex digits */
    int64_t offset_ns;      /* wall - monotonic */
    uint64_t ns_per_tick;
    int has_workload;
    uint64_t last_cgroup;   /* the last resolved id and its Workload */
    PyObject *last_workload;
    int64_t iso_second;     /* the date part, formatted once a second */
    char iso_prefix[40];
    size_t iso_prefix_len;
    char *buf;
    size_t cap, len;
    Py_ssize_t fallbacks;   /* records handed to the Python decoder */
} Decoder;

typedef struct {
    PyObject_HEAD
    PyObject *data;
    PyObject *monitor;
    PyObject *workload;     /* NULL without WORKLOAD fields */
    PyObject *dict;         /* built on the first key the header cannot answer */
    Decoder *decoder;
    uint64_t ts_ns, start_ns, parent_start_ns, cgroup_id;
    uint32_t pid, tid, ppid, uid, gid;
    char comm[16];
} Record;

static PyTypeObject RecordType;

/* -- output buffer ---------------------------------------------------------------- */
static int grow(Decoder *d, size_t more) {
    if (d->len + more <= d->cap)
        return 0;
    size_t cap = d->cap ? d->cap : 1024;
    while (cap < d->len + more)
        cap *= 2;
    char *b = PyMem_Realloc(d->buf, cap);
    if (!b) {
        PyErr_NoMemory();
        return -1;
    }
    d->buf = b;
    d->cap = cap;
    return 0;
}

static inline int put(Decoder *d, const char *s, size_t n) {
    if (grow(d, n) < 0)
        return -1;
    memcpy(d->buf + d->len, s, n);
    d->len += n;
    return 0;
}

static int put_u64(Decoder *d, uint64_t v) {
    char tmp[24];
    int i = 24;
    do {
        tmp[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return put(d, tmp + i, 24 - i);
}

static int put_i64(Decoder *d, int64_t v) {
    if (v < 0) {
        if (put(d, "-", 1) < 0)
            return -1;
        return put_u64(d, (uint64_t)(-(v + 1)) + 1);
    }
    return put_u64(d, (uint64_t)v);
}

static const char HEX[] = "0123456789abcdef";

/* A JSON string of valid UTF-8 bytes, escaped as orjson escapes. */
static int put_str(Decoder *d, const unsigned char *s, size_t n) {
    if (grow(d, n * 6 + 2) < 0)
        return -1;
    char *o = d->buf + d->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\t': *o++ = 't'; break;
        case '\n': *o++ = 'n'; break;
        case '\f': *o++ = 'f'; break;
        case '\r': *o++ = 'r'; break;
        default:
            *o++ = 'u'; *o++ = '0'; *o++ = '0';
            *o++ = HEX[c >> 4]; *o++ = HEX[c & 15];
        }
    }
    *o++ = '"';
    d->len = (size_t)(o - d->buf);
    return 0;
}

/* Strict UTF-8 as Python's decoder takes it (no surrogates, no overlong forms, at most
 * U+10FFFF). */
static int utf8_valid(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) { need = 2; lo = 0xA0; }
        else if (c >= 0xE1 && c <= 0xEC) need = 2;
        else if (c == 0xED) { need = 2; hi = 0x9F; }
        else if (c >= 0xEE && c <= 0xEF) need = 2;
        else if (c == 0xF0) { need = 3; lo = 0x90; }
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) { need = 3; hi = 0x8F; }
        else return 0;
        if (i + need >= n) return 0; /* a truncated sequence */
        if (s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xC0) != 0x80) return 0;
        i += need + 1;
    }
    return 1;
}

/* A Python value as orjson writes it: -1 error, FALLBACK when it cannot be written here. */
static int put_value(Decoder *d, PyObject *v, int depth) {
    if (v == Py_None) return put(d, "null", 4);
    if (v == Py_True) return put(d, "true", 4);
    if (v == Py_False) return put(d, "false", 5);
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow == 0) {
            if (x == -1 && PyErr_Occurred()) return -1;
            return put_i64(d, x);
        }
        if (overflow > 0) {
            unsigned long long u = PyLong_AsUnsignedLongLong(v);
            if (u == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                return FALLBACK;
            }
            return put_u64(d, u);
        }
        return FALLBACK;
    }
    if (PyUnicode_CheckExact(v)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(v, &n);
        if (!s) { /* lone surrogates (surrogateescape): orjson refuses them too */
            PyErr_Clear();
            return FALLBACK;
        }
        return put_str(d, (const unsigned char *)s, (size_t)n);
    }
    if ((PyList_CheckExact(v) || PyTuple_CheckExact(v)) && depth < 8) {
        PyObject *seq = v;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (put(d, "[", 1) < 0) return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i && put(d, ",", 1) < 0) return -1;
            int r = put_value(d, PySequence_Fast_GET_ITEM(seq, i), depth + 1);
            if (r) return r;
        }
        return put(d, "]", 1);
    }
    return FALLBACK;
}

/* -- reading members ------------------------------------------------------------------ */
static inline uint64_t read_u(const unsigned char *p, Py_ssize_t size) {
    switch (size) {
    case 1: return p[0];
    case 2: { uint16_t v; memcpy(&v, p, 2); return v; }
    case 4: { uint32_t v; memcpy(&v, p, 4); return v; }
    default: { uint64_t v; memcpy(&v, p, 8); return v; }
    }
}

static inline int64_t read_s(const unsigned char *p, Py_ssize_t size) {
    switch (size) {
    case 1: return (int8_t)p[0];
    case 2: { int16_t v; memcpy(&v, p, 2); return v; }
    case 4: { int32_t v; memcpy(&v, p, 4); return v; }
    default: { int64_t v; memcpy(&v, p, 8); return v; }
    }
}

/* Python's ipaddress.IPv6Address.__str__ (3.11): 8 lower-case hextets without leading
 * zeros, the longest run (first of equals) of two or more zero hextets as "::". */
static int put_ipv6(Decoder *d, const unsigned char *a) {
    unsigned h[8];
    for (int i = 0; i < 8; i++) h[i] = (unsigned)(a[2 * i] << 8 | a[2 * i + 1]);
    int best = -1, best_len = 0;
    for (int i = 0; i < 8;) {
        if (h[i]) { i++; continue; }
        int j = i;
        while (j < 8 && !h[j]) j++;
        if (j - i > best_len) { best = i; best_len = j - i; }
        i = j;
    }
    if (best_len < 2) best = -1;
    char tmp[48];
    int n = 0;
    tmp[n++] = '"';
    for (int i = 0; i < 8; i++) {
        if (i == best) {
            tmp[n++] = ':';
            if (i == 0) tmp[n++] = ':';
            i += best_len - 1;
            continue;
        }
        n += snprintf(tmp + n, sizeof tmp - (size_t)n, "%x", h[i]);
        if (i < 7) tmp[n++] = ':';
    }
    tmp[n++] = '"';
    return put(d, tmp, (size_t)n);
}

static int put_ipv4(Decoder *d, const unsigned char *a) {
    char tmp[24];
    int n = snprintf(tmp, sizeof tmp, "\"%u.%u.%u.%u\"", a[0], a[1], a[2], a[3]);
    return put(d, tmp, (size_t)n);
}

/* CLOCK_MONOTONIC ns -> "YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ" (agent/model/events.py
 * MonotonicClock.iso). */
static int put_walltime(Decoder *d, uint64_t ts_ns) {
    __int128 wall = (__int128)ts_ns + d->offset_ns;
    int64_t second = (int64_t)(wall / 1000000000);
    int64_t nanos = (int64_t)(wall % 1000000000);
    if (nanos < 0) { nanos += 1000000000; second -= 1; }
    if (second != d->iso_second) {
        time_t t = (time_t)second;
        struct tm tm;
        if (!gmtime_r(&t, &tm) || tm.tm_year + 1900 > 9999 || tm.tm_year + 1900 < 1)
            return FALLBACK; /* out of datetime's range: Python decides */
        d->iso_prefix_len = (size_t)snprintf(
            d->iso_prefix, sizeof d->iso_prefix, "\"%04d-%02d-%02dT%02d:%02d:%02d.",
            tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        d->iso_second = second;
    }
    char tmp[16];
    int n = snprintf(tmp, sizeof tmp, "%09lldZ\"", (long long)nanos);
    if (put(d, d->iso_prefix, d->iso_prefix_len) < 0) return -1;
    return put(d, tmp, (size_t)n);
}

static PyObject *workload_of(Decoder *d, uint64_t cgroup_id) {
    if (d->last_workload && d->last_cgroup == cgroup_id) {
        Py_INCREF(d->last_workload);
        return d->last_workload;
    }
    PyObject *w = PyObject_CallFunction(d->resolve, "K", (unsigned long long)cgroup_id);
    if (!w) return NULL;
    if (!PyTuple_Check(w) || PyTuple_GET_SIZE(w) < 4) {
        Py_DECREF(w);
        PyErr_SetString(PyExc_TypeError, "the cgroup resolver must return a Workload");
        return NULL;
    }
    if (w != d->unknown) { /* an unresolved id is asked again, as the Python path does */
        Py_INCREF(w);
        Py_XSETREF(d->last_workload, w);
        d->last_cgroup = cgroup_id;
    }
    return w;
}

/* -- one record ----------------------------------------------------------------------- */
/* Writes the JSON of rec into d->buf: 0, -1 (error set) or FALLBACK. */
static int encode(Decoder *d, const unsigned char *rec, PyObject *raw, PyObject **workload) {
    PyObject *hooked = NULL;
    int r = 0;
    d->len = 0;
    if (put(d, "{", 1) < 0) return -1;
    for (Py_ssize_t i = 0; i < d->nops && r == 0; i++) {
        op_t *op = &d->ops[i];
        if (op->when_size && !(read_u(rec + op->when_off, op->when_size) & op->when_mask))
            continue;
        if (put(d, op->key, (size_t)op->key_len) < 0) { r = -1; break; }
        const unsigned char *p = rec + op->off;
        switch (op->kind) {
        case K_INT:
            r = op->is_signed ? put_i64(d, read_s(p, op->size)) : put_u64(d, read_u(p, op->size));
            break;
        case K_CSTR: {
            const unsigned char *z = memchr(p, 0, (size_t)op->size);
            size_t n = z ? (size_t)(z - p) : (size_t)op->size;
            r = utf8_valid(p, n) ? put_str(d, p, n) : FALLBACK;
            break;
        }
        case K_HEX: {
            if (grow(d, (size_t)op->size * 2 + 2) < 0) { r = -1; break; }
            char *o = d->buf + d->len;
            *o++ = '"';
            for (Py_ssize_t k = 0; k < op->size; k++) {
                *o++ = HEX[p[k] >> 4];
                *o++ = HEX[p[k] & 15];
            }
            *o++ = '"';
            d->len = (size_t)(o - d->buf);
            break;
        }
        case K_INET: {
            uint64_t family = op->size2 ? read_u(rec + op->off2, op->size2)
                                        : (op->size == 4 ? 2 : 10);
            if (family == 2 && op->size >= 4)
                r = put_ipv4(d, p);
            else if (family == 2)
                r = FALLBACK; /* a short member: Python raises, as it should */
            else if (family == 10 && op->size >= 16)
                r = put_ipv6(d, p);
            else if (family == 10)
                r = FALLBACK; /* a short member: Python raises, as it should */
            else
                r = put(d, "null", 4);
            break;
        }
        case K_NET16: {
            uint16_t v = (uint16_t)read_u(p, 2);
            r = put_u64(d, (uint16_t)((v >> 8) | (v << 8)));
            break;
        }
        case K_FLAG:
            r = (read_u(p, op->size) & (uint64_t)PyLong_AsUnsignedLongLongMask(op->arg))
                    ? put(d, "true", 4) : put(d, "false", 5);
            break;
        case K_ENUM: {
            int64_t v = op->is_signed ? read_s(p, op->size) : (int64_t)read_u(p, op->size);
            Py_ssize_t k;
            for (k = 0; k < op->enum_n; k++)
                if (op->enum_values[k] == v) break;
            if (k < op->enum_n) {
                PyObject *j = op->enum_json[k];
                r = put(d, PyBytes_AS_STRING(j), (size_t)PyBytes_GET_SIZE(j));
            } else {
                char tmp[24];
                int n = op->is_signed ? snprintf(tmp, sizeof tmp, "\"%lld\"", (long long)v)
                                      : snprintf(tmp, sizeof tmp, "\"%llu\"",
                                                 (unsigned long long)read_u(p, op->size));
                r = put(d, tmp, (size_t)n);
            }
            break;
        }
        case K_ERRNO: {
            int64_t v = op->is_signed ? read_s(p, op->size) : (int64_t)read_u(p, op->size);
            if (v >= -MAX_ERRNO && v < 0) {
                PyObject *j = PyTuple_GET_ITEM(op->arg, -v - 1);
                r = put(d, PyBytes_AS_STRING(j), (size_t)PyBytes_GET_SIZE(j));
            } else {
                r = put(d, "null", 4);
            }
            break;
        }
        case K_CONST:
            r = put(d, PyBytes_AS_STRING(op->arg), (size_t)PyBytes_GET_SIZE(op->arg));
            break;
        case K_LOOKUP: {
            PyObject *key = op->is_signed ? PyLong_FromLongLong(read_s(p, op->size))
                                          : PyLong_FromUnsignedLongLong(read_u(p, op->size));
            if (!key) { r = -1; break; }
            PyObject *v = PyDict_GetItemWithError(op->arg, key);
            Py_DECREF(key);
            if (!v) r = PyErr_Occurred() ? -1 : FALLBACK;
            else r = put_value(d, v, 0);
            break;
        }
        case K_HOOK: {
            if (!hooked) {
                hooked = PyObject_CallOneArg(d->hook_call, raw);
                if (!hooked) { r = -1; break; }
                if (!PyDict_Check(hooked)) { r = FALLBACK; break; }
            }
            PyObject *v = PyDict_GetItemWithError(hooked, op->arg);
            if (!v) r = PyErr_Occurred() ? -1 : FALLBACK;
            else r = put_value(d, v, 0);
            break;
        }
        case K_WALLTIME:
            r = put_walltime(d, read_u(p, op->size));
            break;
        case K_PROCESS_ID: {
            uint64_t pid = read_u(p, op->size);
            if (!pid) { r = put(d, "null", 4); break; }
            uint64_t ticks = read_u(rec + op->off2, op->size2) / d->ns_per_tick;
            char tmp[80];
            int n = snprintf(tmp, sizeof tmp, "\"%s-%llu-%llu\"", PyBytes_AS_STRING(d->boot),
                             (unsigned long long)ticks, (unsigned long long)pid);
            r = put(d, tmp, (size_t)n);
            break;
        }
        case K_WORKLOAD: {
            if (!*workload) {
                *workload = workload_of(d, read_u(p, op->size));
                if (!*workload) { r = -1; break; }
            }
            r = put_value(d, PyTuple_GET_ITEM(*workload, op->index), 0);
            break;
        }
        }
    }
    Py_XDECREF(hooked);
    if (r) return r;
    return put(d, "}", 1);
}

static PyObject *Decoder_decode(Decoder *d, PyObject *raw) {
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(raw, &p, &n) < 0) return NULL;
    PyObject *padded = NULL;
    if (n < d->fixed_size) {
        /* A short record reads as zeros past its end (the Python decoder pads it). */
        padded = PyBytes_FromStringAndSize(NULL, d->fixed_size);
        if (!padded) return NULL;
        memset(PyBytes_AS_STRING(padded), 0, (size_t)d->fixed_size);
        memcpy(PyBytes_AS_STRING(padded), p, (size_t)n);
        raw = padded;
        p = PyBytes_AS_STRING(padded);
    }
    const unsigned char *rec = (const unsigned char *)p;
    PyObject *workload = NULL;
    int r = encode(d, rec, raw, &workload);
    if (r) {
        Py_XDECREF(workload);
        PyObject *event = NULL;
        if (r > 0) { /* the Python decoder pads the record itself */
            d->fallbacks++;
            event = PyObject_CallOneArg(d->fallback, raw);
        }
        Py_XDECREF(padded);
        return event;
    }
    Record *out = PyObject_New(Record, &RecordType);
    if (!out) {
        Py_XDECREF(workload);
        Py_XDECREF(padded);
        return NULL;
    }
    out->data = PyBytes_FromStringAndSize(d->buf, (Py_ssize_t)d->len);
    out->dict = NULL;
    out->workload = workload;
    Py_INCREF(d->monitor);
    out->monitor = d->monitor;
    Py_INCREF(d);
    out->decoder = d;
    const Py_ssize_t *o = d->hdr_off;
    out->ts_ns = read_u(rec + o[H_TS], 8);
    out->pid = (uint32_t)read_u(rec + o[H_PID], 4);
    out->tid = (uint32_t)read_u(rec + o[H_TID], 4);
    out->ppid = (uint32_t)read_u(rec + o[H_PPID], 4);
    out->uid = (uint32_t)read_u(rec + o[H_UID], 4);
    out->gid = (uint32_t)read_u(rec + o[H_GID], 4);
    out->start_ns = read_u(rec + o[H_START], 8);
    out->parent_start_ns = read_u(rec + o[H_PSTART], 8);
    out->cgroup_id = read_u(rec + o[H_CGROUP], 8);
    memcpy(out->comm, rec + o[H_COMM], sizeof out->comm);
    Py_XDECREF(padded);
    if (!out->data) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

/* -- Decoder setup ---------------------------------------------------------------------- */
static void free_ops(Decoder *d) {
    for (Py_ssize_t i = 0; i < d->nops; i++) {
        op_t *op = &d->ops[i];
        PyMem_Free(op->key);
        Py_XDECREF(op->arg);
        for (Py_ssize_t k = 0; k < op->enum_n; k++) Py_XDECREF(op->enum_json[k]);
        PyMem_Free(op->enum_json);
        PyMem_Free(op->enum_values);
    }
    PyMem_Free(d->ops);
    d->ops = NULL;
    d->nops = 0;
}

static int Decoder_traverse(Decoder *d, visitproc visit, void *arg) {
    Py_VISIT(d->hook_call);
    Py_VISIT(d->fallback);
    Py_VISIT(d->resolve);
    Py_VISIT(d->last_workload);
    for (Py_ssize_t i = 0; i < d->nops; i++) Py_VISIT(d->ops[i].arg);
    return 0;
}

static int Decoder_clear(Decoder *d) {
    Py_CLEAR(d->hook_call);
    Py_CLEAR(d->fallback);
    Py_CLEAR(d->resolve);
    Py_CLEAR(d->last_workload);
    return 0;
}

static void Decoder_dealloc(Decoder *d) {
    PyObject_GC_UnTrack(d);
    Decoder_clear(d);
    free_ops(d);
    Py_XDECREF(d->monitor);
    Py_XDECREF(d->unknown);
    Py_XDECREF(d->loads);
    Py_XDECREF(d->boot);
    PyMem_Free(d->buf);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* One op: (kind, key bytes, off, size, signed, when_off, when_size, when_mask, arg, off2,
 * size2). ENUM's arg: a tuple of (value, JSON bytes); WORKLOAD's: the index. */
static int parse_op(op_t *op, PyObject *t) {
    PyObject *key, *arg;
    long long kind, off, size, is_signed, when_off, when_size, off2, size2;
    unsigned long long when_mask;
    if (!PyArg_ParseTuple(t, "LSLLLLLKOLL", &kind, &key, &off, &size, &is_signed, &when_off,
                          &when_size, &when_mask, &arg, &off2, &size2))
        return -1;
    if (kind < 0 || kind >= K_NKINDS) {
        PyErr_Format(PyExc_ValueError, "unknown op kind %lld", kind);
        return -1;
    }
    op->kind = (int)kind;
    op->key_len = PyBytes_GET_SIZE(key);
    op->key = PyMem_Malloc((size_t)op->key_len);
    if (!op->key) { PyErr_NoMemory(); return -1; }
    memcpy(op->key, PyBytes_AS_STRING(key), (size_t)op->key_len);
    op->off = off; op->size = size; op->is_signed = (int)is_signed;
    op->when_off = when_off; op->when_size = when_size; op->when_mask = when_mask;
    op->off2 = off2; op->size2 = size2;
    if (op->kind == K_ENUM) {
        if (!PyTuple_Check(arg)) { PyErr_SetString(PyExc_TypeError, "ENUM: a tuple"); return -1; }
        op->enum_n = PyTuple_GET_SIZE(arg);
        op->enum_values = PyMem_Calloc((size_t)op->enum_n + 1, sizeof(int64_t));
        op->enum_json = PyMem_Calloc((size_t)op->enum_n + 1, sizeof(PyObject *));
        if (!op->enum_values || !op->enum_json) { PyErr_NoMemory(); return -1; }
        for (Py_ssize_t k = 0; k < op->enum_n; k++) {
            long long v;
            PyObject *j;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(arg, k), "LS", &v, &j)) return -1;
            op->enum_values[k] = v;
            Py_INCREF(j);
            op->enum_json[k] = j;
        }
        return 0;
    }
    if (op->kind == K_WORKLOAD) {
        op->index = PyLong_AsSsize_t(arg);
        if (op->index < 0 || op->index > 3) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "WORKLOAD: 0..3");
            return -1;
        }
        return 0;
    }
    if ((op->kind == K_CONST && !PyBytes_Check(arg)) ||
        (op->kind == K_LOOKUP && !PyDict_Check(arg)) ||
        (op->kind == K_HOOK && !PyUnicode_Check(arg)) ||
        (op->kind == K_FLAG && !PyLong_Check(arg)) ||
        (op->kind == K_ERRNO && !(PyTuple_Check(arg) && PyTuple_GET_SIZE(arg) == MAX_ERRNO))) {
        PyErr_Format(PyExc_TypeError, "op kind %d: wrong argument", op->kind);
        return -1;
    }
    Py_INCREF(arg);
    op->arg = arg;
    return 0;
}

static int Decoder_init(Decoder *d, PyObject *args, PyObject *kw) {
    static char *names[] = {"ops", "fixed_size", "header_offsets", "monitor", "hook_call",
                            "fallback", "resolve", "unknown", "loads", "boot", "offset_ns",
                            "ns_per_tick", NULL};
    PyObject *ops, *hdr, *monitor, *hook_call, *fallback, *resolve, *unknown, *loads, *boot;
    Py_ssize_t fixed_size;
    long long offset_ns;
    unsigned long long ns_per_tick;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OnOUOOOOOSLK", names, &ops, &fixed_size, &hdr,
                                     &monitor, &hook_call, &fallback, &resolve, &unknown,
                                     &loads, &boot, &offset_ns, &ns_per_tick))
        return -1;
    if (!PyList_Check(ops) || !PyTuple_Check(hdr) || PyTuple_GET_SIZE(hdr) != H_N ||
        !ns_per_tick || PyBytes_GET_SIZE(boot) > 32) {
        PyErr_SetString(PyExc_ValueError, "Decoder: bad arguments");
        return -1;
    }
    free_ops(d);
    d->ops = PyMem_Calloc((size_t)PyList_GET_SIZE(ops) + 1, sizeof(op_t));
    if (!d->ops) { PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ops); i++) {
        d->nops = i + 1;
        if (parse_op(&d->ops[i], PyList_GET_ITEM(ops, i)) < 0) return -1;
        op_t *op = &d->ops[i];
        if (op->off + op->size > fixed_size || op->when_off + op->when_size > fixed_size ||
            op->off2 + op->size2 > fixed_size || op->off < 0 || op->size < 0 ||
            op->when_off < 0 || op->off2 < 0) {
            PyErr_Format(PyExc_ValueError, "op %zd reads past the fixed part", i);
            return -1;
        }
        if (op->kind == K_WORKLOAD) d->has_workload = 1;
    }
    for (int i = 0; i < H_N; i++) {
        d->hdr_off[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(hdr, i));
        if (d->hdr_off[i] < 0 || d->hdr_off[i] + (i == H_COMM ? 16 : 8) > fixed_size) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "header offset");
            return -1;
        }
    }
    d->fixed_size = fixed_size;
    Py_INCREF(monitor); Py_XSETREF(d->monitor, monitor);
    Py_INCREF(hook_call); Py_XSETREF(d->hook_call, hook_call);
    Py_INCREF(fallback); Py_XSETREF(d->fallback, fallback);
    Py_INCREF(resolve); Py_XSETREF(d->resolve, resolve);
    Py_INCREF(unknown); Py_XSETREF(d->unknown, unknown);
    Py_INCREF(loads); Py_XSETREF(d->loads, loads);
    Py_INCREF(boot); Py_XSETREF(d->boot, boot);
    d->offset_ns = offset_ns;
    d->ns_per_tick = ns_per_tick;
    d->iso_second = INT64_MIN;
    return 0;
}

static PyObject *Decoder_get_fallbacks(Decoder *d, void *closure) {
    (void)closure;
    return PyLong_FromSsize_t(d->fallbacks);
}

static PyMethodDef Decoder_methods[] = {
    {"decode", (PyCFunction)Decoder_decode, METH_O,
     "decode(raw: bytes) -> Record (or the Python decoder's dict for a record the"
     " compiled path hands back)"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Decoder_getset[] = {
    {"fallbacks", (getter)Decoder_get_fallbacks, NULL,
     "records handed to the Python decoder", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.monitors._fastpath.Decoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Records -> JSON bytes by a table of operations (agent/monitors/compiled.py)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Decoder_init,
    .tp_dealloc = (destructor)Decoder_dealloc,
    .tp_traverse = (traverseproc)Decoder_traverse,
    .tp_clear = (inquiry)Decoder_clear,
    .tp_methods = Decoder_methods,
    .tp_getset = Decoder_getset,
};

/* -- Record: a read-only mapping over the JSON bytes ------------------------------------ */
enum { R_MONITOR, R_TS, R_PID, R_TID, R_PPID, R_UID, R_GID, R_COMM, R_PROCESS_ID,
       R_PARENT_PROCESS_ID, R_CGROUP_ID, R_CGROUP, R_CONTAINER_ID, R_POD_UID, R_UNIT, R_N };
static const char *R_NAMES[R_N] = {
    "monitor", "ts_ns", "pid", "tid", "ppid", "uid", "gid", "comm", "process_id",
    "parent_process_id", "cgroup_id", "cgroup", "container_id", "pod_uid", "unit"};
static PyObject *r_keys[R_N];

static int key_index(PyObject *key) {
    for (int i = 0; i < R_N; i++)
        if (key == r_keys[i]) return i;
    if (!PyUnicode_Check(key)) return -1;
    for (int i = 0; i < R_N; i++)
        if (PyUnicode_CompareWithASCIIString(key, R_NAMES[i]) == 0) return i;
    return -1;
}

static PyObject *process_id(Record *r, uint32_t pid, uint64_t start_ns) {
    if (!pid) Py_RETURN_NONE;
    return PyUnicode_FromFormat("%s-%llu-%u", PyBytes_AS_STRING(r->decoder->boot),
                                (unsigned long long)(start_ns / r->decoder->ns_per_tick),
                                (unsigned)pid);
}

/* A header value without building the dict; NULL without error: not one of them. */
static PyObject *header_value(Record *r, int i) {
    switch (i) {
    case R_MONITOR: Py_INCREF(r->monitor); return r->monitor;
    case R_TS: return PyLong_FromUnsignedLongLong(r->ts_ns);
    case R_PID: return PyLong_FromUnsignedLong(r->pid);
    case R_TID: return PyLong_FromUnsignedLong(r->tid);
    case R_PPID: return PyLong_FromUnsignedLong(r->ppid);
    case R_UID: return PyLong_FromUnsignedLong(r->uid);
    case R_GID: return PyLong_FromUnsignedLong(r->gid);
    case R_COMM: {
        const char *z = memchr(r->comm, 0, sizeof r->comm);
        return PyUnicode_DecodeUTF8(r->comm, z ? z - r->comm : (Py_ssize_t)sizeof r->comm,
                                    "surrogateescape");
    }
    case R_PROCESS_ID: return process_id(r, r->pid, r->start_ns);
    case R_PARENT_PROCESS_ID: return process_id(r, r->ppid, r->parent_start_ns);
    case R_CGROUP_ID: return PyLong_FromUnsignedLongLong(r->cgroup_id);
    default:
        if (!r->workload) return NULL;
        PyObject *v = PyTuple_GET_ITEM(r->workload, i - R_CGROUP);
        Py_INCREF(v);
        return v;
    }
}

static PyObject *Record_dict(Record *r) {
    if (!r->dict) {
        r->dict = PyObject_CallOneArg(r->decoder->loads, r->data);
        if (r->dict && !PyDict_Check(r->dict)) {
            Py_CLEAR(r->dict);
            PyErr_SetString(PyExc_TypeError, "a record's JSON is not an object");
        }
    }
    return r->dict;
}

static PyObject *Record_lookup(Record *r, PyObject *key) {
    int i = key_index(key);
    if (i >= 0) {
        PyObject *v = header_value(r, i);
        if (v || PyErr_Occurred()) return v;
    }
    PyObject *d = Record_dict(r);
    if (!d) return NULL;
    PyObject *v = PyDict_GetItemWithError(d, key);
    Py_XINCREF(v);
    return v; /* NULL without error: absent */
}

static PyObject *Record_getitem(Record *r, PyObject *key) {
    PyObject *v = Record_lookup(r, key);
    if (!v && !PyErr_Occurred()) PyErr_SetObject(PyExc_KeyError, key);
    return v;
}

static PyObject *Record_get(Record *r, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    PyObject *v = Record_lookup(r, args[0]);
    if (v || PyErr_Occurred()) return v;
    v = nargs > 1 ? args[1] : Py_None;
    Py_INCREF(v);
    return v;
}

static Py_ssize_t Record_len(Record *r) {
    PyObject *d = Record_dict(r);
    return d ? PyDict_Size(d) : -1;
}

static int Record_contains(Record *r, PyObject *key) {
    PyObject *d = Record_dict(r);
    return d ? PyDict_Contains(d, key) : -1;
}

static PyObject *Record_iter(Record *r) {
    PyObject *d = Record_dict(r);
    return d ? PyObject_GetIter(d) : NULL;
}

#define DICT_METHOD(name)                                                        \
    static PyObject *Record_##name(Record *r, PyObject *unused) {               \
        (void)unused;                                                           \
        PyObject *d = Record_dict(r);                                           \
        return d ? PyObject_CallMethod(d, #name, NULL) : NULL;                  \
    }
DICT_METHOD(keys)
DICT_METHOD(values)
DICT_METHOD(items)

static PyObject *Record_to_dict(Record *r, PyObject *unused) {
    (void)unused;
    PyObject *d = Record_dict(r);
    return d ? PyDict_Copy(d) : NULL;
}

static PyObject *Record_richcompare(Record *r, PyObject *other, int op) {
    if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
    PyObject *d = Record_dict(r);
    if (!d) return NULL;
    if (Py_TYPE(other) == &RecordType) {
        other = Record_dict((Record *)other);
        if (!other) return NULL;
    }
    return PyObject_RichCompare(d, other, op);
}

static void Record_dealloc(Record *r) {
    Py_XDECREF(r->data);
    Py_XDECREF(r->monitor);
    Py_XDECREF(r->workload);
    Py_XDECREF(r->dict);
    Py_XDECREF(r->decoder);
    PyObject_Free(r);
}

static PyObject *Record_get_data(Record *r, void *closure) {
    (void)closure;
    Py_INCREF(r->data);
    return r->data;
}

static PyObject *Record_repr(Record *r) {
    return PyUnicode_FromFormat("Record(%R)", r->data);
}

static PyMethodDef Record_methods[] = {
    {"get", (PyCFunction)(void (*)(void))Record_get, METH_FASTCALL, "get(key, default=None)"},
    {"keys", (PyCFunction)Record_keys, METH_NOARGS, NULL},
    {"values", (PyCFunction)Record_values, METH_NOARGS, NULL},
    {"items", (PyCFunction)Record_items, METH_NOARGS, NULL},
    {"to_dict", (PyCFunction)Record_to_dict, METH_NOARGS, "a new dict of the event"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Record_getset[] = {
    {"data", (getter)Record_get_data, NULL, "the event's JSON bytes", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyMappingMethods Record_as_mapping = {
    .mp_length = (lenfunc)Record_len,
    .mp_subscript = (binaryfunc)Record_getitem,
};

static PySequenceMethods Record_as_sequence = {
    .sq_contains = (objobjproc)Record_contains,
};

static PyTypeObject RecordType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.monitors._fastpath.Record",
    .tp_basicsize = sizeof(Record),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One event: its JSON bytes (.data) and a read-only mapping of its fields",
    .tp_dealloc = (destructor)Record_dealloc,
    .tp_methods = Record_methods,
    .tp_getset = Record_getset,
    .tp_as_mapping = &Record_as_mapping,
    .tp_as_sequence = &Record_as_sequence,
    .tp_iter = (getiterfunc)Record_iter,
    .tp_richcompare = (richcmpfunc)Record_richcompare,
    .tp_repr = (reprfunc)Record_repr,
    .tp_hash = PyObject_HashNotImplemented,
};

/* -- module ----------------------------------------------------------------------------- */
static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT, "agent.monitors._fastpath",
    "The per-event path compiled (agent/monitors/compiled.py builds its tables).", -1, NULL,
    NULL, NULL, NULL, NULL};

/* The op kinds, by the names agent/monitors/compiled.py uses (K_INT, ...). */
static const char *KIND_NAMES[K_NKINDS] = {
    "K_INT", "K_CSTR", "K_HEX", "K_INET", "K_NET16", "K_FLAG", "K_ENUM", "K_ERRNO",
    "K_CONST", "K_LOOKUP", "K_HOOK", "K_WALLTIME", "K_PROCESS_ID", "K_WORKLOAD"};

static int add_kinds(PyObject *m) {
    for (int k = 0; k < K_NKINDS; k++)
        if (PyModule_AddIntConstant(m, KIND_NAMES[k], k) < 0) return -1;
    return 0;
}

PyMODINIT_FUNC PyInit__fastpath(void) {
    if (PyType_Ready(&DecoderType) < 0 || PyType_Ready(&RecordType) < 0) return NULL;
    for (int i = 0; i < R_N; i++) {
        r_keys[i] = PyUnicode_InternFromString(R_NAMES[i]);
        if (!r_keys[i]) return NULL;
    }
    PyObject *m = PyModule_Create(&fastpath_module);
    if (!m) return NULL;
    Py_INCREF(&DecoderType);
    Py_INCREF(&RecordType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0 ||
        PyModule_AddObject(m, "Record", (PyObject *)&RecordType) < 0 ||
        add_kinds(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
