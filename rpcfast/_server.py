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

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from rpcfast import _wire
from rpcfast._errors import Status
from rpcfast._router import Deferred, Handler, Router, error_response, handler_entry
from rpcfast._schema import CustomCodec, MethodSpec
from rpcfast._service import Service, custom_decoder
from rpcfast.dispatch import DispatchConfig, Dispatcher, current
from rpcfast.transports import Transport, open_transport

_OK = _wire.RESPONSE.pack(Status.OK, 0, 0)
_now_ns = time.perf_counter_ns

__all__ = ["Deferred", "Server", "ServerStats", "serve"]


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


class Server:
    """Routes requests from its transports to service handlers. Made by :func:`serve`.

    The request path itself is the compiled :class:`~rpcfast._router.Router` (each
    transport's sink); this class runs the ``async def`` handlers' tasks and shutdown."""

    def __init__(self, dispatcher: Dispatcher, services: Sequence[Service]) -> None:
        self.dispatcher = dispatcher
        self.transports: list[Transport] = []
        routes: dict[int, list[Handler]] = {}
        for service in services:
            spec = service.rpcfast_spec
            if spec.service_id in routes:
                raise ValueError(f"two services implement {spec.name}")
            entries = []
            for method, (fn, fast) in zip(spec.methods, service.rpcfast_handlers(), strict=True):
                decoder = custom_decoder(fn)
                if decoder is not None:
                    method = attrs.evolve(
                        method, params=CustomCodec.over(method.params, decode=decoder)
                    )
                entries.append(handler_entry(method, fn, fast))
            routes[spec.service_id] = entries
        self.router = Router(routes, self._spawn)
        self.router.aborted_hook = self._on_aborted
        self._nursery: trio.Nursery | None = None
        self._inflight: dict[tuple[int, Any], trio.CancelScope] = {}

    @property
    def stats(self) -> ServerStats:
        """A snapshot of the request counters."""
        r = self.router
        return ServerStats(
            requests=r.requests,
            fast_requests=r.fast_requests,
            task_requests=r.task_requests,
            errors=r.errors,
            malformed=r.malformed,
            unknown=r.unknown,
            aborted=r.aborted,
            refused=r.refused,
        )

    @property
    def addresses(self) -> list[str]:
        return [t.address for t in self.transports]

    def listen(self, address: str) -> Transport:
        transport = open_transport(self.dispatcher, address)
        transport.sink = self.router
        self.transports.append(transport)
        return transport

    # -- async handlers ---------------------------------------------------------------------------
    def _spawn(
        self,
        transport: Transport,
        token: Any,
        method: MethodSpec,
        fn: Callable[[Any], Any],
        body: memoryview,
        flags: int,
        recv_ns: int,
    ) -> None:
        nursery = self._nursery
        assert nursery is not None
        scope = trio.CancelScope()
        key = (id(transport), token)
        self._inflight[key] = scope
        self.dispatcher.task_started()
        nursery.start_soon(
            self._run_task, transport, token, key, scope, method, fn, body, flags, recv_ns
        )

    def _on_aborted(self, transport: Transport, token: Any) -> None:
        scope = self._inflight.get((id(transport), token))
        if scope is not None:
            self.router.aborted += 1
            scope.cancel()

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
        request: Any = None  # a Body, or a custom decoder's tuple
        response: list[Any] | None = None
        try:
            with scope:
                try:
                    request = method.params.decode(body)
                    result = await fn(request)
                    response = [_OK, *method.results.encode_parts(result)]
                except Exception as exc:
                    response = self.router.failure(method, exc)
        finally:
            self.dispatcher.task_finished()
            self._inflight.pop(key, None)
            if request is not None and type(request) is not tuple:  # (custom decoders' tuples)
                request._release()
        if response is None:  # cancelled: the client aborted (no one to answer) or shutdown
            if self.router.closing:
                transport.reply(token, error_response(Status.CANCELLED, "server stopped"))
            return
        self.router.send(transport, token, response, flags, recv_ns, start_ns)

    async def _shutdown(self, grace: float) -> None:
        self.router.closing = True
        with trio.move_on_after(grace):
            while self._inflight:
                await trio.sleep(0.001)
        for scope in list(self._inflight.values()):
            scope.cancel()


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
