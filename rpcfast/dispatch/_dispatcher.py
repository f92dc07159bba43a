"""ONE polling loop per process (per trio run), in the style of RAMCloud's dispatcher.

The loop polls every transport without blocking, fires transport timers, and runs fast handlers
inline (they run inside ``Transport.poll``). While there is work, or until ``spin_budget`` seconds
after the last work, it spins: it only yields to trio when another task is known to be runnable
(``request_yield``) or every ``yield_interval`` seconds. Then it parks: all transport fds sit in
one epoll set whose fd trio waits on, with a cancel-scope deadline at the next transport timer,
so an idle process burns no CPU.

Measured on this 2-core VM (see DESIGN.md section 3): a sleeping wake-up costs ~40 us and a trio
checkpoint ~4 us, against ~1 us for a non-blocking receive that finds nothing. Hence the spin.

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
_INLINE_WAIT = 0.001
"""Longest sleep in the dispatcher's own epoll (its resolution), trio waits meanwhile."""
_GAP_FLOOR = 0.000005
_WAKE_COST = 0.00015
"""A wake-up from a sleep here, at worst on a loaded 2-core machine (DESIGN.md: ~40 us quiet)."""
_SHORT_WAITS = 4.0
"""Recent idle stretches under this many ``busy_spin`` keep a busy loop spinning."""
_DECAY = 0.75
"""Per stretch, how much of the longest recent one is still remembered."""


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
        cfg = self.config
        self._load = LoadProbe(cfg.load_interval, cfg.load_file) if cfg.park_when_busy else None
        self.busy_spin = min(cfg.busy_spin, cfg.spin_budget)
        self._idle_since = math.inf  # start of the current run of empty inline polls
        # recent idle stretches between two polls that found work (a decaying maximum): short
        # ones mean work comes back quickly, so spinning on a busy machine still pays (a read
        # loop); long ones mean the wait is on other processes that need the cores (a write
        # replicated to 3 backups)
        self._recent_idle = 0.0
        self._worked_at = self._last_poll
        self._slept = False

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
        """Poll every transport once and run due timers; return whether any work was done.

        For callers that spin on it inline: with ``park_when_busy``, after ``busy_spin`` of
        polls that found nothing on an oversubscribed machine, it sleeps until a transport has
        input (at most ~1 ms) instead of returning at once."""
        worked = self._poll_all()
        if worked:
            self._idle_since = math.inf
        elif self._load is not None:
            now = self._last_poll
            if now < self._idle_since:
                self._idle_since = now
            elif (
                now - self._idle_since > self.busy_spin
                and self._recent_idle > _SHORT_WAITS * self.busy_spin
                and self._load.busy(now)
            ):
                self._wait_inline()
        return worked

    def _wait_inline(self) -> None:
        """Sleep in the kernel until a transport fd is readable (at most ~1 ms, epoll's
        resolution, nor past the next transport timer): a woken sleeper gets a core promptly,
        while a yielding spinner may wait out another process's whole time slice."""
        for transport in self._transports:
            if transport.has_pending():  # input that no fd announces (ZeroMQ's edge trigger)
                return
        timeout = min(_INLINE_WAIT, self._next_deadline - _clock())
        if timeout > 0:
            self.stats.inline_waits += 1
            self._slept = True
            self._epoll.poll(timeout)

    def _poll_all(self) -> bool:
        now = _clock()
        if now - self._last_poll > self._gap_warning:
            self._note_gap(now - self._last_poll)
        self._last_poll = now
        worked = False
        for poll in self._polls:
            if poll(now):
                worked = True
        if worked and self._load is not None:  # (only park_when_busy needs the stretches)
            gap = now - self._worked_at
            if self._slept:  # don't count our own wake-up as waiting (or sleeping would stick)
                gap -= _WAKE_COST
                self._slept = False
            if gap > _GAP_FLOOR:  # (back-to-back work is no idle stretch)
                self._recent_idle = max(gap, self._recent_idle * _DECAY)
            self._worked_at = now
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
        load = self._load
        spin_budget = cfg.spin_budget
        last_work = last_yield = _clock()
        try:
            while not self._closed:
                try:
                    worked = self._poll_all()
                except Exception:  # a transport bug must not take the process down
                    self.stats.errors += 1
                    log.exception("transport poll failed")
                    worked = False
                    await trio.sleep(0.001)
                self.stats.polls += 1
                self._idle_since = math.inf  # a caller's inline spin starts a new idle run
                now = _clock()
                budget = spin_budget
                if worked:
                    last_work = now
                elif (
                    load is not None
                    and self._recent_idle > _SHORT_WAITS * self.busy_spin
                    and load.busy(now)
                ):
                    budget = self.busy_spin
                elif share_cpu:
                    sched_yield()
                if self._need_yield or self.active_tasks or now - last_yield > cfg.yield_interval:
                    self._need_yield = False
                    self.stats.yields += 1
                    await trio.lowlevel.checkpoint()
                    last_yield = _clock()
                    # time spent in other tasks is not a gap of ours
                    self._last_poll = last_yield
                elif now - last_work > budget:
                    if budget != spin_budget:
                        self.stats.busy_parks += 1
                    await self._park()
                    last_work = last_yield = self._last_poll = _clock()
        finally:
            self.close()

    async def _park(self) -> None:
        for transport in self._transports:
            if transport.has_pending():
                return
        self.stats.parks += 1
        self._slept = True
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
        if self._load is not None:
            self._load.close()

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
