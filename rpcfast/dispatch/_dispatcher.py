"""ONE polling loop per process (per trio run), in the style of RAMCloud's dispatcher.

The loop polls every transport without blocking, fires transport timers, and runs fast handlers
inline (they run inside ``Transport.poll``). While there is work, or until ``spin_budget`` seconds
after the last work, it spins: it only yields to trio when another task is known to be runnable
(``request_yield``) or every ``yield_interval`` seconds. Then it parks, so an idle process burns
no CPU. While no other trio task can run, it sleeps in ``epoll_wait`` itself, on the transports'
fds and trio's own epoll fd, until input, trio's next deadline or its own next timer
(:mod:`rpcfast.dispatch._idle`): a wake-up then costs a system call, not a trip through trio's
scheduler (~50 us of CPU here). Otherwise, and where trio's internals are not as expected, it
parks as a trio task: the transports' epoll fd waited on with a cancel-scope deadline at the
next transport timer. A task waiting for its own response sleeps in the kernel the same way.

Measured on this 2-core VM (see DESIGN.md section 3): a sleeping wake-up costs ~40 us and a trio
checkpoint ~4 us, against ~1 us for a non-blocking receive that finds nothing. Hence the spin.
Most of that wake-up is the VM's: it halts an idle vCPU (``haltpoll`` with guest polling off),
and waking a halted vCPU takes an IPI through the host. Two blocking Python processes
ping-ponging a UDP datagram take 18 us a round trip pinned to one core and 67-95 us on two
(25-31 us of CPU a round trip each instead of 10); a busy low-priority spinner on each core
(keeping them out of halt) brings the two-core case to 36 us.

Spinning pays only while there is a core to spare. With ``park_when_busy`` the loop watches the
machine's runnable count and, while it exceeds the cores, stops spinning after ``busy_spin``: a
local kvstore cluster (client, master and 3 backups on 2 cores) wrote R=3 about 2-3x faster that
way (perf/kv.py), because its idle spinners no longer hold the cores the others need. Only
while the recent waits for work were long, though: both ends of a read loop keep spinning.

Callers waiting for a response may also drive the loop inline (``poll_once``) for a short while
before they sleep; see ``rpcfast._client``.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from rpcfast.dispatch._idle import INPUT, TRIO, TrioIdle
from rpcfast.dispatch._poller import CLOSED, FAILED, PARK, LoadProbe, Poller

if TYPE_CHECKING:
    from rpcfast.transports import Transport

__all__ = ["DispatchConfig", "DispatchStats", "Dispatcher", "LoadProbe", "current"]

log = logging.getLogger("rpcfast.dispatch")
_clock = time.perf_counter


@attrs.frozen
class DispatchConfig:
    spin_budget: float = 0.002
    """Seconds of idle spinning after the last work before the loop parks."""
    yield_interval: float = 0.0001
    """Longest stretch the loop spins without letting other trio tasks run."""
    call_spin: float = 0.0005
    """Seconds a caller drives the loop inline while waiting for its own response."""
    share_cpu: bool = False
    """Call ``sched_yield`` on idle spins, so a spinning process gives its core to any other
    runnable process (a 2-core machine running client, master and backups) at ~0.3 us a spin.
    Callers spinning inline (``poll_once``) yield too, and a lone UDP client skips its C poll
    of the call's socket (it cannot yield). Pair it with a long ``spin_budget`` and
    ``park_when_busy`` off (yielding spinners count as runnable): nobody sleeps, so no message
    waits for a wake-up. On this 2-core VM (perf/kv.py ``--share-cpu``, interleaved runs) an
    R=1 write took 73-129 us against 238-308 us with ``park_when_busy``; with R=3 (five busy
    processes) the kernel's fair scheduler lets a yielder keep its core for tens of us: R=3
    writes took 418-436 us against 407-701 us, and R=3 multi-writes were slower. Off by
    default."""
    gap_warning: float = 0.010
    """A stretch longer than this between two polls is logged (something hogged the loop)."""
    park_when_busy: bool = False
    """Spin only while the machine has a core to spare. While more threads are runnable than
    there are cores (``/proc/loadavg``, re-read every ``load_interval``), the idle loop parks
    after ``busy_spin`` instead of ``spin_budget``, and a caller spinning inline
    (``poll_once``) sleeps in epoll after ``busy_spin`` of empty polls. On a 2-core machine
    running a client, a master and 3 backups, idle spinners otherwise hold the cores that the
    processes with work need (and keep the kernel from moving them to an idle core).
    Only while its recent waits for work were long (over 4 ``busy_spin``): a process whose
    work comes back at once (either end of a read loop) keeps spinning. Sleeping, not
    ``sched_yield``: a yielding spinner may wait out another process's whole time slice,
    while a woken sleeper gets a core at once."""
    busy_spin: float = 0.00005
    """Seconds of idle spin before sleeping while the machine is oversubscribed: long enough
    to catch a reply that comes back at once (a read), short beside a replicated write."""
    load_interval: float = 0.00005
    """How often (seconds) a spinning loop re-reads the runnable count (~2 us a read)."""
    load_file: str = "/proc/loadavg"
    """Where the runnable count is read (its 4th field, ``running/total``)."""


@attrs.define
class DispatchStats:
    polls: int = 0
    parks: int = 0
    yields: int = 0
    busy_parks: int = 0
    inline_waits: int = 0
    timer_runs: int = 0
    long_gaps: int = 0
    longest_gap: float = 0.0
    errors: int = 0


class Dispatcher:
    """The process's polling loop. Get it with :func:`rpcfast.dispatch.current`.

    The synchronous work lives in a compiled :class:`~rpcfast.dispatch._poller.Poller`; its
    signal methods (``schedule``, ``request_yield``, ``wake``, ``task_started``,
    ``task_finished``) and ``poll_once`` are the poller's own bound methods, so transports and
    callers reach compiled code without a Python frame in between.
    """

    schedule: Callable[[float], None]
    """Make sure transport timers run no later than ``deadline`` (perf_counter time)."""
    request_yield: Callable[[], None]
    """Another task became runnable (a handler task, a woken caller): let it run soon."""
    task_started: Callable[[], None]
    """A task that works with the dispatcher (an async handler) is running: until it
    finishes, the loop yields after every poll so that task is never kept waiting."""
    task_finished: Callable[[], None]
    wake: Callable[[], None]
    """Leave the park now (in-process sends, new transports)."""
    poll_once: Callable[[], bool]
    """Poll every transport once and run due timers; return whether any work was done. For
    callers that spin on it inline (with ``park_when_busy`` it may sleep up to ~1 ms in epoll
    after ``busy_spin`` of empty polls on an oversubscribed machine)."""

    def __init__(self, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig()
        self.poller = poller = Poller(self.config)
        self._transports: list[Transport] = poller.transports
        self.client_endpoints: dict[tuple[str, bool], Transport] = {}
        self._registered: set[int] = set()
        self.idle: TrioIdle | None = None
        """Sleeping in the kernel without trio's scheduler while no other task can run
        (:mod:`rpcfast.dispatch._idle`); None before :meth:`run` or where trio does not allow it."""
        self.yielded = False
        """The loop is waiting in a trio checkpoint (so it counts as a runnable task)."""
        self.schedule = poller.schedule
        self.request_yield = poller.request_yield
        self.task_started = poller.task_started
        self.task_finished = poller.task_finished
        self.wake = poller.wake
        self.poll_once = poller.poll_once

    @property
    def stats(self) -> DispatchStats:
        """A snapshot of the loop's counters."""
        p = self.poller
        return DispatchStats(
            polls=p.n_polls,
            parks=p.n_parks,
            yields=p.n_yields,
            busy_parks=p.n_busy_parks,
            inline_waits=p.n_inline_waits,
            timer_runs=p.n_timer_runs,
            long_gaps=p.n_long_gaps,
            longest_gap=p.longest_gap,
            errors=p.n_errors,
        )

    @property
    def active_tasks(self) -> int:
        return self.poller.active_tasks

    @property
    def busy_spin(self) -> float:
        return self.poller.busy_spin

    # -- transports -------------------------------------------------------------------------------
    def add_transport(self, transport: Transport) -> None:
        self._transports.append(transport)
        self.poller.polls = tuple(t.poll for t in self._transports)
        self.refresh_fds()
        self.wake()

    def remove_transport(self, transport: Transport) -> None:
        if transport in self._transports:
            self._transports.remove(transport)
        self.poller.polls = tuple(t.poll for t in self._transports)
        self.refresh_fds()

    @property
    def transports(self) -> tuple[Transport, ...]:
        return tuple(self._transports)

    def refresh_fds(self) -> None:
        """Re-read every transport's fds into the epoll set (after a transport opens a socket)."""
        if self.poller.closed:
            return
        epoll = self.poller.epoll
        wanted = {fd for t in self._transports for fd in t.filenos()}
        for fd in self._registered - wanted:
            try:
                epoll.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it from the set
        for fd in wanted - self._registered:
            epoll.register(fd, select.EPOLLIN)
        self._registered = wanted
        if self.idle is not None:
            self.idle.set_fds(wanted)

    # -- the loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until cancelled; closes every transport on the way out."""
        poller = self.poller
        spin = poller.spin
        resumed = poller.resumed
        checkpoint = trio.lowlevel.checkpoint
        if self.idle is None and not poller.closed:
            self.idle = TrioIdle.install(self._registered)
        idle = self.idle
        try:
            while True:
                action = spin()
                if action == PARK:
                    if idle is None or not idle.usable():
                        if await self._park():
                            self.took_input()
                        resumed(True)
                        continue
                    if not idle.pending:
                        woke = self._block(idle)
                        if woke != TRIO:  # input (or one of our timers): spin for the budget
                            if woke == INPUT:
                                self.took_input()
                            resumed(True)
                            continue
                    # other tasks can run, or trio has work of its own: let them, look again
                elif action == FAILED:
                    await trio.sleep(0.001)
                    continue
                elif action == CLOSED:
                    return
                self.yielded = True
                await checkpoint()
                self.yielded = False
                resumed(False)
        finally:
            self.close()

    def took_input(self) -> bool:
        """Poll after a transport fd woke us; if no transport found work, the input waits
        where polls do not look (:meth:`Transport.drain`): take it, or the fd stays readable
        and the next sleep ends at once. Returns whether the poll found work."""
        if self.poller.poll_all():
            return True
        now = _clock()
        for transport in list(self._transports):
            transport.drain(now)
        return False

    def input_waiting(self) -> bool:
        """Whether input waits for this dispatcher (:meth:`Poller.input_waiting`): long work
        done between requests (a log cleaner's slice) asks it to yield early."""
        return self.poller.input_waiting()

    def _has_pending(self) -> bool:
        """A transport has input that no fd announces (in-process, ZeroMQ's edge trigger)."""
        return any(transport.has_pending() for transport in self._transports)

    def wait_inline(self, idle: TrioIdle, until: float) -> bool:
        """For a task waiting for its own response while :meth:`TrioIdle.may_block` holds:
        sleep in the kernel until input (taken at once, in this task) or until trio has work
        or ``until`` passes. Returns whether there was input; False: wait in trio instead."""
        if not self._has_pending() and idle.block(until) != INPUT:
            return False
        self.took_input()
        return True

    def _block(self, idle: TrioIdle) -> int:
        """Park in the kernel, this task still running (no other task can run meanwhile)."""
        if self._has_pending():
            return INPUT
        poller = self.poller
        poller.n_parks += 1
        poller.slept = True
        return idle.block(poller.next_deadline)

    async def _park(self) -> bool:
        """Park as a trio task until an fd is readable (True) or the next timer (False)."""
        if self._has_pending():
            return True
        poller = self.poller
        poller.n_parks += 1
        poller.slept = True
        timeout = poller.next_deadline - _clock()
        if timeout <= 0:
            return False
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            poller.park_scope = scope
            try:
                await trio.lowlevel.wait_readable(poller.epoll.fileno())
            finally:
                poller.park_scope = None
        return not scope.cancelled_caught

    def close(self) -> None:
        if self.poller.closed:
            return
        for transport in list(self._transports):
            try:
                transport.close()
            except Exception:
                log.exception("closing %r failed", transport)
        self._transports.clear()
        self.poller.polls = ()
        self.poller.close()
        if self.idle is not None:
            self.idle.close()

    @property
    def closed(self) -> bool:
        return self.poller.closed


_current: trio.lowlevel.RunVar[Dispatcher] = trio.lowlevel.RunVar("rpcfast_dispatcher")


def current(config: DispatchConfig | None = None) -> Dispatcher:
    """The dispatcher of this trio run, started as a system task on first use.

    ``config`` applies only when this call creates it.
    """
    try:
        dispatcher = _current.get()
        if not dispatcher.closed:
            return dispatcher
    except LookupError:
        pass
    dispatcher = Dispatcher(config)
    _current.set(dispatcher)
    trio.lowlevel.spawn_system_task(dispatcher.run, name="rpcfast-dispatcher")
    return dispatcher


Waker = Callable[[], None]
