"""Sleeping in the kernel outside trio's scheduler: only while no other task can run, and never
past trio's own I/O or deadlines."""

from __future__ import annotations

import math
import socket
import time

import pytest
import trio
import trio.testing

import rpcfast
from rpcfast.dispatch import DispatchConfig, current
from rpcfast.dispatch._idle import DUE, INPUT, TRIO, TrioIdle
from rpcfast.testing import EchoService, echo_capnp, spawn_echo_server


async def _synced(idle: TrioIdle) -> None:
    while not idle.synced:  # the count is exact once trio has waited for I/O
        await trio.lowlevel.checkpoint()


async def test_counts_the_tasks_that_can_run() -> None:
    idle = TrioIdle.install(set())
    assert idle is not None
    try:
        await _synced(idle)
        assert idle.may_block()
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release.wait)
            nursery.start_soon(release.wait)
            assert idle.pending == 2 and not idle.may_block()
            assert idle.may_block(others=2)
            await trio.sleep(0.01)  # they ran and now wait
            assert idle.pending == 0 and idle.may_block()
            release.set()
            assert idle.pending == 2
        assert idle.pending == 0
    finally:
        idle.close()


async def test_wakes_for_input_on_its_fds() -> None:
    a, b = socket.socketpair()
    idle = TrioIdle.install({a.fileno()})
    assert idle is not None
    try:
        b.send(b"x")
        assert idle.block(time.perf_counter() + 5) == INPUT
    finally:
        idle.close()
        a.close()
        b.close()


async def test_stands_aside_for_io_that_trio_waits_for() -> None:
    a, b = socket.socketpair()
    mine, other = socket.socketpair()
    idle = TrioIdle.install({mine.fileno()})
    assert idle is not None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.lowlevel.wait_readable, a)
            await trio.testing.wait_all_tasks_blocked()
            b.send(b"x")
            started = time.perf_counter()
            assert idle.block(started + 5) == TRIO
            assert time.perf_counter() - started < 1  # at once, not at the 5 s limit
    finally:
        idle.close()
        for s in (a, b, mine, other):
            s.close()


async def test_never_sleeps_past_a_trio_deadline_or_its_own() -> None:
    idle = TrioIdle.install(set())
    assert idle is not None
    try:
        assert idle.block(time.perf_counter() + 0.02) == DUE
        with trio.move_on_after(0.03):
            started = time.perf_counter()
            assert idle.block(math.inf) == TRIO  # the cancel scope's deadline is trio's
            assert time.perf_counter() - started < 0.9  # (MAX_BLOCK is 1 s)
            await trio.sleep_forever()
    finally:
        idle.close()


def test_declines_a_clock_other_than_trios_own() -> None:
    async def main() -> None:
        assert TrioIdle.install(set()) is None
        # and the dispatcher falls back to parking as a trio task
        async with rpcfast.serve([EchoService()], ["inproc://idle-mock"]) as server:
            async with rpcfast.connect(server.addresses[0], timeout=5) as conn:
                assert await conn.stub(echo_capnp.Echo).ping() is None
            assert server.dispatcher.idle is None

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_wait_all_tasks_blocked_still_sees_a_parked_dispatcher() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as server:
        async with rpcfast.connect(server.addresses[0], timeout=5) as conn:
            assert await conn.stub(echo_capnp.Echo).ping() is None
        with trio.fail_after(5):
            await trio.testing.wait_all_tasks_blocked(0.01)


async def test_a_dispatcher_sleeping_in_the_kernel_keeps_other_tasks_on_time() -> None:
    async with rpcfast.serve([EchoService()], ["udp://127.0.0.1:0"]) as server:
        async with rpcfast.connect(server.addresses[0], timeout=5) as conn:
            assert await conn.stub(echo_capnp.Echo).ping() is None
        await trio.sleep(0.01)  # (the call ran inline: let the loop start)
        idle = server.dispatcher.idle
        assert idle is not None
        blocks = idle.n_blocks
        a, b = socket.socketpair()

        def send_later() -> None:
            time.sleep(0.05)
            b.send(b"x")

        with a, b:
            # under MAX_BLOCK (1 s): neither may wait for the loop's kernel sleep to time out
            with trio.fail_after(0.9):
                await trio.sleep(0.05)  # a deadline of trio's
            with trio.fail_after(0.9):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, send_later)  # a thread's result
                    await trio.lowlevel.wait_readable(a)  # I/O that trio waits for
            assert a.recv(1) == b"x"
        assert idle.n_blocks > blocks  # it did sleep in the kernel meanwhile


def test_a_caller_waits_for_its_reply_in_the_kernel() -> None:
    proc, addresses = spawn_echo_server(["udp://127.0.0.1:0"])

    async def main() -> int:
        dispatcher = current(DispatchConfig(spin_budget=0.0, call_spin=0.0))
        async with rpcfast.connect(addresses[0], timeout=5) as conn:
            stub = conn.stub(echo_capnp.Echo)
            for _ in range(20):
                reply = await stub.echo(data=b"abc")
                assert reply is not None and bytes(reply.data) == b"abc"
        assert dispatcher.idle is not None
        return dispatcher.idle.n_blocks

    try:
        assert trio.run(main) >= 10  # no spinning: the replies were waited for in epoll
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait(timeout=5)
        proc.stdout.close()


def test_a_kernel_wait_ended_by_an_exception_cancels_the_call() -> None:
    proc, addresses = spawn_echo_server(["udp://127.0.0.1:0"])

    class Interrupt(BaseException):
        pass

    def interrupted(idle: TrioIdle, until: float) -> bool:
        raise Interrupt  # as a KeyboardInterrupt in epoll_wait would

    async def main() -> None:
        dispatcher = current(DispatchConfig(spin_budget=0.0, call_spin=0.0))
        async with rpcfast.connect(addresses[0], timeout=5) as conn:
            stub = conn.stub(echo_capnp.Echo)
            assert await stub.ping() is None
            await trio.sleep(0.01)
            transport = conn.transport
            dispatcher.wait_inline = interrupted  # type: ignore[method-assign]
            with pytest.raises(Interrupt):
                await stub.sleep(seconds=1.0)
            assert not transport._calls  # type: ignore[attr-defined]  # cancelled, not left behind

    try:
        trio.run(main)
    finally:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.wait(timeout=5)
        proc.stdout.close()
