"""The UDP transport's client side: one connected socket per server, polled only while needed."""

from __future__ import annotations

import functools
import socket
from typing import Any

import pytest
import trio

import rpcfast
from rpcfast import fast
from rpcfast.testing import EchoService, echo_capnp, spawn_echo_server, stop_echo_server
from rpcfast.transports import UdpTransport, client_transport


async def test_calls_to_each_server_go_over_their_own_connected_socket() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0", "udp://127.0.0.1:0"]) as srv:
        first, second = srv.addresses
        transport, _ = client_transport(srv.dispatcher, first)
        assert isinstance(transport, UdpTransport)
        async with rpcfast.connect(first, timeout=5) as a, rpcfast.connect(second, timeout=5) as b:
            for _ in range(3):
                assert await a.stub(echo_capnp.Echo).ping() is None
                reply = await b.stub(echo_capnp.Echo).echo(data=b"two")
                assert reply is not None and bytes(reply.data) == b"two"
        channels = transport._channels
        assert len(channels) == 2 and not transport._polled  # nothing outstanding: none polled
        ports = {chan.sock.getpeername()[1] for chan in channels.values()}
        assert ports == {int(first.rsplit(":", 1)[1]), int(second.rsplit(":", 1)[1])}
        for chan in channels.values():  # the dispatcher parks on them too
            assert chan.sock.fileno() in transport.filenos()


async def test_past_max_channels_calls_use_the_unconnected_socket() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0", "udp://127.0.0.1:0"]) as srv:
        transport, _ = client_transport(srv.dispatcher, srv.addresses[0])
        assert isinstance(transport, UdpTransport)
        transport.max_channels = 1
        stubs = [rpcfast.connect(a, timeout=5).stub(echo_capnp.Echo) for a in srv.addresses]
        async with trio.open_nursery() as nursery:  # concurrent calls to both servers
            for _ in range(4):
                for stub in stubs:
                    nursery.start_soon(stub.ping)
        assert len(transport._channels) == 1 and transport._main_calls == 0
        assert not transport._polled


async def test_a_server_port_that_refuses_fails_the_call_as_peer_dead() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now: the kernel answers with ICMP port unreachable
    conn = rpcfast.connect(f"udp://127.0.0.1:{port}", timeout=0.5)
    stub = conn.stub(echo_capnp.Echo)
    for _ in range(2):  # the refusal queued on the connected socket must not wedge it
        try:
            await stub.ping()
        except (rpcfast.PeerDead, rpcfast.RpcTimeout):
            pass
        else:
            raise AssertionError("a call to a closed port succeeded")
    transport = conn.transport
    assert isinstance(transport, UdpTransport) and not transport._polled


async def test_a_stray_datagram_on_an_idle_channel_is_drained_not_spun_on() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as srv:
        transport, _ = client_transport(srv.dispatcher, srv.addresses[0])
        assert isinstance(transport, UdpTransport)
        async with rpcfast.connect(srv.addresses[0], timeout=5) as conn:
            assert await conn.stub(echo_capnp.Echo).ping() is None
        (chan,) = transport._channels.values()
        assert not transport._polled  # nobody polls this socket now
        server_transport = srv.transports[0]
        assert isinstance(server_transport, UdpTransport)
        # from the server's port (the channel is connected to it): a late, garbled "reply"
        server_transport.sock.sendto(b"\xffstray", chan.sock.getsockname())
        await trio.sleep(0.01)  # (the call ran inline: let the loop start)
        idle = srv.dispatcher.idle
        assert idle is not None
        with trio.fail_after(5):
            while not transport.n_drained:
                await trio.sleep(0.01)
        blocks = idle.n_blocks
        await trio.sleep(0.2)
        # still readable, every sleep would end at once: thousands of wake-ups in 0.2 s
        assert idle.n_blocks - blocks < 100
        async with rpcfast.connect(srv.addresses[0], timeout=5) as conn:
            assert await conn.stub(echo_capnp.Echo).ping() is None  # the channel still works


async def test_calls_to_a_known_server_go_inline_and_leave_nothing_behind() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as srv:
        transport, _ = client_transport(srv.dispatcher, srv.addresses[0])
        assert isinstance(transport, UdpTransport)
        async with rpcfast.connect(srv.addresses[0], timeout=5) as conn:
            stub = conn.stub(echo_capnp.Echo)
            assert await stub.ping() is None  # the first call opens the channel
            before = transport.n_inline_calls
            for size in (0, 100, 60_000, 300_000):  # responses of one datagram and of many
                reply = await stub.fill(size=size)
                assert reply is not None and bytes(reply.data) == bytes(size)
            with pytest.raises(rpcfast.RemoteError):
                await stub.fail(code=3, message="no")
            assert transport.n_inline_calls - before == 5
        assert not transport._polled and not transport._calls
        assert transport.core.outstanding_calls() == 0 and transport.core.inline_view is None


async def test_inline_calls_outliving_the_spin_become_ordinary_calls() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as srv:
        transport, _ = client_transport(srv.dispatcher, srv.addresses[0])
        assert isinstance(transport, UdpTransport)
        async with rpcfast.connect(srv.addresses[0], timeout=5) as conn:
            stub = conn.stub(echo_capnp.Echo)
            await stub.ping()
            before = transport.n_inline_calls
            async with trio.open_nursery() as nursery:  # slow calls beside fast ones
                for _ in range(3):
                    nursery.start_soon(functools.partial(stub.sleep, seconds=0.02))
                    nursery.start_soon(stub.ping)
            with trio.move_on_after(0.005) as scope:  # cancelled while it waits, adopted
                await stub.sleep(seconds=1.0)
            assert scope.cancelled_caught
            assert transport.n_inline_calls > before
            assert await stub.ping() is None
        assert not transport._polled and not transport._calls
        assert transport.core.outstanding_calls() == 0
        with trio.fail_after(5):  # the server heard of the cancelled call
            while transport.core.stats.calls_cancelled == 0 or srv.dispatcher.poller.active_tasks:
                await trio.sleep(0.01)


async def test_an_inline_call_whose_transport_closes_meanwhile_fails_as_peer_dead() -> None:
    closing: list[UdpTransport] = []

    class ClosingEcho(EchoService):
        @fast
        def ping(self, request: None) -> None:  # runs inside the caller's inline poll
            transport = closing[0]
            transport.close()
            transport.dispatcher.remove_transport(transport)
            transport.dispatcher.client_endpoints.clear()

    async with rpcfast.serve([ClosingEcho()], ["udp://127.0.0.1:0"]) as srv:
        transport, _ = client_transport(srv.dispatcher, srv.addresses[0])
        assert isinstance(transport, UdpTransport)
        async with rpcfast.connect(srv.addresses[0], timeout=5) as conn:
            stub = conn.stub(echo_capnp.Echo)
            await stub.echo(data=b"opens the channel")
            closing.append(transport)
            before = transport.n_inline_calls
            with trio.fail_after(2), pytest.raises(rpcfast.PeerDead):
                await stub.ping()
            assert transport.n_inline_calls == before + 1
        assert not transport._calls and transport.core.inline_view is None


async def test_a_client_with_nothing_else_to_poll_takes_responses_in_c() -> None:
    """A client-only process (its dispatcher polls one transport) polls the call's own socket in
    C right after the send: one-datagram responses end the call before the session core makes
    a record; anything else (fragments, slow handlers, errors) goes on as before."""
    proc, addresses = spawn_echo_server(["udp://127.0.0.1:0"])
    try:
        async with rpcfast.connect(addresses[0], timeout=5.0) as conn:
            stub = conn.stub(echo_capnp.Echo)
            assert await stub.ping() is None  # the first call opens the channel
            transport = conn.transport
            assert isinstance(transport, UdpTransport)
            assert len(conn.dispatcher.poller.polls) == 1
            core = transport.core
            calls, answered = transport.n_inline_calls, transport.n_answered_in_c
            seq = core._next_seq
            done = 0
            # (a response slower than busy_spin takes the poller's loop instead: on a loaded
            # machine it may take more calls, within bounds)
            deadline = trio.current_time() + 5
            while done < 50 or transport.n_answered_in_c - answered < 10:
                data = bytes([done % 256]) * (done % 60 * 30)  # (up to _SMALL: inline)
                reply = await stub.echo(data=data)
                assert reply is not None and bytes(reply.data) == data
                done += 1
                if done == 2000 or trio.current_time() > deadline:
                    break
            assert transport.n_inline_calls - calls == done
            assert transport.n_answered_in_c - answered >= 1
            assert core._next_seq == seq + done and core.outstanding_calls() == 0
            # the first datagram of a fragmented response is handed back to the core
            reply = await stub.fill(size=300_000)
            assert reply is not None and bytes(reply.data) == bytes(300_000)
            with pytest.raises(rpcfast.RemoteError):
                await stub.fail(code=3, message="no")
            assert await stub.sleep(seconds=0.01) is None  # outlives the spin
            with trio.move_on_after(0.005) as scope:  # cancelled while it waits
                await stub.sleep(seconds=1.0)
            assert scope.cancelled_caught
            for _ in range(5):
                assert await stub.ping() is None
            assert core.outstanding_calls() == 0 and core.inline_view is None
            assert not transport._calls and not transport._polled
            stats = core.stats
            assert stats.calls_cancelled == 1 and stats.calls_failed == 0
    finally:
        stop_echo_server(proc)


async def test_a_sharing_client_spins_in_the_poller_loop_not_in_c() -> None:
    """With ``share_cpu`` the C poll (which cannot yield its core) is skipped: calls still go
    inline and are answered through the poller's loop, which hands the core over on idle
    spins."""
    rpcfast.dispatch.current(rpcfast.DispatchConfig(share_cpu=True))
    proc, addresses = spawn_echo_server(["udp://127.0.0.1:0"])
    try:
        async with rpcfast.connect(addresses[0], timeout=5.0) as conn:
            stub = conn.stub(echo_capnp.Echo)
            assert await stub.ping() is None  # the first call opens the channel
            transport = conn.transport
            assert isinstance(transport, UdpTransport)
            assert conn.dispatcher.poller.share_cpu
            calls, answered = transport.n_inline_calls, transport.n_answered_in_c
            for i in range(20):
                reply = await stub.echo(data=b"%d" % i)
                assert reply is not None and bytes(reply.data) == b"%d" % i
            assert transport.n_inline_calls - calls == 20
            assert transport.n_answered_in_c == answered
    finally:
        stop_echo_server(proc)


async def test_requests_reach_a_router_through_its_compiled_target_and_others_by_method() -> None:
    from rpcfast._router import RequestTarget

    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as srv:
        server_transport = srv.transports[0]
        assert isinstance(server_transport, UdpTransport)
        target = server_transport.core.request_sink
        assert isinstance(target, RequestTarget) and target.transport is server_transport
        async with rpcfast.connect(srv.addresses[0], timeout=5) as conn:
            assert await conn.stub(echo_capnp.Echo).echo(data=b"via target") is not None

            class Counting:  # any sink with on_request/on_aborted: its method, bound
                def __init__(self, inner: Any) -> None:
                    self.inner, self.seen = inner, 0

                def on_request(self, transport: Any, token: Any, message: memoryview) -> None:
                    self.seen += 1
                    self.inner.on_request(transport, token, message)

                def on_aborted(self, transport: Any, token: Any) -> None:
                    self.inner.on_aborted(transport, token)

            counting = Counting(server_transport.sink)
            server_transport.sink = counting
            reply = await conn.stub(echo_capnp.Echo).echo(data=b"via method")
            assert reply is not None and bytes(reply.data) == b"via method"
            assert counting.seen == 1
