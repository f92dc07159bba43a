"""Answering later without a task: Deferred replies and callback-style calls between servers."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import rpcfast
from rpcfast.testing import EchoService, echo_capnp


class Relay(EchoService):
    """``echo`` forwards to a downstream echo server and answers when that answer arrives."""

    def __init__(self, downstream: str) -> None:
        super().__init__()
        self.conn = rpcfast.connect(downstream)
        self.stub = self.conn.stub(echo_capnp.Echo)

    @rpcfast.fast
    def echo(self, request: Any) -> Any:
        deferred = rpcfast.Deferred()
        data = bytes(request.data)  # the request is released when we return
        spec = self.conn.stub(echo_capnp.Echo)._spec
        method = spec.by_name["fail" if data == b"fail" else "echo"]
        params = {"code": 7, "message": "downstream"} if data == b"fail" else {"data": data * 2}

        def done(result: Any, error: Exception | None) -> None:
            if error is not None:
                deferred.fail(rpcfast.ServiceError(str(error), code=99))
            else:
                deferred.resolve({"data": bytes(result.data)})

        self.conn.start(spec, method, params, done)
        return deferred

    @rpcfast.fast
    def ping(self, request: None) -> Any:
        deferred = rpcfast.Deferred()
        deferred.resolve()  # settled before the handler returns
        return deferred


@pytest.mark.parametrize("scheme", ["udp://127.0.0.1:0", "zmq://127.0.0.1:0", "inproc://relay"])
async def test_deferred_answers_after_a_downstream_callback(scheme: str) -> None:
    downstream_scheme = scheme.replace("relay", "down")
    async with rpcfast.serve([EchoService()], [downstream_scheme]) as down:
        relay = Relay(down.addresses[0])
        async with rpcfast.serve([relay], [scheme]) as server:
            async with rpcfast.connect(server.addresses[0], timeout=5) as conn:
                stub = conn.stub(echo_capnp.Echo)
                reply = await stub.echo(data=b"ab")
                assert reply is not None and bytes(reply.data) == b"abab"
                assert await stub.ping() is None
                with pytest.raises(rpcfast.RemoteError) as info:
                    await stub.echo(data=b"fail")
                assert info.value.code == 99


async def test_many_concurrent_deferred_calls() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as down:
        async with rpcfast.serve([Relay(down.addresses[0])], ["udp://127.0.0.1:0"]) as server:
            async with rpcfast.connect(server.addresses[0], timeout=5) as conn:
                stub = conn.stub(echo_capnp.Echo)
                got: dict[int, bytes] = {}

                async def one(i: int) -> None:
                    reply = await stub.echo(data=bytes([i]))
                    assert reply is not None
                    got[i] = bytes(reply.data)

                async with trio.open_nursery() as nursery:
                    for i in range(100):
                        nursery.start_soon(one, i)
    assert got == {i: bytes([i]) * 2 for i in range(100)}


async def test_cancelled_callback_call_never_calls_back() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as down:
        conn = rpcfast.connect(down.addresses[0])
        spec = conn.stub(echo_capnp.Echo)._spec
        calls: list[object] = []
        pending = conn.start(
            spec, spec.by_name["sleep"], {"seconds": 0.2}, lambda r, e: calls.append(e)
        )
        conn.cancel(pending)
        await trio.sleep(0.4)
        assert calls == []
