"""ONE polling loop per process (per trio run), in the style of RAMCloud's dispatcher.

The loop polls every transport without blocking, fires transport timers, and runs fast handlers
inline (they run inside ``Transport.poll``). While there is work, or until ``spin_budget`` seconds
after the last work, it spins: it only yields to trio when another task is known to be runnable
(``request_yield``) or every ``yield_interval`` seconds. Then it parks: all transport fds sit in
one epoll set whose fd trio waits on, with a cancel-scope deadline at the next transport timer,
so an idle process burns no CPU.

Measured on this 2-core VM (see DESIGN.md section 3): a sleeping wake-up costs ~40 us and a trio
checkpoint ~4 us, against ~1 us for a non-blocking receive that finds nothing. Hence the spin.

Callers waiting for a response may also drive the loop inline (``poll_once``) for a short while
before they sleep; see ``rpcfast._client``.
"""

from __future__ import annotations

import logging
import math
import os
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from rpcfast.transports import Transport

log = logging.getLogger("rpcfast.dispatch")

_clock = time.perf_counter
sched_yield = os.sched_yield


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
    runnable process (a 2-core machine running client, master and backups) at ~0.3 us a spin."""
    gap_warning: float = 0.010
    """A stretch longer than this between two polls is logged (something hogged the loop)."""


@attrs.define
class DispatchStats:
    polls: int = 0
    parks: int = 0
    yields: int = 0
    timer_runs: int = 0
    long_gaps: int = 0
    longest_gap: float = 0.0
    errors: int = 0


class Dispatcher:
    """The process's polling loop. Get it with :func:`rpcfast.dispatch.current`."""

    def __init__(self, config: DispatchConfig | None = None) -> None:
        self.config = config or DispatchConfig()
        self.stats = DispatchStats()
        self._transports: list[Transport] = []
        self._polls: tuple[Callable[[float], bool], ...] = ()  # bound Transport.poll methods
        self._gap_warning = self.config.gap_warning
        self._epoll = select.epoll()
        self._registered: set[int] = set()
        self._next_deadline = math.inf
        self._need_yield = False
        self.active_tasks = 0
        self._park_scope: trio.CancelScope | None = None
        self._closed = False
        self._last_poll = _clock()
        self.client_endpoints: dict[tuple[str, bool], Transport] = {}

    # -- transports -------------------------------------------------------------------------------
    def add_transport(self, transport: Transport) -> None:
        self._transports.append(transport)
        self._polls = tuple(t.poll for t in self._transports)
        self.refresh_fds()
        self.wake()

    def remove_transport(self, transport: Transport) -> None:
        if transport in self._transports:
            self._transports.remove(transport)
        self._polls = tuple(t.poll for t in self._transports)
        self.refresh_fds()

    @property
    def transports(self) -> tuple[Transport, ...]:
        return tuple(self._transports)

    def refresh_fds(self) -> None:
        """Re-read every transport's fds into the epoll set (after a transport opens a socket)."""
        wanted = {fd for t in self._transports for fd in t.filenos()}
        for fd in self._registered - wanted:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it from the set
        for fd in wanted - self._registered:
            self._epoll.register(fd, select.EPOLLIN)
        self._registered = wanted

    # -- signals from transports and callers ------------------------------------------------------
    def schedule(self, deadline: float) -> None:
        """Make sure transport timers run no later than ``deadline`` (perf_counter time)."""
        if deadline < self._next_deadline:
            self._next_deadline = deadline
            scope = self._park_scope
            if scope is not None:
                scope.deadline = trio.current_time() + max(0.0, deadline - _clock())

    def request_yield(self) -> None:
        """Another task became runnable (a handler task, a woken caller): let it run soon."""
        self._need_yield = True

    def task_started(self) -> None:
        """A task that works with the dispatcher (an async handler) is running: until it
        finishes, the loop yields after every poll so that task is never kept waiting."""
        self.active_tasks += 1
        self._need_yield = True

    def task_finished(self) -> None:
        self.active_tasks -= 1

    def wake(self) -> None:
        """Leave the park now (in-process sends, new transports)."""
        self._need_yield = True
        scope = self._park_scope
        if scope is not None:
            scope.cancel()

    # -- the loop ---------------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """Poll every transport once and run due timers; return whether any work was done."""
        now = _clock()
        if now - self._last_poll > self._gap_warning:
            self._note_gap(now - self._last_poll)
        self._last_poll = now
        worked = False
        for poll in self._polls:
            if poll(now):
                worked = True
        if now >= self._next_deadline:
            self._run_timers(now)
        return worked

    def _note_gap(self, gap: float) -> None:
        self.stats.long_gaps += 1
        if gap > self.stats.longest_gap:
            self.stats.longest_gap = gap
        log.debug("dispatcher was not polled for %.1f ms", gap * 1e3)

    def _run_timers(self, now: float) -> None:
        self.stats.timer_runs += 1
        nxt = math.inf
        for transport in self._transports:
            transport.on_timer(now)
            deadline = transport.next_deadline()
            if deadline is not None and deadline < nxt:
                nxt = deadline
        self._next_deadline = nxt

    async def run(self) -> None:
        """Run until cancelled; closes every transport on the way out."""
        cfg = self.config
        share_cpu = cfg.share_cpu
        last_work = last_yield = _clock()
        try:
            while not self._closed:
                try:
                    worked = self.poll_once()
                except Exception:  # a transport bug must not take the process down
                    self.stats.errors += 1
                    log.exception("transport poll failed")
                    worked = False
                    await trio.sleep(0.001)
                self.stats.polls += 1
                now = _clock()
                if worked:
                    last_work = now
                elif share_cpu:
                    sched_yield()
                if self._need_yield or self.active_tasks or now - last_yield > cfg.yield_interval:
                    self._need_yield = False
                    self.stats.yields += 1
                    await trio.lowlevel.checkpoint()
                    last_yield = _clock()
                    # time spent in other tasks is not a gap of ours
                    self._last_poll = last_yield
                elif now - last_work > cfg.spin_budget:
                    await self._park()
                    last_work = last_yield = self._last_poll = _clock()
        finally:
            self.close()

    async def _park(self) -> None:
        for transport in self._transports:
            if transport.has_pending():
                return
        self.stats.parks += 1
        timeout = self._next_deadline - _clock()
        if timeout <= 0:
            return
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            self._park_scope = scope
            try:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
            finally:
                self._park_scope = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for transport in list(self._transports):
            try:
                transport.close()
            except Exception:
                log.exception("closing %r failed", transport)
        self._transports.clear()
        self._polls = ()
        self._epoll.close()

    @property
    def closed(self) -> bool:
        return self._closed


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
