"""The server's request path: header checks, routing, ``@fast`` handlers and their replies.

Compiled with mypyc (``rpcfast._compiled``): a transport hands every request straight to
:meth:`Router.on_request`, and a fast handler's reply goes out before it returns, so this is
the server's whole share of a null RPC besides the handler itself. Requests for coroutine
handlers go to the server's ``spawn`` callback (``rpcfast._server``), which starts a task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import capnp  # type: ignore[import-untyped,unused-ignore]

from rpcfast import _wire
from rpcfast._errors import ServiceError, Status
from rpcfast._fastcall import decode_with, encode_with, fast_entry

log: Final = logging.getLogger("rpcfast.server")

_OK: Final = _wire.RESPONSE.pack(Status.OK, 0, 0)
_OK_ONLY: Final = (_OK,)
_HEADER_SIZE: Final = _wire.HEADER_SIZE
_FLAG_TRACE: Final = _wire.FLAG_TRACE
_unpack_request: Final = _wire.header.unpack_request
_pack_response: Final = _wire.RESPONSE.pack
_unpack_response: Final = _wire.RESPONSE.unpack
_pack_trace: Final = _wire.TRACE.pack
_now_ns: Final = time.perf_counter_ns
_MALFORMED: Final = (capnp.KjException, _wire.MalformedMessage)

Handler = tuple[
    Any, Callable[[Any], Any], bool, bool, Callable[[memoryview], Any], Any, bool, Any, Any
]
"""(method, bound handler, fast, bare, params decode, results encode_parts, results empty,
params' generated decoder, results' generated encoder): bare marks a fast handler whose
params are empty; the generated functions (None without) skip the codecs' wrapper frames."""

Spawn = Callable[[Any, Any, Any, Callable[[Any], Any], memoryview, int, int], None]
"""(transport, token, method, handler, body, flags, recv_ns): run an async handler in a task."""


def handler_entry(method: Any, fn: Callable[[Any], Any], fast: bool) -> Handler:
    """The routing entry for one method (codec entry points looked up once, not per request)."""
    params, results = method.params, method.results
    bare = fast and bool(params.empty)
    # a CustomCodec's hand-written decoder is called directly (no wrapper frame)
    decode = getattr(params, "custom_decode", None) or params.decode
    return (
        method,
        fn,
        fast,
        bare,
        decode,
        results.encode_parts,
        bool(results.empty),
        fast_entry(params, "custom_decode", "decode"),
        fast_entry(results, "custom_encode", "encode"),
    )


def error_response(status: int, message: str, code: int = 0) -> list[Any]:
    return [_pack_response(status, 0, code), message.encode("utf-8", "replace")[:4096]]


def traced(response: list[Any], recv_ns: int, start_ns: int) -> list[Any]:
    """``response`` with the server's time-trace stamps added (for a traced request)."""
    end_ns = _now_ns()
    status, _flags, code = _unpack_response(response[0])
    head = _pack_response(status, _FLAG_TRACE, code)
    stamps = _pack_trace(recv_ns, start_ns, end_ns, _now_ns())
    return [head, stamps, *response[1:]]


class Router:
    """Routes requests from transports to service handlers, counting what it sees."""

    def __init__(self, services: dict[int, list[Handler]], spawn: Spawn) -> None:
        self.services = services
        self.spawn = spawn
        self.aborted_hook: Callable[[Any, Any], None] | None = None
        self.closing = False
        self.requests = 0
        self.fast_requests = 0
        self.task_requests = 0
        self.errors = 0
        self.malformed = 0
        self.unknown = 0
        self.aborted = 0
        self.refused = 0

    def on_request(self, transport: Any, token: Any, message: memoryview) -> None:
        self.requests += 1
        if len(message) < _HEADER_SIZE:
            self.malformed += 1
            transport.reply(token, error_response(Status.MALFORMED_REQUEST, "short header"))
            return
        service_id, ordinal, flags = _unpack_request(message)
        # trace stamps only for traced calls: a clock read is ~0.1 us on the untraced fast path
        recv_ns = _now_ns() if flags & _FLAG_TRACE else 0
        handlers = self.services.get(service_id)
        if handlers is None or ordinal >= len(handlers):
            self.unknown += 1
            status = Status.UNKNOWN_SERVICE if handlers is None else Status.UNKNOWN_METHOD
            what = f"service {service_id:#x}" if handlers is None else f"method {ordinal}"
            transport.reply(token, error_response(status, f"no {what} here"))
            return
        if self.closing:
            self.refused += 1
            transport.reply(token, error_response(Status.SHUTTING_DOWN, "server is stopping"))
            return
        method, fn, fast, bare, decode, encode_parts, results_empty, fast_decode, fast_encode = (
            handlers[ordinal]
        )
        if not fast:
            self.task_requests += 1
            self.spawn(transport, token, method, fn, message[_HEADER_SIZE:], flags, recv_ns)
            return
        self.fast_requests += 1
        if bare and not flags and len(message) == _HEADER_SIZE:
            # the null-RPC path: no body to decode, no timestamps
            try:
                result = fn(None)
            except Exception as exc:
                transport.reply(token, self.failure(method, exc))
                return
            if result is None and results_empty:
                transport.reply(token, _OK_ONLY)
                return
            if type(result) is Deferred:
                result.bind(self, transport, token, method, flags, 0, 0)
                return
            try:
                encoded = [_OK, *encode_with(fast_encode, encode_parts, result)]
            except Exception as exc:
                encoded = self.failure(method, exc)
            transport.reply(token, encoded)
            return
        start_ns = _now_ns() if flags & _FLAG_TRACE else 0
        request = None
        try:
            request = decode_with(fast_decode, decode, message[_HEADER_SIZE:])
            result = fn(request)
            if type(result) is Deferred:
                result.bind(self, transport, token, method, flags, recv_ns, start_ns)
                return
            response = [_OK, *encode_with(fast_encode, encode_parts, result)]
        except Exception as exc:
            response = self.failure(method, exc)
        finally:
            if request is not None and type(request) is not tuple:  # (custom decoders' tuples)
                request._release()
        if flags & _FLAG_TRACE:
            response = traced(response, recv_ns, start_ns)
        transport.reply(token, response)

    def request_target(self, transport: Any) -> RequestTarget:
        """What a session core calls with each request of ``transport`` (see RequestTarget)."""
        return RequestTarget(self, transport)

    def on_aborted(self, transport: Any, token: Any) -> None:
        hook = self.aborted_hook
        if hook is not None:
            hook(transport, token)

    def send(
        self,
        transport: Any,
        token: Any,
        response: list[Any],
        flags: int,
        recv_ns: int,
        start_ns: int,
    ) -> None:
        if flags & _FLAG_TRACE:
            response = traced(response, recv_ns, start_ns)
        transport.reply(token, response)

    def failure(self, method: Any, exc: Exception) -> list[Any]:
        """The error response for a handler that raised ``exc`` (a ``ServiceError`` keeps
        its code; undecodable requests are MALFORMED_REQUEST; anything else is logged)."""
        self.errors += 1
        name = str(method.name)
        if isinstance(exc, ServiceError):
            return error_response(Status.APPLICATION_ERROR, exc.message, exc.code)
        if isinstance(exc, _MALFORMED):
            self.malformed += 1
            return error_response(Status.MALFORMED_REQUEST, f"{name}: {exc}")
        log.exception("handler %s failed", name, exc_info=exc)
        return error_response(Status.INTERNAL_ERROR, f"{name}: {type(exc).__name__}: {exc}")


class RequestTarget:
    """``partial(router.on_request, transport)``, compiled: the session core's request sink
    calls the router natively, without a partial object and a bound method between them."""

    def __init__(self, router: Router, transport: Any) -> None:
        self.router = router
        self.transport = transport

    def __call__(self, token: Any, message: memoryview) -> None:
        self.router.on_request(self.transport, token, message)


class Deferred:
    """What a ``@fast`` handler returns to answer later, without a task.

    The handler starts work that completes in dispatcher callbacks (e.g. replication RPCs made
    with ``Connection.start``) and one of those callbacks calls :meth:`resolve` or :meth:`fail`.
    The request body is released when the handler returns: copy what the answer needs first.
    """

    def __init__(self) -> None:
        self._bound: tuple[Router, Any, Any, Any, int, int, int] | None = None
        self._early: tuple[bool, Any] | None = None

    def bind(
        self,
        router: Router,
        transport: Any,
        token: Any,
        method: Any,
        flags: int,
        recv_ns: int,
        start_ns: int,
    ) -> None:
        self._bound = (router, transport, token, method, flags, recv_ns, start_ns)
        early = self._early
        if early is not None:  # settled before the handler even returned
            self._early = None
            if early[0]:
                self.resolve(early[1])
            else:
                self.fail(early[1])

    def resolve(self, result: Any = None) -> None:
        """Answer with ``result`` (None, a mapping of result fields, or a builder)."""
        bound, self._bound = self._bound, None
        if bound is None:
            if self._early is None:
                self._early = (True, result)
            return
        router, transport, token, method, flags, recv_ns, start_ns = bound
        try:
            response: list[Any] = [_OK, *method.results.encode_parts(result)]
        except Exception as exc:
            response = router.failure(method, exc)
        router.send(transport, token, response, flags, recv_ns, start_ns)

    def fail(self, error: Exception) -> None:
        """Answer with an error (a ``ServiceError`` keeps its code)."""
        bound, self._bound = self._bound, None
        if bound is None:
            if self._early is None:
                self._early = (False, error)
            return
        router, transport, token, method, flags, recv_ns, start_ns = bound
        router.send(transport, token, router.failure(method, error), flags, recv_ns, start_ns)
