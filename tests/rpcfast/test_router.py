"""The server's compiled request path: routing, typed error replies, counters, Deferred."""

from __future__ import annotations

from typing import Any

from rpcfast import _wire
from rpcfast._errors import ServiceError, Status
from rpcfast._router import Deferred, Router, handler_entry
from rpcfast._schema import interface_spec
from rpcfast.testing import echo_capnp

SPEC = interface_spec(echo_capnp.Echo)
PING, ECHO = SPEC.by_name["ping"], SPEC.by_name["echo"]


class FakeTransport:
    def __init__(self) -> None:
        self.replies: list[tuple[Any, bytes]] = []

    def reply(self, token: Any, message: Any) -> None:
        self.replies.append((token, b"".join(bytes(part) for part in message)))

    def status(self, index: int = -1) -> tuple[int, int, bytes]:
        raw = self.replies[index][1]
        status, _flags, code = _wire.RESPONSE.unpack_from(raw)
        return status, code, raw[_wire.HEADER_SIZE :]


def request(method: Any, body: bytes = b"", service: int = SPEC.service_id) -> memoryview:
    return memoryview(_wire.REQUEST.pack(service, method.ordinal, 0) + body)


def make_router(
    ping: Any = lambda _r: None, echo: Any = lambda r: {"data": r.data}, fast: bool = True
) -> tuple[Router, list[tuple[Any, ...]]]:
    spawned: list[tuple[Any, ...]] = []
    table = {
        SPEC.service_id: [
            handler_entry(method, fn, fast)
            for method, fn in zip(
                SPEC.methods,
                [ping, echo, lambda r: None, lambda r: None, lambda r: None],
                strict=True,
            )
        ]
    }
    return Router(table, lambda *args: spawned.append(args)), spawned


def test_null_request_is_answered_ok_inline_and_counted() -> None:
    router, _ = make_router()
    transport = FakeTransport()
    router.on_request(transport, "t1", request(PING))
    assert transport.replies[0][0] == "t1" and transport.status() == (Status.OK, 0, b"")
    assert (router.requests, router.fast_requests, router.task_requests) == (1, 1, 0)


def test_fast_handler_gets_the_decoded_body_and_its_result_is_encoded() -> None:
    router, _ = make_router()
    transport = FakeTransport()
    body = b"".join(ECHO.params.encode_parts({"data": b"hello"}))
    router.on_request(transport, 7, request(ECHO, body))
    status, _code, payload = transport.status()
    assert status == Status.OK
    decoded = ECHO.results.decode(memoryview(payload))
    assert decoded is not None and bytes(decoded.data) == b"hello"


def test_bad_requests_get_typed_errors_and_counts() -> None:
    router, _ = make_router()
    transport = FakeTransport()
    router.on_request(transport, 1, memoryview(b"\x01\x02"))
    router.on_request(transport, 2, request(PING, service=SPEC.service_id ^ 1))
    router.on_request(transport, 3, memoryview(_wire.REQUEST.pack(SPEC.service_id, 99, 0)))
    router.on_request(transport, 4, request(ECHO, b"\xff" * 5))  # garbage capnp body
    statuses = [transport.status(i)[0] for i in range(4)]
    assert statuses == [
        Status.MALFORMED_REQUEST,
        Status.UNKNOWN_SERVICE,
        Status.UNKNOWN_METHOD,
        Status.MALFORMED_REQUEST,
    ]
    assert (router.malformed, router.unknown, router.errors) == (2, 2, 1)


def test_service_errors_keep_their_code_and_crashes_become_internal_errors() -> None:
    def refuse(_r: Any) -> None:
        raise ServiceError("no", code=42)

    def crash(_r: Any) -> None:
        raise ZeroDivisionError("boom")

    transport = FakeTransport()
    make_router(ping=refuse)[0].on_request(transport, 1, request(PING))
    make_router(ping=crash)[0].on_request(transport, 2, request(PING))
    assert transport.status(0) == (Status.APPLICATION_ERROR, 42, b"no")
    status, _code, message = transport.status(1)
    assert status == Status.INTERNAL_ERROR and b"ZeroDivisionError" in message


def test_closing_router_refuses_and_task_handlers_are_spawned_with_their_body() -> None:
    router, spawned = make_router(fast=False)
    transport = FakeTransport()
    body = b"".join(ECHO.params.encode_parts({"data": b"x"}))
    router.on_request(transport, "tok", request(ECHO, body))
    assert transport.replies == [] and router.task_requests == 1
    (t, token, method, _fn, got, flags, recv_ns) = spawned[0]
    assert (t, token, method, bytes(got), flags, recv_ns) == (transport, "tok", ECHO, body, 0, 0)
    router.closing = True
    router.on_request(transport, "late", request(PING))
    assert transport.status() == (Status.SHUTTING_DOWN, 0, b"server is stopping")
    assert router.refused == 1 and len(spawned) == 1


def test_deferred_answers_after_the_handler_returns_or_before_it_is_bound() -> None:
    pending: list[Deferred] = []

    def later(_r: Any) -> Deferred:
        deferred = Deferred()
        pending.append(deferred)
        return deferred

    def at_once(_r: Any) -> Deferred:
        deferred = Deferred()
        deferred.fail(ServiceError("early", code=3))
        return deferred

    transport = FakeTransport()
    make_router(ping=later)[0].on_request(transport, 1, request(PING))
    assert transport.replies == []
    pending[0].resolve(None)
    pending[0].resolve(None)  # a second answer is ignored
    make_router(ping=at_once)[0].on_request(transport, 2, request(PING))
    assert [token for token, _ in transport.replies] == [1, 2]
    assert transport.status(0)[0] == Status.OK
    assert transport.status(1) == (Status.APPLICATION_ERROR, 3, b"early")


def test_aborts_reach_the_hook() -> None:
    router, _ = make_router()
    seen: list[tuple[Any, Any]] = []
    router.on_aborted("transport", 1)  # no hook yet: ignored
    router.aborted_hook = lambda transport, token: seen.append((transport, token))
    router.on_aborted("transport", 2)
    assert seen == [("transport", 2)]
