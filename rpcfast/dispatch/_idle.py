"""Sleeping in the kernel without a trip through trio's scheduler.

A parked dispatcher used to wait as a trio task: a cancel scope for the next transport timer,
``wait_readable`` on the transports' epoll fd (an ``epoll_ctl`` each time), trio's own
``epoll_wait``, then a reschedule and a task switch to run it again. On this 2-core VM that is
~50 us of CPU per wake-up beside ~15 us for a raw blocking socket, and every message to a
process that sleeps between messages pays it: each backup of a replicated write, the master
waiting for their acknowledgements, a client that does not spin.

While no other trio task can run, that trip buys nothing, and the task that wants to sleep may
block in ``epoll_wait`` itself. :class:`TrioIdle` says when that is safe and does it:

- An instrument counts the tasks that trio has scheduled but not yet stepped (its run queue plus
  the rest of the current batch, which trio keeps in a local list). It resynchronises with the
  run queue whenever trio is about to wait for I/O, when the batch is empty by construction.
- The kernel wait covers the transports' fds and trio's own epoll fd (a nested epoll set), so
  I/O that trio waits for (other sockets, threads finishing, ``run_sync_soon``, signals through
  the wake-up fd) ends it at once, and it never outlasts trio's next deadline.
- It stands aside (the caller falls back to waiting in trio) under a clock other than trio's
  system clock (autojump, mock clocks), in guest mode, while a task waits in
  ``wait_all_tasks_blocked`` (it needs trio to see every task blocked), and until the count has
  been synchronised once.

It reaches into trio's runner (``GLOBAL_RUN_CONTEXT``, the epoll fd, the deadline heap); a trio
without them just disables it.
"""

from __future__ import annotations

import math
import select
import time
from typing import Any, Final

import trio

_clock: Final = time.perf_counter
MAX_BLOCK: Final = 1.0
"""Longest single kernel wait (seconds); the caller simply waits again."""

INPUT: Final = 1
"""``block`` result: a transport fd is readable."""
TRIO: Final = 2
"""``block`` result: trio has work (an fd of its own, a deadline): let it run."""
DUE: Final = 3
"""``block`` result: the caller's own deadline passed."""


def _runner() -> Any:
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT, SystemClock

        runner = GLOBAL_RUN_CONTEXT.runner
        if type(runner.clock) is not SystemClock or runner.is_guest:
            return None
        runner.io_manager._epoll.fileno()
        runner.deadlines.next_deadline()
        runner.waiting_for_idle.__len__()
        return runner
    except (ImportError, AttributeError, RuntimeError, OSError):
        return None


class TrioIdle(trio.abc.Instrument):
    """Whether this thread may sleep in the kernel now, and the sleep itself."""

    def __init__(self, runner: Any, fds: set[int]) -> None:
        self.runner = runner
        self._runq = runner.runq
        self._deadlines = runner.deadlines
        self._waiting_for_idle = runner.waiting_for_idle
        self._trio_clock = runner.clock
        self.pending = 0
        """Tasks scheduled by trio but not yet stepped (exact once ``synced``)."""
        self.synced = False
        self.epoll = select.epoll()
        self.trio_fd = runner.io_manager._epoll.fileno()
        self.epoll.register(self.trio_fd, select.EPOLLIN)
        self._fds: set[int] = set()
        self.set_fds(fds)
        self.n_blocks = 0
        self.closed = False

    @classmethod
    def install(cls, fds: set[int]) -> TrioIdle | None:
        """For the current trio run, or None where trio's internals are not as expected."""
        runner = _runner()
        if runner is None:
            return None
        idle = cls(runner, fds)
        trio.lowlevel.add_instrument(idle)
        return idle

    # -- the instrument ---------------------------------------------------------------------------
    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.pending += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.pending -= 1

    def before_io_wait(self, timeout: float) -> None:
        self.pending = len(self._runq)  # the batch is done: the run queue is all there is
        self.synced = True

    # -- fds --------------------------------------------------------------------------------------
    def set_fds(self, fds: set[int]) -> None:
        for fd in self._fds - fds:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass  # already closed: the kernel dropped it from the set
        for fd in fds - self._fds:
            self.epoll.register(fd, select.EPOLLIN)
        self._fds = set(fds)

    # -- sleeping ---------------------------------------------------------------------------------
    def usable(self) -> bool:
        """The task count is known and trio is not waiting for all tasks to block."""
        return self.synced and not self._waiting_for_idle and not self.closed

    def may_block(self, others: int = 0) -> bool:
        """:meth:`usable`, and no task but the current one (and ``others`` known to be
        harmless) can run."""
        return self.pending <= others and self.usable()

    def block(self, until: float = math.inf) -> int:
        """Sleep until a transport fd is readable (:data:`INPUT`), trio has something to do
        (:data:`TRIO`) or ``until`` (perf_counter time) passes (:data:`DUE`). Call only after
        :meth:`may_block` said yes."""
        now = _clock()
        timeout = min(
            until - now,
            self._deadlines.next_deadline() - self._trio_clock.current_time(),
            MAX_BLOCK,
        )
        if timeout <= 0:
            return DUE if until <= now else TRIO
        self.n_blocks += 1
        events = self.epoll.poll(timeout)
        if not events:
            return DUE if _clock() >= until else TRIO
        trio_fd = self.trio_fd
        got_input = False
        for fd, _ in events:
            if fd != trio_fd:
                got_input = True
        return INPUT if got_input else TRIO

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.epoll.close()
        try:
            trio.lowlevel.remove_instrument(self)
        except (KeyError, RuntimeError):
            pass  # the run is over, or it was never added
