"""The client's synchronous call path: send, drive the dispatcher inline, parse the response.

Compiled with mypyc (``rpcfast._compiled``). A stub method (``rpcfast._client.Stub``) is a
thin coroutine around :meth:`Caller.call`: when the response arrives within the inline spin
(the common case for a nearby server), the whole round trip on the client runs here and in
the transport without entering the interpreter, apart from the codec and the coroutine itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

import capnp  # type: ignore[import-untyped,unused-ignore]

from rpcfast import _wire
from rpcfast._capnp_fast import NeedsFallback, Unsupported
from rpcfast._errors import MalformedResponse, RemoteError, Status
from rpcfast._pending import PendingCall
from rpcfast.dispatch._poller import Poller
from rpcfast.transports._udp import UdpTransport

_clock: Final = time.perf_counter
_HEADER_SIZE: Final = _wire.HEADER_SIZE
_FLAG_TRACE: Final = _wire.FLAG_TRACE
_TRACE_SIZE: Final = _wire.TRACE.size
_STATUS_OK: Final = int(Status.OK)
_unpack_response: Final = _wire.header.unpack_response
_STATUS: Final = {int(s): s for s in Status}
_MALFORMED: Final = (capnp.KjException, _wire.MalformedMessage)
_C_POLL_MAX: Final = 0.001
"""Longest poll in C (``SockOps.call_whole``): it holds the GIL and runs no signal handlers."""


class CallPlan:
    """One stub method's constants: its packed request header and its codecs' entry points."""

    def __init__(self, header: bytes, params: Any, results: Any) -> None:
        self.header = header
        self.params_empty: bool = bool(params.empty)
        # a CustomCodec's hand-written functions are called directly (no wrapper frame)
        self.encode_parts: Callable[[Any], list[Any]] = (
            getattr(params, "custom_encode", None) or params.encode_parts
        )
        self.results_empty: bool = bool(results.empty)
        self.decode: Callable[[memoryview], Any] = (
            getattr(results, "custom_decode", None) or results.decode
        )
        # the generated encoder and decoder, called without the codec's wrapper
        self.fast_encode: Callable[[Any], list[Any]] | None = fast_entry(
            params, "custom_encode", "encode"
        )
        self.fast_decode: Callable[[memoryview], Any] | None = fast_entry(
            results, "custom_decode", "decode"
        )


def encode_with(
    fast_encode: Callable[[Any], list[Any]] | None,
    encode_parts: Callable[[Any], list[Any]],
    value: Any,
) -> list[Any]:
    """``encode_parts(value)``, calling the struct's generated encoder directly for the usual
    value (a non-empty dict of fields), and a hand-written result's ``rpcfast_message()``
    directly too: the codec's wrapper is a Python frame of its own."""
    cls = value.__class__
    if cls is dict:
        if fast_encode is not None and value:
            try:
                return fast_encode(value)
            except Unsupported:
                pass  # the wrapper knows what to do (pycapnp, or its error)
    elif fast_encode is not None and value is not None:  # (not for hand-written encoders)
        message = getattr(value, "rpcfast_message", None)
        if message is not None:
            parts: list[Any] = message()
            return parts
    return encode_parts(value)


def decode_with(
    fast_decode: Callable[[memoryview], Any] | None,
    decode: Callable[[memoryview], Any],
    body: memoryview,
) -> Any:
    """``decode(body)``, calling the struct's generated decoder directly when there is one
    (it raises MalformedMessage for garbage, as the wrapper does)."""
    if fast_decode is not None and len(body) != 0:
        try:
            return fast_decode(body)
        except NeedsFallback:
            pass  # several segments, far pointers: pycapnp reads it
    return decode(body)


def fast_entry(codec: Any, custom: str, name: str) -> Any:
    """The generated ``encode``/``decode`` of a codec without hand-written functions, if any."""
    if getattr(codec, custom, None) is not None:
        return None
    fast = getattr(codec, "fast", None)
    return None if fast is None else getattr(fast, name)


def short_response(payload: memoryview) -> MalformedResponse:
    return MalformedResponse(f"response of {len(payload)} bytes is shorter than its header")


def read_results(plan: CallPlan, body: memoryview) -> Any:
    """The results in a response body; an undecodable one raises MalformedResponse."""
    try:
        return decode_with(plan.fast_decode, plan.decode, body)
    except _MALFORMED as exc:
        raise MalformedResponse(f"undecodable results: {exc}") from exc


def remote_error(payload: memoryview, status: int, offset: int, code: int) -> RemoteError:
    message = bytes(payload[offset:]).decode("utf-8", "replace")
    return RemoteError(_STATUS.get(status, Status.INTERNAL_ERROR), message, code)


class Completion:
    """The end of a callback-style call (:meth:`Caller.start`): decode the result, hand it
    to the callback, release it."""

    def __init__(self, plan: CallPlan, callback: Callable[[Any, Exception | None], None]) -> None:
        self.plan = plan
        self.callback = callback

    def __call__(self, call: PendingCall) -> None:
        error = call.error
        if error is not None:
            self.callback(None, error)
            return
        payload = call.payload
        assert payload is not None
        if len(payload) < _HEADER_SIZE:
            self.callback(None, short_response(payload))
            return
        status, _, code = _unpack_response(payload)
        if status != _STATUS_OK:
            self.callback(None, remote_error(payload, status, _HEADER_SIZE, code))
            return
        try:
            result = read_results(self.plan, payload[_HEADER_SIZE:])
        except MalformedResponse as exc:
            self.callback(None, exc)
            return
        try:
            self.callback(result, None)
        finally:
            if result is not None and type(result) is not tuple:  # (custom decoders' tuples)
                result._release()


class Caller:
    """A connection's untraced call path (``rpcfast._client.Connection`` owns one)."""

    def __init__(
        self,
        transport: Any,
        peer: str,
        poller: Poller,
        call_spin: float,
        timeout: float | None,
    ) -> None:
        self.transport = transport
        self.peer = peer
        self.poller = poller
        self.call_spin = call_spin
        self.timeout = timeout
        self.closed = False
        # UDP calls go inline (UdpTransport.call_inline): no per-call PendingCall or delivery
        self.udp: UdpTransport | None = transport if isinstance(transport, UdpTransport) else None

    def call(self, plan: CallPlan, params: Any, timeout: float | None) -> Any:
        """Encode, send and spin for up to ``call_spin``. Returns the decoded result (None for
        an empty one) when the response came, or raises its error; returns the
        :class:`PendingCall` itself when the call is still running (the caller sleeps on it,
        then calls :meth:`finish`)."""
        if params is None and plan.params_empty:
            message: list[Any] = [plan.header]
        else:
            message = [plan.header, *encode_with(plan.fast_encode, plan.encode_parts, params)]
        if self.closed:
            raise RuntimeError("connection is closed")
        if timeout is None:
            timeout = self.timeout
        start = _clock()
        spin_until = start + self.call_spin
        if timeout is not None and start + timeout < spin_until:
            spin_until = start + timeout
        poller = self.poller
        udp = self.udp
        if udp is not None:
            # with nothing else to poll, the call's socket is polled in C first, for up to
            # busy_spin (at most 1 ms; the rest of the spin, if any, takes the poller's loop,
            # which parks on an oversubscribed machine and runs timers)
            c_until = 0.0
            transports = poller.transports
            if len(transports) == 1 and transports[0] is udp and not poller.share_cpu:
                c_until = start + min(poller.busy_spin, _C_POLL_MAX)
                if c_until > spin_until:
                    c_until = spin_until
            if udp.call_inline(self.peer, message, start, c_until):
                return self.spin_inline(udp, plan, start, spin_until, c_until)
        pending = PendingCall()
        pending.started = start
        self.transport.call(self.peer, message, pending)
        if not pending.done:
            while True:
                poller.poll_once()
                if pending.done or _clock() > spin_until:
                    break
            if not pending.done:
                return pending
        return self.finish(plan, pending)

    def spin_inline(
        self, udp: UdpTransport, plan: CallPlan, start: float, spin_until: float, c_until: float
    ) -> Any:
        """:meth:`call`'s spin for an inline UDP call (``UdpTransport.call_inline``), which has
        polled its socket until ``c_until`` already (0: not at all)."""
        core = udp.core
        poller = self.poller
        if core.inline_view is None and c_until and poller.idle_since > start:
            # the polls in C were an idle run: an oversubscribed machine parks sooner
            poller.idle_since = start
        try:
            while core.inline_view is None and core.inline_error is None:
                if _clock() > spin_until:
                    break
                poller.poll_once()
        except BaseException:
            udp.end_inline(None)  # cancelled
            raise
        view = core.inline_view
        if view is not None:
            udp.end_inline(None)
            return self.decode(plan, view)
        pending = PendingCall()
        pending.started = start
        udp.end_inline(pending)
        if pending.done:
            return self.finish(plan, pending)
        return pending

    def start(
        self, plan: CallPlan, params: Any, callback: Callable[[Any, Exception | None], None]
    ) -> PendingCall:
        """Send a call whose end runs ``callback`` inside the dispatcher's poll."""
        if self.closed:
            raise RuntimeError("connection is closed")
        if params is None and plan.params_empty:
            message: list[Any] = [plan.header]
        else:
            message = [plan.header, *encode_with(plan.fast_encode, plan.encode_parts, params)]
        pending = PendingCall()
        pending.callback = Completion(plan, callback)
        self.transport.call(self.peer, message, pending)
        return pending

    def finish(self, plan: CallPlan, pending: PendingCall) -> Any:
        """The result of a finished call (or raise its error)."""
        error = pending.error
        if error is not None:
            raise error
        payload = pending.payload
        assert payload is not None
        return self.decode(plan, payload)

    def decode(self, plan: CallPlan, payload: memoryview) -> Any:
        """The result in a response (or raise its error)."""
        if len(payload) < _HEADER_SIZE:
            raise short_response(payload)
        status, rflags, code = _unpack_response(payload)
        if not rflags and status == _STATUS_OK:
            if len(payload) == _HEADER_SIZE and plan.results_empty:
                return None  # what an empty result struct decodes to, without the call
            return read_results(plan, payload[_HEADER_SIZE:])
        offset = _HEADER_SIZE
        if rflags & _FLAG_TRACE:  # (a traced reply to an untraced call: skip the stamps)
            offset += _TRACE_SIZE
        if status != _STATUS_OK:
            raise remote_error(payload, status, offset, code)
        return read_results(plan, payload[offset:])
