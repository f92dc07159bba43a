"""The transport interface: reliable request/response messages between endpoints.

Deliberately small, so that a verbs (RDMA) transport fits: a transport moves whole messages and
reports them to its sink; it never decodes them. Unreliable datagram drivers (UDP, verbs UD) get
reliability from the sans-IO session core; reliable ones (ZeroMQ, in-process, verbs RC) implement
this interface directly. Everything here is non-blocking and called from the dispatcher's loop.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rpcfast._types import Buffer

if TYPE_CHECKING:
    from rpcfast._pending import PendingCall
    from rpcfast.dispatch import Dispatcher


class RequestSink(Protocol):
    """What a listening transport hands whole requests to (the server)."""

    def on_request(self, transport: Transport, token: Any, message: memoryview) -> None: ...

    def on_aborted(self, transport: Transport, token: Any) -> None: ...


class Transport(abc.ABC):
    """One local endpoint of one scheme; both client and server roles.

    ``token`` identifies a server-side request and is opaque to everything but its transport.
    """

    scheme: ClassVar[str]

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.sink: RequestSink | None = None
        self.address = ""

    @abc.abstractmethod
    def poll(self, now: float) -> bool:
        """Receive and process whatever is ready without blocking; return whether there was work."""

    def on_timer(self, now: float) -> None:
        """Run timers that are due (retransmission, expiry)."""

    def next_deadline(self) -> float | None:
        """``time.perf_counter()`` time at which :meth:`on_timer` must run next, if any."""
        return None

    def filenos(self) -> Sequence[int]:
        """File descriptors that become readable when :meth:`poll` has work."""
        return ()

    def drain(self, now: float) -> None:
        """Take in whatever waits on fds that :meth:`poll` skips for speed. Called when an fd
        of :meth:`filenos` woke the dispatcher but :meth:`poll` found nothing (else the fd
        stays readable and every sleep ends at once)."""

    def has_pending(self) -> bool:
        """Whether :meth:`poll` has work that no fd will announce (edge-triggered sources)."""
        return False

    @abc.abstractmethod
    def call(self, peer: str, message: Sequence[Buffer], pending: PendingCall) -> None:
        """Start a call to ``peer`` (the part of an address after ``scheme://``)."""

    @abc.abstractmethod
    def cancel(self, pending: PendingCall) -> None:
        """Forget a call and tell the server; no completion will follow."""

    @abc.abstractmethod
    def reply(self, token: Any, message: Sequence[Buffer]) -> None:
        """Send the response for a request received through the sink."""

    def close(self) -> None:
        """Release OS resources; calls still pending fail with ``PeerDead``."""
