"""The polling loop: it parks when idle, wakes for work, runs timers, survives bad transports."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import rpcfast
from rpcfast._pending import PendingCall
from rpcfast._types import Buffer
from rpcfast.dispatch import DispatchConfig, Dispatcher, current
from rpcfast.dispatch._dispatcher import DispatchStats, LoadProbe
from rpcfast.testing import EchoService, echo_capnp, spawn_echo_server, stop_echo_server
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


class _WorkTransport(_TimerTransport):
    """Reports one unit of work at the poll after ``work`` is set."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        super().__init__(dispatcher)
        self.work = False

    def poll(self, now: float) -> bool:
        work, self.work = self.work, False
        return work


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


def _loadavg(tmp_path: Path, running: int) -> str:
    path = tmp_path / "loadavg"
    path.write_text(f"0.50 0.40 0.30 {running}/200 4242\n")
    return str(path)


def test_load_probe_reads_the_running_count(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    path = _loadavg(tmp_path, cores + 1)
    probe = LoadProbe(interval=10.0, path=path)
    assert probe.busy(0.0)
    _loadavg(tmp_path, 1)
    assert probe.busy(5.0)  # within the interval: the last reading holds
    assert not probe.busy(10.0)
    probe.close()


def test_load_probe_without_the_file_is_never_busy(tmp_path: Path) -> None:
    probe = LoadProbe(interval=0.0, path=str(tmp_path / "missing"))
    assert not probe.busy(0.0)
    probe.close()


def test_load_probe_with_a_garbled_file_is_never_busy(tmp_path: Path) -> None:
    path = tmp_path / "loadavg"
    path.write_text("nonsense\n")
    probe = LoadProbe(interval=0.0, path=str(path))
    assert not probe.busy(0.0)
    probe.close()


@pytest.mark.parametrize("oversubscribed", [True, False])
def test_idle_inline_polls_sleep_in_epoll_only_when_oversubscribed(
    tmp_path: Path, oversubscribed: bool
) -> None:
    running = (os.cpu_count() or 1) + 1 if oversubscribed else 1
    config = DispatchConfig(
        park_when_busy=True, load_file=_loadavg(tmp_path, running), busy_spin=0.001
    )
    waits: list[int] = []

    async def main() -> None:
        dispatcher = current(config)
        transport = _WorkTransport(dispatcher)
        dispatcher.add_transport(transport)
        # (no checkpoint below: the loop task does not run meanwhile)
        stretch_end = time.perf_counter() + 0.01
        while time.perf_counter() < stretch_end:  # an idle stretch over 4 busy spins...
            assert not dispatcher.poll_once()
        transport.work = True
        assert dispatcher.poll_once()
        before = dispatcher.stats.inline_waits
        deadline = time.perf_counter() + 0.003  # ...that ends in work: the next one sleeps
        while time.perf_counter() < deadline:
            assert not dispatcher.poll_once()
        waits.append(dispatcher.stats.inline_waits - before)
        dispatcher.remove_transport(transport)

    trio.run(main)
    assert (waits[0] >= 1) is oversubscribed


def test_inline_polls_keep_spinning_while_waits_are_short(tmp_path: Path) -> None:
    running = (os.cpu_count() or 1) + 1
    config = DispatchConfig(
        park_when_busy=True, load_file=_loadavg(tmp_path, running), busy_spin=0.001
    )
    waits: list[int] = []

    async def main() -> None:
        dispatcher = current(config)
        transport = _WorkTransport(dispatcher)
        dispatcher.add_transport(transport)
        for _ in range(20):  # replies that come back at once (a read loop)
            assert not dispatcher.poll_once()
            transport.work = True
            assert dispatcher.poll_once()
        deadline = time.perf_counter() + 0.003
        while time.perf_counter() < deadline:
            assert not dispatcher.poll_once()
        waits.append(dispatcher.stats.inline_waits)
        dispatcher.remove_transport(transport)

    trio.run(main)
    assert waits == [0]


def test_a_caller_sleeping_inline_still_gets_its_reply(tmp_path: Path) -> None:
    running = (os.cpu_count() or 1) + 1
    config = DispatchConfig(
        park_when_busy=True,
        load_file=_loadavg(tmp_path, running),
        busy_spin=0.0,
        call_spin=5.0,  # the whole call waits inline: in epoll sleeps, not in trio
    )
    results: list[bool] = []
    proc, addresses = spawn_echo_server(["udp://127.0.0.1:0"])

    async def main() -> None:
        dispatcher = current(config)
        async with rpcfast.connect(addresses[0], timeout=5.0) as conn:
            echo = conn.stub(echo_capnp.Echo)
            await echo.sleep(seconds=0.02)  # a long wait: the next one sleeps inline
            before = dispatcher.stats.inline_waits
            await echo.sleep(seconds=0.02)
            results.append(True)
        results.append(dispatcher.stats.inline_waits > before)

    try:
        trio.run(main)
    finally:
        stop_echo_server(proc)
    assert results == [True, True]


@pytest.mark.parametrize("oversubscribed", [True, False])
def test_oversubscribed_loop_parks_after_the_short_busy_spin(
    tmp_path: Path, oversubscribed: bool
) -> None:
    running = (os.cpu_count() or 1) + 1 if oversubscribed else 1
    config = DispatchConfig(
        park_when_busy=True,
        load_file=_loadavg(tmp_path, running),
        spin_budget=30.0,  # never reached: only the busy spin can park this loop
        busy_spin=0.001,
    )
    stats: list[DispatchStats] = []

    async def main() -> None:
        dispatcher = current(config)
        transport = _WorkTransport(dispatcher)
        dispatcher.add_transport(transport)
        await trio.sleep(0.02)  # waits so far were short: the loop spins
        spinning = attrs.evolve(dispatcher.stats)
        transport.work = True  # a 20 ms idle stretch ended in work: the next one parks
        await trio.sleep(0.05)
        stats.extend([spinning, attrs.evolve(dispatcher.stats)])
        dispatcher.remove_transport(transport)

    trio.run(main)
    assert stats[0].parks == 0
    assert (stats[1].busy_parks >= 1) is oversubscribed
    assert (stats[1].parks >= 1) is oversubscribed
