"""Clients for the peer systems that ``rpcfast-perf rpc`` measures rpcfast against.

Each peer is written the way a user of that library would write an echo client, and each
measurement owns its server: ``measure_peer`` starts ``perf._peer_servers`` in a subprocess,
waits (bounded) for it to report its port, times round trips, and always stops it.

Every round trip is bounded by ``timeout_s`` and every loop by both a count and a deadline, so
a lost datagram or a wedged server turns into an exception instead of a hung benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from attrs import define, frozen

from perf._peer_servers import (
    GRPC_METHOD,
    GRPC_OPTIONS,
    HOST,
    READY_PREFIX,
    UDP_BUFFER,
    load_echo_schema,
)

PEER_SYSTEMS: tuple[str, ...] = ("raw-udp-poll", "pyzmq-reqrep", "pycapnp-rpc", "grpcio-unary")
BASELINE_SYSTEM = "raw-udp-poll"
UDP_MAX_PAYLOAD = 65000
"""Largest payload ``raw-udp-poll`` carries: one IPv4 datagram, no fragmentation layer."""

DEFAULT_TIMEOUT_S = 10.0
_NS_PER_S = 1_000_000_000
_SPIN_CHECK_MASK = 0x3FF
_MAX_SPINS = 1 << 40
_READY_MAX_READS = 1000


class PeerError(RuntimeError):
    """A peer server failed to start, or a peer echoed something other than what it was sent."""


def supports(system: str, payload: int) -> bool:
    """Whether ``system`` can carry ``payload`` bytes in one request (only UDP has a limit)."""
    if system not in PEER_SYSTEMS:
        raise ValueError(f"unknown peer system {system!r}; known: {', '.join(PEER_SYSTEMS)}")
    return system != BASELINE_SYSTEM or payload <= UDP_MAX_PAYLOAD


def make_payload(size: int) -> bytes:
    """A deterministic, non-constant payload of ``size`` bytes."""
    pattern = bytes(range(256))
    return (pattern * (size // 256 + 1))[:size]


# --- server processes -------------------------------------------------------------------------


@define
class PeerServer:
    """A running peer server subprocess; ``stop`` returns its exit status (0 when clean)."""

    system: str
    port: int
    process: subprocess.Popen[bytes]
    _stderr: IO[bytes]

    def stop(self, timeout_s: float = 5.0) -> int:
        """Terminate (then kill, if it lingers) the server, reap it, and release its pipes."""
        proc = self.process
        try:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout_s)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self._stderr.close()
        return proc.returncode

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not existing else os.pathsep.join([root, existing])
    return env


def _read_ready_port(proc: subprocess.Popen[bytes], deadline: float) -> int:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    received = b""
    for _ in range(_READY_MAX_READS):
        if b"\n" in received:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("peer server did not report readiness in time")
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise PeerError(f"peer server exited before it was ready (status {proc.wait()})")
        received += chunk
    line = received.split(b"\n", 1)[0].decode(errors="replace")
    prefix, _, port = line.partition(" ")
    if prefix != READY_PREFIX or not port.isdigit():
        raise PeerError(f"unexpected readiness line from peer server: {line!r}")
    return int(port)


def start_server(
    system: str, *, ready_timeout_s: float = 30.0, lifetime_s: float = 600.0
) -> PeerServer:
    """Start the echo server for ``system`` and wait (bounded) until it reports its port."""
    supports(system, 0)
    # Owned by the PeerServer from here on (closed in ``stop``), hence no ``with``.
    stderr = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "perf._peer_servers",
                system,
                "--port",
                "0",
                "--lifetime",
                str(lifetime_s),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_server_env(),
        )
    except BaseException:
        stderr.close()
        raise
    server = PeerServer(system, 0, proc, stderr)
    try:
        server.port = _read_ready_port(proc, time.monotonic() + ready_timeout_s)
    except BaseException as exc:
        server.stop()
        if isinstance(exc, PeerError | TimeoutError):
            raise PeerError(f"{system} server: {exc}; stderr: {server.stderr_text()}") from exc
        raise
    return server


@contextlib.contextmanager
def peer_server(
    system: str, *, ready_timeout_s: float = 30.0, lifetime_s: float = 600.0
) -> Iterator[PeerServer]:
    """``start_server`` as a context manager that always stops the process."""
    server = start_server(system, ready_timeout_s=ready_timeout_s, lifetime_s=lifetime_s)
    try:
        yield server
    finally:
        server.stop()


# --- client sessions --------------------------------------------------------------------------


@frozen
class _Plan:
    """What one client session does: echo ``probes`` (kept), warm up, then time round trips."""

    probes: tuple[bytes, ...]
    data: bytes
    warmup: int
    warmup_seconds: float
    iterations: int
    seconds: float
    timeout_s: float


@define
class _Outcome:
    replies: list[bytes]
    samples_ns: list[int]


def _check_length(system: str, got: int, expected: int) -> None:
    if got != expected:
        raise PeerError(f"{system} echoed {got} bytes for a {expected}-byte request")


def _udp_session(port: int, plan: _Plan) -> _Outcome:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((HOST, port))
        sock.setblocking(False)
        buf = bytearray(UDP_BUFFER)
        send = sock.send
        recv_into = sock.recv_into
        clock = time.perf_counter_ns
        timeout_ns = int(plan.timeout_s * _NS_PER_S)

        def round_trip(data: bytes) -> int:
            """Send one datagram and busy-poll for the echo; returns its length."""
            start = clock()
            send(data)
            for spin in range(_MAX_SPINS):
                try:
                    return recv_into(buf)
                except BlockingIOError:
                    if spin & _SPIN_CHECK_MASK == _SPIN_CHECK_MASK and clock() - start > timeout_ns:
                        break
            raise TimeoutError(f"no UDP echo within {plan.timeout_s} s")

        replies = []
        for probe in plan.probes:
            n = round_trip(probe)
            replies.append(bytes(buf[:n]))

        def timed(count: int, seconds: float) -> list[int]:
            data = plan.data
            expected = len(data)
            samples: list[int] = []
            end = clock() + int(seconds * _NS_PER_S)
            for _ in range(count):
                t0 = clock()
                send(data)
                for spin in range(_MAX_SPINS):
                    try:
                        n = recv_into(buf)
                        break
                    except BlockingIOError:
                        if (
                            spin & _SPIN_CHECK_MASK == _SPIN_CHECK_MASK
                            and clock() - t0 > timeout_ns
                        ):
                            raise TimeoutError(f"no UDP echo within {plan.timeout_s} s") from None
                else:
                    raise TimeoutError("UDP poll spin limit reached")
                t1 = clock()
                _check_length("raw-udp-poll", n, expected)
                samples.append(t1 - t0)
                if t1 >= end:
                    break
            return samples

        timed(plan.warmup, plan.warmup_seconds)
        return _Outcome(replies, timed(plan.iterations, plan.seconds))
    finally:
        sock.close()


def _zmq_session(port: int, plan: _Plan) -> _Outcome:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    try:
        sock.linger = 0
        sock.rcvtimeo = sock.sndtimeo = int(plan.timeout_s * 1000)
        sock.connect(f"tcp://{HOST}:{port}")
        send = sock.send
        recv = sock.recv
        clock = time.perf_counter_ns

        def timed(count: int, seconds: float) -> list[int]:
            data = plan.data
            expected = len(data)
            samples: list[int] = []
            end = clock() + int(seconds * _NS_PER_S)
            for _ in range(count):
                t0 = clock()
                send(data)
                reply = recv()
                t1 = clock()
                _check_length("pyzmq-reqrep", len(reply), expected)
                samples.append(t1 - t0)
                if t1 >= end:
                    break
            return samples

        try:
            replies = []
            for probe in plan.probes:
                send(probe)
                replies.append(recv())
            timed(plan.warmup, plan.warmup_seconds)
            return _Outcome(replies, timed(plan.iterations, plan.seconds))
        except zmq.Again as exc:
            raise TimeoutError(f"no ZeroMQ reply within {plan.timeout_s} s") from exc
    finally:
        sock.close()
        ctx.term()


def _grpc_session(port: int, plan: _Plan) -> _Outcome:
    import grpc

    channel = grpc.insecure_channel(f"{HOST}:{port}", options=GRPC_OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=plan.timeout_s)
        call = channel.unary_unary(GRPC_METHOD)
        timeout_s = plan.timeout_s
        clock = time.perf_counter_ns

        def timed(count: int, seconds: float) -> list[int]:
            data = plan.data
            expected = len(data)
            samples: list[int] = []
            end = clock() + int(seconds * _NS_PER_S)
            for _ in range(count):
                t0 = clock()
                reply = call(data, timeout=timeout_s)
                t1 = clock()
                _check_length("grpcio-unary", len(reply), expected)
                samples.append(t1 - t0)
                if t1 >= end:
                    break
            return samples

        replies = [bytes(call(probe, timeout=timeout_s)) for probe in plan.probes]
        timed(plan.warmup, plan.warmup_seconds)
        return _Outcome(replies, timed(plan.iterations, plan.seconds))
    finally:
        channel.close()


async def _capnp_client(port: int, plan: _Plan) -> _Outcome:
    import capnp

    schema = load_echo_schema()
    # Whole-session bound: per-call timeouts would add a timer to every timed round trip.
    budget = plan.timeout_s * (len(plan.probes) + 2) + plan.warmup_seconds + plan.seconds
    async with asyncio.timeout(budget), capnp.kj_loop():
        stream = await capnp.AsyncIoStream.create_connection(host=HOST, port=port)
        client = capnp.TwoPartyClient(stream)
        echo: Any = client.bootstrap().cast_as(schema.Echo)
        clock = time.perf_counter_ns

        async def timed(count: int, seconds: float) -> list[int]:
            data = plan.data
            expected = len(data)
            samples: list[int] = []
            end = clock() + int(seconds * _NS_PER_S)
            for _ in range(count):
                t0 = clock()
                response = await echo.echo(data)
                n = len(response.data)
                t1 = clock()
                _check_length("pycapnp-rpc", n, expected)
                samples.append(t1 - t0)
                if t1 >= end:
                    break
            return samples

        replies = [bytes((await echo.echo(probe)).data) for probe in plan.probes]
        await timed(plan.warmup, plan.warmup_seconds)
        samples = await timed(plan.iterations, plan.seconds)
        client.close()
        return _Outcome(replies, samples)


def _capnp_session(port: int, plan: _Plan) -> _Outcome:
    return asyncio.run(_capnp_client(port, plan))


_SESSIONS: dict[str, Callable[[int, _Plan], _Outcome]] = {
    "raw-udp-poll": _udp_session,
    "pyzmq-reqrep": _zmq_session,
    "pycapnp-rpc": _capnp_session,
    "grpcio-unary": _grpc_session,
}


def _server_lifetime(seconds: float, timeout_s: float) -> float:
    return 120.0 + 4 * seconds + 4 * timeout_s


def echo_peer(
    system: str, messages: Sequence[bytes], *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> list[bytes]:
    """Start ``system``'s server, send each message once, and return the replies in order."""
    for message in messages:
        if not supports(system, len(message)):
            raise ValueError(f"{system} cannot carry a {len(message)}-byte message")
    plan = _Plan(tuple(messages), b"", 0, 0.0, 0, 0.0, timeout_s)
    with peer_server(system, lifetime_s=_server_lifetime(0.0, timeout_s)) as server:
        return _SESSIONS[system](server.port, plan).replies


def measure_peer(
    system: str,
    payload: int,
    iterations: int,
    seconds: float,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[float]:
    """Round-trip latencies in seconds: at most ``iterations`` round trips, about ``seconds`` long.

    Same shape as ``perf._rpcfast_bench.measure``. Before timing, one request is echoed and
    compared byte for byte, then a short warm-up (at most a tenth of the iterations, a quarter
    of the time, one second) runs and is discarded; timed round trips check the echoed length.
    """
    if iterations < 1 or seconds <= 0:
        raise ValueError("iterations must be >= 1 and seconds > 0")
    if not supports(system, payload):
        raise ValueError(f"{system} cannot carry a {payload}-byte payload")
    data = make_payload(payload)
    plan = _Plan(
        probes=(data,),
        data=data,
        warmup=min(max(iterations // 10, 1), 1000),
        warmup_seconds=min(seconds / 4, 1.0),
        iterations=iterations,
        seconds=seconds,
        timeout_s=timeout_s,
    )
    with peer_server(system, lifetime_s=_server_lifetime(seconds, timeout_s)) as server:
        outcome = _SESSIONS[system](server.port, plan)
    if outcome.replies != [data]:
        raise PeerError(f"{system} echoed different bytes than it was sent")
    return [ns / _NS_PER_S for ns in outcome.samples_ns]
