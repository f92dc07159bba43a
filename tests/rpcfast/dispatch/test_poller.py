"""The dispatcher's compiled core: what its spin loop decides, given explicit configurations."""

from __future__ import annotations

import math

import pytest

from rpcfast.dispatch import DispatchConfig
from rpcfast.dispatch._poller import CLOSED, FAILED, PARK, YIELD, Poller


class Source:
    """A transport stand-in: ``work`` polls find something, then nothing; may raise."""

    def __init__(self, work: int = 0, fail: bool = False) -> None:
        self.work = work
        self.fail = fail
        self.polls = 0
        self.timers: list[float] = []
        self.deadline: float | None = None
        self.rearm: float | None = None  # the deadline a timer run arms next

    def poll(self, now: float) -> bool:
        self.polls += 1
        if self.fail:
            raise RuntimeError("broken")
        if self.work:
            self.work -= 1
            return True
        return False

    def has_pending(self) -> bool:
        return False

    def on_timer(self, now: float) -> None:
        self.timers.append(now)
        self.deadline = self.rearm

    def next_deadline(self) -> float | None:
        return self.deadline


def poller(source: Source, **config: float) -> Poller:
    p = Poller(DispatchConfig(**config))  # type: ignore[arg-type]
    p.transports.append(source)
    p.polls = (source.poll,)
    return p


def test_idle_loop_parks_once_its_spin_budget_is_spent() -> None:
    source = Source()
    p = poller(source, spin_budget=0.0, yield_interval=10.0)
    p.resumed(True)
    assert p.spin() == PARK
    assert source.polls >= 1 and p.n_polls == source.polls


def test_work_keeps_it_spinning_and_a_yield_request_ends_the_stretch() -> None:
    source = Source(work=50)
    p = poller(source, spin_budget=10.0, yield_interval=10.0)
    p.resumed(True)
    p.request_yield()
    assert p.spin() == YIELD and not p.need_yield and p.n_yields == 1
    p.task_started()
    assert p.spin() == YIELD and p.active_tasks == 1  # handler tasks: yield every poll
    p.task_finished()
    assert p.active_tasks == 0


def test_a_failing_transport_is_reported_not_raised() -> None:
    p = poller(Source(fail=True))
    assert p.spin() == FAILED and p.n_errors == 1


def test_closed_poller_stops_spinning() -> None:
    p = poller(Source())
    p.close()
    assert p.spin() == CLOSED


def test_due_timers_run_and_the_next_deadline_is_taken_from_the_transports() -> None:
    source = Source()
    p = poller(source)
    assert p.next_deadline == math.inf
    p.schedule(0.0)  # already due
    source.rearm = 1e12
    p.poll_once()
    assert len(source.timers) == 1 and p.next_deadline == pytest.approx(1e12)
    p.schedule(2e12)  # later than the one armed: no change
    assert p.next_deadline == pytest.approx(1e12)


def test_input_waiting_sees_a_readable_fd_and_takes_nothing() -> None:
    import select
    import socket

    source = Source()
    p = poller(source)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        p.epoll.register(a.fileno(), select.EPOLLIN)  # as the dispatcher registers fds
        assert not p.input_waiting()
        b.send(b"x")
        assert p.input_waiting()
        assert p.input_waiting()  # level-triggered and nothing was read
        assert a.recv(8) == b"x"
        assert not p.input_waiting()
        assert source.polls == 0  # asking never polls a transport
    finally:
        p.close()
        a.close()
        b.close()
    assert not p.input_waiting()  # closed: nothing to wait for


def test_input_waiting_sees_input_that_no_fd_announces() -> None:
    class Buffered(Source):
        def has_pending(self) -> bool:
            return True

    p = poller(Buffered())
    try:
        assert p.input_waiting()
    finally:
        p.close()


@pytest.mark.parametrize("share_cpu", [False, True])
def test_sharing_loop_hands_its_core_over_on_idle_spins_only(
    monkeypatch: pytest.MonkeyPatch, share_cpu: bool
) -> None:
    yields: list[int] = []
    monkeypatch.setattr("os.sched_yield", lambda: yields.append(1))
    source = Source(work=3)
    p = poller(source, spin_budget=0.0, yield_interval=10.0, share_cpu=share_cpu)
    p.resumed(True)
    assert p.spin() == PARK
    spin_yields = len(yields)
    assert (spin_yields >= 1) is share_cpu
    assert spin_yields <= source.polls - 3  # never after a poll that found work
    # a caller spinning inline on poll_once: the same rule
    source.work = 1
    assert p.poll_once() is True
    assert len(yields) == spin_yields
    assert p.poll_once() is False
    assert len(yields) == spin_yields + share_cpu
