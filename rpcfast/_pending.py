"""A client call in flight: the one object a transport completes or fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from rpcfast._errors import RpcError


class PendingCall:
    """Plain slotted object (no attrs on the per-call hot path).

    A transport calls exactly one of :meth:`complete` or :meth:`fail`. The caller spins on
    ``done`` first and only creates the trio ``Event`` when it has to sleep; callback-style
    callers (``Connection.start``) set ``callback``, run inside the dispatcher's poll.
    """

    __slots__ = (
        "callback",
        "channel",
        "done",
        "error",
        "event",
        "handle",
        "payload",
        "recv_ns",
        "sent_ns",
        "started",
        "waker",
    )

    def __init__(self) -> None:
        self.done = False
        self.payload: memoryview | None = None
        self.error: RpcError | None = None
        self.event: trio.Event | None = None
        self.handle: Any = None
        self.sent_ns = 0
        self.recv_ns = 0
        self.started = 0.0
        self.waker: Any = None
        self.callback: Callable[[PendingCall], None] | None = None
        self.channel: Any = None  # the transport's per-peer state for this call, if it has one

    def complete(self, payload: memoryview) -> None:
        if self.done:
            return
        self.done = True
        self.payload = payload
        if self.callback is not None:
            self.callback(self)
        if self.event is not None:
            self.event.set()
            if self.waker is not None:
                self.waker()

    def fail(self, error: RpcError) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        if self.callback is not None:
            self.callback(self)
        if self.event is not None:
            self.event.set()
            if self.waker is not None:
                self.waker()
