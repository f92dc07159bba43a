"""The dispatcher's synchronous core: polling, timers, the spin loop and inline waits.

Compiled with mypyc (``rpcfast._compiled``): it runs between every two datagrams, on the server
(the spin loop) and on the client (a caller driving ``poll_once`` while it waits for its own
response), so the interpreter's share of each iteration is what a round trip pays for
detecting its datagram. The async parts (yielding to trio, parking in epoll) stay in
``rpcfast.dispatch._dispatcher``, which owns one :class:`Poller`.
"""

from __future__ import annotations

import logging
import math
import os
import select
import time
from collections.abc import Callable
from typing import Any, Final

import trio

log: Final = logging.getLogger("rpcfast.dispatch")

_clock: Final = time.perf_counter
_INLINE_WAIT: Final = 0.001
"""Longest sleep in the dispatcher's own epoll (its resolution), trio waits meanwhile."""
_GAP_FLOOR: Final = 0.000005
_WAKE_COST: Final = 0.00015
"""A wake-up from a sleep here, at worst on a loaded 2-core machine (DESIGN.md: ~40 us quiet)."""
_SHORT_WAITS: Final = 4.0
"""Recent idle stretches under this many ``busy_spin`` keep a busy loop spinning."""
_DECAY: Final = 0.75
"""Per stretch, how much of the longest recent one is still remembered."""

YIELD: Final = 0
""":meth:`Poller.spin` result: let other trio tasks run, then spin again."""
PARK: Final = 1
""":meth:`Poller.spin` result: the spin budget is spent, sleep until there is work."""
FAILED: Final = 2
""":meth:`Poller.spin` result: a transport's poll raised (logged); back off briefly."""
CLOSED: Final = 3
""":meth:`Poller.spin` result: the dispatcher was closed from inside a poll."""


class LoadProbe:
    """Whether more threads are runnable than the machine has cores, from the running count in
    ``/proc/loadavg`` (instantaneous, unlike the averages beside it). Re-read at most every
    ``interval`` seconds; where the file cannot be read the machine counts as never busy."""

    def __init__(self, interval: float, path: str = "/proc/loadavg") -> None:
        self._interval = interval
        self._cores = os.cpu_count() or 1
        self._next = -math.inf
        self._busy = False
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = -1

    def busy(self, now: float) -> bool:
        if now < self._next:
            return self._busy
        self._next = now + self._interval
        if self._fd >= 0:
            try:
                fields = os.pread(self._fd, 128, 0).split()
                self._busy = int(fields[3].partition(b"/")[0]) > self._cores
            except (OSError, IndexError, ValueError):
                self._busy = False
        return self._busy

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Poller:
    """Every transport's non-blocking poll, their timers, and the idle-spin bookkeeping.

    ``config`` is a :class:`rpcfast.dispatch.DispatchConfig`; its values are copied here.
    """

    def __init__(self, config: Any) -> None:
        self.spin_budget: float = float(config.spin_budget)
        self.yield_interval: float = float(config.yield_interval)
        self.share_cpu: bool = bool(config.share_cpu)
        self.gap_warning: float = float(config.gap_warning)
        self.busy_spin: float = min(float(config.busy_spin), self.spin_budget)
        self.load: LoadProbe | None = (
            LoadProbe(float(config.load_interval), str(config.load_file))
            if config.park_when_busy
            else None
        )
        self.epoll = select.epoll()
        self.transports: list[Any] = []
        self.polls: tuple[Callable[[float], bool], ...] = ()  # bound Transport.poll methods
        self.next_deadline = math.inf
        self.need_yield = False
        self.active_tasks = 0
        self.park_scope: Any = None  # the trio.CancelScope of a park in progress
        self.closed = False
        now = _clock()
        self.last_poll = now
        self.last_work = now
        self.last_yield = now
        self.idle_since = math.inf  # start of the current run of empty inline polls
        # recent idle stretches between two polls that found work (a decaying maximum): short
        # ones mean work comes back quickly, so spinning on a busy machine still pays (a read
        # loop); long ones mean the wait is on other processes that need the cores (a write
        # replicated to 3 backups)
        self.recent_idle = 0.0
        self.worked_at = now
        self.slept = False
        # statistics (DispatchStats reads them)
        self.n_polls = 0
        self.n_parks = 0
        self.n_yields = 0
        self.n_busy_parks = 0
        self.n_inline_waits = 0
        self.n_timer_runs = 0
        self.n_long_gaps = 0
        self.longest_gap = 0.0
        self.n_errors = 0

    # -- signals from transports and callers ------------------------------------------------------
    def schedule(self, deadline: float) -> None:
        """Make sure transport timers run no later than ``deadline`` (perf_counter time)."""
        if deadline < self.next_deadline:
            self.next_deadline = deadline
            scope = self.park_scope
            if scope is not None:
                scope.deadline = trio.current_time() + max(0.0, deadline - _clock())

    def request_yield(self) -> None:
        """Another task became runnable (a handler task, a woken caller): let it run soon."""
        self.need_yield = True

    def task_started(self) -> None:
        self.active_tasks += 1
        self.need_yield = True

    def task_finished(self) -> None:
        self.active_tasks -= 1

    def wake(self) -> None:
        """Leave the park now (in-process sends, new transports)."""
        self.need_yield = True
        scope = self.park_scope
        if scope is not None:
            scope.cancel()

    # -- polling ----------------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """Poll every transport once and run due timers; return whether any work was done.

        For callers that spin on it inline: with ``park_when_busy``, after ``busy_spin`` of
        polls that found nothing on an oversubscribed machine, it sleeps until a transport has
        input (at most ~1 ms) instead of returning at once."""
        worked = self.poll_all()
        if worked:
            self.idle_since = math.inf
        else:
            if self.share_cpu:
                os.sched_yield()
            load = self.load
            if load is not None:
                now = self.last_poll
                if now < self.idle_since:
                    self.idle_since = now
                elif (
                    now - self.idle_since > self.busy_spin
                    and self.recent_idle > _SHORT_WAITS * self.busy_spin
                    and load.busy(now)
                ):
                    self.wait_inline()
        return worked

    def wait_inline(self) -> None:
        """Sleep in the kernel until a transport fd is readable (at most ~1 ms, epoll's
        resolution, nor past the next transport timer): a woken sleeper gets a core promptly,
        while a yielding spinner may wait out another process's whole time slice."""
        for transport in self.transports:
            if transport.has_pending():  # input that no fd announces (ZeroMQ's edge trigger)
                return
        timeout = min(_INLINE_WAIT, self.next_deadline - _clock())
        if timeout > 0:
            self.n_inline_waits += 1
            self.slept = True
            self.epoll.poll(timeout)

    def input_waiting(self) -> bool:
        """Whether a transport has input to take right now: a readable fd (one ``epoll_wait``
        that does not sleep, ~1 us) or input that no fd announces. Takes nothing."""
        if self.closed:
            return False
        for transport in self.transports:
            if transport.has_pending():
                return True
        return len(self.epoll.poll(0, 1)) > 0

    def poll_all(self) -> bool:
        now = _clock()
        if now - self.last_poll > self.gap_warning:
            self.note_gap(now - self.last_poll)
        self.last_poll = now
        worked = False
        for poll in self.polls:
            if poll(now):
                worked = True
        if worked and self.load is not None:  # (only park_when_busy needs the stretches)
            gap = now - self.worked_at
            if self.slept:  # don't count our own wake-up as waiting (or sleeping would stick)
                gap -= _WAKE_COST
                self.slept = False
            if gap > _GAP_FLOOR:  # (back-to-back work is no idle stretch)
                self.recent_idle = max(gap, self.recent_idle * _DECAY)
            self.worked_at = now
        if now >= self.next_deadline:
            self.run_timers(now)
        return worked

    def note_gap(self, gap: float) -> None:
        self.n_long_gaps += 1
        if gap > self.longest_gap:
            self.longest_gap = gap
        log.debug("dispatcher was not polled for %.1f ms", gap * 1e3)

    def run_timers(self, now: float) -> None:
        self.n_timer_runs += 1
        nxt = math.inf
        for transport in self.transports:
            transport.on_timer(now)
            deadline = transport.next_deadline()
            if deadline is not None and deadline < nxt:
                nxt = deadline
        self.next_deadline = nxt

    def spin(self) -> int:
        """The dispatcher's loop between two awaits: poll until other trio tasks must run
        (:data:`YIELD`), the spin budget is spent (:data:`PARK`), a poll failed
        (:data:`FAILED`) or the dispatcher closed (:data:`CLOSED`).

        It yields when a task asked for it, while handler tasks run, and at least every
        ``yield_interval``; it parks ``spin_budget`` after the last work (``busy_spin`` on an
        oversubscribed machine while recent waits for work were long)."""
        load = self.load
        spin_budget = self.spin_budget
        busy_spin = self.busy_spin
        yield_interval = self.yield_interval
        while not self.closed:
            try:
                worked = self.poll_all()
            except Exception:  # a transport bug must not take the process down
                self.n_errors += 1
                log.exception("transport poll failed")
                return FAILED
            self.n_polls += 1
            self.idle_since = math.inf  # a caller's inline spin starts a new idle run
            # an empty poll took no time worth a second clock read (~0.2 us): reuse its own
            now = _clock() if worked else self.last_poll
            budget = spin_budget
            if worked:
                self.last_work = now
            elif (
                load is not None and self.recent_idle > _SHORT_WAITS * busy_spin and load.busy(now)
            ):
                budget = busy_spin
            elif self.share_cpu:
                os.sched_yield()
            if self.need_yield or self.active_tasks or now - self.last_yield > yield_interval:
                self.need_yield = False
                self.n_yields += 1
                return YIELD
            if now - self.last_work > budget:
                if budget != spin_budget:
                    self.n_busy_parks += 1
                return PARK
        return CLOSED

    def resumed(self, parked: bool) -> None:
        """Back from a yield or a park: time spent in other tasks is not a gap of ours, and
        a park restarts the spin budget."""
        now = _clock()
        self.last_yield = now
        self.last_poll = now
        if parked:
            self.last_work = now

    def close(self) -> None:
        self.closed = True
        self.epoll.close()
        if self.load is not None:
            self.load.close()
