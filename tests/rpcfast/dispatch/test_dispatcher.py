"""The polling loop: it parks when idle, wakes for work, runs timers, survives bad transports."""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any

import trio

import rpcfast
from rpcfast._pending import PendingCall
from rpcfast._types import Buffer
from rpcfast.dispatch import DispatchConfig, Dispatcher, current
from rpcfast.testing import EchoService, echo_capnp
from rpcfast.transports import Transport


class _TimerTransport(Transport):
    scheme = "test"

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.deadline: float | None = None
        self.fired: list[float] = []
        self.fail_polls = 0

    def poll(self, now: float) -> bool:
        if self.fail_polls:
            self.fail_polls -= 1
            raise RuntimeError("broken transport")
        return False

    def on_timer(self, now: float) -> None:
        if self.deadline is not None and now >= self.deadline:
            self.fired.append(now)
            self.deadline = None

    def next_deadline(self) -> float | None:
        return self.deadline

    def call(self, peer: str, message: Sequence[Buffer], pending: PendingCall) -> None:
        raise NotImplementedError

    def cancel(self, pending: PendingCall) -> None:
        raise NotImplementedError

    def reply(self, token: Any, message: Sequence[Buffer]) -> None:
        raise NotImplementedError


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_idle_dispatcher_parks_and_burns_no_cpu() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as server:
        async with rpcfast.connect(server.addresses[0]) as conn:
            await conn.stub(echo_capnp.Echo).ping()
        await trio.sleep(0.05)  # past the spin budget
        parks = server.dispatcher.stats.parks
        cpu0, wall0 = _cpu(), time.monotonic()
        await trio.sleep(0.5)
        cpu = _cpu() - cpu0
        wall = time.monotonic() - wall0
    assert server.dispatcher.stats.parks >= parks
    # a spinning loop would use ~100% of a core; parked it is a handful of wake-ups
    assert cpu < 0.25 * wall


async def test_parked_dispatcher_wakes_for_a_request() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as server:
        await trio.sleep(0.05)
        parks_before = server.dispatcher.stats.parks
        async with rpcfast.connect(server.addresses[0], timeout=2.0) as conn:
            await trio.sleep(0.05)
            assert await conn.stub(echo_capnp.Echo).ping() is None
        assert parks_before >= 1


async def test_timers_fire_while_parked() -> None:
    dispatcher = current()
    transport = _TimerTransport(dispatcher)
    dispatcher.add_transport(transport)
    await trio.sleep(0.02)
    transport.deadline = time.perf_counter() + 0.05
    dispatcher.schedule(transport.deadline)
    with trio.fail_after(2):
        while not transport.fired:
            await trio.sleep(0.01)
    assert transport.fired[0] >= transport.deadline - 1e-3 if transport.deadline else True
    dispatcher.remove_transport(transport)


async def test_a_failing_transport_is_logged_not_fatal() -> None:
    dispatcher = current()
    transport = _TimerTransport(dispatcher)
    transport.fail_polls = 3
    dispatcher.add_transport(transport)
    with trio.fail_after(2):
        while transport.fail_polls:
            await trio.sleep(0.005)
    assert dispatcher.stats.errors >= 3
    dispatcher.remove_transport(transport)


def test_dispatcher_is_per_trio_run() -> None:
    seen: list[Dispatcher] = []

    async def main() -> None:
        seen.append(current(DispatchConfig(spin_budget=0.001)))
        assert current() is seen[-1]

    trio.run(main)
    trio.run(main)
    assert seen[0] is not seen[1]
    assert seen[0].closed and seen[1].closed
