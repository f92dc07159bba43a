"""Calling services.

    async with rpcfast.connect("udp://127.0.0.1:5000") as conn:
        echo = conn.stub(echo_capnp.Echo)
        reply = await echo.echo(data=b"hi")       # a Body; reply.data is a memoryview
        await echo.ping(timeout=0.5)               # empty results return None

Many calls may be outstanding on one connection (from many tasks). A call first drives the
dispatcher inline for ``DispatchConfig.call_spin`` seconds (no task switch: the fast path), then
sleeps until its response, its deadline, or cancellation. Cancelling the surrounding cancel scope
cancels the call and tells the server, which cancels the handler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import attrs
import trio

from rpcfast import _wire
from rpcfast._errors import MalformedResponse, RemoteError, RpcTimeout, Status
from rpcfast._fastcall import _MALFORMED, Caller, CallPlan, short_response
from rpcfast._pending import PendingCall
from rpcfast._schema import Body, CustomCodec, InterfaceSpec, MethodSpec, interface_spec
from rpcfast._trace import TimeTrace
from rpcfast._types import Buffer
from rpcfast.dispatch import current
from rpcfast.transports import client_transport

_clock = time.perf_counter
_now_ns = time.perf_counter_ns
_STATUS = {int(s): s for s in Status}
_HEADER_SIZE = _wire.HEADER_SIZE
_FLAG_TRACE = _wire.FLAG_TRACE
_TRACE = _wire.TRACE
_pack_request = _wire.REQUEST.pack
_unpack_response = _wire.RESPONSE.unpack_from
_STATUS_OK = int(Status.OK)
_checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled


def _run_context() -> Any:
    """trio's run context, when its tasks have the fields a stub's cancellation check reads (as in
    trio 0.25-0.35); else None, and stubs await ``checkpoint_if_cancelled`` instead.

    ``checkpoint_if_cancelled`` is a coroutine of its own plus ``current_task()``: about 0.2 us,
    a sizeable share of a 12 us round trip. A stub makes the same check inline: when the task is
    cancelled (or a KeyboardInterrupt is pending for the main task) it awaits the real thing,
    otherwise it counts the cancel point as trio does (``trio.testing.assert_checkpoints``)."""
    try:
        from trio._core import _run

        if not (
            {"_cancel_status", "_cancel_points", "_runner"} <= set(attrs.fields_dict(_run.Task))
            and "effectively_cancelled" in attrs.fields_dict(_run.CancelStatus)
            and {"main_task", "ki_pending"} <= set(attrs.fields_dict(_run.Runner))
        ):
            return None
        return _run.GLOBAL_RUN_CONTEXT
    except (ImportError, AttributeError, TypeError, attrs.exceptions.NotAnAttrsClassError):
        return None


_RUN_CONTEXT = _run_context()


def _read(method: MethodSpec, body: memoryview) -> Body | None:
    """``method``'s results in a response body (the traced path's ``read_results``)."""
    try:
        result: Body | None = method.results.decode(body)
    except _MALFORMED as exc:
        raise MalformedResponse(f"undecodable results: {exc}") from exc
    return result


Encoder = Callable[[Any], list[Buffer]]
"""A hand-written params encoder (``Connection.stub(codecs=...)``)."""
Decoder = Callable[[memoryview], Any]
"""A hand-written results decoder (``Connection.stub(codecs=...)``)."""


class Connection:
    """Calls to one remote address. Cheap: transports are shared by all connections."""

    def __init__(
        self, address: str, *, timeout: float | None = None, trace: TimeTrace | None = None
    ) -> None:
        self.dispatcher = current()
        self.transport, self.peer = client_transport(self.dispatcher, address)
        self.address = address
        self.trace = trace
        self._closed = False
        self._call_spin = self.dispatcher.config.call_spin
        self._poll_once = self.dispatcher.poll_once
        self._plans: dict[int, CallPlan] = {}  # by id() of cached, long-lived MethodSpecs
        self._caller = Caller(
            self.transport, self.peer, self.dispatcher.poller, self._call_spin, timeout
        )

    @property
    def timeout(self) -> float | None:
        """Default timeout (seconds) of calls that give none; None waits for ever."""
        return self._caller.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._caller.timeout = value

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._caller.closed = True

    def stub(
        self,
        interface: Any,
        *,
        codecs: Mapping[str, tuple[Encoder | None, Decoder | None]] | None = None,
    ) -> Stub:
        """Methods of ``interface`` (a pycapnp interface or a Service class) as coroutines.

        ``codecs`` replaces the generic codec of some methods with hand-written ones, by method
        name: ``(encode, decode)``, either None to keep the generic one. ``encode(params)``
        gets whatever the caller passes as the one positional argument and returns the params
        message as a scatter list; ``decode(message)`` returns what the call returns: a tuple,
        or a body of the generic decoder's (which gets released after a ``start`` callback). For the
        few calls a client makes so often that the generic codec's ~10,000 instructions show."""
        spec = getattr(interface, "rpcfast_spec", None)
        if not isinstance(spec, InterfaceSpec):
            spec = interface_spec(interface)
        if codecs:
            by_name = dict(spec.by_name)
            for name, (encode, decode) in codecs.items():
                method = by_name.get(name)
                if method is None:
                    raise AttributeError(f"{spec.name} has no method {name!r}")
                by_name[name] = attrs.evolve(
                    method,
                    params=CustomCodec.over(method.params, encode=encode),
                    results=CustomCodec.over(method.results, decode=decode),
                )
            methods = tuple(by_name[m.name] for m in spec.methods)
            spec = attrs.evolve(spec, methods=methods, by_name=by_name)
        return Stub(self, spec)

    async def call(
        self,
        spec: InterfaceSpec,
        method: MethodSpec,
        params: Any = None,
        *,
        timeout: float | None = None,
    ) -> Body | None:
        """Call ``method``; ``params`` is None, a mapping of fields, or a params builder."""
        header = _pack_request(spec.service_id, method.ordinal, 0)
        return await self._call(spec, method, header, params, timeout)

    async def _call(
        self,
        spec: InterfaceSpec,
        method: MethodSpec,
        header: bytes,
        params: Any,
        timeout: float | None,
    ) -> Body | None:
        """:meth:`call` with the untraced request header already packed (stubs cache it)."""
        message: list[Buffer]
        if params is None and method.params.empty:
            message = [header]
        else:
            message = [header, *method.params.encode_parts(params)]
        trace = self.trace
        if trace is not None:
            message[0] = _pack_request(spec.service_id, method.ordinal, _FLAG_TRACE)
        if self._closed:
            raise RuntimeError("connection is closed")
        await _checkpoint_if_cancelled()
        if timeout is None:
            timeout = self.timeout
        pending = self._send_and_spin(message, timeout)
        if not pending.done:
            await self._sleep_until_done(pending, timeout)
        if pending.error is not None:
            raise pending.error
        payload = pending.payload
        assert payload is not None
        if len(payload) < _HEADER_SIZE:
            raise short_response(payload)
        status, rflags, code = _unpack_response(payload)
        if not rflags and status == _STATUS_OK:
            if len(payload) == _HEADER_SIZE and method.results.empty:
                return None  # what an empty result struct decodes to, without the call
            return _read(method, payload[_HEADER_SIZE:])
        offset = _HEADER_SIZE
        if rflags & _FLAG_TRACE:
            if len(payload) < offset + _TRACE.size:
                raise short_response(payload)
            stamps = _TRACE.unpack_from(payload, offset)
            offset += _TRACE.size
            if trace is not None:
                trace.add((pending.sent_ns, *stamps, pending.recv_ns))
        if status != _STATUS_OK:
            message_text = bytes(payload[offset:]).decode("utf-8", "replace")
            raise RemoteError(_STATUS.get(status, Status.INTERNAL_ERROR), message_text, code)
        return _read(method, payload[offset:])

    _last_sent_ns = 0
    _last_recv_ns = 0

    def start(
        self,
        spec: InterfaceSpec,
        method: MethodSpec,
        params: Any,
        callback: Callable[[Body | None, Exception | None], None],
    ) -> PendingCall:
        """Start a call without a task: ``callback(result, None)`` or ``callback(None, error)``
        runs inside the dispatcher's poll when it ends. For servers that call other servers on
        their request path (a master replicating to backups) without a task switch. Cancel
        with :meth:`cancel`. The result body is valid only during the callback."""
        plan = self._plans.get(id(method))
        if plan is None:
            header = _pack_request(spec.service_id, method.ordinal, 0)
            plan = self._plans[id(method)] = CallPlan(header, method.params, method.results)
        return self._caller.start(plan, params, callback)

    def cancel(self, pending: PendingCall) -> None:
        """Cancel a call made with :meth:`start`; its callback will not run."""
        if not pending.done:
            pending.callback = None
            self.transport.cancel(pending)

    async def call_raw(self, message: list[Any], *, timeout: float | None = None) -> memoryview:
        """Send one request message (scatter list) and return the raw response message."""
        if self._closed:
            raise RuntimeError("connection is closed")
        await _checkpoint_if_cancelled()
        if timeout is None:
            timeout = self.timeout
        pending = self._send_and_spin(message, timeout)
        if not pending.done:
            await self._sleep_until_done(pending, timeout)
        if self.trace is not None:
            self._last_sent_ns = pending.sent_ns
            self._last_recv_ns = pending.recv_ns
        if pending.error is not None:
            raise pending.error
        payload = pending.payload
        assert payload is not None
        return payload

    def _send_and_spin(self, message: list[Any], timeout: float | None) -> PendingCall:
        """Send, then drive the dispatcher inline for up to ``call_spin`` (no task switch):
        the fast path. The returned call may still be running."""
        pending = PendingCall()
        start = pending.started = _clock()
        tracing = self.trace is not None
        if tracing:
            pending.sent_ns = _now_ns()
        self.transport.call(self.peer, message, pending)
        if not pending.done:
            spin_until = start + self._call_spin
            if timeout is not None and start + timeout < spin_until:
                spin_until = start + timeout
            poll_once = self._poll_once
            while True:
                poll_once()
                if pending.done or _clock() > spin_until:
                    break
        if tracing and pending.done:
            pending.recv_ns = _now_ns()
        return pending

    async def _wait(
        self, pending: PendingCall, plan: CallPlan, timeout: float | None
    ) -> Body | None:
        """The rest of a stub's call that did not finish within the inline spin."""
        if timeout is None:
            timeout = self.timeout
        await self._sleep_until_done(pending, timeout)
        result: Body | None = self._caller.finish(plan, pending)
        return result

    async def _sleep_until_done(self, pending: PendingCall, timeout: float | None) -> None:
        dispatcher = self.dispatcher
        idle = dispatcher.idle
        if idle is not None:
            # no other task can run (the loop itself may sit in a checkpoint: it would only
            # poll): sleep in the kernel and take the response inline, as a blocking socket would
            until = pending.started + timeout if timeout else math.inf
            try:
                while not pending.done and idle.may_block(1 if dispatcher.yielded else 0):
                    if not dispatcher.wait_inline(idle, until):
                        break
            except BaseException:  # (KeyboardInterrupt in the kernel wait): tell the server
                if not pending.done:
                    self.transport.cancel(pending)
                raise
            if pending.done:
                if self.trace is not None:
                    pending.recv_ns = _now_ns()
                return
        event = pending.event = trio.Event()
        pending.waker = self.dispatcher.request_yield
        if timeout:
            deadline = trio.current_time() + (timeout - (_clock() - pending.started))
        else:
            deadline = math.inf
        try:
            with trio.move_on_at(deadline):
                await event.wait()
        except BaseException:  # cancelled from outside: tell the server
            if not pending.done:
                self.transport.cancel(pending)
            raise
        if not pending.done:
            self.transport.cancel(pending)
            raise RpcTimeout(f"no response from {self.address} within {timeout} s")
        if self.trace is not None:
            pending.recv_ns = _now_ns()


class Stub:
    """``await stub.method(**fields, timeout=None)`` for every method of an interface."""

    def __init__(self, connection: Connection, spec: InterfaceSpec) -> None:
        self._connection = connection
        self._spec = spec

    def __getattr__(self, name: str) -> Any:
        method = self._spec.by_name.get(name)
        if method is None:
            raise AttributeError(f"{self._spec.name} has no method {name!r}")
        connection, spec = self._connection, self._spec
        header = _pack_request(spec.service_id, method.ordinal, 0)
        plan = CallPlan(header, method.params, method.results)
        fast = connection._caller.call
        checkpoint_if_cancelled = _checkpoint_if_cancelled
        pending_type = PendingCall
        run_context = _RUN_CONTEXT

        async def call(
            _params: Mapping[str, Any] | None = None,
            /,
            *,
            timeout: float | None = None,
            **fields: Any,
        ) -> Body | None:
            if connection.trace is not None:  # traced calls take the general path
                return await connection._call(spec, method, header, _params or fields, timeout)
            if run_context is None:
                await checkpoint_if_cancelled()
            else:  # checkpoint_if_cancelled, inline (see _run_context)
                task = run_context.task
                runner = task._runner
                if task._cancel_status.effectively_cancelled or (
                    runner.ki_pending and task is runner.main_task
                ):
                    await checkpoint_if_cancelled()
                else:
                    task._cancel_points += 1
            result = fast(plan, _params or fields or None, timeout)
            if type(result) is pending_type:
                return await connection._wait(result, plan, timeout)
            return result  # type: ignore[no-any-return]

        call.__name__ = name
        setattr(self, name, call)
        return call


def connect(
    address: str, *, timeout: float | None = None, trace: TimeTrace | None = None
) -> Connection:
    """A connection to ``address``; usable directly or as ``async with``. Must run inside trio."""
    return Connection(address, timeout=timeout, trace=trace)
