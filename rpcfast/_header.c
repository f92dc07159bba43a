/* The session core's datagram header, packed and unpacked in C, and the RPC header read
 * (rpcfast._header).
 *
 * rpcfast._session reads the 32-byte header of every datagram it receives and writes the header
 * of every one-datagram message it sends; the router reads every request's 8-byte RPC header
 * (rpcfast._wire) and the caller every response's. Through struct.Struct each costs about a thousand
 * instructions (a method looked up by name, arguments parsed, a buffer acquired, the header and
 * payload joined by a second copy); these functions do the same work directly. The layout is
 * the session core's fast-path view of the header, five little-endian words:
 *
 *     u32 magic|kind<<8|flags<<16   u32 length   u64 client id   u64 sequence
 *     u64 offset|frag<<32|ack<<48
 *
 * rpcfast/_header_py.py is the pure-Python equivalent, used where this module was not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 32

PyDoc_STRVAR(pack_whole_doc,
             "pack_whole(head, client_id, sequence, tail, payload) -> bytes\n\n"
             "A whole message's datagram: the header (length = len(payload)), then the payload.");

static int
as_u64(PyObject *obj, uint64_t *out)
{
    /* the masked conversion walks the digits directly (the checked one goes through a generic
     * byte-array conversion, four times slower for a 64-bit client id); the range is checked
     * here instead */
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "pack_whole: header words must be int");
        return -1;
    }
    if (_PyLong_Sign(obj) < 0 || _PyLong_NumBits(obj) > 64) {
        PyErr_SetString(PyExc_OverflowError, "pack_whole: header word out of range");
        return -1;
    }
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(obj);
    return 0;
}

static PyObject *
pack_whole(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t head, cid, seq, tail;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pack_whole(head, client_id, sequence, tail, payload)");
        return NULL;
    }
    if (as_u64(args[0], &head) < 0 || as_u64(args[1], &cid) < 0 || as_u64(args[2], &seq) < 0 ||
        as_u64(args[3], &tail) < 0) {
        return NULL;
    }
    if (head > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "pack_whole: head over 32 bits");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[4], &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    PyObject *out = NULL;
    if (view.len > UINT32_MAX - HEADER_SIZE) {
        PyErr_SetString(PyExc_OverflowError, "pack_whole: payload over 32 bits of length");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, HEADER_SIZE + view.len);
    if (out == NULL) {
        goto done;
    }
    char *p = PyBytes_AS_STRING(out);
    uint32_t head32 = (uint32_t)head, length = (uint32_t)view.len;
    /* little-endian words: x86-64 and aarch64 Linux, the platforms rpcfast builds C for */
    memcpy(p, &head32, 4);
    memcpy(p + 4, &length, 4);
    memcpy(p + 8, &cid, 8);
    memcpy(p + 16, &seq, 8);
    memcpy(p + 24, &tail, 8);
    memcpy(p + HEADER_SIZE, view.buf, (size_t)view.len);
done:
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(unpack_head_doc,
             "unpack_head(datagram) -> (head, length, client_id, sequence, tail)\n\n"
             "The header's five words; the datagram must be bytes of at least 32 bytes.");

static PyObject *
unpack_head(PyObject *module, PyObject *datagram)
{
    if (!PyBytes_CheckExact(datagram)) {
        PyErr_SetString(PyExc_TypeError, "unpack_head: datagram must be bytes");
        return NULL;
    }
    if (PyBytes_GET_SIZE(datagram) < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "unpack_head: datagram shorter than a header");
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(datagram);
    uint32_t head, length;
    uint64_t cid, seq, tail;
    memcpy(&head, p, 4);
    memcpy(&length, p + 4, 4);
    memcpy(&cid, p + 8, 8);
    memcpy(&seq, p + 16, 8);
    memcpy(&tail, p + 24, 8);
    PyObject *result = PyTuple_New(5);
    if (result == NULL) {
        return NULL;
    }
    PyObject *items[5] = {
        PyLong_FromUnsignedLong(head), PyLong_FromUnsignedLong(length),
        PyLong_FromUnsignedLongLong(cid), PyLong_FromUnsignedLongLong(seq),
        PyLong_FromUnsignedLongLong(tail),
    };
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL) {
            for (int j = i + 1; j < 5; j++) {
                Py_XDECREF(items[j]);
            }
            Py_DECREF(result); /* releases the items already set */
            return NULL;
        }
        PyTuple_SET_ITEM(result, i, items[i]);
    }
    return result;
}

PyDoc_STRVAR(payload_view_doc,
             "payload_view(datagram) -> memoryview\n\n"
             "``memoryview(datagram)[32:]`` in one step: the payload after the header, uncopied.");

static PyObject *
payload_view(PyObject *module, PyObject *datagram)
{
    if (!PyBytes_CheckExact(datagram)) {
        PyErr_SetString(PyExc_TypeError, "payload_view: datagram must be bytes");
        return NULL;
    }
    if (PyBytes_GET_SIZE(datagram) < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "payload_view: datagram shorter than a header");
        return NULL;
    }
    PyObject *view = PyMemoryView_FromObject(datagram);
    if (view == NULL) {
        return NULL;
    }
    /* what slicing does to a new view's own buffer description (a 1-D view of unsigned bytes:
     * shape and strides point into the view object itself), without the slice object and the
     * second view: nothing else has seen this view yet */
    Py_buffer *buffer = PyMemoryView_GET_BUFFER(view);
    if (buffer->ndim != 1 || buffer->itemsize != 1 || buffer->shape == NULL) {
        Py_DECREF(view);
        PyErr_SetString(PyExc_SystemError, "payload_view: unexpected memoryview layout");
        return NULL;
    }
    buffer->buf = (char *)buffer->buf + HEADER_SIZE;
    buffer->len -= HEADER_SIZE;
    buffer->shape[0] -= HEADER_SIZE;
    return view;
}

/* The first 8 bytes of ``obj`` (any buffer), for the RPC header (rpcfast._wire). */
static int
rpc_head(PyObject *obj, const char *what, unsigned char out[8])
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    if (view.len < 8) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "%s: message shorter than its 8-byte header", what);
        return -1;
    }
    memcpy(out, view.buf, 8);
    PyBuffer_Release(&view);
    return 0;
}

static PyObject *
triple(uint32_t a, uint32_t b, uint32_t c)
{
    PyObject *result = PyTuple_New(3);
    if (result == NULL) {
        return NULL;
    }
    uint32_t values[3] = {a, b, c};
    for (int i = 0; i < 3; i++) {
        PyObject *item = PyLong_FromUnsignedLong(values[i]);
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, i, item);
    }
    return result;
}

PyDoc_STRVAR(unpack_request_doc,
             "unpack_request(message) -> (service_id, ordinal, flags)\n\n"
             "The RPC request header (rpcfast._wire.REQUEST) at the start of a buffer.");

static PyObject *
unpack_request(PyObject *module, PyObject *message)
{
    unsigned char b[8];
    uint32_t service;
    uint16_t ordinal, flags;
    if (rpc_head(message, "unpack_request", b) < 0) {
        return NULL;
    }
    memcpy(&service, b, 4);
    memcpy(&ordinal, b + 4, 2);
    memcpy(&flags, b + 6, 2);
    return triple(service, ordinal, flags);
}

PyDoc_STRVAR(unpack_response_doc,
             "unpack_response(message) -> (status, flags, code)\n\n"
             "The RPC response header (rpcfast._wire.RESPONSE) at the start of a buffer.");

static PyObject *
unpack_response(PyObject *module, PyObject *message)
{
    unsigned char b[8];
    uint16_t status, flags;
    uint32_t code;
    if (rpc_head(message, "unpack_response", b) < 0) {
        return NULL;
    }
    memcpy(&status, b, 2);
    memcpy(&flags, b + 2, 2);
    memcpy(&code, b + 4, 4);
    return triple(status, flags, code);
}

static PyMethodDef header_methods[] = {
    {"payload_view", (PyCFunction)payload_view, METH_O, payload_view_doc},
    {"unpack_request", (PyCFunction)unpack_request, METH_O, unpack_request_doc},
    {"unpack_response", (PyCFunction)unpack_response, METH_O, unpack_response_doc},
    {"pack_whole", (PyCFunction)(void (*)(void))pack_whole, METH_FASTCALL, pack_whole_doc},
    {"unpack_head", (PyCFunction)unpack_head, METH_O, unpack_head_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef header_module = {
    PyModuleDef_HEAD_INIT,
    "rpcfast._header",
    "The session core's datagram header, packed and unpacked in C.",
    0,
    header_methods,
};

PyMODINIT_FUNC
PyInit__header(void)
{
    PyObject *module = PyModule_Create(&header_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "HEADER_SIZE", HEADER_SIZE) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
