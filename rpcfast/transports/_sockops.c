/* Non-blocking datagram socket calls for the UDP transport's hot path (rpcfast.transports._sockops).
 *
 * Python's socket methods cost more than the system calls they make, on exactly the path a
 * polling transport runs most: an empty receive raises BlockingIOError (an exception object,
 * its message and a traceback, at every turn of a spin loop), every call releases and retakes
 * the GIL, recvfrom formats the sender's address with sprintf into a new tuple and sendto parses
 * it back with inet_pton. These functions make the same calls with MSG_DONTWAIT and:
 *
 *   - report "nothing there" / "buffer full" as a return value, not an exception;
 *   - keep the GIL (a non-blocking call returns at once);
 *   - keep the last senders' address tuples in a small direct-mapped cache: a datagram from a
 *     known sender gets the same tuple object again, and sendto() with such a tuple reuses its
 *     socket address without parsing it.
 *
 * Addresses are the socket module's: (host, port) for IPv4, (host, port, flowinfo, scope_id)
 * for IPv6 (sendto also takes (host, port) and (host, port, flowinfo)); hosts are numeric.
 * Other errors raise OSError as the socket module does. ``SockOps(sock)`` holds one socket's
 * calls; rpcfast/transports/_sockops_py.py is the pure-Python equivalent, used where this
 * module was not built.
 *
 * Single-phase module with static state: rpcfast does not run in subinterpreters.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define CACHE_SIZE 256 /* a power of two */

typedef struct {
    struct sockaddr_storage sa;
    socklen_t len;
    PyObject *addr; /* strong reference, or NULL */
} Entry;

/* sender socket address -> its address tuple (recvfrom) */
static Entry by_sockaddr[CACHE_SIZE];
/* address object, by identity -> its socket address (sendto) */
static Entry by_object[CACHE_SIZE];

static int
would_block(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

static size_t
sockaddr_slot(const struct sockaddr *sa)
{
    uint32_t h;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        h = in->sin_addr.s_addr ^ ((uint32_t)in->sin_port * 2654435761u);
    }
    else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        uint32_t words[4];
        memcpy(words, &in6->sin6_addr, sizeof(words));
        h = words[0] ^ words[1] ^ words[2] ^ words[3] ^ in6->sin6_scope_id;
        h ^= (uint32_t)in6->sin6_port * 2654435761u;
    }
    h ^= h >> 16;
    return h & (CACHE_SIZE - 1);
}

static size_t
object_slot(PyObject *obj)
{
    uintptr_t p = (uintptr_t)obj;
    return (size_t)((p >> 4) ^ (p >> 12)) & (CACHE_SIZE - 1);
}

/* The socket module's address tuple for a socket address. */
static PyObject *
make_address(const struct sockaddr *sa)
{
    char text[INET6_ADDRSTRLEN];
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        const unsigned char *b = (const unsigned char *)&in->sin_addr.s_addr;
        char *p = text;
        for (int i = 0; i < 4; i++) {
            unsigned v = b[i];
            if (v >= 100) {
                *p++ = (char)('0' + v / 100);
            }
            if (v >= 10) {
                *p++ = (char)('0' + v / 10 % 10);
            }
            *p++ = (char)('0' + v % 10);
            if (i < 3) {
                *p++ = '.';
            }
        }
        PyObject *host = PyUnicode_FromStringAndSize(text, p - text);
        if (host == NULL) {
            return NULL;
        }
        PyObject *port = PyLong_FromLong(ntohs(in->sin_port));
        if (port == NULL) {
            Py_DECREF(host);
            return NULL;
        }
        PyObject *addr = PyTuple_Pack(2, host, port);
        Py_DECREF(host);
        Py_DECREF(port);
        return addr;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        if (inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof(text)) == NULL) {
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        return Py_BuildValue(
            "(sikI)", text, (int)ntohs(in6->sin6_port), (unsigned long)ntohl(in6->sin6_flowinfo),
            (unsigned int)in6->sin6_scope_id);
    }
    errno = EAFNOSUPPORT;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* Fill ``sa`` from an address tuple; -1 with an exception set when it is not one. */
static int
parse_address(PyObject *addr, struct sockaddr_storage *sa, socklen_t *len)
{
    if (!PyTuple_Check(addr) || PyTuple_GET_SIZE(addr) < 2 || PyTuple_GET_SIZE(addr) > 4) {
        PyErr_SetString(PyExc_TypeError, "address must be a (host, port, ...) tuple");
        return -1;
    }
    PyObject *host_obj = PyTuple_GET_ITEM(addr, 0);
    if (!PyUnicode_Check(host_obj)) {
        PyErr_SetString(PyExc_TypeError, "address host must be a str");
        return -1;
    }
    const char *host = PyUnicode_AsUTF8(host_obj);
    if (host == NULL) {
        return -1;
    }
    long port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memset(sa, 0, sizeof(*sa));
    if (strchr(host, ':') == NULL && PyTuple_GET_SIZE(addr) == 2) {
        struct sockaddr_in *in = (struct sockaddr_in *)sa;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &in->sin_addr) != 1) {
            PyErr_Format(PyExc_ValueError, "not a numeric IPv4 address: %R", host_obj);
            return -1;
        }
        *len = sizeof(*in);
        return 0;
    }
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)sa;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) != 1) {
        PyErr_Format(PyExc_ValueError, "not a numeric IPv6 address: %R", host_obj);
        return -1;
    }
    if (PyTuple_GET_SIZE(addr) > 2) {
        unsigned long flowinfo = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 2));
        if (flowinfo == (unsigned long)-1 && PyErr_Occurred()) {
            return -1;
        }
        in6->sin6_flowinfo = htonl((uint32_t)flowinfo);
    }
    if (PyTuple_GET_SIZE(addr) > 3) {
        unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 3));
        if (scope == (unsigned long)-1 && PyErr_Occurred()) {
            return -1;
        }
        in6->sin6_scope_id = (uint32_t)scope;
    }
    *len = sizeof(*in6);
    return 0;
}

static void
remember(Entry *entry, const struct sockaddr_storage *sa, socklen_t len, PyObject *addr)
{
    Py_INCREF(addr);
    Py_XSETREF(entry->addr, addr);
    memcpy(&entry->sa, sa, len);
    entry->len = len;
}

typedef struct {
    PyObject_HEAD
    int fd;
    int large; /* the last datagram received was over SMALL_DATAGRAM bytes */
    Py_ssize_t errors; /* send errors that send_now counted instead of raising */
    PyObject *sock;
} SockOps;

/* Datagrams are received into this scratch buffer and copied out (a small allocation, and
 * nothing allocated at all when the socket is empty), except after a large datagram: bulk
 * transfers come in runs of them, so the next one is received straight into a new bytes object
 * of the full size (shrunk after), saving the copy. Safe to share: the GIL is held throughout. */
#define SMALL_DATAGRAM 4096
#define SCRATCH_SIZE 65536
static char scratch[SCRATCH_SIZE];

/* One datagram (and its sender when ``sa`` is given) as a new bytes object; None when none is
 * waiting; NULL with OSError set on other errors. */
static PyObject *
receive(SockOps *self, PyObject *size_obj, struct sockaddr_storage *sa, socklen_t *len)
{
    Py_ssize_t size = PyLong_AsSsize_t(size_obj);
    if (size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "size must be positive");
        return NULL;
    }
    PyObject *data = NULL;
    char *into = scratch;
    if (size > SCRATCH_SIZE || self->large) {
        data = PyBytes_FromStringAndSize(NULL, size);
        if (data == NULL) {
            return NULL;
        }
        into = PyBytes_AS_STRING(data);
    }
    ssize_t got = recvfrom(
        self->fd, into, (size_t)size, MSG_DONTWAIT, (struct sockaddr *)sa, sa ? len : NULL);
    if (got < 0) {
        int err = errno;
        Py_XDECREF(data);
        if (would_block(err)) {
            Py_RETURN_NONE;
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->large = got > SMALL_DATAGRAM;
    if (data == NULL) {
        return PyBytes_FromStringAndSize(scratch, got);
    }
    if (got != size && _PyBytes_Resize(&data, got) < 0) {
        return NULL;
    }
    return data;
}

PyDoc_STRVAR(recv_doc, "recv(size) -> bytes | None\n\n"
                       "One datagram from a connected socket; None when none is waiting.");

static PyObject *
SockOps_recv(SockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "recv(size)");
        return NULL;
    }
    return receive(self, args[0], NULL, NULL);
}

PyDoc_STRVAR(recvfrom_doc, "recvfrom(size) -> (bytes, address) | None\n\n"
                           "One datagram and its sender; None when none is waiting.");

static PyObject *
SockOps_recvfrom(SockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    struct sockaddr_storage sa;
    socklen_t len = sizeof(sa);
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "recvfrom(size)");
        return NULL;
    }
    PyObject *data = receive(self, args[0], &sa, &len);
    if (data == NULL || data == Py_None) {
        return data;
    }
    PyObject *addr;
    if (sa.ss_family != AF_INET && sa.ss_family != AF_INET6) {
        addr = make_address((struct sockaddr *)&sa); /* raises */
        Py_DECREF(data);
        return addr;
    }
    Entry *entry = &by_sockaddr[sockaddr_slot((struct sockaddr *)&sa)];
    if (entry->addr != NULL && entry->len == len && memcmp(&entry->sa, &sa, len) == 0) {
        addr = entry->addr;
        Py_INCREF(addr);
    }
    else {
        addr = make_address((struct sockaddr *)&sa);
        if (addr == NULL) {
            Py_DECREF(data);
            return NULL;
        }
        remember(entry, &sa, len, addr);
        remember(&by_object[object_slot(addr)], &sa, len, addr);
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(data);
        Py_DECREF(addr);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, data);
    PyTuple_SET_ITEM(result, 1, addr);
    return result;
}

/* Send ``obj``'s bytes; True, False when the socket buffer is full, NULL on other errors. */
static PyObject *
send_data(int fd, PyObject *obj, const struct sockaddr *sa, socklen_t len)
{
    Py_buffer view;
    const char *buf;
    Py_ssize_t size;
    int release = 0;
    if (PyBytes_CheckExact(obj)) {
        buf = PyBytes_AS_STRING(obj);
        size = PyBytes_GET_SIZE(obj);
    }
    else {
        if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        buf = view.buf;
        size = view.len;
        release = 1;
    }
    ssize_t sent = sa == NULL ? send(fd, buf, (size_t)size, MSG_DONTWAIT)
                              : sendto(fd, buf, (size_t)size, MSG_DONTWAIT, sa, len);
    int err = errno;
    if (release) {
        PyBuffer_Release(&view);
    }
    if (sent < 0) {
        if (would_block(err)) {
            Py_RETURN_FALSE;
        }
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(send_doc, "send(data) -> bool\n\n"
                       "Send one datagram on a connected socket; False when its buffer is full.");

static PyObject *
SockOps_send(SockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "send(data)");
        return NULL;
    }
    return send_data(self->fd, args[0], NULL, 0);
}

PyDoc_STRVAR(sendto_doc, "sendto(data, address) -> bool\n\n"
                         "Send one datagram to address; False when the socket buffer is full.");

static PyObject *
SockOps_sendto(SockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "sendto(data, address)");
        return NULL;
    }
    PyObject *addr = args[1];
    Entry *entry = &by_object[object_slot(addr)];
    if (entry->addr != addr) {
        struct sockaddr_storage sa;
        socklen_t len;
        if (parse_address(addr, &sa, &len) < 0) {
            return NULL;
        }
        remember(entry, &sa, len, addr);
    }
    return send_data(self->fd, args[0], (struct sockaddr *)&entry->sa, entry->len);
}

/* The session core's one-datagram call, from send to response (rpcfast._session's wire format:
 * a 32-byte header, little-endian: u32 magic|kind<<8|flags<<16, u32 payload length, u64 client
 * id, u64 sequence, u64 offset|frag<<32|ack<<48). */
#define HEADER_SIZE 32
#define RESPONSE_HEAD (0xB5u | 1u << 8) /* magic, ALL_DATA, no flags: a whole first response */

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.perf_counter's clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

PyDoc_STRVAR(
    call_whole_doc,
    "call_whole(datagram, until) -> memoryview | tuple[bytes] | bool | None\n\n"
    "Send a whole one-datagram request (the session core's ALL_DATA format) on a connected "
    "socket, then poll the socket until ``until`` (time.perf_counter seconds) for its response. "
    "Returns a view of the response's payload when the first datagram to arrive is its whole "
    "first transmission; ``(datagram,)`` when another datagram arrived first (the caller feeds "
    "it to the session core); None when nothing arrived in time or the receive failed (the "
    "core's timers recover); False, with nothing sent, when the socket buffer is full. A send "
    "error raises OSError.");

static PyObject *
SockOps_call_whole(SockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "call_whole(datagram: bytes, until: float)");
        return NULL;
    }
    double until = PyFloat_AsDouble(args[1]);
    if (until == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    const char *request = PyBytes_AS_STRING(args[0]);
    Py_ssize_t request_size = PyBytes_GET_SIZE(args[0]);
    if (request_size < HEADER_SIZE) {
        PyErr_SetString(PyExc_ValueError, "call_whole: datagram shorter than a header");
        return NULL;
    }
    if (send(self->fd, request, (size_t)request_size, MSG_DONTWAIT) < 0) {
        if (would_block(errno)) {
            Py_RETURN_FALSE;
        }
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    for (;;) {
        ssize_t got = recv(self->fd, scratch, SCRATCH_SIZE, MSG_DONTWAIT);
        if (got < 0) {
            if (!would_block(errno) || monotonic_now() > until) {
                Py_RETURN_NONE;
            }
            continue;
        }
        self->large = got > SMALL_DATAGRAM;
        if (got >= HEADER_SIZE) {
            uint32_t head, length;
            uint64_t tail;
            memcpy(&head, scratch, 4);
            memcpy(&length, scratch + 4, 4);
            memcpy(&tail, scratch + 24, 8);
            /* the same client id and sequence: bytes 8-24 of the request */
            if (head == RESPONSE_HEAD && length == (uint64_t)(got - HEADER_SIZE) && tail == 0 &&
                memcmp(scratch + 8, request + 8, 16) == 0) {
                PyObject *payload =
                    PyBytes_FromStringAndSize(scratch + HEADER_SIZE, got - HEADER_SIZE);
                if (payload == NULL) {
                    return NULL;
                }
                PyObject *view = PyMemoryView_FromObject(payload);
                Py_DECREF(payload);
                return view;
            }
        }
        PyObject *data = PyBytes_FromStringAndSize(scratch, got);
        if (data == NULL) {
            return NULL;
        }
        PyObject *result = PyTuple_New(1);
        if (result == NULL) {
            Py_DECREF(data);
            return NULL;
        }
        PyTuple_SET_ITEM(result, 0, data);
        return result;
    }
}

PyDoc_STRVAR(send_now_doc,
             "send_now(address, data) -> bool\n\n"
             "``sendto(data, address)`` for the session core's ``send_now``: False when the "
             "socket buffer is full; other send errors (an unreachable peer) are counted in "
             "``errors`` and reported as sent, since the core recovers from a lost datagram.");

static PyObject *
SockOps_send_now(SockOps *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "send_now(address, data)");
        return NULL;
    }
    PyObject *swapped[2] = {args[1], args[0]};
    PyObject *sent = SockOps_sendto(self, swapped, 2);
    if (sent == NULL && PyErr_ExceptionMatches(PyExc_OSError)) {
        PyErr_Clear();
        self->errors++;
        Py_RETURN_TRUE;
    }
    return sent;
}

PyDoc_STRVAR(close_doc, "close() -> None\n\n"
                        "Forget the socket's descriptor before its owner closes it: later calls "
                        "fail with EBADF instead of reaching whatever reuses the number.");

static PyObject *
SockOps_close(SockOps *self, PyObject *unused)
{
    self->fd = -1; /* the system calls then fail with EBADF */
    Py_RETURN_NONE;
}

static PyMethodDef SockOps_methods[] = {
    {"call_whole", (PyCFunction)(void (*)(void))SockOps_call_whole, METH_FASTCALL,
     call_whole_doc},
    {"close", (PyCFunction)SockOps_close, METH_NOARGS, close_doc},
    {"recv", (PyCFunction)(void (*)(void))SockOps_recv, METH_FASTCALL, recv_doc},
    {"recvfrom", (PyCFunction)(void (*)(void))SockOps_recvfrom, METH_FASTCALL, recvfrom_doc},
    {"send", (PyCFunction)(void (*)(void))SockOps_send, METH_FASTCALL, send_doc},
    {"sendto", (PyCFunction)(void (*)(void))SockOps_sendto, METH_FASTCALL, sendto_doc},
    {"send_now", (PyCFunction)(void (*)(void))SockOps_send_now, METH_FASTCALL, send_now_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *
SockOps_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *sock;
    static char *kwlist[] = {"sock", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:SockOps", kwlist, &sock)) {
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(sock);
    if (fd < 0) {
        return NULL;
    }
    SockOps *self = (SockOps *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->fd = fd;
    self->large = 0;
    self->errors = 0;
    Py_INCREF(sock);
    self->sock = sock;
    return (PyObject *)self;
}

static int
SockOps_traverse(SockOps *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sock);
    return 0;
}

static int
SockOps_clear(SockOps *self)
{
    Py_CLEAR(self->sock);
    return 0;
}

static void
SockOps_dealloc(SockOps *self)
{
    PyObject_GC_UnTrack(self);
    SockOps_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef SockOps_members[] = {
    {"sock", T_OBJECT_EX, offsetof(SockOps, sock), READONLY, "the socket"},
    {"fd", T_INT, offsetof(SockOps, fd), READONLY, "its file descriptor"},
    {"errors", T_PYSSIZET, offsetof(SockOps, errors), READONLY,
     "send errors send_now counted instead of raising"},
    {NULL, 0, 0, 0, NULL},
};

PyDoc_STRVAR(SockOps_doc, "SockOps(sock)\n\n"
                          "Non-blocking calls on a datagram socket (kept open by its owner).");

static PyTypeObject SockOpsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rpcfast.transports._sockops.SockOps",
    .tp_basicsize = sizeof(SockOps),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = SockOps_doc,
    .tp_new = SockOps_new,
    .tp_dealloc = (destructor)SockOps_dealloc,
    .tp_traverse = (traverseproc)SockOps_traverse,
    .tp_clear = (inquiry)SockOps_clear,
    .tp_methods = SockOps_methods,
    .tp_members = SockOps_members,
};

static struct PyModuleDef sockops_module = {
    PyModuleDef_HEAD_INIT,
    "rpcfast.transports._sockops",
    "Non-blocking datagram socket calls without exceptions for empty sockets.",
    -1,
    NULL,
};

PyMODINIT_FUNC
PyInit__sockops(void)
{
    if (PyType_Ready(&SockOpsType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&sockops_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "HEADER_SIZE", HEADER_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "RESPONSE_HEAD", RESPONSE_HEAD) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&SockOpsType);
    if (PyModule_AddObject(module, "SockOps", (PyObject *)&SockOpsType) < 0) {
        Py_DECREF(&SockOpsType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
