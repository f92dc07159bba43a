"""In-process transport: for unit tests of the layers above transports.

Messages are copied once (joined) at send, so a handler never aliases the caller's buffers.
Endpoints are found by name in a per-trio-run registry: ``inproc://name``.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from rpcfast._errors import PeerDead
from rpcfast._types import Buffer
from rpcfast.transports._base import Transport

if TYPE_CHECKING:
    from rpcfast._pending import PendingCall
    from rpcfast.dispatch import Dispatcher

_registry: trio.lowlevel.RunVar[dict[str, InprocTransport]] = trio.lowlevel.RunVar(
    "rpcfast_inproc_registry"
)
_names = itertools.count(1)

_REQ, _ABORT = 0, 1


def _endpoints() -> dict[str, InprocTransport]:
    try:
        return _registry.get()
    except LookupError:
        table: dict[str, InprocTransport] = {}
        _registry.set(table)
        return table


class InprocTransport(Transport):
    scheme: ClassVar[str] = "inproc"

    def __init__(self, dispatcher: Dispatcher, name: str | None = None) -> None:
        super().__init__(dispatcher)
        endpoints = _endpoints()
        if not name:
            name = f"anon-{next(_names)}"
        if name in endpoints:
            raise OSError(f"inproc://{name} is already bound")
        endpoints[name] = self
        self.name = name
        self.address = f"inproc://{name}"
        self._inbox: deque[tuple[int, Any, memoryview | None]] = deque()
        self._responses: deque[tuple[int, memoryview]] = deque()
        self._calls: dict[int, PendingCall] = {}
        self._ids = itertools.count(1)
        self._closed = False

    @classmethod
    def open(cls, dispatcher: Dispatcher, where: str) -> InprocTransport:
        return cls(dispatcher, where or None)

    def poll(self, now: float) -> bool:
        worked = False
        while self._responses:
            rpc_id, payload = self._responses.popleft()
            pending = self._calls.pop(rpc_id, None)
            if pending is not None:
                pending.complete(payload)
            worked = True
        while self._inbox:
            kind, token, message = self._inbox.popleft()
            worked = True
            sink = self.sink
            if sink is None:
                continue
            if kind == _REQ:
                assert message is not None
                sink.on_request(self, token, message)
            else:
                sink.on_aborted(self, token)
        return worked

    def has_pending(self) -> bool:
        return bool(self._inbox or self._responses)

    def call(self, peer: str, message: Sequence[Buffer], pending: PendingCall) -> None:
        server = _endpoints().get(peer)
        if server is None or server._closed or server.sink is None:
            pending.fail(PeerDead(f"no in-process server at inproc://{peer}"))
            return
        rpc_id = next(self._ids)
        pending.handle = (server, rpc_id)
        self._calls[rpc_id] = pending
        server._inbox.append((_REQ, (self, rpc_id), memoryview(b"".join(message))))
        self.dispatcher.wake()

    def cancel(self, pending: PendingCall) -> None:
        if pending.handle is None:
            return
        server, rpc_id = pending.handle
        if self._calls.pop(rpc_id, None) is not None and not server._closed:
            server._inbox.append((_ABORT, (self, rpc_id), None))
            self.dispatcher.wake()

    def reply(self, token: Any, message: Sequence[Buffer]) -> None:
        client, rpc_id = token
        if client._closed:
            return
        client._responses.append((rpc_id, memoryview(b"".join(message))))
        self.dispatcher.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoints = _endpoints()
        if endpoints.get(self.name) is self:
            del endpoints[self.name]
        calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.fail(PeerDead("transport closed"))
