"""rpcfast's own round-trip and throughput measurements for ``rpcfast-perf rpc``.

The echo server runs in a subprocess (``python -m rpcfast.testing``) for the socket transports,
as a user's server would; the in-process transport serves in the measuring process itself.
Null RPCs call ``Echo.ping`` (empty request and response), payloads call ``Echo.echo``.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

import rpcfast
from rpcfast.testing import EchoService, echo_capnp, spawn_echo_server

RPCFAST_SYSTEMS: tuple[str, ...] = ("rpcfast-udp", "rpcfast-zmq", "rpcfast-inproc")

_LISTEN = {
    "rpcfast-udp": "udp://127.0.0.1:0",
    "rpcfast-zmq": "zmq://127.0.0.1:0",
    "rpcfast-inproc": "inproc://perf-echo",
}
WARMUP = 200


def _with_server(system: str, body: Callable[[str], Awaitable[Any]]) -> Any:
    """Run ``body(address)`` in a fresh trio run with an echo server for ``system``."""
    listen = _LISTEN[system]
    if system == "rpcfast-inproc":

        async def inproc_main() -> Any:
            async with rpcfast.serve([EchoService()], [listen]) as server:
                return await body(server.addresses[0])

        return trio.run(inproc_main)
    proc, addresses = spawn_echo_server([listen])
    try:
        return trio.run(body, addresses[0])
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except Exception:
            proc.kill()
            proc.wait()


def _caller(stub: rpcfast.Stub, payload: int) -> Callable[[], Awaitable[Any]]:
    if payload == 0:
        return stub.ping  # type: ignore[no-any-return]
    data = b"x" * payload

    async def echo() -> Any:
        reply = await stub.echo(data=data)
        if reply is None or len(reply.data) != payload:
            raise AssertionError("echo returned the wrong payload")
        return reply

    return echo


def measure(system: str, payload: int, iterations: int, seconds: float) -> list[float]:
    """Per-round-trip latencies in seconds: at most ``iterations`` calls, at most ``seconds``."""

    async def body(address: str) -> list[float]:
        async with rpcfast.connect(address, timeout=5.0) as conn:
            call = _caller(conn.stub(echo_capnp.Echo), payload)
            warm_until = time.perf_counter() + min(1.0, seconds / 4)
            for _ in range(WARMUP):
                await call()
                if time.perf_counter() > warm_until:
                    break
            samples: list[float] = []
            clock = time.perf_counter_ns
            stop = time.perf_counter() + seconds
            for _ in range(iterations):
                t0 = clock()
                await call()
                samples.append((clock() - t0) / 1e9)
                if time.perf_counter() > stop:
                    break
            return samples

    result: list[float] = _with_server(system, body)
    return result


def throughput(system: str, payload: int, outstanding: int, seconds: float) -> float:
    """Calls per second with ``outstanding`` calls kept in flight for ``seconds``."""

    async def body(address: str) -> float:
        async with rpcfast.connect(address, timeout=5.0) as conn:
            call = _caller(conn.stub(echo_capnp.Echo), payload)
            done = 0
            stop = time.perf_counter() + seconds
            cap = 5_000_000  # a hard bound on the count as well as the time

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < stop and done < cap:
                    await call()
                    done += 1

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(outstanding):
                    nursery.start_soon(worker)
            elapsed = time.perf_counter() - start
            return done / elapsed if elapsed > 0 else math.nan

    result: float = _with_server(system, body)
    return result


def breakdown(system: str, payload: int, iterations: int, seconds: float) -> str:
    """The time-trace breakdown of ``iterations`` traced calls, as a printable table."""

    async def body(address: str) -> str:
        trace = rpcfast.TimeTrace()
        async with rpcfast.connect(address, timeout=5.0, trace=trace) as conn:
            call = _caller(conn.stub(echo_capnp.Echo), payload)
            for _ in range(WARMUP):
                await call()
            trace.clear()
            stop = time.perf_counter() + seconds
            for _ in range(iterations):
                await call()
                if time.perf_counter() > stop:
                    break
        return f"{system}, payload {payload} B\n{trace.format()}"

    result: str = _with_server(system, body)
    return result


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def idle_cpu(system: str, seconds: float) -> dict[str, float]:
    """CPU used by an idle echo server process (after some calls, past its spin budget)."""
    proc, addresses = spawn_echo_server([_LISTEN[system]])
    try:

        async def warm(address: str) -> None:
            async with rpcfast.connect(address, timeout=5.0) as conn:
                stub = conn.stub(echo_capnp.Echo)
                for _ in range(1000):
                    await stub.ping()

        trio.run(warm, addresses[0])
        time.sleep(0.2)  # well past the spin budget
        before, start = _cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        used, wall = _cpu_seconds(proc.pid) - before, time.monotonic() - start
        return {"cpu_seconds": used, "seconds": round(wall, 2), "cpu_fraction": used / wall}
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
