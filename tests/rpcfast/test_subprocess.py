"""A real server process on loopback: calls across processes, and a server killed mid-run."""

from __future__ import annotations

import os

import pytest
import trio

import rpcfast
from rpcfast.testing import echo_capnp, spawn_echo_server, stop_echo_server


@pytest.mark.parametrize("listen", ["udp://127.0.0.1:0", "zmq://127.0.0.1:0"])
async def test_calls_to_a_server_process_then_it_dies(listen: str) -> None:
    proc, addresses = spawn_echo_server([listen])
    try:
        async with rpcfast.connect(addresses[0], timeout=5.0) as conn:
            stub = conn.stub(echo_capnp.Echo)
            for size in (0, 100, 70_000, 2_000_000):
                data = os.urandom(size)
                reply = await stub.echo(data=data)
                assert reply is not None and bytes(reply.data) == data
            proc.kill()
            proc.wait()
            with trio.fail_after(10), pytest.raises((rpcfast.PeerDead, rpcfast.RpcTimeout)):
                await stub.ping()
    finally:
        stop_echo_server(proc)
