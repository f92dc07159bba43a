/* Segment compaction's inner loop in C (services.kvstore.log._relocate).
 *
 * The cleaner (services/kvstore/log/_cleaner.py) compacts segments in batches of index
 * entries. Its numpy path spends ~60 numpy calls and a Python loop of slice copies per batch:
 * about 2 us per relocated 1 KB entry, which is what bounds write throughput at 80-90% memory
 * use. compact_batch does one batch in one call with the same results: the liveness probe of
 * every entry, the copies (cut at seglet boundaries), the hash-table repointing and the new
 * index words. The numpy path stays for pure-Python installs, for entries without a key hash
 * in the index (which need the object manager) and for combined cleaning.
 *
 * Liveness, as the numpy path decides it: an object entry is live iff its main bucket's chain
 * (main area, then overflow buckets) holds an entry whose reference field equals the entry's
 * reference (references are unique); a tombstone is live iff the segment it names is still in
 * the log (``present``, sorted); an IDX_OTHER entry is never moved. Nothing is written before
 * every live entry of the batch is known to fit its target, so an accounting error changes
 * nothing (the caller raises InternalError).
 *
 * Layouts (see _segments.py and _hashtable.py): an index word is
 * ``offset << 40 | aux << 3 | flags``; a hash-table entry is ``tag:16 | chain:1 | ref:47`` and a
 * bucket's last entry, with the chain bit, names the next bucket (``>= buckets``: overflow).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IDX_TOMB 1
#define IDX_NO_HASH 2
#define IDX_OTHER 4
#define IDX_SHIFT 3
#define IDX_OFFSET_SHIFT 40
#define OFFSET_BITS 24
#define REF_BITS 47
#define REF_MASK ((UINT64_C(1) << REF_BITS) - 1)
#define CHAIN_BIT (UINT64_C(1) << REF_BITS)
#define REF_FIELD (CHAIN_BIT | REF_MASK)
#define TAG_BITS (UINT64_C(0xFFFF) << 48)
#define ENTRIES_PER_BUCKET 8

#define NARGS 19

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int
get(Buf *b, PyObject *obj, int writable, Py_ssize_t itemsize, const char *what)
{
    if (PyObject_GetBuffer(obj, &b->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0) {
        return -1;
    }
    b->held = 1;
    if (itemsize > 1 && b->view.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zd-byte items",
                     what, b->view.len, itemsize);
        return -1;
    }
    return 0;
}

#define COUNT(b, type) ((b).view.len / (Py_ssize_t)sizeof(type))
#define AT(b, type) ((type *)(b).view.buf)

static int
present_has(const uint64_t *present, Py_ssize_t n, uint64_t id)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (present[mid] < id) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo < n && present[lo] == id;
}

/* The hash-table entry holding ``ref`` in the chain of main bucket ``bucket``, or NULL. */
static uint64_t *
find_ref(uint64_t *main, Py_ssize_t buckets, uint64_t *ovf, Py_ssize_t ovf_buckets,
         uint64_t bucket, uint64_t ref, int *corrupt)
{
    uint64_t *row = main + bucket * ENTRIES_PER_BUCKET;
    for (Py_ssize_t hops = 0; hops <= ovf_buckets; hops++) {
        for (int i = 0; i < ENTRIES_PER_BUCKET; i++) {
            if ((row[i] & REF_FIELD) == ref) {
                return &row[i];
            }
        }
        uint64_t last = row[ENTRIES_PER_BUCKET - 1];
        if (!(last & CHAIN_BIT)) {
            return NULL;
        }
        uint64_t next = last & REF_MASK;
        if (next < (uint64_t)buckets || next - (uint64_t)buckets >= (uint64_t)ovf_buckets) {
            *corrupt = 1;
            return NULL;
        }
        row = ovf + (next - (uint64_t)buckets) * ENTRIES_PER_BUCKET;
    }
    *corrupt = 1; /* a chain longer than the overflow area: a cycle */
    return NULL;
}

/* Arena position of byte ``off`` of the segment whose seglets start at bases[first] (pass 1
 * checked every seglet index and base the copies can reach). */
static inline int64_t
position(const int64_t *bases, int64_t first, int64_t off, int64_t size)
{
    return bases[first + off / size] + off % size;
}

PyDoc_STRVAR(
    compact_batch_doc,
    "compact_batch(arena, seglet_size, bases, src_first, dst_first, dst_length, dst_limit,\n"
    "              dst_bits, src, off, size, flags, aux, ref, main, ovf, present, words,\n"
    "              acct) -> (entries moved, bytes moved)\n\n"
    "Compact one batch of index entries (numpy arrays, one element an entry: source number,\n"
    "offset, size, flags, aux, reference) into each source's target: live entries are copied\n"
    "to ``dst_length[s]`` of source s's target (updated), repointed in the hash table\n"
    "(``main``, ``ovf``) and their index words written to ``words`` in order. ``acct`` gets,\n"
    "per source, bytes moved, tombstone bytes moved and entries moved added (3 int64 each).\n"
    "Raises ValueError, and changes nothing, when a target lacks room or an argument is\n"
    "inconsistent.");

static PyObject *
compact_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != NARGS) {
        PyErr_Format(PyExc_TypeError, "compact_batch takes %d arguments", NARGS);
        return NULL;
    }
    Buf b[NARGS];
    memset(b, 0, sizeof(b));
    uint64_t **slots = NULL;
    PyObject *result = NULL;
    Py_ssize_t seglet = PyLong_AsSsize_t(args[1]);
    if (seglet == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (seglet <= 0) {
        PyErr_SetString(PyExc_ValueError, "seglet_size must be positive");
        return NULL;
    }
    static const char *names[NARGS] = {
        "arena", "", "bases", "src_first", "dst_first", "dst_length", "dst_limit",
        "dst_bits", "src", "off", "size", "flags", "aux", "ref", "main", "ovf", "present",
        "words", "acct"};
    for (int i = 0; i < NARGS; i++) {
        if (i == 1) {
            continue;
        }
        int writable = i == 0 || i == 5 || i == 14 || i == 15 || i == 17 || i == 18;
        if (get(&b[i], args[i], writable, i == 0 ? 1 : 8, names[i]) < 0) {
            goto done;
        }
    }
    unsigned char *arena = (unsigned char *)b[0].view.buf;
    Py_ssize_t arena_len = b[0].view.len;
    const int64_t *bases = AT(b[2], int64_t);
    Py_ssize_t nbases = COUNT(b[2], int64_t);
    Py_ssize_t nsrc = COUNT(b[3], int64_t);
    if (COUNT(b[4], int64_t) != nsrc || COUNT(b[5], int64_t) != nsrc ||
        COUNT(b[6], int64_t) != nsrc || COUNT(b[7], uint64_t) != nsrc ||
        COUNT(b[18], int64_t) != 3 * nsrc) {
        PyErr_SetString(PyExc_ValueError, "per-source arrays disagree in length");
        goto done;
    }
    const int64_t *src_first = AT(b[3], int64_t), *dst_first = AT(b[4], int64_t);
    int64_t *dst_length = AT(b[5], int64_t);
    const int64_t *dst_limit = AT(b[6], int64_t);
    const uint64_t *dst_bits = AT(b[7], uint64_t);
    Py_ssize_t n = COUNT(b[8], int64_t);
    if (COUNT(b[9], int64_t) != n || COUNT(b[10], int64_t) != n || COUNT(b[11], int64_t) != n ||
        COUNT(b[12], uint64_t) != n || COUNT(b[13], uint64_t) != n ||
        COUNT(b[17], uint64_t) < n) {
        PyErr_SetString(PyExc_ValueError, "per-entry arrays disagree in length");
        goto done;
    }
    const int64_t *src = AT(b[8], int64_t), *off = AT(b[9], int64_t), *size = AT(b[10], int64_t);
    const int64_t *flags = AT(b[11], int64_t);
    const uint64_t *aux = AT(b[12], uint64_t), *ref = AT(b[13], uint64_t);
    uint64_t *main = AT(b[14], uint64_t), *ovf = AT(b[15], uint64_t);
    Py_ssize_t buckets = COUNT(b[14], uint64_t) / ENTRIES_PER_BUCKET;
    Py_ssize_t ovf_buckets = COUNT(b[15], uint64_t) / ENTRIES_PER_BUCKET;
    if (buckets == 0 || (buckets & (buckets - 1))) {
        PyErr_SetString(PyExc_ValueError, "main hash area must hold a power of two of buckets");
        goto done;
    }
    const uint64_t *present = AT(b[16], uint64_t);
    Py_ssize_t npresent = COUNT(b[16], uint64_t);
    uint64_t *words = AT(b[17], uint64_t);
    int64_t *acct = AT(b[18], int64_t);

    for (Py_ssize_t k = 0; k < nbases; k++) {
        if (bases[k] < 0 || bases[k] > arena_len - seglet) {
            PyErr_Format(PyExc_ValueError, "seglet base %zd outside the arena", k);
            goto done;
        }
    }

    /* Pass 1: liveness, and the bytes each target must take. */
    slots = PyMem_Calloc((size_t)(n ? n : 1), sizeof(uint64_t *));
    int64_t *need = PyMem_Calloc((size_t)(nsrc ? nsrc : 1), sizeof(int64_t));
    if (slots == NULL || need == NULL) {
        PyMem_Free(need);
        PyErr_NoMemory();
        goto done;
    }
    static uint64_t tomb_marker;
    int corrupt = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t s = src[i];
        if (s < 0 || s >= nsrc || size[i] <= 0 || off[i] < 0 || src_first[s] < 0 ||
            src_first[s] + (off[i] + size[i] - 1) / seglet >= nbases) {
            PyErr_Format(PyExc_ValueError, "entry %zd: bad source, offset or size", i);
            PyMem_Free(need);
            goto done;
        }
        if (flags[i] & IDX_NO_HASH) {
            PyErr_SetString(PyExc_ValueError, "an entry without its key hash: use the numpy path");
            PyMem_Free(need);
            goto done;
        }
        if (flags[i] & IDX_OTHER) {
            continue;
        }
        if (flags[i] & IDX_TOMB) {
            if (present_has(present, npresent, aux[i])) {
                slots[i] = &tomb_marker;
            }
        }
        else {
            slots[i] = find_ref(main, buckets, ovf, ovf_buckets, aux[i] & (uint64_t)(buckets - 1),
                                ref[i], &corrupt);
            if (corrupt) {
                PyErr_SetString(PyExc_ValueError, "hash-table chain leaves the overflow area");
                PyMem_Free(need);
                goto done;
            }
        }
        if (slots[i] != NULL) {
            need[s] += size[i];
        }
    }
    for (Py_ssize_t s = 0; s < nsrc; s++) {
        if (need[s] && (dst_length[s] + need[s] > dst_limit[s] || dst_length[s] < 0 ||
                        dst_first[s] < 0 ||
                        dst_first[s] + (dst_length[s] + need[s] - 1) / seglet >= nbases)) {
            PyErr_Format(PyExc_ValueError, "target of source %zd lacks room for %lld bytes", s,
                         (long long)need[s]);
            PyMem_Free(need);
            goto done;
        }
    }
    PyMem_Free(need);

    /* Pass 2: copy, repoint, index. */
    Py_ssize_t moved = 0;
    int64_t moved_bytes = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (slots[i] == NULL) {
            continue;
        }
        int64_t s = src[i];
        int64_t length = size[i];
        int64_t at = dst_length[s];
        int64_t so = off[i], dof = at, left = length;
        while (left > 0) {
            int64_t sp = position(bases, src_first[s], so, seglet);
            int64_t dp = position(bases, dst_first[s], dof, seglet);
            int64_t chunk = left;
            if (seglet - so % seglet < chunk) {
                chunk = seglet - so % seglet;
            }
            if (seglet - dof % seglet < chunk) {
                chunk = seglet - dof % seglet;
            }
            memmove(arena + dp, arena + sp, (size_t)chunk);
            so += chunk;
            dof += chunk;
            left -= chunk;
        }
        dst_length[s] = at + length;
        if (slots[i] != &tomb_marker) {
            uint64_t new_ref = dst_bits[s] | (uint64_t)at;
            *slots[i] = (*slots[i] & TAG_BITS) | new_ref;
        }
        else {
            acct[3 * s + 1] += length;
        }
        acct[3 * s] += length;
        acct[3 * s + 2] += 1;
        words[moved++] = (uint64_t)at << IDX_OFFSET_SHIFT | aux[i] << IDX_SHIFT | (uint64_t)flags[i];
        moved_bytes += length;
    }
    result = Py_BuildValue("(nL)", moved, (long long)moved_bytes);
done:
    PyMem_Free(slots);
    for (int i = 0; i < NARGS; i++) {
        if (b[i].held) {
            PyBuffer_Release(&b[i].view);
        }
    }
    return result;
}

static PyMethodDef methods[] = {
    {"compact_batch", (PyCFunction)(void (*)(void))compact_batch, METH_FASTCALL,
     compact_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "services.kvstore.log._relocate",
    "Segment compaction's inner loop in C (see _relocate.c).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__relocate(void)
{
    return PyModule_Create(&module_def);
}
