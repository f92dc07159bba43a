"""End-to-end behaviour of services, servers and clients, on every transport.

The server runs in this process for the in-process transport and for the real sockets (UDP and
ZeroMQ on loopback); ``test_subprocess.py`` covers a server in another process.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio

import rpcfast
from rpcfast import _wire
from rpcfast.testing import EchoService, echo_capnp

SCHEMES = ["inproc://echo-test", "udp://127.0.0.1:0", "zmq://127.0.0.1:0"]


@pytest.fixture(params=SCHEMES, ids=["inproc", "udp", "zmq"])
async def echo_address(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with rpcfast.serve([EchoService()], [request.param], grace=0.2) as server:
        yield server.addresses[0]


async def test_null_rpc_returns_none(echo_address: str) -> None:
    async with rpcfast.connect(echo_address) as conn:
        assert await conn.stub(echo_capnp.Echo).ping() is None


@pytest.mark.parametrize("size", [0, 1, 100, 1000, 65536, 1 << 20])
async def test_echo_returns_same_bytes(echo_address: str, size: int) -> None:
    data = os.urandom(size)
    async with rpcfast.connect(echo_address) as conn:
        reply = await conn.stub(echo_capnp.Echo).echo(data=data)
        assert reply is not None
        assert isinstance(reply.data, memoryview)
        assert bytes(reply.data) == data


async def test_large_response_from_small_request(echo_address: str) -> None:
    async with rpcfast.connect(echo_address) as conn:
        reply = await conn.stub(echo_capnp.Echo).fill(size=3 * 1024 * 1024 + 7)
        assert reply is not None and len(reply.data) == 3 * 1024 * 1024 + 7


async def test_many_outstanding_calls_on_one_connection(echo_address: str) -> None:
    results: dict[int, bytes] = {}
    async with rpcfast.connect(echo_address) as conn:
        stub = conn.stub(echo_capnp.Echo)

        async def one(i: int) -> None:
            reply = await stub.echo(data=i.to_bytes(4, "little") * (i % 50 + 1))
            assert reply is not None
            results[i] = bytes(reply.data)

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert results == {i: i.to_bytes(4, "little") * (i % 50 + 1) for i in range(200)}


async def test_service_error_is_typed_remote_error(echo_address: str) -> None:
    async with rpcfast.connect(echo_address) as conn:
        with pytest.raises(rpcfast.RemoteError) as info:
            await conn.stub(echo_capnp.Echo).fail(code=42, message="nope")
    assert info.value.status is rpcfast.Status.APPLICATION_ERROR
    assert info.value.code == 42 and info.value.message == "nope"


async def test_timeout_raises_and_cancels_the_handler(echo_address: str) -> None:
    service = EchoService()
    async with rpcfast.connect(echo_address) as conn:
        with pytest.raises(rpcfast.RpcTimeout):
            await conn.stub(echo_capnp.Echo).sleep(seconds=5.0, timeout=0.05)
        # the connection still works afterwards
        assert await conn.stub(echo_capnp.Echo).ping() is None
    assert service.pings == 0


async def test_cancel_scope_cancels_call_and_server_learns() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as server:
        async with rpcfast.connect(server.addresses[0]) as conn:
            with trio.move_on_after(0.05) as scope:
                await conn.stub(echo_capnp.Echo).sleep(seconds=5.0)
            assert scope.cancelled_caught
            with trio.fail_after(2):
                while server.stats.aborted == 0:
                    await trio.sleep(0.005)
    assert server.stats.aborted == 1


@pytest.mark.parametrize("inline_check", [True, False])
async def test_a_call_in_a_cancelled_scope_raises_cancelled_and_sends_nothing(
    inline_check: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not inline_check:  # the plain checkpoint_if_cancelled, as with unknown trio internals
        monkeypatch.setattr(rpcfast._client, "_RUN_CONTEXT", None)
    else:
        assert rpcfast._client._RUN_CONTEXT is not None  # this trio has what the check reads
    service = EchoService()
    async with rpcfast.serve([service], ["udp://127.0.0.1:0"]) as server:
        async with rpcfast.connect(server.addresses[0]) as conn:
            stub = conn.stub(echo_capnp.Echo)
            await stub.ping()
            with trio.CancelScope() as scope:
                scope.cancel()
                await stub.ping()
                raise AssertionError("a call in a cancelled scope went on")  # pragma: no cover
            assert scope.cancelled_caught
            assert await stub.ping() is None
    assert service.pings == 2


async def test_unknown_method_is_typed_error(echo_address: str) -> None:
    async with rpcfast.connect(echo_address) as conn:
        spec = conn.stub(echo_capnp.Echo)._spec
        bogus = _wire.REQUEST.pack(spec.service_id, 99, 0)
        payload = await conn.call_raw([bogus])
        status, _flags, _code = _wire.RESPONSE.unpack_from(payload)
        assert status == rpcfast.Status.UNKNOWN_METHOD


async def test_unknown_service_and_garbage_body_are_typed_errors(echo_address: str) -> None:
    async with rpcfast.connect(echo_address) as conn:
        payload = await conn.call_raw([_wire.REQUEST.pack(0xDEAD, 0, 0)])
        assert _wire.RESPONSE.unpack_from(payload)[0] == rpcfast.Status.UNKNOWN_SERVICE
        spec = conn.stub(echo_capnp.Echo)._spec
        garbage = [_wire.REQUEST.pack(spec.service_id, 1, 0), b"\xff" * 24]
        payload = await conn.call_raw(garbage)
        assert _wire.RESPONSE.unpack_from(payload)[0] == rpcfast.Status.MALFORMED_REQUEST
        payload = await conn.call_raw([b"abc"])
        assert _wire.RESPONSE.unpack_from(payload)[0] == rpcfast.Status.MALFORMED_REQUEST
        # and the server is still fine
        assert await conn.stub(echo_capnp.Echo).ping() is None


async def test_dead_peer_raises_peer_dead() -> None:
    # nothing listens on this port: UDP datagrams vanish, ZeroMQ never connects
    for address in ("udp://127.0.0.1:9", "zmq://127.0.0.1:9"):
        async with rpcfast.connect(address) as conn:
            with trio.fail_after(10):
                with pytest.raises(rpcfast.PeerDead):
                    await conn.stub(echo_capnp.Echo).ping()


async def test_time_trace_records_every_leg(echo_address: str) -> None:
    trace = rpcfast.TimeTrace()
    async with rpcfast.connect(echo_address, trace=trace) as conn:
        stub = conn.stub(echo_capnp.Echo)
        for _ in range(5):
            await stub.echo(data=b"x" * 100)
    assert len(trace.records) == 5
    for record in trace.records:
        assert list(record) == sorted(record)
    names = [name for name, _med, _p99 in trace.breakdown()]
    assert names[0] == "client -> server" and names[-1] == "total"


async def test_graceful_shutdown_finishes_running_handlers_and_refuses_new() -> None:
    results: list[object] = []
    async with trio.open_nursery() as nursery:
        async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"], grace=2.0) as server:
            conn = rpcfast.connect(server.addresses[0])
            stub = conn.stub(echo_capnp.Echo)

            async def slow() -> None:
                results.append(await stub.sleep(seconds=0.2))

            nursery.start_soon(slow)
            with trio.fail_after(2):
                while not server._inflight:
                    await trio.sleep(0.005)
            server.router.closing = True  # what leaving the block does first
            with pytest.raises(rpcfast.RemoteError) as info:
                await stub.ping()
            assert info.value.status is rpcfast.Status.SHUTTING_DOWN
    assert results == [None]


async def test_unreadable_responses_raise_malformed_response_traced_or_not() -> None:
    """A UDP "server" that answers every call with an RPC response the caller cannot read."""
    from rpcfast import _session

    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    answers = [b"abc", _wire.RESPONSE.pack(0, 0, 0) + b"\xff" * 24]

    async def respond() -> None:
        n = 0
        while True:
            data, addr = await sock.recvfrom(65536)
            _head, _length, cid, seq, _tail = _session._FAST.unpack_from(data)
            answer = answers[n % len(answers)]
            n += 1
            await sock.sendto(
                _session._pack_whole(_session._RESPONSE_HEAD, cid, seq, 0, answer), addr
            )

    host, port = sock.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(respond)
        for trace in (None, rpcfast.TimeTrace()):
            async with rpcfast.connect(f"udp://{host}:{port}", timeout=5, trace=trace) as conn:
                stub = conn.stub(echo_capnp.Echo)
                for _ in answers:
                    with trio.fail_after(5), pytest.raises(rpcfast.MalformedResponse):
                        await stub.echo(data=b"x")
        nursery.cancel_scope.cancel()
    sock.close()
