"""Echo servers for the peer systems, each run in its own process by ``perf._peers``.

Usage: ``python -m perf._peer_servers KIND [--port N] [--lifetime S]``. The server binds
127.0.0.1 (port 0 picks a free one), prints ``PERF-PEER-READY <port>`` on stdout once it accepts
requests, and echoes every request until SIGTERM (exit status 0). A separate process keeps the
server's interpreter and GIL out of the client's timings, as a real deployment would. So that
no orphan survives a killed benchmark, a server also exits when its parent process goes away or
when ``--lifetime`` seconds have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

READY_PREFIX = "PERF-PEER-READY"
HOST = "127.0.0.1"
UDP_BUFFER = 65536
GRPC_METHOD = "/rpcfast.perf.Echo/Echo"
GRPC_MAX_MESSAGE = 64 * 1024 * 1024
GRPC_OPTIONS = (
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE),
)
_CHECK_EVERY_SPINS = 1 << 14
_IDLE_CHECK_S = 0.2


@functools.cache
def load_echo_schema() -> Any:
    """The ``Echo`` capnp schema module (cached: loading it twice would define it twice)."""
    import capnp

    return capnp.load(str(Path(__file__).with_name("echo_bench.capnp")))


class Lifeline:
    """Tells a server loop when to give up: lifetime spent or the parent process gone."""

    def __init__(self, lifetime_s: float) -> None:
        self._deadline = time.monotonic() + lifetime_s
        self._parent = os.getppid()

    def expired(self) -> bool:
        return time.monotonic() >= self._deadline or os.getppid() != self._parent


def _announce(port: int) -> None:
    print(f"{READY_PREFIX} {port}", flush=True)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve_udp_poll(port: int, lifeline: Lifeline) -> None:
    """Busy-polling UDP echo: non-blocking ``recvfrom_into`` in a loop, no event loop at all."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((HOST, port))
        sock.setblocking(False)
        _announce(sock.getsockname()[1])
        buf = bytearray(UDP_BUFFER)
        view = memoryview(buf)
        recvfrom_into = sock.recvfrom_into
        sendto = sock.sendto
        while not lifeline.expired():
            for _ in range(_CHECK_EVERY_SPINS):
                try:
                    n, addr = recvfrom_into(buf)
                except BlockingIOError:
                    continue
                try:
                    sendto(view[:n], addr)
                except BlockingIOError:
                    pass  # send buffer full: the datagram is lost, as UDP allows
    finally:
        sock.close()


def serve_zmq_rep(port: int, lifeline: Lifeline) -> None:
    """pyzmq REP echo with blocking ``recv``; its receive timeout only serves the lifeline."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    try:
        sock.linger = 0
        sock.rcvtimeo = int(_IDLE_CHECK_S * 1000)
        if port == 0:
            port = sock.bind_to_random_port(f"tcp://{HOST}")
        else:
            sock.bind(f"tcp://{HOST}:{port}")
        _announce(port)
        while not lifeline.expired():
            try:
                frame = sock.recv(copy=False)
            except zmq.Again:
                continue
            sock.send(frame, copy=False)
    finally:
        sock.close()
        ctx.term()


def _grpc_identity(request: bytes, context: object) -> bytes:
    return request


def serve_grpc_unary(port: int, lifeline: Lifeline) -> None:
    """grpcio unary-unary echo on raw bytes via a generic handler (no protoc, no serializers)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    service, method = GRPC_METHOD.strip("/").split("/")
    handler = grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(_grpc_identity)}
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    try:
        server.add_generic_rpc_handlers((handler,))
        bound = server.add_insecure_port(f"{HOST}:{port}")
        server.start()
        _announce(bound)
        while not lifeline.expired():
            server.wait_for_termination(timeout=_IDLE_CHECK_S)
    finally:
        server.stop(grace=None).wait(timeout=5)


async def _capnp_main(port: int, lifeline: Lifeline) -> None:
    import capnp

    echo_server_base: Any = load_echo_schema().Echo.Server

    class EchoImpl(echo_server_base):  # type: ignore[misc]
        async def echo(self, data: bytes, **kwargs: object) -> bytes:
            return data

    async def on_connect(stream: Any) -> None:
        await capnp.TwoPartyServer(stream, bootstrap=EchoImpl()).on_disconnect()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with capnp.kj_loop():
        server = await capnp.AsyncIoStream.create_server(on_connect, HOST, port)
        try:
            _announce(server.sockets[0].getsockname()[1])
            while not lifeline.expired() and not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), timeout=_IDLE_CHECK_S)
                except TimeoutError:
                    pass
        finally:
            server.close()
            await server.wait_closed()


def serve_capnp_rpc(port: int, lifeline: Lifeline) -> None:
    """pycapnp two-party RPC echo (asyncio; pycapnp 2.x has no other RPC mode)."""
    asyncio.run(_capnp_main(port, lifeline))


SERVERS: dict[str, Callable[[int, Lifeline], None]] = {
    "raw-udp-poll": serve_udp_poll,
    "pyzmq-reqrep": serve_zmq_rep,
    "pycapnp-rpc": serve_capnp_rpc,
    "grpcio-unary": serve_grpc_unary,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf._peer_servers", description=__doc__)
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, default=0, help="TCP/UDP port; 0 picks a free one")
    parser.add_argument(
        "--lifetime", type=float, default=600.0, help="exit after this many seconds regardless"
    )
    args = parser.parse_args(argv)
    # The parent owns our life: Ctrl-C reaches it, and it stops us with SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    SERVERS[args.kind](args.port, Lifeline(args.lifetime))
    return 0


if __name__ == "__main__":
    sys.exit(main())
