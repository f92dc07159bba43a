/* Object and tombstone entries encoded in place, in C (services.kvstore.log._encode), and the
 * hash table's bucket scan (bucket_scan, at the end).
 *
 * Every write appends an object entry to the head segment, and every overwrite a tombstone
 * before it. The pure-Python encoders (services/kvstore/log/_entries.py: write_object_into and
 * write_tombstone_into) pack the headers with a cached struct per size and checksum the content
 * with the crc32c package: about 1.3 us for a tombstone plus a 100-byte object, most of it
 * argument parsing, buffer acquisition and the conversion of memoryview arguments to bytes. These
 * functions write the same bytes (the tests compare them on random input) in one call.
 *
 * Layouts (little-endian; see _entries.py): an entry is [type byte][length, 1-4 bytes][content].
 *     object:    u32 crc, u32 timestamp, u64 version, u64 table id, u8 1, u16 key length, key, value
 *     tombstone: u32 crc, u32 timestamp, u64 table id, u64 segment id, u64 object version, key
 * Each crc is CRC32C over the content after the crc field, started from 0 for an object and from
 * TOMBSTONE_CRC_SEED for a tombstone, with the crc32c package's convention for a start value.
 *
 * CRC32C uses the SSE4.2 instruction where the CPU has it, else a slicing-by-8 table.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define ENTRY_OBJ 2
#define ENTRY_OBJTOMB 3
#define OBJECT_HEADER_SIZE 27
#define TOMBSTONE_HEADER_SIZE 32
#define TOMBSTONE_CRC_SEED 0x746F6D62u
#define MAX_KEY_LENGTH 0xFFFF
#define POLY 0x82F63B78u /* CRC32C (Castagnoli), reflected */

/* -- CRC32C ------------------------------------------------------------------------------ */

static uint32_t crc_table[8][256];

static void
crc_init_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c >> 1) ^ (POLY & (0u - (c & 1u)));
        }
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            uint32_t prev = crc_table[t - 1][i];
            crc_table[t][i] = (prev >> 8) ^ crc_table[0][prev & 0xFF];
        }
    }
}

static uint32_t
crc_soft(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                             (uint32_t)p[3] << 24);
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^
              crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^
              crc_table[2][p[5]] ^ crc_table[1][p[6]] ^ crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--) {
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xFF];
    }
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_HW_CRC 1
__attribute__((target("sse4.2"))) static uint32_t
crc_hw(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) {
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    }
    return c32;
}
#endif

static int use_hw_crc = 0;

/* crc32c.crc32c(data, value): continues from a previous checksum ``value`` */
static uint32_t
crc32c_continue(uint32_t value, const unsigned char *p, size_t n)
{
    uint32_t crc = ~value;
#ifdef HAVE_HW_CRC
    if (use_hw_crc) {
        return ~crc_hw(crc, p, n);
    }
#endif
    return ~crc_soft(crc, p, n);
}

/* -- arguments --------------------------------------------------------------------------- */

static int
as_u64(PyObject *obj, uint64_t *out, const char *what)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", what);
        return -1;
    }
    if (_PyLong_Sign(obj) < 0 || _PyLong_NumBits(obj) > 64) {
        PyErr_Format(PyExc_OverflowError, "%s out of range for 64 bits", what);
        return -1;
    }
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(obj);
    return 0;
}

static int
as_u32(PyObject *obj, uint32_t *out, const char *what)
{
    uint64_t v;
    if (as_u64(obj, &v, what) < 0) {
        return -1;
    }
    if (v > UINT32_MAX) {
        PyErr_Format(PyExc_OverflowError, "%s out of range for 32 bits", what);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static inline void
put16(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void
put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (unsigned char)(v >> (8 * i));
    }
}

static inline void
put64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) {
        p[i] = (unsigned char)(v >> (8 * i));
    }
}

/* The type byte and length field; returns their size. */
static inline Py_ssize_t
put_entry_header(unsigned char *p, int type, uint32_t content_length)
{
    int n = content_length < 0x100 ? 1 : content_length < 0x10000 ? 2
                                     : content_length < 0x1000000 ? 3
                                                                  : 4;
    p[0] = (unsigned char)((n - 1) << 6 | type);
    for (int i = 0; i < n; i++) {
        p[1 + i] = (unsigned char)(content_length >> (8 * i));
    }
    return 1 + n;
}

static inline Py_ssize_t
entry_size(Py_ssize_t content_length)
{
    return content_length + (content_length < 0x100 ? 2 : content_length < 0x10000 ? 3
                                                      : content_length < 0x1000000 ? 4
                                                                                   : 5);
}

/* A tombstone at p (room checked by the caller); returns its size. */
static Py_ssize_t
put_tombstone(unsigned char *p, uint64_t table_id, const Py_buffer *key, uint64_t segment_id,
              uint64_t object_version, uint32_t timestamp)
{
    uint32_t content = (uint32_t)(TOMBSTONE_HEADER_SIZE + key->len);
    unsigned char *c = p + put_entry_header(p, ENTRY_OBJTOMB, content);
    put32(c + 4, timestamp);
    put64(c + 8, table_id);
    put64(c + 16, segment_id);
    put64(c + 24, object_version);
    memmove(c + TOMBSTONE_HEADER_SIZE, key->buf, (size_t)key->len);
    put32(c, crc32c_continue(TOMBSTONE_CRC_SEED, c + 4, content - 4));
    return (c - p) + content;
}

static void
put_object(unsigned char *p, uint64_t table_id, const Py_buffer *key, const Py_buffer *value,
           uint64_t version, uint32_t timestamp)
{
    uint32_t content = (uint32_t)(OBJECT_HEADER_SIZE + key->len + value->len);
    unsigned char *c = p + put_entry_header(p, ENTRY_OBJ, content);
    put32(c + 4, timestamp);
    put64(c + 8, version);
    put64(c + 16, table_id);
    c[24] = 1;
    put16(c + 25, (uint32_t)key->len);
    memmove(c + OBJECT_HEADER_SIZE, key->buf, (size_t)key->len);
    memmove(c + OBJECT_HEADER_SIZE + key->len, value->buf, (size_t)value->len);
    put32(c, crc32c_continue(0, c + 4, content - 4));
}

/* -- the module's functions -------------------------------------------------------------- */

PyDoc_STRVAR(write_object_into_doc,
             "write_object_into(buf, pos, table_id, key, value, version, timestamp,\n"
             "                  dead_segment_id=-1, dead_version=0) -> None\n\n"
             "Encode an object entry into the writable buffer ``buf`` at ``pos``; with\n"
             "``dead_segment_id >= 0`` the tombstone of ``dead_version`` (whose object lived in\n"
             "that segment) first, directly followed by the object.");

static PyObject *
write_object_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 && nargs != 9) {
        PyErr_SetString(PyExc_TypeError,
                        "write_object_into(buf, pos, table_id, key, value, version, timestamp"
                        "[, dead_segment_id, dead_version])");
        return NULL;
    }
    uint64_t table_id, version, dead_version = 0, dead_segment = 0;
    uint32_t timestamp;
    int with_tombstone = 0;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (as_u64(args[2], &table_id, "table_id") < 0 || as_u64(args[5], &version, "version") < 0 ||
        as_u32(args[6], &timestamp, "timestamp") < 0) {
        return NULL;
    }
    if (nargs == 9) {
        if (!PyLong_Check(args[7])) {
            PyErr_SetString(PyExc_TypeError, "dead_segment_id must be an int");
            return NULL;
        }
        if (_PyLong_Sign(args[7]) >= 0) {
            with_tombstone = 1;
            if (as_u64(args[7], &dead_segment, "dead_segment_id") < 0 ||
                as_u64(args[8], &dead_version, "dead_version") < 0) {
                return NULL;
            }
        }
    }
    Py_buffer key, value, out;
    if (PyObject_GetBuffer(args[3], &key, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[4], &value, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&value);
        PyBuffer_Release(&key);
        return NULL;
    }
    PyObject *result = NULL;
    if (key.len > MAX_KEY_LENGTH) {
        PyErr_Format(PyExc_ValueError, "key of %zd bytes is over %d", key.len, MAX_KEY_LENGTH);
        goto done;
    }
    if (value.len > (Py_ssize_t)UINT32_MAX - OBJECT_HEADER_SIZE - MAX_KEY_LENGTH) {
        PyErr_SetString(PyExc_ValueError, "value too large for an entry");
        goto done;
    }
    Py_ssize_t size = entry_size(OBJECT_HEADER_SIZE + key.len + value.len);
    Py_ssize_t tsize = with_tombstone ? entry_size(TOMBSTONE_HEADER_SIZE + key.len) : 0;
    if (pos < 0 || pos > out.len || out.len - pos < size + tsize) {
        PyErr_Format(PyExc_ValueError, "%zd bytes at %zd do not fit a buffer of %zd", size + tsize,
                     pos, out.len);
        goto done;
    }
    unsigned char *p = (unsigned char *)out.buf + pos;
    if (with_tombstone) {
        p += put_tombstone(p, table_id, &key, dead_segment, dead_version, timestamp);
    }
    put_object(p, table_id, &key, &value, version, timestamp);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&value);
    PyBuffer_Release(&key);
    return result;
}

PyDoc_STRVAR(write_tombstone_into_doc,
             "write_tombstone_into(buf, pos, table_id, key, segment_id, object_version,\n"
             "                     timestamp) -> None\n\n"
             "Encode a tombstone entry into the writable buffer ``buf`` at ``pos``.");

static PyObject *
write_tombstone_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "write_tombstone_into(buf, pos, table_id, key, segment_id, "
                        "object_version, timestamp)");
        return NULL;
    }
    uint64_t table_id, segment_id, object_version;
    uint32_t timestamp;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (as_u64(args[2], &table_id, "table_id") < 0 ||
        as_u64(args[4], &segment_id, "segment_id") < 0 ||
        as_u64(args[5], &object_version, "object_version") < 0 ||
        as_u32(args[6], &timestamp, "timestamp") < 0) {
        return NULL;
    }
    Py_buffer key, out;
    if (PyObject_GetBuffer(args[3], &key, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&key);
        return NULL;
    }
    PyObject *result = NULL;
    if (key.len > MAX_KEY_LENGTH) {
        PyErr_Format(PyExc_ValueError, "key of %zd bytes is over %d", key.len, MAX_KEY_LENGTH);
        goto done;
    }
    Py_ssize_t size = entry_size(TOMBSTONE_HEADER_SIZE + key.len);
    if (pos < 0 || pos > out.len || out.len - pos < size) {
        PyErr_Format(PyExc_ValueError, "%zd bytes at %zd do not fit a buffer of %zd", size, pos,
                     out.len);
        goto done;
    }
    put_tombstone((unsigned char *)out.buf + pos, table_id, &key, segment_id, object_version,
                  timestamp);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&key);
    return result;
}

PyDoc_STRVAR(crc32c_doc,
             "crc32c(data, value=0) -> int\n\n"
             "CRC32C of ``data`` continuing from checksum ``value`` (the crc32c package's\n"
             "convention: crc32c(b, crc32c(a)) == crc32c(a + b)).");

static PyObject *
crc32c(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 && nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "crc32c(data, value=0)");
        return NULL;
    }
    uint32_t value = 0;
    if (nargs == 2 && as_u32(args[1], &value, "value") < 0) {
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint32_t crc = crc32c_continue(value, (const unsigned char *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

/* -- hash-table buckets -------------------------------------------------------------------- */

#define BUCKET_ENTRIES 8
#define HT_REF_BITS 47
#define HT_REF_MASK ((UINT64_C(1) << HT_REF_BITS) - 1)
#define HT_CHAIN_BIT (UINT64_C(1) << HT_REF_BITS)

PyDoc_STRVAR(bucket_scan_doc,
             "bucket_scan(area, entry, tag) -> int\n\n"
             "Scan the hash-table bucket whose first entry is ``area[entry]`` (``area``: a buffer\n"
             "of native u64 entries). Bit i of the result is set when entry i is in use and its\n"
             "top 17 bits (secondary hash, chain bit) equal ``tag``; bits 8 and up hold the\n"
             "bucket number a chain pointer in the last entry names (0: no chain). The pure twin\n"
             "is services.kvstore.log._hashtable.bucket_scan.");

static PyObject *
bucket_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "bucket_scan(area, entry, tag)");
        return NULL;
    }
    uint64_t entry, tag;
    if (as_u64(args[1], &entry, "entry") < 0 || as_u64(args[2], &tag, "tag") < 0) {
        return NULL;
    }
    Py_buffer area;
    if (PyObject_GetBuffer(args[0], &area, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    uint64_t words = (uint64_t)area.len / 8;
    if (entry > words || words - entry < BUCKET_ENTRIES) {
        PyBuffer_Release(&area);
        PyErr_SetString(PyExc_IndexError, "bucket out of range");
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)area.buf + entry * 8;
    uint64_t mask = 0, last = 0;
    for (int i = 0; i < BUCKET_ENTRIES; i++) {
        uint64_t e;
        memcpy(&e, base + 8 * i, 8);
        if (e != 0 && (e >> HT_REF_BITS) == tag) {
            mask |= UINT64_C(1) << i;
        }
        last = e;
    }
    PyBuffer_Release(&area);
    if (last & HT_CHAIN_BIT) {
        mask |= (last & HT_REF_MASK) << 8;
    }
    return PyLong_FromUnsignedLongLong(mask);
}

static PyObject *
hardware_crc(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(use_hw_crc);
}

static PyMethodDef methods[] = {
    {"write_object_into", (PyCFunction)(void (*)(void))write_object_into, METH_FASTCALL,
     write_object_into_doc},
    {"write_tombstone_into", (PyCFunction)(void (*)(void))write_tombstone_into, METH_FASTCALL,
     write_tombstone_into_doc},
    {"crc32c", (PyCFunction)(void (*)(void))crc32c, METH_FASTCALL, crc32c_doc},
    {"bucket_scan", (PyCFunction)(void (*)(void))bucket_scan, METH_FASTCALL, bucket_scan_doc},
    {"hardware_crc", hardware_crc, METH_NOARGS,
     "hardware_crc() -> bool: whether CRC32C runs on the CPU's SSE4.2 instruction."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "services.kvstore.log._encode",
    "Object and tombstone entries encoded in place, in C (see _encode.c).",
    -1,
    methods,
};

PyMODINIT_FUNC
PyInit__encode(void)
{
    crc_init_table();
#ifdef HAVE_HW_CRC
    __builtin_cpu_init();
    use_hw_crc = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#endif
    return PyModule_Create(&module_def);
}
