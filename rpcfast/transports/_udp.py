"""UDP transport: non-blocking datagram sockets plus the sans-IO session core for reliability.

The driver part is tiny: receive datagrams, hand them to the core with the current time, send what
the core queues (scatter lists, ``sendmsg``), and turn core events into completions and requests.

Datagram size: on loopback the kernel takes 64 KB datagrams without IP fragmentation, so loopback
endpoints use ``max_datagram=65000`` (1 MB moves in 17 datagrams instead of 700); other endpoints
use 1472 (an Ethernet MTU). ``udp://host:port?max_datagram=N`` overrides it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import parse_qs

from rpcfast._errors import PeerDead
from rpcfast._session import (
    EV_ABORTED,
    EV_FAILED,
    EV_REQUEST,
    EV_RESPONSE,
    SessionConfig,
    SessionCore,
    _join_small,
)
from rpcfast._types import Buffer
from rpcfast.transports._base import RequestSink, Transport

try:  # the C calls (built with the compiled hot path), else their pure-Python equivalent
    from rpcfast.transports._sockops import SockOps
except ImportError:  # pragma: no cover - pure Python installs
    from rpcfast.transports._sockops_py import SockOps  # type: ignore[assignment]

if TYPE_CHECKING:
    from rpcfast._pending import PendingCall
    from rpcfast.dispatch import Dispatcher

# Final: compiled code reads these once instead of looking them up at every use
log: Final = logging.getLogger("rpcfast.udp")
_clock: Final = time.perf_counter

LOOPBACK_DATAGRAM: Final = 65000
NETWORK_DATAGRAM: Final = 1472
SOCKET_BUFFER: Final = 4 * 1024 * 1024
_RECV_SIZE: Final = 65536
_BATCH: Final = 64
MAX_CHANNELS: Final = 64
"""Connected sockets a client endpoint keeps (one per server); calls to further servers go
out of its unconnected socket."""


def split_host_port(where: str) -> tuple[str, int, dict[str, list[str]]]:
    """``host:port[?opts]`` or ``[v6]:port[?opts]`` -> (host, port, options)."""
    where, _, query = where.partition("?")
    if where.startswith("["):
        host, _, rest = where[1:].partition("]")
        port_text = rest.lstrip(":")
    else:
        host, _, port_text = where.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"expected host:port, got {where!r}")
    return host, int(port_text), parse_qs(query)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _set_buffer(sock: socket.socket, force: int, plain: int, size: int) -> int:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:  # not privileged: the kernel caps SO_RCVBUF at rmem_max
        sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return sock.getsockopt(socket.SOL_SOCKET, plain)


def _open_socket(family: int, host: str, port: int) -> tuple[socket.socket, int]:
    """A non-blocking datagram socket with large buffers, bound; and its receive buffer."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        rcvbuf = _set_buffer(sock, 33, socket.SO_RCVBUF, SOCKET_BUFFER)  # 33: SO_RCVBUFFORCE
        _set_buffer(sock, 32, socket.SO_SNDBUF, SOCKET_BUFFER)  # 32: SO_SNDBUFFORCE
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock, rcvbuf


class _Channel:
    """A client endpoint's connected socket to one server. The kernel then skips the route
    lookup on every send and the sender's address on every receive, and so does Python (it
    neither parses nor formats an address): a raw Python ping-pong over loopback is ~1.3 us
    faster a round trip connected than not, on this 2-core VM. Polled only while calls to its
    server are outstanding (anything the server sends later waits and is then dropped as stale)."""

    def __init__(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.addr = addr  # the session core's address object for the server (compared by identity)
        self.ops = ops = SockOps(sock)
        self.recv = ops.recv  # None when nothing is waiting
        self.send = ops.send  # False when the socket buffer is full
        self.call_whole = ops.call_whole  # send a one-datagram call and poll for its response
        self.sendmsg = sock.sendmsg
        self.outstanding = 0


class UdpTransport(Transport):
    """One UDP endpoint. ``client_only`` endpoints (the process's client side, see
    ``rpcfast.transports.client_transport``) send each server's calls over a socket connected to
    that server, up to ``max_channels`` of them."""

    scheme: ClassVar[str] = "udp"

    def __init__(
        self,
        dispatcher: Dispatcher,
        host: str,
        port: int,
        *,
        max_datagram: int | None = None,
        config: SessionConfig | None = None,
        client_only: bool = False,
        max_channels: int = MAX_CHANNELS,
    ) -> None:
        super().__init__(dispatcher)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock, rcvbuf = _open_socket(family, host, port)
        self.sock = sock
        self._host = host
        self._client_only = client_only
        self.max_channels = max_channels
        self._channels: dict[Any, _Channel] = {}  # server address -> its connected socket
        self._polled: list[_Channel] = []  # the channels with calls outstanding
        self._main_calls = 0  # calls of a client-only endpoint made over its unconnected socket
        self._inline_chan: _Channel | None = None  # the channel of the inline call in progress
        self.n_inline_calls = 0  # calls sent by call_inline
        self.n_answered_in_c = 0  # of those, answered while call_whole polled (no record made)
        self.n_drained = 0  # datagrams taken in by drain() (late replies on idle sockets)
        self._ops = ops = SockOps(sock)
        self._recvfrom = ops.recvfrom  # None when nothing is waiting
        self._sendto = ops.sendto  # False when the socket buffer is full
        self._sendmsg = sock.sendmsg
        if max_datagram is None:
            max_datagram = LOOPBACK_DATAGRAM if is_loopback(host) else NETWORK_DATAGRAM
        if config is None:
            # the kernel reports twice the buffer it accounts; keep the window well inside it
            window = max(2 * max_datagram, min(1024 * 1024, rcvbuf // 4))
            config = SessionConfig(max_datagram=max_datagram, window_bytes=window)
        self.config = config
        self.core = core = SessionCore(config)
        core.response_sink = self._on_response
        # a server's datagrams go straight to the C call (no channels to choose from)
        core.send_now = self._send_now if client_only else ops.send_now
        self.sink = self._sink
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if family == socket.AF_INET6 else bound_host
        self.address = f"udp://{shown}:{bound_port}"
        self._calls: dict[int, PendingCall] = {}
        self._peers: dict[str, Any] = {}
        self._closed = False
        self._now = 0.0  # the current poll's time while it delivers events, else 0
        self._send_errors = 0

    @property
    def send_errors(self) -> int:
        """Datagrams that failed to send (e.g. to an unreachable peer), left to the core's
        retransmission."""
        return self._send_errors + self._ops.errors

    @classmethod
    def open(cls, dispatcher: Dispatcher, where: str) -> UdpTransport:
        host, port, options = split_host_port(where)
        max_datagram = int(options["max_datagram"][0]) if "max_datagram" in options else None
        return cls(dispatcher, host, port, max_datagram=max_datagram)

    def filenos(self) -> Sequence[int]:
        if self._closed:
            return ()
        return (self.sock.fileno(), *(chan.sock.fileno() for chan in self._channels.values()))

    def has_pending(self) -> bool:
        return bool(self.core.outbox)

    # -- the hot path -----------------------------------------------------------------------------
    def poll(self, now: float) -> bool:
        core = self.core
        recvfrom = self._recvfrom
        count = 0
        self._now = now  # replies sent by fast handlers reuse this clock reading
        try:
            done = False
            polled = self._polled
            i = 0
            while i < len(polled):  # (a delivery may end a call and drop its channel)
                chan = polled[i]
                i += 1
                addr = chan.addr
                recv = chan.recv
                while count < _BATCH:
                    try:
                        data = recv(_RECV_SIZE)
                    except OSError as exc:  # e.g. the server's port is closed (ICMP)
                        log.debug("udp receive error from %s: %s", addr, exc)
                        break
                    if data is None:
                        break
                    count += 1
                    if core.receive(data, addr, now):
                        done = True  # see below
                        break
                if done:
                    break
            if not done and (not self._client_only or self._main_calls):
                while count < _BATCH:
                    try:
                        got = recvfrom(_RECV_SIZE)
                    except OSError as exc:  # e.g. an ICMP error queued on the socket
                        log.debug("udp receive error: %s", exc)
                        break
                    if got is None:
                        break
                    data, addr = got
                    count += 1
                    if core.receive(data, addr, now):
                        # a request or response was handed over (and a fast reply sent):
                        # return, so the dispatcher or the caller spinning on it goes on at once
                        break
        finally:
            self._now = 0.0
        # _settle inlined: poll runs between every two datagrams, mostly finding nothing
        if core.events:
            self._deliver()
        if core.outbox:
            self._flush()
        if core.deadline_moved:
            self._rearm()
        return count > 0

    def _settle(self) -> None:
        """After receiving: hand over what the session core completed, send what it queued,
        move the timer."""
        core = self.core
        if core.events:
            self._deliver()
        if core.outbox:
            self._flush()
        if core.deadline_moved:
            self._rearm()

    def drain(self, now: float) -> None:
        """Receive on the sockets :meth:`poll` skips (channels without calls outstanding, a
        client endpoint's own socket without calls): late or duplicate replies, which the
        session core drops as stale, and anything else that arrived there."""
        core = self.core
        if self._closed:
            return
        socks: list[tuple[socket.socket, Any]] = [
            (chan.sock, chan.addr) for chan in self._channels.values() if not chan.outstanding
        ]
        if self._client_only and not self._main_calls:
            socks.append((self.sock, None))
        self._now = now
        try:
            for sock, addr in socks:
                for _ in range(_BATCH):
                    try:
                        if addr is None:
                            data, sender = sock.recvfrom(_RECV_SIZE)
                        else:
                            data, sender = sock.recv(_RECV_SIZE), addr
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        log.debug("udp receive error: %s", exc)
                        break
                    self.n_drained += 1
                    core.receive(data, sender, now)
        finally:
            self._now = 0.0
        self._settle()

    def _on_response(self, rpc_id: int, payload: memoryview) -> None:
        calls = self._calls
        pending = calls.get(rpc_id)  # get and del: compiled, cheaper than pop(rpc_id, None)
        if pending is not None:
            del calls[rpc_id]
            if self._client_only:
                self._release(pending)
            pending.complete(payload)

    def _release(self, pending: PendingCall) -> None:
        """The call is over: stop polling its channel if it was the channel's last."""
        chan: _Channel | None = pending.channel
        if chan is None:
            self._main_calls -= 1
            return
        pending.channel = None
        self._release_channel(chan)

    @property
    def sink(self) -> RequestSink | None:
        return self._sink

    @sink.setter
    def sink(self, sink: RequestSink | None) -> None:
        """Requests go from the session core straight to the sink, without a call of ours."""
        self._sink = sink
        core: SessionCore | None = getattr(self, "core", None)  # None while __init__ runs
        if core is not None:
            if sink is None:
                core.request_sink = None
            else:  # a router's compiled target, else the sink's method bound to us
                target = getattr(sink, "request_target", None)
                core.request_sink = (
                    partial(sink.on_request, self) if target is None else target(self)
                )

    def _rearm(self) -> None:
        """The core armed a timer: make sure the dispatcher runs ours by then."""
        core = self.core
        core.deadline_moved = False
        deadline = core.next_deadline()
        if deadline is not None:
            self.dispatcher.schedule(deadline)

    def _deliver(self) -> None:
        events = self.core.events
        calls = self._calls
        while events:
            kind, a, b = events.popleft()
            if kind == EV_RESPONSE:
                pending = calls.pop(a, None)
                if pending is not None:
                    if self._client_only:
                        self._release(pending)
                    pending.complete(b)
            elif kind == EV_REQUEST:
                sink = self.sink
                if sink is not None:
                    sink.on_request(self, a, b)
            elif kind == EV_FAILED:
                pending = calls.pop(a, None)
                if pending is not None:
                    if self._client_only:
                        self._release(pending)
                    pending.fail(PeerDead(str(b)))
            elif kind == EV_ABORTED:
                sink = self.sink
                if sink is not None:
                    sink.on_aborted(self, a)

    def _flush(self) -> None:
        outbox = self.core.outbox
        while outbox:
            addr, buffers = outbox.popleft()
            chan = self._channels.get(addr) if self._client_only else None
            try:
                if chan is not None:
                    if len(buffers) == 1:
                        sent = chan.send(buffers[0])
                    else:
                        chan.sendmsg(buffers)
                        sent = True
                elif len(buffers) == 1:  # one contiguous datagram: the cheaper call
                    sent = self._sendto(buffers[0], addr)
                else:
                    self._sendmsg(buffers, (), 0, addr)
                    sent = True
            except (BlockingIOError, InterruptedError):
                sent = False
            except OSError as exc:  # unreachable peer, message too long: the core resends or aborts
                self._send_errors += 1
                log.debug("udp send to %s failed: %s", addr, exc)
                continue
            if not sent:
                outbox.appendleft((addr, buffers))
                return  # socket buffer full: has_pending() keeps the dispatcher polling

    def _send_now(self, addr: Any, datagram: bytes) -> bool:
        """Send one datagram at once (the session core's common case, without ``outbox``);
        False if the socket buffer is full (the core queues it then)."""
        chan = self._channels.get(addr) if self._client_only else None
        try:
            if chan is not None:
                return chan.send(datagram)
            return self._sendto(datagram, addr)
        except OSError as exc:  # unreachable peer: as in _flush, the core resends or aborts
            self._send_errors += 1
            log.debug("udp send to %s failed: %s", addr, exc)
        return True

    def _resolve(self, peer: str) -> Any:
        addr = self._peers.get(peer)
        if addr is None:
            host, port, _ = split_host_port(peer)
            info = socket.getaddrinfo(host, port, self.sock.family, socket.SOCK_DGRAM)
            addr = info[0][4][:2]
            self._peers[peer] = addr
        return addr

    def call(self, peer: str, message: Sequence[Buffer], pending: PendingCall) -> None:
        if self._closed:
            pending.fail(PeerDead("transport closed"))
            return
        addr = self._peers.get(peer)
        if addr is None:
            try:
                addr = self._resolve(peer)
            except (OSError, ValueError) as exc:
                pending.fail(PeerDead(f"cannot resolve {peer!r}: {exc}"))
                return
        core = self.core
        chan: _Channel | None = None
        if self._client_only:
            chan = self._channels.get(addr)
            if chan is None and len(self._channels) < self.max_channels:
                try:
                    chan = self._open_channel(addr)
                except OSError as exc:
                    pending.fail(PeerDead(f"cannot connect to {peer!r}: {exc}"))
                    return
        rpc_id = core.call(addr, message, pending.started or _clock())
        pending.handle = rpc_id
        self._calls[rpc_id] = pending
        if self._client_only:
            if chan is None:
                self._main_calls += 1
            else:
                pending.channel = chan
                if chan.outstanding == 0:
                    self._polled.append(chan)
                chan.outstanding += 1
        self._flush()
        if core.deadline_moved:
            self._rearm()

    def call_inline(
        self, peer: str, message: Sequence[Buffer], now: float, poll_until: float = 0.0
    ) -> bool:
        """Send a call whose caller polls for the response itself (``SessionCore.call_inline``:
        the response lands in ``core.inline_view``, or the failure in ``core.inline_error``);
        the caller then calls :meth:`end_inline`. False, with nothing sent, when the call must
        go through :meth:`call` instead: only a client endpoint's one-datagram calls to a
        server it has a channel to (made by an earlier :meth:`call`) go inline.

        With ``poll_until`` (``time.perf_counter`` seconds; for a caller with nothing else to
        poll) the call's own socket is polled in C until then, right after the send
        (``SockOps.call_whole``): a response that comes in time ends the call before it has a
        record in the session core."""
        if not self._client_only or self._closed:
            return False
        addr = self._peers.get(peer)
        if addr is None:
            return False
        chan = self._channels.get(addr)
        if chan is None:
            return False
        small = _join_small(message)
        if small is None:
            return False
        core = self.core
        datagram = core.call_inline(small)
        if datagram is None:
            return False
        got: memoryview | tuple[bytes] | bool | None = None
        try:
            if poll_until:
                got = chan.call_whole(datagram, poll_until)
                sent = got is not False
            else:
                sent = chan.send(datagram)
            if not sent:  # socket buffer full: take the queued path
                core.end_inline()
                return False
        except OSError as exc:  # unreachable peer: as in _flush, the core resends or aborts
            self._send_errors += 1
            log.debug("udp send to %s failed: %s", addr, exc)
        self.n_inline_calls += 1
        if type(got) is memoryview:
            core.answered_inline(got)
            self.n_answered_in_c += 1
            return True
        core.track_inline(addr, small, now)
        if chan.outstanding == 0:
            self._polled.append(chan)
        chan.outstanding += 1
        self._inline_chan = chan
        if type(got) is tuple:  # another datagram came first
            core.receive(got[0], addr, _clock())
            self._settle()
        elif core.deadline_moved:
            self._rearm()
        return True

    def end_inline(self, pending: PendingCall | None) -> memoryview | None:
        """End the inline call: its response, or None without one. Then, with ``pending``, a
        call still running goes on as an ordinary call that completes ``pending`` (and one that
        failed fails it); without, it is cancelled."""
        core = self.core
        chan = self._inline_chan
        self._inline_chan = None
        view: memoryview | None = None
        if pending is not None and core.inline_view is None:
            error = core.inline_error
            if error is None and self._closed:  # (closed while the caller polled)
                error = "transport closed"
            if error is None:
                rpc_id = core.adopt_inline()
                pending.handle = rpc_id
                pending.channel = chan  # its count of outstanding calls goes on including it
                self._calls[rpc_id] = pending
                return None
            core.end_inline()
            pending.fail(PeerDead(error))
        else:
            view = core.end_inline()
        if chan is not None:
            self._release_channel(chan)
        if view is None and core.outbox:  # (the ABORT of a cancelled call)
            self._flush()
        return view

    def _release_channel(self, chan: _Channel) -> None:
        chan.outstanding -= 1
        if chan.outstanding == 0 and not self._closed:  # (close() emptied _polled)
            self._polled.remove(chan)

    def _open_channel(self, addr: Any) -> _Channel:
        sock, _ = _open_socket(self.sock.family, self._host, 0)
        try:
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        chan = self._channels[addr] = _Channel(sock, addr)
        self.dispatcher.refresh_fds()
        return chan

    def cancel(self, pending: PendingCall) -> None:
        rpc_id = pending.handle
        if rpc_id is None or self._calls.pop(rpc_id, None) is None:
            return
        if self._client_only:
            self._release(pending)
        core = self.core
        core.cancel(rpc_id, _clock())
        self._flush()
        if core.deadline_moved:
            self._rearm()

    def reply(self, token: Any, message: Sequence[Buffer]) -> None:
        if self._closed:
            return
        core = self.core
        # inside poll (a fast handler) the poll's clock reading is fresh enough
        core.reply(token, message, self._now or _clock())
        self._flush()
        if core.deadline_moved:
            self._rearm()

    def on_timer(self, now: float) -> None:
        core = self.core
        core.on_timer(now)
        core.deadline_moved = False  # the dispatcher reads next_deadline() right after this
        if core.events:
            self._deliver()
        if core.outbox:
            self._flush()

    def next_deadline(self) -> float | None:
        return self.core.next_deadline()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ops.close()  # first: a call after this must not reach a reused descriptor
        self.sock.close()
        for chan in self._channels.values():
            chan.ops.close()
            chan.sock.close()
        self._polled.clear()
        calls, self._calls = self._calls, {}
        for pending in calls.values():
            pending.fail(PeerDead("transport closed"))
