/* The cleaner's inner loops in C (services.kvstore.log._relocate).
 *
 * The cleaner (services/kvstore/log/_cleaner.py) compacts segments in batches of index
 * entries. Its numpy path spends ~60 numpy calls and a Python loop of slice copies per batch:
 * about 2 us per relocated 1 KB entry, which is what bounds write throughput at 80-90% memory
 * use. compact_range does one batch in one call with the same results: where the batch ends,
 * the liveness probe of every entry, the copies (cut at seglet boundaries), the hash-table
 * repointing and the new index words. It takes the pass's arrays whole, with the batch's
 * bounds, so that a batch costs the interpreter one call and a few integers (the numpy
 * slicing and accounting around each call had cost ~50 us a batch, more than the batch).
 * Combined cleaning uses three smaller loops: live_slots (the liveness probe of a batch or
 * of a scanned chunk), entry_stamps (the timestamps its sort by age needs) and
 * place_entries (a batch's copies into a survivor, repointing and index words); their numpy
 * twins cost ~15 numpy calls a chunk or batch, and over a third of the cleaner's time at
 * 100 B.
 * The numpy path stays for pure-Python installs and for entries without a key hash in the
 * index (which need the object manager).
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
#define IDX_FLAGS_MASK UINT64_C(7)
#define IDX_AUX_MASK ((UINT64_C(1) << 37) - 1)
#define OFFSET_BITS 24
#define REF_BITS 47
#define REF_MASK ((UINT64_C(1) << REF_BITS) - 1)
#define CHAIN_BIT (UINT64_C(1) << REF_BITS)
#define REF_FIELD (CHAIN_BIT | REF_MASK)
#define TAG_BITS (UINT64_C(0xFFFF) << 48)
#define ENTRIES_PER_BUCKET 8

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

/* The buffers of ``args[0..n)`` named in ``names`` ("" skips a non-buffer argument): bit i of
 * ``writable`` asks for a writable one; "arena" is bytes, the rest 8-byte items. */
static int
get_named(Buf *b, PyObject *const *args, const char *const *names, int n, uint32_t writable)
{
    for (int i = 0; i < n; i++) {
        if (names[i][0] == '\0') {
            continue;
        }
        int bytes = strcmp(names[i], "arena") == 0;
        if (get(&b[i], args[i], (int)((writable >> i) & 1), bytes ? 1 : 8, names[i]) < 0) {
            return -1;
        }
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

/* Copy ``length`` bytes from offset ``so`` of the segment whose seglets start at
 * bases[src_first] to offset ``dof`` of the one whose seglets start at bases[dst_first], cut
 * at both sides' seglet boundaries (the caller checked every seglet the copy reaches). */
static inline void
copy_entry(unsigned char *arena, const int64_t *bases, int64_t seglet, int64_t src_first,
           int64_t so, int64_t dst_first, int64_t dof, int64_t length)
{
    while (length > 0) {
        int64_t sp = position(bases, src_first, so, seglet);
        int64_t dp = position(bases, dst_first, dof, seglet);
        int64_t chunk = length;
        if (seglet - so % seglet < chunk) {
            chunk = seglet - so % seglet;
        }
        if (seglet - dof % seglet < chunk) {
            chunk = seglet - dof % seglet;
        }
        memmove(arena + dp, arena + sp, (size_t)chunk);
        so += chunk;
        dof += chunk;
        length -= chunk;
    }
}

/* 0 if every seglet base lies wholly inside the arena, else -1 with ValueError set. */
static int
check_bases(const int64_t *bases, Py_ssize_t nbases, Py_ssize_t arena_len, Py_ssize_t seglet)
{
    for (Py_ssize_t k = 0; k < nbases; k++) {
        if (bases[k] < 0 || bases[k] > arena_len - seglet) {
            PyErr_Format(PyExc_ValueError, "seglet base %zd outside the arena", k);
            return -1;
        }
    }
    return 0;
}

/* Release the buffers ``get`` took. */
static void
release_all(Buf *b, int n)
{
    for (int i = 0; i < n; i++) {
        if (b[i].held) {
            PyBuffer_Release(&b[i].view);
        }
    }
}

PyDoc_STRVAR(
    compact_range_doc,
    "compact_range(arena, seglet_size, bases, nbases, src_first, dst_first, dst_length,\n"
    "              dst_limit, dst_bits, ntargets, src, off, size, flags, aux, ref, main, ovf,\n"
    "              present, words, acct, first, limit, room, max_batch, cost_entry)\n"
    "    -> (end, entries moved, bytes moved, charge, first source, last source)\n\n"
    "Compact one batch of a pass's index entries (numpy arrays over the whole pass, one\n"
    "element an entry: source number, offset, size, flags, aux, reference) into each source's\n"
    "target. The batch is ``[first, end)``: entries from ``first`` while their running cost\n"
    "(size + size/8 + ``cost_entry`` each) stays within ``room``, at least one, at most\n"
    "``max_batch``, never past ``limit``; every source it reaches must be below ``ntargets``.\n"
    "Live entries are copied to ``dst_length[s]`` of source s's target (updated), repointed in\n"
    "the hash table (``main``, ``ovf``) and their index words written to ``words`` in order.\n"
    "``acct`` gets, per source of the batch, bytes moved, tombstone bytes moved and entries\n"
    "moved (3 int64 each, zeroed first). ``charge`` is the batch's work besides the bytes\n"
    "moved (size/8 + cost_entry per entry). An entry without its key hash makes the batch\n"
    "the numpy path's: nothing is done and entries moved is -1. Raises ValueError, and\n"
    "changes nothing, when a target lacks room or an argument is inconsistent.");

#define NARGS 26

static int
get_count(PyObject *obj, Py_ssize_t *out, const char *what)
{
    *out = PyLong_AsSsize_t(obj);
    if (*out == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*out < 0) {
        PyErr_Format(PyExc_ValueError, "%s must not be negative", what);
        return -1;
    }
    return 0;
}

static PyObject *
compact_range(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != NARGS) {
        PyErr_Format(PyExc_TypeError, "compact_range takes %d arguments", NARGS);
        return NULL;
    }
    Buf b[NARGS];
    memset(b, 0, sizeof(b));
    uint64_t **slots = NULL;
    int64_t *need = NULL;
    PyObject *result = NULL;
    Py_ssize_t seglet, nbases, ntargets, first, limit, room, max_batch, cost_entry;
    if (get_count(args[1], &seglet, "seglet_size") < 0 || get_count(args[3], &nbases, "nbases") < 0 ||
        get_count(args[9], &ntargets, "ntargets") < 0 || get_count(args[21], &first, "first") < 0 ||
        get_count(args[22], &limit, "limit") < 0 || get_count(args[24], &max_batch, "max_batch") < 0 ||
        get_count(args[25], &cost_entry, "cost_entry") < 0) {
        return NULL;
    }
    room = PyLong_AsSsize_t(args[23]);
    if (room == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (seglet == 0 || max_batch == 0) {
        PyErr_SetString(PyExc_ValueError, "seglet_size and max_batch must be positive");
        return NULL;
    }
    static const char *names[NARGS] = {
        "arena", "", "bases", "", "src_first", "dst_first", "dst_length", "dst_limit",
        "dst_bits", "", "src", "off", "size", "flags", "aux", "ref", "main", "ovf", "present",
        "words", "acct", "", "", "", "", ""};
    uint32_t writable = 1u << 0 | 1u << 6 | 1u << 16 | 1u << 17 | 1u << 19 | 1u << 20;
    if (get_named(b, args, names, 21, writable) < 0) {
        goto done;
    }
    unsigned char *arena = (unsigned char *)b[0].view.buf;
    Py_ssize_t arena_len = b[0].view.len;
    const int64_t *bases = AT(b[2], int64_t);
    if (COUNT(b[2], int64_t) < nbases) {
        PyErr_SetString(PyExc_ValueError, "bases holds fewer than nbases seglets");
        goto done;
    }
    if (COUNT(b[4], int64_t) < ntargets || COUNT(b[5], int64_t) < ntargets ||
        COUNT(b[6], int64_t) < ntargets || COUNT(b[7], int64_t) < ntargets ||
        COUNT(b[8], uint64_t) < ntargets || COUNT(b[20], int64_t) < 3 * ntargets) {
        PyErr_SetString(PyExc_ValueError, "per-source arrays shorter than ntargets");
        goto done;
    }
    const int64_t *src_first = AT(b[4], int64_t), *dst_first = AT(b[5], int64_t);
    int64_t *dst_length = AT(b[6], int64_t);
    const int64_t *dst_limit = AT(b[7], int64_t);
    const uint64_t *dst_bits = AT(b[8], uint64_t);
    Py_ssize_t count = COUNT(b[10], int64_t);
    if (COUNT(b[11], int64_t) != count || COUNT(b[12], int64_t) != count ||
        COUNT(b[13], int64_t) != count || COUNT(b[14], uint64_t) != count ||
        COUNT(b[15], uint64_t) != count) {
        PyErr_SetString(PyExc_ValueError, "per-entry arrays disagree in length");
        goto done;
    }
    if (first >= limit || limit > count) {
        PyErr_SetString(PyExc_ValueError, "need first < limit <= entries");
        goto done;
    }
    if (COUNT(b[19], uint64_t) < max_batch) {
        PyErr_SetString(PyExc_ValueError, "words holds fewer than max_batch entries");
        goto done;
    }
    const int64_t *src = AT(b[10], int64_t), *off = AT(b[11], int64_t);
    const int64_t *size = AT(b[12], int64_t), *flags = AT(b[13], int64_t);
    const uint64_t *aux = AT(b[14], uint64_t), *ref = AT(b[15], uint64_t);
    uint64_t *main = AT(b[16], uint64_t), *ovf = AT(b[17], uint64_t);
    Py_ssize_t buckets = COUNT(b[16], uint64_t) / ENTRIES_PER_BUCKET;
    Py_ssize_t ovf_buckets = COUNT(b[17], uint64_t) / ENTRIES_PER_BUCKET;
    if (buckets == 0 || (buckets & (buckets - 1))) {
        PyErr_SetString(PyExc_ValueError, "main hash area must hold a power of two of buckets");
        goto done;
    }
    const uint64_t *present = AT(b[18], uint64_t);
    Py_ssize_t npresent = COUNT(b[18], uint64_t);
    uint64_t *words = AT(b[19], uint64_t);
    int64_t *acct = AT(b[20], int64_t);

    if (check_bases(bases, nbases, arena_len, seglet) < 0) {
        goto done;
    }

    /* The batch: what fits the room (at least one entry), as the numpy path cuts it. */
    Py_ssize_t end = first;
    int64_t cost = 0, charge = 0;
    int no_hash = 0;
    while (end < limit && end - first < max_batch) {
        int64_t sz = size[end];
        int64_t c = sz + (sz >> 3) + (int64_t)cost_entry;
        if (end > first && cost + c > (int64_t)room) {
            break;
        }
        cost += c;
        charge += (sz >> 3) + (int64_t)cost_entry;
        if (flags[end] & IDX_NO_HASH) {
            no_hash = 1;
        }
        end++;
    }
    Py_ssize_t n = end - first;
    int64_t g_lo = src[first], g_hi = src[end - 1];
    if (no_hash) {
        result = Py_BuildValue("(nnLLLL)", end, (Py_ssize_t)-1, 0LL, (long long)charge,
                               (long long)g_lo, (long long)g_hi);
        goto done;
    }

    /* Pass 1: liveness, and the bytes each target must take. */
    slots = PyMem_Calloc((size_t)n, sizeof(uint64_t *));
    need = PyMem_Calloc((size_t)(ntargets ? ntargets : 1), sizeof(int64_t));
    if (slots == NULL || need == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    static uint64_t tomb_marker;
    int corrupt = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t i = first + j;
        int64_t s = src[i];
        if (s < g_lo || s > g_hi || s >= ntargets || size[i] <= 0 || off[i] < 0 ||
            src_first[s] < 0 || src_first[s] + (off[i] + size[i] - 1) / seglet >= nbases) {
            PyErr_Format(PyExc_ValueError, "entry %zd: bad source, offset or size", i);
            goto done;
        }
        if (flags[i] & IDX_OTHER) {
            continue;
        }
        if (flags[i] & IDX_TOMB) {
            if (present_has(present, npresent, aux[i])) {
                slots[j] = &tomb_marker;
            }
        }
        else {
            slots[j] = find_ref(main, buckets, ovf, ovf_buckets, aux[i] & (uint64_t)(buckets - 1),
                                ref[i], &corrupt);
            if (corrupt) {
                PyErr_SetString(PyExc_ValueError, "hash-table chain leaves the overflow area");
                goto done;
            }
        }
        if (slots[j] != NULL) {
            need[s] += size[i];
        }
    }
    for (int64_t s = g_lo; s <= g_hi; s++) {
        if (need[s] && (dst_length[s] + need[s] > dst_limit[s] || dst_length[s] < 0 ||
                        dst_first[s] < 0 ||
                        dst_first[s] + (dst_length[s] + need[s] - 1) / seglet >= nbases)) {
            PyErr_Format(PyExc_ValueError, "target of source %lld lacks room for %lld bytes",
                         (long long)s, (long long)need[s]);
            goto done;
        }
    }
    for (int64_t s = g_lo; s <= g_hi; s++) {
        acct[3 * s] = acct[3 * s + 1] = acct[3 * s + 2] = 0;
    }

    /* Pass 2: copy, repoint, index. */
    Py_ssize_t moved = 0;
    int64_t moved_bytes = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (slots[j] == NULL) {
            continue;
        }
        Py_ssize_t i = first + j;
        int64_t s = src[i];
        int64_t length = size[i];
        int64_t at = dst_length[s];
        copy_entry(arena, bases, seglet, src_first[s], off[i], dst_first[s], at, length);
        dst_length[s] = at + length;
        if (slots[j] != &tomb_marker) {
            uint64_t new_ref = dst_bits[s] | (uint64_t)at;
            *slots[j] = (*slots[j] & TAG_BITS) | new_ref;
        }
        else {
            acct[3 * s + 1] += length;
        }
        acct[3 * s] += length;
        acct[3 * s + 2] += 1;
        words[moved++] = (uint64_t)at << IDX_OFFSET_SHIFT | aux[i] << IDX_SHIFT | (uint64_t)flags[i];
        moved_bytes += length;
    }
    result = Py_BuildValue("(nnLLLL)", end, moved, (long long)moved_bytes, (long long)charge,
                           (long long)g_lo, (long long)g_hi);
done:
    PyMem_Free(slots);
    PyMem_Free(need);
    release_all(b, NARGS);
    return result;
}

PyDoc_STRVAR(
    live_slots_doc,
    "live_slots(flags, aux, ref, ids, main, ovf, present, out) -> entries or -1\n\n"
    "Liveness of the entries ``ids`` of a pass's index arrays (``flags`` int64, ``aux`` and\n"
    "``ref`` uint64, one element an entry), as the cleaner's numpy path decides it: ``out[j]``\n"
    "gets the hash-table slot holding entry ``ids[j]``'s reference (main slots first, then the\n"
    "overflow area's, as HashTable numbers them), -1 for a live tombstone (its segment is in\n"
    "``present``, sorted) and -2 for a dead entry or an IDX_OTHER one. Returns the number of\n"
    "entries; -1, with ``out`` unspecified, when an object has no key hash in the index (the\n"
    "numpy path asks the object manager). Raises ValueError for an id out of range or a\n"
    "hash-table chain that leaves the overflow area.");

#define LIVE_NARGS 8

static PyObject *
live_slots(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != LIVE_NARGS) {
        PyErr_Format(PyExc_TypeError, "live_slots takes %d arguments", LIVE_NARGS);
        return NULL;
    }
    Buf b[LIVE_NARGS];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    static const char *names[LIVE_NARGS] = {"flags", "aux", "ref", "ids",
                                            "main", "ovf", "present", "out"};
    if (get_named(b, args, names, LIVE_NARGS, 1u << 7) < 0) {
        goto done;
    }
    Py_ssize_t count = COUNT(b[0], int64_t);
    if (COUNT(b[1], uint64_t) != count || COUNT(b[2], uint64_t) != count) {
        PyErr_SetString(PyExc_ValueError, "per-entry arrays disagree in length");
        goto done;
    }
    Py_ssize_t n = COUNT(b[3], int64_t);
    if (COUNT(b[7], int64_t) < n) {
        PyErr_SetString(PyExc_ValueError, "out holds fewer elements than ids");
        goto done;
    }
    const int64_t *flags = AT(b[0], int64_t), *ids = AT(b[3], int64_t);
    const uint64_t *aux = AT(b[1], uint64_t), *ref = AT(b[2], uint64_t);
    uint64_t *main = AT(b[4], uint64_t), *ovf = AT(b[5], uint64_t);
    Py_ssize_t main_entries = COUNT(b[4], uint64_t);
    Py_ssize_t buckets = main_entries / ENTRIES_PER_BUCKET;
    Py_ssize_t ovf_buckets = COUNT(b[5], uint64_t) / ENTRIES_PER_BUCKET;
    if (buckets == 0 || (buckets & (buckets - 1))) {
        PyErr_SetString(PyExc_ValueError, "main hash area must hold a power of two of buckets");
        goto done;
    }
    const uint64_t *present = AT(b[6], uint64_t);
    Py_ssize_t npresent = COUNT(b[6], uint64_t);
    int64_t *out = AT(b[7], int64_t);
    int corrupt = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t i = ids[j];
        if (i < 0 || i >= count) {
            PyErr_Format(PyExc_ValueError, "id %lld out of range", (long long)i);
            goto done;
        }
        int64_t f = flags[i];
        if (f & IDX_OTHER) {
            out[j] = -2;
        }
        else if (f & IDX_TOMB) {
            out[j] = present_has(present, npresent, aux[i]) ? -1 : -2;
        }
        else if (f & IDX_NO_HASH) {
            result = PyLong_FromLong(-1);
            goto done;
        }
        else {
            uint64_t *at = find_ref(main, buckets, ovf, ovf_buckets,
                                    aux[i] & (uint64_t)(buckets - 1), ref[i], &corrupt);
            if (corrupt) {
                PyErr_SetString(PyExc_ValueError, "hash-table chain leaves the overflow area");
                goto done;
            }
            if (at == NULL) {
                out[j] = -2;
            }
            else if (at >= main && at < main + main_entries) {
                out[j] = at - main;
            }
            else {
                out[j] = main_entries + (at - ovf);
            }
        }
    }
    result = PyLong_FromSsize_t(n);
done:
    release_all(b, LIVE_NARGS);
    return result;
}

PyDoc_STRVAR(
    entry_stamps_doc,
    "entry_stamps(arena, seglet_size, bases, off, out)\n\n"
    "The timestamps of the object or tombstone entries at offsets ``off`` (int64) of one\n"
    "segment whose seglets start at arena positions ``bases`` (int64): ``out[j]`` (int64) gets\n"
    "the little-endian u32 at byte 4 of entry j's content, read across seglet boundaries.\n"
    "Raises ValueError, having written nothing past the entry, for an offset whose bytes lie\n"
    "outside the segment's seglets.");

static PyObject *
entry_stamps(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "entry_stamps takes 5 arguments");
        return NULL;
    }
    Buf b[5];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    Py_ssize_t seglet;
    if (get_count(args[1], &seglet, "seglet_size") < 0) {
        return NULL;
    }
    if (seglet == 0) {
        PyErr_SetString(PyExc_ValueError, "seglet_size must be positive");
        return NULL;
    }
    if (get(&b[0], args[0], 0, 1, "arena") < 0 || get(&b[2], args[2], 0, 8, "bases") < 0 ||
        get(&b[3], args[3], 0, 8, "off") < 0 || get(&b[4], args[4], 1, 8, "out") < 0) {
        goto done;
    }
    const unsigned char *arena = (const unsigned char *)b[0].view.buf;
    Py_ssize_t arena_len = b[0].view.len;
    const int64_t *bases = AT(b[2], int64_t), *off = AT(b[3], int64_t);
    Py_ssize_t nbases = COUNT(b[2], int64_t), n = COUNT(b[3], int64_t);
    if (COUNT(b[4], int64_t) < n) {
        PyErr_SetString(PyExc_ValueError, "out holds fewer elements than off");
        goto done;
    }
    if (check_bases(bases, nbases, arena_len, seglet) < 0) {
        goto done;
    }
    int64_t *out = AT(b[4], int64_t);
    /* [type byte][1-4 length bytes][crc u32][timestamp u32]: the last byte read is at most
     * 12 bytes past the entry's start */
    int64_t end = (int64_t)nbases * seglet;
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t at = off[j];
        if (at < 0 || at + 1 > end) {
            PyErr_Format(PyExc_ValueError, "entry %zd: offset outside the segment", j);
            goto done;
        }
        int64_t content = at + 2 + (arena[position(bases, 0, at, seglet)] >> 6);
        if (content + 8 > end) {
            PyErr_Format(PyExc_ValueError, "entry %zd: header outside the segment", j);
            goto done;
        }
        int64_t stamp = 0;
        for (int k = 0; k < 4; k++) {
            stamp |= (int64_t)arena[position(bases, 0, content + 4 + k, seglet)] << (8 * k);
        }
        out[j] = stamp;
    }
    result = Py_NewRef(Py_None);
done:
    release_all(b, 5);
    return result;
}

PyDoc_STRVAR(
    place_entries_doc,
    "place_entries(arena, seglet_size, bases, src_first, dst_first, start, dst_bits, ids,\n"
    "              slots, src, off, size, flags, aux, main, ovf, words, acct) -> bytes placed\n\n"
    "Combined cleaning's placement: copy the entries ``ids`` of a pass's arrays (``src``,\n"
    "``off``, ``size``, ``flags``: int64; ``aux``: uint64), in this order, back to back to\n"
    "the survivor from its byte ``start``. ``bases`` holds arena positions of seglets: source s's\n"
    "from ``bases[src_first[s]]``, the survivor's from ``bases[dst_first]``. An entry whose\n"
    "``slots`` element is a hash-table slot (as live_slots numbers them) is repointed there,\n"
    "its tag kept (``dst_bits`` | new offset); -1 marks a tombstone. ``words`` (uint64) gets\n"
    "the new index words, ``acct`` (int64, zeroed first) bytes and tombstone bytes placed per\n"
    "source. Raises ValueError, and changes nothing, when an argument is inconsistent or the\n"
    "survivor's seglets cannot hold the entries.");

#define PLACE_NARGS 18

static PyObject *
place_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != PLACE_NARGS) {
        PyErr_Format(PyExc_TypeError, "place_entries takes %d arguments", PLACE_NARGS);
        return NULL;
    }
    Buf b[PLACE_NARGS];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    Py_ssize_t seglet, dst_first, start;
    if (get_count(args[1], &seglet, "seglet_size") < 0 ||
        get_count(args[4], &dst_first, "dst_first") < 0 || get_count(args[5], &start, "start") < 0) {
        return NULL;
    }
    uint64_t dst_bits = PyLong_AsUnsignedLongLong(args[6]);
    if (dst_bits == (uint64_t)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (seglet == 0) {
        PyErr_SetString(PyExc_ValueError, "seglet_size must be positive");
        return NULL;
    }
    static const char *names[PLACE_NARGS] = {
        "arena", "", "bases", "src_first", "", "", "", "ids", "slots", "src", "off", "size",
        "flags", "aux", "main", "ovf", "words", "acct"};
    uint32_t writable = 1u << 0 | 1u << 14 | 1u << 15 | 1u << 16 | 1u << 17;
    if (get_named(b, args, names, PLACE_NARGS, writable) < 0) {
        goto done;
    }
    unsigned char *arena = (unsigned char *)b[0].view.buf;
    Py_ssize_t arena_len = b[0].view.len;
    const int64_t *bases = AT(b[2], int64_t), *src_first = AT(b[3], int64_t);
    Py_ssize_t nbases = COUNT(b[2], int64_t), nsources = COUNT(b[3], int64_t);
    const int64_t *ids = AT(b[7], int64_t), *slots = AT(b[8], int64_t);
    Py_ssize_t n = COUNT(b[7], int64_t);
    const int64_t *src = AT(b[9], int64_t), *off = AT(b[10], int64_t);
    const int64_t *size = AT(b[11], int64_t), *flags = AT(b[12], int64_t);
    const uint64_t *aux = AT(b[13], uint64_t);
    Py_ssize_t count = COUNT(b[9], int64_t);
    uint64_t *main = AT(b[14], uint64_t), *ovf = AT(b[15], uint64_t);
    Py_ssize_t main_entries = COUNT(b[14], uint64_t), ovf_entries = COUNT(b[15], uint64_t);
    uint64_t *words = AT(b[16], uint64_t);
    int64_t *acct = AT(b[17], int64_t);
    if (COUNT(b[8], int64_t) != n || COUNT(b[16], uint64_t) < n ||
        COUNT(b[17], int64_t) < 2 * nsources) {
        PyErr_SetString(PyExc_ValueError, "slots, words or acct too short");
        goto done;
    }
    if (COUNT(b[10], int64_t) != count || COUNT(b[11], int64_t) != count ||
        COUNT(b[12], int64_t) != count || COUNT(b[13], uint64_t) != count) {
        PyErr_SetString(PyExc_ValueError, "per-entry arrays disagree in length");
        goto done;
    }
    if (check_bases(bases, nbases, arena_len, seglet) < 0) {
        goto done;
    }
    if (dst_first > nbases) {
        PyErr_SetString(PyExc_ValueError, "dst_first past the bases");
        goto done;
    }
    /* Pass 1: check everything, so that nothing is written unless all of it can be. */
    int64_t total = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t i = ids[j];
        if (i < 0 || i >= count) {
            PyErr_Format(PyExc_ValueError, "id %lld out of range", (long long)i);
            goto done;
        }
        int64_t s = src[i];
        if (s < 0 || s >= nsources || size[i] <= 0 || off[i] < 0 || src_first[s] < 0 ||
            src_first[s] + (off[i] + size[i] - 1) / seglet >= nbases) {
            PyErr_Format(PyExc_ValueError, "entry %lld: bad source, offset or size", (long long)i);
            goto done;
        }
        int64_t slot = slots[j];
        if (slot < -1 || slot >= (int64_t)(main_entries + ovf_entries)) {
            PyErr_Format(PyExc_ValueError, "slot %lld out of range", (long long)slot);
            goto done;
        }
        total += size[i];
    }
    if (n && dst_first + (start + total - 1) / seglet >= nbases) {
        PyErr_SetString(PyExc_ValueError, "the survivor's seglets cannot hold the entries");
        goto done;
    }
    for (Py_ssize_t s = 0; s < 2 * nsources; s++) {
        acct[s] = 0;
    }
    /* Pass 2: copy, repoint, index, account. */
    int64_t at = start;
    for (Py_ssize_t j = 0; j < n; j++) {
        int64_t i = ids[j];
        int64_t s = src[i];
        copy_entry(arena, bases, seglet, src_first[s], off[i], dst_first, at, size[i]);
        int64_t slot = slots[j];
        if (slot >= 0) {
            uint64_t *e = slot < main_entries ? &main[slot] : &ovf[slot - main_entries];
            *e = (*e & TAG_BITS) | dst_bits | (uint64_t)at;
        }
        if (flags[i] & IDX_TOMB) {
            acct[2 * s + 1] += size[i];
        }
        acct[2 * s] += size[i];
        words[j] = (uint64_t)at << IDX_OFFSET_SHIFT | aux[i] << IDX_SHIFT | (uint64_t)flags[i];
        at += size[i];
    }
    result = PyLong_FromLongLong((long long)total);
done:
    release_all(b, PLACE_NARGS);
    return result;
}

PyDoc_STRVAR(
    decode_index_doc,
    "decode_index(words, counts, ends_at, slot_bits, off, size, flags, aux, src, ref) -> None\n\n"
    "The cleaner's per-entry arrays for a pass (``_Entries``) from its sources' index words,\n"
    "joined in source order (``words``, uint64): source s has ``counts[s]`` entries and its\n"
    "last one ends at ``ends_at[s]``; ``slot_bits[s]`` is its reference prefix. Fills, one\n"
    "element an entry: ``off`` (int64), ``size`` (int64: to the next entry of the source, or\n"
    "to ``ends_at``), ``flags`` (int64), ``aux`` (uint64), ``src`` (int64, the source number)\n"
    "and ``ref`` (uint64, ``slot_bits[src] | off``). Raises ValueError, with the outputs\n"
    "unspecified, when the lengths disagree or an entry's size would not be positive.");

#define DECODE_NARGS 10

static PyObject *
decode_index(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != DECODE_NARGS) {
        PyErr_Format(PyExc_TypeError, "decode_index takes %d arguments", DECODE_NARGS);
        return NULL;
    }
    Buf b[DECODE_NARGS];
    memset(b, 0, sizeof(b));
    PyObject *result = NULL;
    static const char *names[DECODE_NARGS] = {"words", "counts", "ends_at", "slot_bits", "off",
                                              "size", "flags", "aux", "src", "ref"};
    if (get_named(b, args, names, DECODE_NARGS, ~UINT32_C(0) << 4) < 0) {
        goto done;
    }
    Py_ssize_t total = COUNT(b[0], uint64_t);
    Py_ssize_t nsources = COUNT(b[1], int64_t);
    if (COUNT(b[2], int64_t) != nsources || COUNT(b[3], uint64_t) != nsources) {
        PyErr_SetString(PyExc_ValueError, "per-source arrays disagree in length");
        goto done;
    }
    for (int i = 4; i < DECODE_NARGS; i++) {
        if (COUNT(b[i], int64_t) != total) {
            PyErr_Format(PyExc_ValueError, "%s must hold one element an entry", names[i]);
            goto done;
        }
    }
    const uint64_t *words = AT(b[0], uint64_t);
    const int64_t *counts = AT(b[1], int64_t), *ends_at = AT(b[2], int64_t);
    const uint64_t *slot_bits = AT(b[3], uint64_t);
    int64_t *off = AT(b[4], int64_t), *size = AT(b[5], int64_t), *flags = AT(b[6], int64_t);
    uint64_t *aux = AT(b[7], uint64_t);
    int64_t *src = AT(b[8], int64_t);
    uint64_t *ref = AT(b[9], uint64_t);
    Py_ssize_t i = 0;
    for (Py_ssize_t s = 0; s < nsources; s++) {
        int64_t n = counts[s];
        if (n < 0 || n > total - i) {
            PyErr_SetString(PyExc_ValueError, "counts exceed the index words");
            goto done;
        }
        for (Py_ssize_t k = i; k < i + n; k++) {
            uint64_t w = words[k];
            int64_t at = (int64_t)(w >> IDX_OFFSET_SHIFT);
            int64_t next = k + 1 < i + n ? (int64_t)(words[k + 1] >> IDX_OFFSET_SHIFT) : ends_at[s];
            if (next <= at) {
                PyErr_Format(PyExc_ValueError, "entry %zd of source %zd: size not positive", k - i,
                             s);
                goto done;
            }
            off[k] = at;
            size[k] = next - at;
            flags[k] = (int64_t)(w & IDX_FLAGS_MASK);
            aux[k] = (w >> IDX_SHIFT) & IDX_AUX_MASK;
            src[k] = s;
            ref[k] = slot_bits[s] | (uint64_t)at;
        }
        i += n;
    }
    if (i != total) {
        PyErr_SetString(PyExc_ValueError, "counts do not cover the index words");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    release_all(b, DECODE_NARGS);
    return result;
}

static PyMethodDef methods[] = {
    {"compact_range", (PyCFunction)(void (*)(void))compact_range, METH_FASTCALL,
     compact_range_doc},
    {"live_slots", (PyCFunction)(void (*)(void))live_slots, METH_FASTCALL, live_slots_doc},
    {"place_entries", (PyCFunction)(void (*)(void))place_entries, METH_FASTCALL,
     place_entries_doc},
    {"entry_stamps", (PyCFunction)(void (*)(void))entry_stamps, METH_FASTCALL, entry_stamps_doc},
    {"decode_index", (PyCFunction)(void (*)(void))decode_index, METH_FASTCALL, decode_index_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "services.kvstore.log._relocate",
    "The cleaner's inner loops in C (see _relocate.c).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__relocate(void)
{
    return PyModule_Create(&module_def);
}
