"""The UDP transport's socket calls: the C extension and its pure-Python equivalent, side by side
with the socket module (empty and full sockets as return values, addresses as the socket module
gives them, errors as OSError)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpcfast import _compiled
from rpcfast.transports import _sockops_py

try:
    from rpcfast.transports import _sockops
except ImportError:  # a pure-Python install
    _sockops = None  # type: ignore[assignment]

IMPLS = [
    pytest.param(_sockops_py.SockOps, id="python"),
    pytest.param(
        getattr(_sockops, "SockOps", None),
        id="c",
        marks=pytest.mark.skipif(_sockops is None, reason="C extension not built"),
    ),
]


def udp(host: str = "127.0.0.1", family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = udp(), udp()
    yield a, b
    a.close()
    b.close()


def wait_readable(sock: socket.socket) -> None:
    import select

    assert select.select([sock], [], [], 5)[0], "nothing arrived"


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_socket_gives_none_and_data_round_trips(impl: Any, pair: Any) -> None:
    a, b = pair
    ops_a, ops_b = impl(a), impl(b)
    assert ops_a.fd == a.fileno() and ops_a.sock is a
    assert ops_a.recv(65536) is None and ops_a.recvfrom(65536) is None
    assert ops_a.sendto(b"hello", b.getsockname()) is True
    wait_readable(b)
    data, addr = ops_b.recvfrom(65536)
    assert data == b"hello" and addr == a.getsockname()
    assert ops_b.recvfrom(65536) is None
    b.connect(a.getsockname())
    for payload in (b"", bytearray(b"x" * 1000), memoryview(b"view")):
        assert ops_b.send(payload) is True
        wait_readable(a)
        assert ops_a.recv(65536) == bytes(payload)
    ops_b.send(b"0123456789")
    wait_readable(a)
    assert ops_a.recv(4) == b"0123"  # a datagram longer than asked for is truncated, like recv
    assert ops_a.recv(65536) is None


@pytest.mark.parametrize("impl", IMPLS)
def test_replies_to_the_address_a_datagram_came_from(impl: Any, pair: Any) -> None:
    server, client = pair
    ops = impl(server)
    others = [udp() for _ in range(300)]  # more senders than the C address cache has slots
    try:
        for rounds in range(2):
            for sock in [client, *others]:
                sock.sendto(b"q%d" % rounds, server.getsockname())
                wait_readable(server)
                data, addr = ops.recvfrom(100)
                assert addr == sock.getsockname()
                assert ops.sendto(data.upper(), addr)
                wait_readable(sock)
                assert sock.recv(100) == b"Q%d" % rounds
    finally:
        for sock in others:
            sock.close()


def test_c_recvfrom_returns_one_tuple_per_sender_and_sendto_trusts_it(pair: Any) -> None:
    if _sockops is None:
        pytest.skip("C extension not built")
    server, client = pair
    ops = _sockops.SockOps(server)
    addrs = []
    for _ in range(3):
        client.sendto(b"x", server.getsockname())
        wait_readable(server)
        got = ops.recvfrom(10)
        assert got is not None
        addrs.append(got[1])
    assert addrs[0] is addrs[1] is addrs[2]  # cached: compared by identity downstream


@pytest.mark.parametrize("impl", IMPLS)
def test_errors_are_raised_as_oserror(impl: Any, pair: Any) -> None:
    a, b = pair
    port = b.getsockname()[1]
    b.close()  # nothing listens there now: the kernel queues ECONNREFUSED on a connected socket
    a.connect(("127.0.0.1", port))
    ops = impl(a)
    ops.send(b"anyone?")
    with pytest.raises(ConnectionRefusedError):
        for _ in range(1000):
            ops.recv(100)
    a.close()
    with pytest.raises(OSError):
        ops.recv(100)
    with pytest.raises(OSError):
        ops.send(b"closed")


def test_c_sendto_rejects_malformed_addresses(pair: Any) -> None:
    if _sockops is None:
        pytest.skip("C extension not built")
    ops = _sockops.SockOps(pair[0])
    for bad, error in [
        ("127.0.0.1", TypeError),
        (("127.0.0.1",), TypeError),
        ((1, 2), TypeError),
        (("127.0.0.1", 70000), OverflowError),
        (("localhost", 9), ValueError),  # numeric hosts only: the transport resolves names
        (("::zz", 9), ValueError),
    ]:
        with pytest.raises(error):
            ops.sendto(b"x", bad)
    with pytest.raises(ValueError):
        ops.recv(0)


@settings(max_examples=40, deadline=None)
@given(octets=st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(1, 254)))
def test_c_formats_sender_addresses_as_the_socket_module_does(octets: tuple[int, ...]) -> None:
    if _sockops is None:
        pytest.skip("C extension not built")
    host = "127.{}.{}.{}".format(*octets)  # all of 127/8 is loopback: every digit count per octet
    receiver, sender = udp(), udp(host)
    try:
        sender.sendto(b"x", receiver.getsockname())
        wait_readable(receiver)
        got = _sockops.SockOps(receiver).recvfrom(10)
        assert got is not None and got[1] == (host, sender.getsockname()[1])
        assert _sockops.SockOps(receiver).sendto(b"back", got[1])
        wait_readable(sender)
        assert sender.recv(10) == b"back"
    finally:
        receiver.close()
        sender.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_ipv6_addresses_match_the_socket_module(impl: Any) -> None:
    try:
        receiver, sender = udp("::1", socket.AF_INET6), udp("::1", socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        ops = impl(receiver)
        assert impl(sender).sendto(b"six", receiver.getsockname()[:2])  # (host, port) is enough
        wait_readable(receiver)
        got = ops.recvfrom(10)
        assert got is not None and got[1] == sender.getsockname()
        assert ops.sendto(b"back", got[1])
        wait_readable(sender)
        assert sender.recv(10) == b"back"
    finally:
        receiver.close()
        sender.close()


def test_compiled_builds_include_the_c_module() -> None:
    if not _compiled.hot_path_compiled():
        pytest.skip("pure-Python install")
    assert _sockops is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_closed_ops_never_reach_a_reused_descriptor(impl: Any, pair: Any) -> None:
    a, b = pair
    ops = impl(a)
    ops.close()
    a.close()
    reuse = udp()  # likely gets a's old descriptor number
    try:
        b.sendto(b"not yours", reuse.getsockname())
        wait_readable(reuse)
        with pytest.raises(OSError):
            ops.recv(10)
        with pytest.raises(OSError):
            ops.recvfrom(10)
        with pytest.raises(OSError):
            ops.send(b"x")
        with pytest.raises(OSError):
            ops.sendto(b"x", b.getsockname())
        assert reuse.recv(10) == b"not yours"
    finally:
        reuse.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_runs_of_large_and_small_datagrams_arrive_whole(impl: Any, pair: Any) -> None:
    a, b = pair
    ops = impl(a)
    sizes = [10, 60_000, 60_000, 10, 5000, 4096, 4097, 3, 65_000, 1]
    for i, size in enumerate(sizes):
        payload = bytes([i]) * size
        b.sendto(payload, a.getsockname())
        wait_readable(a)
        size_arg = 100_000 if i % 3 == 2 else 65536  # (over the C scratch buffer: allocated)
        got = ops.recvfrom(size_arg) if i % 2 else ops.recv(size_arg)
        data = got[0] if isinstance(got, tuple) else got
        assert data == payload
    assert ops.recv(65536) is None


def _request(cid: int, seq: int, payload: bytes) -> bytes:
    from rpcfast import _session

    return _session._FAST.pack(_session._REQUEST_HEAD, len(payload), cid, seq, 0) + payload


def _response(cid: int, seq: int, payload: bytes, tail: int = 0) -> bytes:
    from rpcfast import _session

    return _session._FAST.pack(_session._RESPONSE_HEAD, len(payload), cid, seq, tail) + payload


def test_call_whole_knows_the_session_cores_wire_format() -> None:
    from rpcfast import _session

    mods = [_sockops_py] + ([_sockops] if _sockops is not None else [])
    for mod in mods:
        assert mod.HEADER_SIZE == _session.HEADER_SIZE
        assert mod.RESPONSE_HEAD == _session._RESPONSE_HEAD


@pytest.mark.parametrize("impl", IMPLS)
def test_call_whole_returns_the_payload_of_its_own_response(impl: Any, pair: Any) -> None:
    import time

    client, server = pair
    client.connect(server.getsockname())
    ops = impl(client)
    request = _request(7, 42, b"ping")
    # (queued before the call: call_whole keeps the GIL, so no thread of ours could answer)
    server.sendto(_response(7, 42, b"pong" * 100), client.getsockname())
    wait_readable(client)
    assert ops.call_whole(request, time.perf_counter() + 5.0) == b"pong" * 100
    assert server.recv(65536) == request
    # anything else that comes first is handed back whole, for the session core
    others = [
        _response(7, 41, b"late"),  # an earlier call's
        _response(8, 42, b"x"),  # another client id
        _response(7, 42, b"x", tail=1 << 48),  # not a plain first transmission
        _response(7, 42, b"xy")[:-1],  # length disagrees with the datagram
        b"short",
        _request(7, 42, b"x"),  # not a response
    ]
    for other in others:
        server.sendto(other, client.getsockname())
        wait_readable(client)
        assert ops.call_whole(request, time.perf_counter() + 5.0) == (other,)
        assert server.recv(65536) == request
    # nothing in time
    start = time.perf_counter()
    assert ops.call_whole(request, start + 0.01) is None
    assert time.perf_counter() - start >= 0.01
    assert server.recv(65536) == request


@pytest.mark.parametrize("impl", IMPLS)
def test_call_whole_polls_until_the_response_comes(impl: Any, pair: Any) -> None:
    """A server in another process answers after a delay, while call_whole polls."""
    import subprocess
    import sys
    import time

    client, server = pair
    server_addr = server.getsockname()
    server.close()
    answer = _response(3, 9, b"late but in time").hex()
    code = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"s.bind({server_addr!r})\n"
        "print('ready', flush=True)\n"
        "data, addr = s.recvfrom(65536)\n"
        "time.sleep(0.05)\n"
        f"s.sendto(bytes.fromhex({answer!r}), addr)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        client.connect(server_addr)
        start = time.perf_counter()
        got = impl(client).call_whole(_request(3, 9, b"?"), start + 10.0)
        assert got == b"late but in time"
        assert time.perf_counter() - start >= 0.05
    finally:
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_call_whole_reports_a_full_buffer_and_errors(impl: Any, pair: Any) -> None:
    import time

    client, server = pair
    client.connect(server.getsockname())
    ops = impl(client)
    with pytest.raises(ValueError):
        ops.call_whole(b"too short", time.perf_counter())
    # a full socket buffer: a local datagram socket pair blocks its sender (loopback UDP drops)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        a.setblocking(False)
        unix_ops = impl(a)
        full = False
        for _ in range(10000):
            got = unix_ops.call_whole(_request(1, 1, bytes(4000)), 0.0)
            if got is False:
                full = True
                break
            assert got is None
        assert full, "the socket buffer never filled"
    finally:
        a.close()
        b.close()
    server.close()  # the peer's port is closed: ECONNREFUSED shows up on a receive or a send
    for _ in range(3):
        try:
            got = ops.call_whole(_request(1, 2, b""), time.perf_counter() + 0.01)
        except OSError:
            continue
        assert got is None or got is False
    ops.close()
    with pytest.raises(OSError):
        ops.call_whole(_request(1, 3, b""), time.perf_counter())


@pytest.mark.parametrize("impl", IMPLS)
def test_send_now_counts_send_errors_instead_of_raising(impl: Any, pair: Any) -> None:
    a, b = pair
    ops = impl(a)
    assert ops.errors == 0
    assert ops.send_now(b.getsockname(), b"hello") is True  # (address, data): the core's order
    wait_readable(b)
    assert b.recv(100) == b"hello"
    assert ops.send_now(b.getsockname(), bytes(70_000)) is True  # EMSGSIZE: over a datagram
    assert ops.errors == 1
    closed = b.getsockname()
    with pytest.raises((TypeError, ValueError)):  # a bad address is a bug, not a lost datagram
        ops.send_now("not an address", b"x")
    ops.close()
    before = ops.errors
    assert ops.send_now(closed, b"after close") is True
    assert ops.errors == before + 1
