"""Serving services on transports.

    async with rpcfast.serve([Echo()], ["udp://127.0.0.1:0", "zmq://127.0.0.1:0"]) as server:
        print(server.addresses)
        await trio.sleep_forever()

The server is the transports' request sink. Requests are answered inline by ``@fast`` handlers,
or by a task per request for ``async def`` handlers; either way errors become typed responses and
never escape into the dispatcher. Leaving the ``async with`` block shuts down gracefully: new
requests are refused with SHUTTING_DOWN, running handlers get ``grace`` seconds, then are
cancelled, then the endpoints close.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import capnp  # type: ignore[import-untyped,unused-ignore]
import trio

from rpcfast import _wire
from rpcfast._errors import ServiceError, Status
from rpcfast._schema import MethodSpec
from rpcfast._service import Service
from rpcfast.dispatch import DispatchConfig, Dispatcher, current
from rpcfast.transports import Transport, open_transport

log = logging.getLogger("rpcfast.server")

_OK = _wire.RESPONSE.pack(Status.OK, 0, 0)
_OK_ONLY: tuple[bytes] = (_OK,)
_HEADER_SIZE = _wire.HEADER_SIZE
_FLAG_TRACE = _wire.FLAG_TRACE
_unpack_request = _wire.REQUEST.unpack_from
_now_ns = time.perf_counter_ns

Handler = tuple[MethodSpec, Callable[[Any], Any], bool, bool]
"""(method, bound handler, fast, bare): bare marks a fast handler whose params are empty."""


@attrs.define
class ServerStats:
    requests: int = 0
    fast_requests: int = 0
    task_requests: int = 0
    errors: int = 0
    malformed: int = 0
    unknown: int = 0
    aborted: int = 0
    refused: int = 0


def _error_response(status: Status, message: str, code: int = 0) -> list[bytes]:
    return [_wire.RESPONSE.pack(status, 0, code), message.encode("utf-8", "replace")[:4096]]


class Server:
    """Routes requests from its transports to service handlers. Made by :func:`serve`."""

    def __init__(self, dispatcher: Dispatcher, services: Sequence[Service]) -> None:
        self.dispatcher = dispatcher
        self.stats = ServerStats()
        self.transports: list[Transport] = []
        self._services: dict[int, list[Handler]] = {}
        for service in services:
            spec = service.rpcfast_spec
            if spec.service_id in self._services:
                raise ValueError(f"two services implement {spec.name}")
            self._services[spec.service_id] = [
                (method, fn, fast, fast and method.params.empty)
                for method, (fn, fast) in zip(spec.methods, service.rpcfast_handlers(), strict=True)
            ]
        self._nursery: trio.Nursery | None = None
        self._inflight: dict[tuple[int, Any], trio.CancelScope] = {}
        self._closing = False

    @property
    def addresses(self) -> list[str]:
        return [t.address for t in self.transports]

    def listen(self, address: str) -> Transport:
        transport = open_transport(self.dispatcher, address)
        transport.sink = self
        self.transports.append(transport)
        return transport

    # -- the request path (called from Transport.poll) ---------------------------------------------
    def on_request(self, transport: Transport, token: Any, message: memoryview) -> None:
        stats = self.stats
        stats.requests += 1
        if len(message) < _HEADER_SIZE:
            stats.malformed += 1
            transport.reply(token, _error_response(Status.MALFORMED_REQUEST, "short header"))
            return
        service_id, ordinal, flags = _unpack_request(message)
        # trace stamps only for traced calls: a clock read is ~0.1 us on the untraced fast path
        recv_ns = _now_ns() if flags & _FLAG_TRACE else 0
        handlers = self._services.get(service_id)
        if handlers is None or ordinal >= len(handlers):
            stats.unknown += 1
            status = Status.UNKNOWN_SERVICE if handlers is None else Status.UNKNOWN_METHOD
            what = f"service {service_id:#x}" if handlers is None else f"method {ordinal}"
            transport.reply(token, _error_response(status, f"no {what} here"))
            return
        if self._closing:
            stats.refused += 1
            transport.reply(token, _error_response(Status.SHUTTING_DOWN, "server is stopping"))
            return
        method, fn, fast, bare = handlers[ordinal]
        if fast:
            stats.fast_requests += 1
            if bare and not flags and len(message) == _HEADER_SIZE:
                # the null-RPC path: no body to decode, no timestamps
                try:
                    result = fn(None)
                except Exception as exc:
                    transport.reply(token, self._failure(method, exc))
                    return
                if result is None and method.results.empty:
                    transport.reply(token, _OK_ONLY)
                    return
                if type(result) is Deferred:
                    result._bind(self, transport, token, method, flags, 0, 0)
                    return
                try:
                    encoded = [_OK, *method.results.encode_parts(result)]
                except Exception as exc:
                    encoded = self._failure(method, exc)
                transport.reply(token, encoded)
                return
            start_ns = _now_ns() if flags & _FLAG_TRACE else 0
            response = self._run_fast(method, fn, message[_HEADER_SIZE:])
            if isinstance(response, Deferred):
                response._bind(self, transport, token, method, flags, recv_ns, start_ns)
                return
            if flags & _FLAG_TRACE:
                response = self._traced(response, recv_ns, start_ns)
            transport.reply(token, response)
        else:
            stats.task_requests += 1
            nursery = self._nursery
            assert nursery is not None
            scope = trio.CancelScope()
            key = (id(transport), token)
            self._inflight[key] = scope
            self.dispatcher.task_started()
            nursery.start_soon(
                self._run_task,
                transport,
                token,
                key,
                scope,
                method,
                fn,
                message[_HEADER_SIZE:],
                flags,
                recv_ns,
            )

    def on_aborted(self, transport: Transport, token: Any) -> None:
        scope = self._inflight.get((id(transport), token))
        if scope is not None:
            self.stats.aborted += 1
            scope.cancel()

    @staticmethod
    def _traced(response: list[Any], recv_ns: int, start_ns: int) -> list[Any]:
        end_ns = _now_ns()
        status, _flags, code = _wire.RESPONSE.unpack(response[0])
        head = _wire.RESPONSE.pack(status, _wire.FLAG_TRACE, code)
        stamps = _wire.TRACE.pack(recv_ns, start_ns, end_ns, _now_ns())
        return [head, stamps, *response[1:]]

    def _run_fast(
        self, method: MethodSpec, fn: Callable[[Any], Any], body: memoryview
    ) -> list[Any] | Deferred:
        request = None
        try:
            request = method.params.decode(body)
            result = fn(request)
            if type(result) is Deferred:
                return result
            return [_OK, *method.results.encode_parts(result)]
        except Exception as exc:
            return self._failure(method, exc)
        finally:
            if request is not None:
                request._release()

    async def _run_task(
        self,
        transport: Transport,
        token: Any,
        key: tuple[int, Any],
        scope: trio.CancelScope,
        method: MethodSpec,
        fn: Callable[[Any], Any],
        body: memoryview,
        flags: int,
        recv_ns: int,
    ) -> None:
        start_ns = _now_ns()
        request = None
        response: list[Any] | None = None
        try:
            with scope:
                try:
                    request = method.params.decode(body)
                    result = await fn(request)
                    response = [_OK, *method.results.encode_parts(result)]
                except Exception as exc:
                    response = self._failure(method, exc)
        finally:
            self.dispatcher.task_finished()
            self._inflight.pop(key, None)
            if request is not None:
                request._release()
        if response is None:  # cancelled: the client aborted (no one to answer) or shutdown
            if self._closing:
                transport.reply(token, _error_response(Status.CANCELLED, "server stopped"))
            return
        if flags & _wire.FLAG_TRACE:
            response = self._traced(response, recv_ns, start_ns)
        transport.reply(token, response)

    def _send(
        self,
        transport: Transport,
        token: Any,
        response: list[Any],
        flags: int,
        recv_ns: int,
        start_ns: int,
    ) -> None:
        if flags & _wire.FLAG_TRACE:
            response = self._traced(response, recv_ns, start_ns)
        transport.reply(token, response)

    def _failure(self, method: MethodSpec, exc: Exception) -> list[bytes]:
        self.stats.errors += 1
        if isinstance(exc, ServiceError):
            return _error_response(Status.APPLICATION_ERROR, exc.message, exc.code)
        if isinstance(exc, (capnp.KjException, _wire.MalformedMessage)):
            self.stats.malformed += 1
            return _error_response(Status.MALFORMED_REQUEST, f"{method.name}: {exc}")
        log.exception("handler %s failed", method.name)
        return _error_response(Status.INTERNAL_ERROR, f"{method.name}: {type(exc).__name__}: {exc}")

    async def _shutdown(self, grace: float) -> None:
        self._closing = True
        with trio.move_on_after(grace):
            while self._inflight:
                await trio.sleep(0.001)
        for scope in list(self._inflight.values()):
            scope.cancel()


class Deferred:
    """What a ``@fast`` handler returns to answer later, without a task.

    The handler starts work that completes in dispatcher callbacks (e.g. replication RPCs made
    with ``Connection.start``) and one of those callbacks calls :meth:`resolve` or :meth:`fail`.
    The request body is released when the handler returns: copy what the answer needs first.
    """

    __slots__ = ("_bound", "_early")

    def __init__(self) -> None:
        self._bound: tuple[Any, ...] | None = None
        self._early: tuple[bool, Any] | None = None

    def _bind(
        self,
        server: Server,
        transport: Transport,
        token: Any,
        method: MethodSpec,
        flags: int,
        recv_ns: int,
        start_ns: int,
    ) -> None:
        self._bound = (server, transport, token, method, flags, recv_ns, start_ns)
        if self._early is not None:  # settled before the handler even returned
            ok, value = self._early
            self._early = None
            if ok:
                self.resolve(value)
            else:
                self.fail(value)

    def resolve(self, result: Any = None) -> None:
        """Answer with ``result`` (None, a mapping of result fields, or a builder)."""
        bound, self._bound = self._bound, None
        if bound is None:
            if self._early is None:
                self._early = (True, result)
            return
        server, transport, token, method, flags, recv_ns, start_ns = bound
        try:
            response: list[Any] = [_OK, *method.results.encode_parts(result)]
        except Exception as exc:
            response = server._failure(method, exc)
        server._send(transport, token, response, flags, recv_ns, start_ns)

    def fail(self, error: Exception) -> None:
        """Answer with an error (a ``ServiceError`` keeps its code)."""
        bound, self._bound = self._bound, None
        if bound is None:
            if self._early is None:
                self._early = (False, error)
            return
        server, transport, token, method, flags, recv_ns, start_ns = bound
        server._send(transport, token, server._failure(method, error), flags, recv_ns, start_ns)


@asynccontextmanager
async def serve(
    services: Sequence[Service],
    addresses: Sequence[str],
    *,
    grace: float = 1.0,
    dispatch: DispatchConfig | None = None,
) -> AsyncIterator[Server]:
    """Serve ``services`` on every address (``udp://host:port``, ``zmq://host:port``,
    ``inproc://name``; port 0 picks a free one) for the duration of the block."""
    server = Server(current(dispatch), services)
    try:
        async with trio.open_nursery() as nursery:
            server._nursery = nursery
            for address in addresses:
                server.listen(address)
            try:
                yield server
            finally:
                with trio.CancelScope(shield=True):
                    await server._shutdown(grace)
    finally:
        for transport in server.transports:
            server.dispatcher.remove_transport(transport)
            transport.close()
