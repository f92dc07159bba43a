"""The client's compiled call path: results, remote errors, and calls that outlive the spin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from rpcfast import _wire
from rpcfast._errors import PeerDead, RemoteError, Status
from rpcfast._fastcall import Caller, CallPlan
from rpcfast._pending import PendingCall
from rpcfast._schema import interface_spec
from rpcfast.dispatch import DispatchConfig
from rpcfast.dispatch._poller import Poller
from rpcfast.testing import echo_capnp

SPEC = interface_spec(echo_capnp.Echo)
PING, ECHO = SPEC.by_name["ping"], SPEC.by_name["echo"]


class ScriptedTransport:
    """Answers each call with the next scripted response (None: never answers)."""

    def __init__(self, responses: Sequence[bytes | Exception | None]) -> None:
        self.responses = list(responses)
        self.sent: list[tuple[str, bytes]] = []

    def call(self, peer: str, message: Sequence[Any], pending: PendingCall) -> None:
        self.sent.append((peer, b"".join(bytes(part) for part in message)))
        answer = self.responses.pop(0)
        if isinstance(answer, Exception):
            pending.fail(answer)  # type: ignore[arg-type]
        elif answer is not None:
            pending.complete(memoryview(answer))


def plan(method: Any) -> CallPlan:
    return CallPlan(
        _wire.REQUEST.pack(SPEC.service_id, method.ordinal, 0), method.params, method.results
    )


def caller(transport: ScriptedTransport, timeout: float | None = None) -> Caller:
    return Caller(transport, "peer:1", Poller(DispatchConfig()), 0.0, timeout)


def ok(body: bytes = b"") -> bytes:
    return _wire.RESPONSE.pack(Status.OK, 0, 0) + body


def test_null_call_sends_the_bare_header_and_returns_none() -> None:
    transport = ScriptedTransport([ok()])
    assert caller(transport).call(plan(PING), None, None) is None
    assert transport.sent == [("peer:1", _wire.REQUEST.pack(SPEC.service_id, PING.ordinal, 0))]


def test_result_is_decoded_and_params_are_encoded() -> None:
    body = b"".join(ECHO.results.encode_parts({"data": b"back"}))
    transport = ScriptedTransport([ok(body)])
    result = caller(transport).call(plan(ECHO), {"data": b"out"}, None)
    assert bytes(result.data) == b"back"
    sent = ECHO.params.decode(memoryview(transport.sent[0][1])[_wire.HEADER_SIZE :])
    assert sent is not None and bytes(sent.data) == b"out"


def test_remote_and_transport_errors_are_raised() -> None:
    error = _wire.RESPONSE.pack(Status.APPLICATION_ERROR, 0, 9) + b"nope"
    transport = ScriptedTransport([error, PeerDead("gone")])
    c = caller(transport)
    with pytest.raises(RemoteError) as info:
        c.call(plan(PING), None, None)
    assert (info.value.status, info.value.code) == (Status.APPLICATION_ERROR, 9)
    with pytest.raises(PeerDead):
        c.call(plan(PING), None, None)


def test_a_call_still_running_after_the_spin_comes_back_pending_then_finishes() -> None:
    transport = ScriptedTransport([None])
    c = caller(transport, timeout=5.0)
    pending = c.call(plan(PING), None, None)
    assert type(pending) is PendingCall and not pending.done and pending.started > 0
    pending.complete(memoryview(ok()))
    assert c.finish(plan(PING), pending) is None


def test_closed_caller_refuses() -> None:
    c = caller(ScriptedTransport([]))
    c.closed = True
    with pytest.raises(RuntimeError):
        c.call(plan(PING), None, None)


def test_callback_calls_report_results_and_errors_to_their_callback() -> None:
    body = b"".join(ECHO.results.encode_parts({"data": b"cb"}))
    error = _wire.RESPONSE.pack(Status.APPLICATION_ERROR, 0, 5) + b"bad"
    transport = ScriptedTransport([ok(body), error, PeerDead("gone"), None])
    c = caller(transport)
    seen: list[tuple[Any, Any]] = []

    def callback(result: Any, exc: Exception | None) -> None:
        seen.append((None if result is None else bytes(result.data), exc))

    for _ in range(3):
        assert c.start(plan(ECHO), {"data": b"in"}, callback).done
    running = c.start(plan(ECHO), {"data": b"in"}, callback)
    assert not running.done and len(seen) == 3
    assert seen[0] == (b"cb", None)
    assert isinstance(seen[1][1], RemoteError) and seen[1][1].code == 5
    assert isinstance(seen[2][1], PeerDead)


GARBLED = [
    b"abc",  # shorter than the RPC header
    ok(b"\xff" * 24),  # a segment table asking for 2**32 segments
    ok(b"\x00\x00\x00\x00\x02\x00\x00\x00" + b"\xfd\xff\xff\xff\x00\x00\x01\x00" + bytes(8)),
]


@pytest.mark.parametrize("response", GARBLED)
def test_unreadable_responses_raise_malformed_response(response: bytes) -> None:
    """A response the caller cannot read is a typed RpcError, on every path that reads one."""
    from rpcfast import MalformedResponse, RpcError

    assert issubclass(MalformedResponse, RpcError)
    transport = ScriptedTransport([response, response, None])
    c = caller(transport, timeout=5.0)
    with pytest.raises(MalformedResponse):
        c.call(plan(ECHO), {"data": b"x"}, None)
    seen: list[Exception | None] = []
    assert c.start(plan(ECHO), {"data": b"x"}, lambda _r, exc: seen.append(exc)).done
    assert len(seen) == 1 and isinstance(seen[0], MalformedResponse)
    pending = c.call(plan(ECHO), {"data": b"x"}, None)  # one that finishes after the spin
    assert type(pending) is PendingCall
    pending.complete(memoryview(response))
    with pytest.raises(MalformedResponse):
        c.finish(plan(ECHO), pending)
