"""ZeroMQ transport: ROUTER for the server role, one DEALER per peer for the client role.

ZeroMQ already gives reliable, ordered, framed delivery over TCP, so there is no session core:
frames are ``[header, message]`` with a 9-byte header (kind, rpc id). Liveness is ours: while a
call is outstanding and the peer has been silent for ``ping_interval``, the client pings; the
server answers BUSY when it knows the call and LOST when it does not (it restarted), and silence
for ``abort_after`` fails the peer's calls with ``PeerDead``.

``zmq.FD`` is edge-triggered: it only says "events may have changed". So ``has_pending`` reads
``zmq.EVENTS`` before the dispatcher parks, and ``poll`` drains each socket until ``zmq.Again``.
Messages of 64 KB and more are sent without copying (``copy=False``), smaller ones copied: pyzmq
measures zero-copy as slower below that size.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import zmq

from rpcfast._errors import PeerDead
from rpcfast._types import Buffer
from rpcfast.transports._base import Transport
from rpcfast.transports._udp import split_host_port

if TYPE_CHECKING:
    from rpcfast._pending import PendingCall
    from rpcfast.dispatch import Dispatcher

log = logging.getLogger("rpcfast.zmq")

_HDR = struct.Struct("<BQ")
REQUEST, RESPONSE, ABORT, PING, BUSY, LOST = range(6)
_ZERO_COPY_MIN = 65536
_BATCH = 64


def _view(frame: zmq.Frame) -> memoryview:
    """Small frames live inside the zmq message, unaligned for Cap'n Proto: copy those into a
    bytes object (8-byte aligned); large ones are separately allocated and used in place."""
    if len(frame) < _ZERO_COPY_MIN:
        return memoryview(frame.bytes)
    return frame.buffer


class _Peer:
    __slots__ = ("calls", "last_heard", "last_ping", "sock")

    def __init__(self, sock: zmq.Socket[Any], now: float) -> None:
        self.sock = sock
        self.calls: dict[int, PendingCall] = {}
        self.last_heard = now
        self.last_ping = now


class ZmqTransport(Transport):
    scheme: ClassVar[str] = "zmq"

    def __init__(
        self,
        dispatcher: Dispatcher,
        bind: str | None,
        *,
        ping_interval: float = 0.05,
        abort_after: float = 1.0,
    ) -> None:
        super().__init__(dispatcher)
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.ping_interval = ping_interval
        self.abort_after = abort_after
        self.router: zmq.Socket[Any] | None = None
        if bind is not None:
            router = self.ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            host, port, _ = split_host_port(bind)
            endpoint = f"tcp://{host}:{port or '*'}"
            try:
                router.bind(endpoint)
            except zmq.ZMQError as exc:
                router.close()
                raise OSError(f"cannot bind {endpoint}: {exc}") from exc
            last = router.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(last, bytes)
            self.address = "zmq://" + last.decode().removeprefix("tcp://")
            self.router = router
        self._peers: dict[str, _Peer] = {}
        self._sockets: list[zmq.Socket[Any]] = [self.router] if self.router is not None else []
        self._ids = itertools.count(1)
        self._inflight: set[tuple[bytes, int]] = set()
        self._closed = False

    @classmethod
    def open(cls, dispatcher: Dispatcher, where: str) -> ZmqTransport:
        return cls(dispatcher, where or None)

    def filenos(self) -> Sequence[int]:
        return [int(s.getsockopt(zmq.FD)) for s in self._sockets]

    def has_pending(self) -> bool:
        return any(int(s.getsockopt(zmq.EVENTS)) & zmq.POLLIN for s in self._sockets)

    # -- receive ----------------------------------------------------------------------------------
    def poll(self, now: float) -> bool:
        worked = False
        router = self.router
        if router is not None:
            worked = self._poll_router(router)
        for peer in self._peers.values():
            if peer.calls and self._poll_dealer(peer, now):
                worked = True
        return worked

    def _poll_router(self, router: zmq.Socket[Any]) -> bool:
        count = 0
        while count < _BATCH:
            try:
                frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            count += 1
            if len(frames) != 3 or len(frames[1]) != _HDR.size:
                continue  # malformed: dropped
            identity = frames[0].bytes
            kind, rpc_id = _HDR.unpack(frames[1].buffer)
            token = (identity, rpc_id)
            if kind == REQUEST:
                self._inflight.add(token)
                sink = self.sink
                if sink is not None:
                    sink.on_request(self, token, _view(frames[2]))
            elif kind == ABORT:
                if token in self._inflight:
                    self._inflight.discard(token)
                    if self.sink is not None:
                        self.sink.on_aborted(self, token)
            elif kind == PING:
                answer = BUSY if token in self._inflight else LOST
                router.send_multipart([identity, _HDR.pack(answer, rpc_id), b""])
        return count > 0

    def _poll_dealer(self, peer: _Peer, now: float) -> bool:
        count = 0
        sock = peer.sock
        while count < _BATCH:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            count += 1
            peer.last_heard = now
            if len(frames) != 2 or len(frames[0]) != _HDR.size:
                continue
            kind, rpc_id = _HDR.unpack(frames[0].buffer)
            if kind == RESPONSE:
                pending = peer.calls.pop(rpc_id, None)
                if pending is not None:
                    pending.complete(_view(frames[1]))
            elif kind == LOST:
                pending = peer.calls.pop(rpc_id, None)
                if pending is not None:
                    pending.fail(PeerDead("the server no longer knows this call (restarted?)"))
        return count > 0

    # -- client role ------------------------------------------------------------------------------
    def _peer(self, where: str, now: float) -> _Peer:
        peer = self._peers.get(where)
        if peer is None:
            host, port, _ = split_host_port(where)
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{host}:{port}")
            peer = _Peer(sock, now)
            self._peers[where] = peer
            self._sockets.append(sock)
            self.dispatcher.refresh_fds()
        return peer

    def call(self, peer: str, message: Sequence[Buffer], pending: PendingCall) -> None:
        if self._closed:
            pending.fail(PeerDead("transport closed"))
            return
        now = time.perf_counter()
        try:
            target = self._peer(peer, now)
        except (ValueError, zmq.ZMQError) as exc:
            pending.fail(PeerDead(f"cannot connect to {peer!r}: {exc}"))
            return
        rpc_id = next(self._ids)
        pending.handle = (target, rpc_id)
        if not target.calls:
            target.last_heard = target.last_ping = now
        target.calls[rpc_id] = pending
        self._send(target.sock, _HDR.pack(REQUEST, rpc_id), message)
        self.dispatcher.schedule(now + self.ping_interval)

    @staticmethod
    def _send(sock: zmq.Socket[Any], header: bytes, message: Sequence[Buffer]) -> None:
        body = message[0] if len(message) == 1 else b"".join(message)
        copy = memoryview(body).nbytes < _ZERO_COPY_MIN
        try:
            sock.send_multipart([header, body], zmq.NOBLOCK, copy=copy)
        except zmq.Again:  # high-water mark reached: this peer is slow, wait for room
            sock.send_multipart([header, body], copy=copy)

    def cancel(self, pending: PendingCall) -> None:
        if pending.handle is None:
            return
        target, rpc_id = pending.handle
        if target.calls.pop(rpc_id, None) is not None and not self._closed:
            target.sock.send_multipart([_HDR.pack(ABORT, rpc_id), b""])

    # -- server role ------------------------------------------------------------------------------
    def reply(self, token: Any, message: Sequence[Buffer]) -> None:
        if self._closed or token not in self._inflight:
            return  # aborted by the client meanwhile
        self._inflight.discard(token)
        identity, rpc_id = token
        body = message[0] if len(message) == 1 else b"".join(message)
        size = memoryview(body).nbytes
        assert self.router is not None
        self.router.send_multipart(
            [identity, _HDR.pack(RESPONSE, rpc_id), body], copy=size < _ZERO_COPY_MIN
        )

    # -- liveness ---------------------------------------------------------------------------------
    def on_timer(self, now: float) -> None:
        for peer in self._peers.values():
            if not peer.calls:
                continue
            silent = now - peer.last_heard
            if silent >= self.abort_after:
                calls, peer.calls = peer.calls, {}
                for pending in calls.values():
                    pending.fail(PeerDead(f"no answer for {silent:.2f} s"))
            elif silent >= self.ping_interval and now - peer.last_ping >= self.ping_interval:
                peer.last_ping = now
                for rpc_id in list(peer.calls):
                    peer.sock.send_multipart([_HDR.pack(PING, rpc_id), b""], zmq.NOBLOCK)

    def next_deadline(self) -> float | None:
        if any(p.calls for p in self._peers.values()):
            return time.perf_counter() + self.ping_interval
        return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            sock.close(linger=0)
        for peer in self._peers.values():
            calls, peer.calls = peer.calls, {}
            for pending in calls.values():
                pending.fail(PeerDead("transport closed"))
