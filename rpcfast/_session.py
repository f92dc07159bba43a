"""Sans-IO session core: reliable request/response RPC over an unreliable datagram service.

The protocol follows RAMCloud's BasicTransport (receiver-driven grants, timer-based resends,
abort after silence). The core is a pure state machine: datagrams and ``now`` (float seconds) go
in; datagrams to send (``outbox``), events (``events``) and the next deadline come out. Drivers
(UDP, RDMA UD) only move opaque datagrams, so loss, duplication, reordering and timeouts are
tested exactly with a simulated link and an explicit clock.

Wire format: every datagram starts with one 32-byte header (a multiple of 8, so payloads stay
8-byte aligned for Cap'n Proto)::

    u8 magic (0xB5: protocol and version)  u8 kind  u8 flags  u8 reserved (0)
    u32 length   u64 client_id   u64 sequence   u32 offset   u16 frag   u16 ack

    ALL_DATA  a whole message in one datagram: length = payload bytes, offset = frag = 0
    DATA      one fragment: length = message bytes, offset = fragment start, frag = the sender's
              fragment size (every fragment but the last is exactly ``frag`` bytes)
    GRANT     the receiver allows data up to ``offset``; length = message bytes
    RESEND    send [offset, offset + length) again. From a client with no response yet it is a
              ping; from a server with RESTART set it means "I never saw this request".
    BUSY      the server has the request and its handler is still running
    ABORT     from a client: cancel (the server forgets the RPC); from a server: refused, with
              the reason code in ``length``

``FROM_CLIENT`` marks packets that travel client -> server, so one core can be both client and
server (even of itself). ``ack`` (client -> server data only) is ``sequence`` minus the client's
lowest still-outstanding sequence: the server frees kept responses below it and treats requests
below it as stale duplicates.

Rules:

* An RPC is ``(client_id, sequence)``; the sequence is the ``rpc_id`` that ``call`` returns. The
  server keys its state by ``(peer, client_id, sequence)`` (the ``RequestToken``).
* A sender sends at most ``window_bytes`` unscheduled, then only up to the receiver's grants. A
  receiver grants ``received + window_bytes`` (in steps of a few fragments), so the bytes of one
  message in flight never exceed the window plus one fragment. A sender never takes a grant
  more than a window beyond what it has sent, so a forged grant cannot unleash a whole message.
* A receiver that hears nothing for a message for ``resend_interval`` asks for the missing
  ranges (RESEND, at most a window's worth per interval; a RESEND is also a grant). A client that
  has no response data pings instead. The server answers a ping with BUSY (handler running or
  request still arriving), by retransmitting (response ready) or with RESEND+RESTART (unknown).
* A blind request to retransmit (a ping, a RESTART, a duplicated request) within half a resend
  interval of the sender's last transmission of that message is ignored: the data may still be
  in flight. A RESEND naming holes comes after the receiver's silence, so it is served at once.
* A client call fails (EV_FAILED) after ``abort_after`` without any packet for it from the
  server. A server drops a partial request after ``abort_after`` of silence.
* A request is delivered (EV_REQUEST) at most once: the server remembers it while the handler
  runs, keeps the response until the client acknowledges it (``ack``) or ``response_keep`` after
  the last packet about it, and drops requests below the client's acknowledged floor. An
  abandoned request (cancel) leaves a tombstone for the same time. Requests duplicated with
  a delay longer than that can run twice; ``response_keep >= abort_after`` is enforced so a live
  client never sees its response forgotten.
* Memory: multi-fragment requests being reassembled are capped in count and bytes; fragments of
  a new message beyond the cap are dropped (the client's pings recover once room frees up). A
  request larger than ``max_message`` is refused with ABORT before anything is allocated.
* Timers: one periodic tick (every ``resend_interval`` while calls or partial requests exist)
  scans them; kept responses, tombstones and idle per-client records expire in a sweep that
  runs at most about 8 times per ``response_keep``.

Assumptions: one-way delay well under half a ``resend_interval`` (else data is sent twice, which
is wasteful but still correct), and a link that checksums datagrams (UDP, InfiniBand CRC): a
corrupted payload under an intact header is not detected here.
"""

from __future__ import annotations

import random
import struct
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Final, TypeAlias

import attr
import attrs

from rpcfast._types import Buffer
from rpcfast._wire import header as _header

__all__ = [
    "EV_ABORTED",
    "EV_FAILED",
    "EV_REQUEST",
    "EV_RESPONSE",
    "HEADER_SIZE",
    "Addr",
    "MalformedPacket",
    "RequestToken",
    "SessionConfig",
    "SessionCore",
    "SessionStats",
]

Addr: TypeAlias = Hashable
# (peer, client_id, sequence). A variable-length tuple type on purpose: mypyc keeps fixed-length
# tuples unboxed and boxes them anew wherever they become objects, which would allocate a token
# per use and defeat the ``token is self._last_token`` shortcut in reply()
RequestToken: TypeAlias = tuple[Any, ...]
Event: TypeAlias = tuple[int, Any, Any]
# the peer is whatever the driver passed in, typed Any so drivers can hand it to sendmsg
Datagram: TypeAlias = tuple[Any, tuple[Buffer, ...]]

EV_REQUEST: Final = 0
EV_RESPONSE: Final = 1
EV_FAILED: Final = 2
EV_ABORTED: Final = 3

_HEADER: Final = struct.Struct("<BBBBIQQIHH")
HEADER_SIZE: Final = _HEADER.size
_MAGIC: Final = 0xB5

_ALL_DATA: Final = 1
_DATA: Final = 2
_GRANT: Final = 3
_RESEND: Final = 4
_BUSY: Final = 5
_ABORT: Final = 6

_FROM_CLIENT: Final = 1
_RETRANSMISSION: Final = 2
_RESTART: Final = 4
_PING: Final = 8  # a RESEND from a client that has no response data yet
_ALL_FLAGS: Final = _FROM_CLIENT | _RETRANSMISSION | _RESTART | _PING

# the fast receive path reads the header as five words: (magic, kind, flags, reserved) as one
# u32 and (offset, frag, ack) as one u64, so a first transmission is recognised by two compares
_FAST: Final = struct.Struct("<IIQQQ")
_REQUEST_HEAD: Final = _MAGIC | _ALL_DATA << 8 | _FROM_CLIENT << 16
_RESPONSE_HEAD: Final = _MAGIC | _ALL_DATA << 8
_TAIL_NO_ACK: Final = (1 << 48) - 1  # offset and frag: zero in an ALL_DATA datagram

# compiled code looks a builtin up by name at every use, a Final module constant only once
_memoryview: Final = memoryview
# _FAST's pack (with the payload after it) and unpack_from, for bytes datagrams
_pack_whole: Final = _header.pack_whole
_unpack_head: Final = _header.unpack_head
_payload_view: Final = _header.payload_view  # memoryview(datagram)[HEADER_SIZE:]

_REASON_TOO_LARGE: Final = 1
_REASONS: Final = {_REASON_TOO_LARGE: "refused by server: message too large"}

_MAX_ACK: Final = 0xFFFF
_MAX_FRAG: Final = 0xFFFF
_MIN_FRAG: Final = 64
_MAX_RESEND_RANGES: Final = 32

# server-side RPC states
_RECEIVING: Final = 0  # request fragments arriving
_IN_PROGRESS: Final = 1  # delivered as EV_REQUEST, waiting for reply()
_RESPONDING: Final = 2  # response sent or being sent; kept for retransmission
_ABORTED: Final = 3  # cancelled by the client: a tombstone against late duplicates
_DEAD: Final = 4  # forgotten: nothing refers to it any more but a stale local


class MalformedPacket(Exception):
    """The only error the ``*_untrusted`` parsers raise; receive() drops and counts it."""


@attrs.frozen
class SessionConfig:
    """Tuning of one session core; both ends should use the same ``max_datagram``."""

    max_datagram: int = 1472
    resend_interval: float = 0.010
    abort_after: float = 1.0
    window_bytes: int = 256 * 1024
    response_keep: float = 2.0
    max_message: int = 64 * 1024 * 1024
    max_partial_messages: int = 256
    max_reassembly_bytes: int = 256 * 1024 * 1024

    def __attrs_post_init__(self) -> None:
        # checked here rather than with field validators: mypyc compiles this module, and it
        # type-checks class-level defaults, which ``attrs.field(...)`` is not
        for name, value in (
            ("resend_interval", self.resend_interval),
            ("abort_after", self.abort_after),
            ("response_keep", self.response_keep),
            ("max_partial_messages", self.max_partial_messages),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if not HEADER_SIZE + _MIN_FRAG <= self.max_datagram <= HEADER_SIZE + _MAX_FRAG:
            raise ValueError(
                f"max_datagram must be in [{HEADER_SIZE + _MIN_FRAG}, {HEADER_SIZE + _MAX_FRAG}]"
            )
        if self.window_bytes < self.max_datagram - HEADER_SIZE:
            raise ValueError("window_bytes must hold at least one fragment")
        if self.abort_after < self.resend_interval:
            raise ValueError("abort_after must be at least resend_interval")
        if self.response_keep < self.abort_after:
            raise ValueError("response_keep must be at least abort_after (at-most-once)")
        if not 0 <= self.max_message <= 0xFFFFFFFF:
            raise ValueError("max_message must fit in 32 bits")
        if self.max_reassembly_bytes < self.max_message:
            raise ValueError("max_reassembly_bytes must be at least max_message")


@attr.s(auto_attribs=True)
class SessionStats:
    """Counters for operators and tests; plain ints, updated in place.

    Spelled ``attr.s(auto_attribs=True)``: mypyc compiles that to a native class, so a counter
    update on the per-datagram path is a C struct write (``attrs.define`` stays a Python class).
    """

    datagrams_in: int = 0
    datagrams_out: int = 0
    dropped_malformed: int = 0
    dropped_unknown: int = 0
    dropped_capacity: int = 0
    duplicates: int = 0
    resends_sent: int = 0
    pings_sent: int = 0
    busy_sent: int = 0
    retransmitted_bytes: int = 0
    calls_failed: int = 0
    calls_cancelled: int = 0
    requests_refused: int = 0
    requests_aborted: int = 0
    partials_expired: int = 0
    responses_acked: int = 0
    responses_expired: int = 0
    replies_dropped: int = 0


def _byte_view_untrusted(datagram: Any) -> memoryview:
    """A flat byte view of whatever buffer the driver handed in."""
    try:
        view = memoryview(datagram)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError) as exc:
        raise MalformedPacket(f"not a contiguous buffer: {exc}") from exc
    return view


def _parse_header_untrusted(
    datagram: bytes | memoryview,
) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    """Unpack and sanity-check the header; fields are (magic, kind, flags, reserved, length,
    client_id, sequence, offset, frag, ack)."""
    try:
        fields: tuple[int, int, int, int, int, int, int, int, int, int] = _HEADER.unpack_from(
            datagram
        )
    except struct.error as exc:
        raise MalformedPacket(
            f"datagram of {len(datagram)} bytes is shorter than the header"
        ) from exc
    if (
        fields[0] != _MAGIC
        or not _ALL_DATA <= fields[1] <= _ABORT
        or fields[2] & ~_ALL_FLAGS
        or fields[3]
    ):
        raise MalformedPacket(
            f"bad magic, kind, flags or reserved byte: {bytes(datagram[:4]).hex()}"
        )
    return fields


def _check_fragment_untrusted(length: int, offset: int, frag: int, payload: int) -> None:
    """A DATA fragment must sit on the sender's fragment grid and have the grid's length."""
    if frag < _MIN_FRAG or length <= frag:
        raise MalformedPacket(f"fragment size {frag} invalid for a {length}-byte message")
    if offset % frag or offset >= length:
        raise MalformedPacket(f"fragment offset {offset} off the grid of {frag}")
    if payload != min(frag, length - offset):
        raise MalformedPacket(f"fragment of {payload} bytes at {offset}, expected another size")


class _InMessage:
    """A multi-fragment message being reassembled into one preallocated bytearray."""

    __slots__ = (
        "buf",
        "first_missing",
        "frag",
        "grant",
        "have",
        "last_heard",
        "last_resend",
        "nfrags",
        "received",
        "total",
    )

    def __init__(self, total: int, frag: int, window: int, now: float) -> None:
        self.total = total
        self.frag = frag
        self.nfrags = -(-total // frag)
        self.buf = bytearray(total)
        self.have = bytearray(self.nfrags)
        self.received = 0
        self.first_missing = 0
        self.grant = min(total, window)
        self.last_heard = now
        self.last_resend = now

    def add_untrusted(
        self, length: int, offset: int, frag: int, payload: memoryview, now: float
    ) -> int:
        """Store one (grid-checked) fragment: 0 duplicate, 1 stored, 2 message complete."""
        if length != self.total or frag != self.frag:
            raise MalformedPacket("fragment disagrees with its message's length or grid")
        index = offset // frag
        have = self.have
        self.last_heard = now
        if have[index]:
            return 0
        n = len(payload)
        self.buf[offset : offset + n] = payload
        have[index] = 1
        self.received += n
        if index == self.first_missing:
            nxt = have.find(0, index + 1)
            self.first_missing = self.nfrags if nxt < 0 else nxt
        return 2 if self.received == self.total else 1

    def grant_due(self, window: int, step: int) -> int:
        """The new grant offset if one should be sent now, else 0."""
        grant = self.received + window
        if grant >= self.total:
            return self.total if self.total > self.grant else 0
        return grant if grant - self.grant >= step else 0

    def missing(self, budget: int) -> list[tuple[int, int]]:
        """Missing byte ranges below the grant, first ones first, at most ``budget`` bytes."""
        frag = self.frag
        have = self.have
        end = min(-(-self.grant // frag), self.nfrags)
        ranges: list[tuple[int, int]] = []
        i = self.first_missing
        while i < end and budget > 0 and len(ranges) < _MAX_RESEND_RANGES:
            j = have.find(1, i, end)
            if j < 0:
                j = end
            start = i * frag
            n = min(min(j * frag, self.total) - start, budget)
            ranges.append((start, n))
            budget -= n
            if j >= end:
                break
            i = have.find(0, j, end)
            if i < 0:
                break
        return ranges


class _Sender:
    """An outgoing message: scatter list, grid position and grant."""

    __slots__ = (
        "cid",
        "flags",
        "granted",
        "last_tx",
        "peer",
        "sent",
        "seq",
        "starts",
        "total",
        "tx",
        "views",
    )

    peer: Addr
    cid: int
    seq: int
    flags: int
    views: Sequence[Buffer]
    starts: list[int] | None
    total: int
    sent: int
    granted: int
    last_tx: float
    tx: array[float] | None  # per fragment: when it was last transmitted


class _ClientRpc(_Sender):
    """One outstanding call: the request being sent and the response being received."""

    __slots__ = ("last_heard", "last_ping", "resp")

    def __init__(
        self,
        peer: Addr,
        cid: int,
        seq: int,
        views: Sequence[Buffer],
        total: int,
        now: float,
    ) -> None:
        self.peer = peer
        self.cid = cid
        self.seq = seq
        self.flags = _FROM_CLIENT
        self.views = views
        self.starts = None  # set for multi-fragment messages by _start_fragments
        self.total = total
        self.sent = 0
        self.granted = 0
        self.last_tx = now
        self.tx = None
        self.resp: _InMessage | None = None
        self.last_heard = now
        self.last_ping = now


class _RemoteClient:
    """What a server remembers about one (peer, client_id): its RPCs and acknowledged floor."""

    __slots__ = ("floor", "idle_since", "key", "rpcs")

    def __init__(self, key: tuple[Addr, int], floor: int) -> None:
        self.key = key
        self.floor = floor
        self.rpcs: dict[int, _ServerRpc] = {}
        self.idle_since = 0.0


class _ServerRpc(_Sender):
    """One RPC seen by the server: request reassembly, then the handler, then the response."""

    __slots__ = ("inmsg", "last_heard", "owner", "state", "token")

    def __init__(self, token: RequestToken, owner: _RemoteClient, state: int, now: float) -> None:
        self.reset(token, owner, state, now)

    def reset(self, token: RequestToken, owner: _RemoteClient, state: int, now: float) -> None:
        """(Re)initialise: the core reuses the record of an acknowledged RPC for the next one."""
        self.token = token
        self.owner = owner
        self.state = state
        self.peer = token[0]
        self.cid = token[1]
        self.seq = token[2]
        self.flags = 0
        self.views = ()
        self.starts = None
        self.inmsg: _InMessage | None = None
        self.last_heard = now
        self.total = 0
        self.sent = 0
        self.granted = 0
        self.last_tx = now
        self.tx = None


_SMALL: Final = 2048
"""Messages up to this size made only of ``bytes`` and ``bytearray`` are joined into one bytes
object: copying a few hundred bytes costs less than a scatter send, the driver can use
``sendto``, and the core keeps an immutable copy for retransmission."""


def _join_small(message: Sequence[Buffer]) -> bytes | None:
    """``message`` as one bytes object if it is short and made of bytes and bytearrays only
    (what encoders produce), else None."""
    if len(message) == 1:
        only = message[0]
        if type(only) is bytes:
            return only if len(only) <= _SMALL else None
        if type(only) is bytearray and len(only) <= _SMALL:
            return bytes(only)
        return None
    total = 0
    for buf in message:
        if type(buf) is not bytes and type(buf) is not bytearray:
            return None
        total += len(buf)
    return b"".join(message) if total <= _SMALL else None


def _gather(message: Sequence[Buffer]) -> tuple[Sequence[Buffer], int]:
    """Flat non-empty byte views of a scatter list and its total length, without copying."""
    if len(message) == 1:
        only = message[0]
        if type(only) is bytes:
            return (only,), len(only)
    views: list[memoryview] = []
    total = 0
    for buf in message:
        view = memoryview(buf)
        if not view.c_contiguous:  # a strided view: sendmsg needs contiguous memory
            view = memoryview(view.tobytes())
        elif view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
            total += view.nbytes
    return views, total


class SessionCore:
    """Reliable RPC over datagrams, both roles at once; pure state, no I/O and no clock.

    The driver pops ``outbox`` (``(peer, buffers)``: ``sock.sendmsg(list(buffers), peer)``, or
    ``sendto`` when there is one buffer) and ``events`` after every call into the core, and calls
    ``on_timer`` at ``next_deadline()`` (re-read it whenever ``deadline_moved`` is set). Buffers
    passed to ``call``/``reply`` are referenced, not copied, until the RPC is finished; short
    messages made of ``bytes`` are joined into one buffer (a small copy beats a scatter send).
    """

    __slots__ = (
        "_calls",
        "_clients",
        "_frag",
        "_grant_step",
        "_idle",
        "_inline_seq",
        "_keep",
        "_kept",
        "_last_owner",
        "_last_rpc",
        "_last_token",
        "_linger",
        "_lowest",
        "_max_in",
        "_max_message",
        "_next_seq",
        "_partial_bytes",
        "_partials",
        "_quiet",
        "_retired",
        "_ri",
        "_spare",
        "_sweep_at",
        "_tick_at",
        "_window",
        "client_id",
        "config",
        "deadline_moved",
        "events",
        "inline_error",
        "inline_view",
        "outbox",
        "request_sink",
        "response_sink",
        "send_now",
        "stats",
    )

    def __init__(self, config: SessionConfig, client_id: int | None = None) -> None:
        if client_id is None:
            client_id = random.getrandbits(64)
        if not 0 <= client_id < 1 << 64:
            raise ValueError("client_id must fit in 64 bits")
        self.config = config
        self.client_id = client_id
        self.outbox: deque[Datagram] = deque()
        self.events: deque[Event] = deque()
        # when set, requests and responses go straight to these (called as the last step of
        # receive, so they may call back into the core) instead of through ``events``
        self.request_sink: Callable[[RequestToken, memoryview], None] | None = None
        self.response_sink: Callable[[int, memoryview], None] | None = None
        # when set, a single-datagram request or response is offered to it first (returns
        # whether it took the datagram), skipping ``outbox``; only while ``outbox`` is empty,
        # so datagrams still leave in order
        self.send_now: Callable[[Addr, bytes], bool] | None = None
        self.stats = SessionStats()
        self._frag = (config.max_datagram - HEADER_SIZE) // 8 * 8
        self._max_in = config.max_datagram
        self._max_message = config.max_message
        self._window = config.window_bytes
        self._grant_step = max(self._frag, min(config.window_bytes // 4, 8 * self._frag))
        self._ri = config.resend_interval
        self._quiet = config.resend_interval / 2
        self._next_seq = 1
        self._lowest = 1
        self._calls: dict[int, _ClientRpc] = {}
        self._clients: dict[tuple[Addr, int], _RemoteClient] = {}
        self._partials: dict[_ServerRpc, None] = {}
        self._partial_bytes = 0
        # responding or aborted server RPCs, and clients without RPCs: expired by _sweep
        self._linger: dict[_ServerRpc, None] = {}
        self._kept = 0
        self._idle: dict[_RemoteClient, None] = {}
        self._sweep_at: float | None = None
        self._tick_at: float | None = None
        self._keep = config.response_keep
        # set when a timer was armed since the driver last looked: the driver then tells its
        # scheduler next_deadline() and clears it (cheaper than asking after every call)
        self.deadline_moved = False
        # the request delivered last, so its reply (usually the very next call) skips lookups
        self._last_token: RequestToken | None = None
        self._last_rpc: _ServerRpc | None = None
        # an acknowledged server record, dead, that the next whole request reuses
        self._spare: _ServerRpc | None = None
        # the client record of the last whole request (a client's requests come in runs, and
        # driver address objects repeat: the C socket calls hand out one tuple per sender)
        self._last_owner: _RemoteClient | None = None
        # the record of the call whose response came last: freed at the next call, after its
        # datagram left, rather than between a response's arrival and its delivery
        self._retired: _ClientRpc | None = None
        # the inline call (call_inline): its sequence number (0: none), then its response or
        # why it failed
        self._inline_seq = 0
        self.inline_view: memoryview | None = None
        self.inline_error: str | None = None

    # -- introspection ----------------------------------------------------------------------------
    def outstanding_calls(self) -> int:
        return len(self._calls)

    def kept_responses(self) -> int:
        """Completed responses the server still keeps for retransmission."""
        return self._kept

    def partial_requests(self) -> int:
        """Multi-fragment requests being reassembled (bounded by max_partial_messages)."""
        return len(self._partials)

    def known_clients(self) -> int:
        """Per-client records (floors) the server keeps."""
        return len(self._clients)

    # -- client role --------------------------------------------------------------------------
    def call(self, peer: Addr, message: Sequence[Buffer], now: float) -> int:
        """Start an RPC; returns its rpc_id. Raises ValueError over ``max_message``."""
        if len(message) == 1:
            small: Buffer | None = message[0]
            if type(small) is not bytes or len(small) > _SMALL:
                small = None
        else:
            small = _join_small(message)
        seq = self._next_seq
        calls = self._calls
        if small is not None and len(small) <= self._frag and len(small) <= self._max_message:
            # the common case, kept short: one datagram, one contiguous buffer
            self._next_seq = seq + 1
            if calls:
                ack = seq - self._lowest
                if ack > _MAX_ACK:
                    ack = _MAX_ACK
            else:
                self._lowest = seq
                ack = 0
            cid = self.client_id
            calls[seq] = _ClientRpc(peer, cid, seq, (small,), len(small), now)
            datagram = _pack_whole(_REQUEST_HEAD, cid, seq, ack << 48, small)
            send_now = self.send_now
            if send_now is None or self.outbox or not send_now(peer, datagram):
                self.outbox.append((peer, (datagram,)))
            self.stats.datagrams_out += 1
            if self._tick_at is None:
                self._tick_at = now + self._ri
                self.deadline_moved = True
            return seq
        if small is not None:
            views: Sequence[Buffer] = (small,)
            total = len(small)
        else:
            views, total = _gather(message)
        if total > self._max_message:
            raise ValueError(f"message of {total} bytes exceeds max_message {self._max_message}")
        self._next_seq = seq + 1
        if not calls:
            self._lowest = seq
        rpc = _ClientRpc(peer, self.client_id, seq, views, total, now)
        calls[seq] = rpc
        if total <= self._frag:
            ack = seq - self._lowest
            header = _HEADER.pack(
                _MAGIC,
                _ALL_DATA,
                _FROM_CLIENT,
                0,
                total,
                self.client_id,
                seq,
                0,
                0,
                ack if ack < _MAX_ACK else _MAX_ACK,
            )
            self.outbox.append((peer, (header, *views)))
            self.stats.datagrams_out += 1
        else:
            self._start_fragments(rpc, now)
        if self._tick_at is None:
            self._tick_at = now + self._ri
            self.deadline_moved = True
        return seq

    def cancel(self, rpc_id: int, now: float) -> None:
        """Forget the call and tell the server (ABORT, best effort); no event follows for it."""
        rpc = self._calls.pop(rpc_id, None)
        if rpc is None:
            return
        self.stats.calls_cancelled += 1
        self._call_done(rpc_id)
        self._send_control(rpc.peer, _ABORT, _FROM_CLIENT, 0, rpc_id, 0)

    # -- client role: the inline call ---------------------------------------------------------
    def call_inline(self, small: bytes) -> bytes | None:
        """Start a one-datagram call whose caller sends the returned datagram itself, then
        calls :meth:`track_inline` (with the peer and the send time), and polls until
        ``inline_view`` (the response) or ``inline_error`` is set: the response is handed over
        there instead of to ``response_sink`` or ``events``. The caller ends it with
        :meth:`end_inline`, or with :meth:`adopt_inline` to make it an ordinary call when it
        stops polling first.

        None (nothing started) when the call must take :meth:`call`: an inline call is already
        in progress, output is queued, or ``small`` is over one datagram."""
        if self._inline_seq or self.outbox or len(small) > self._frag:
            return None
        if len(small) > self._max_message:
            return None
        seq = self._next_seq
        if self._calls:
            ack = seq - self._lowest
            if ack > _MAX_ACK:
                ack = _MAX_ACK
        else:
            ack = 0
        self._inline_seq = seq
        self.inline_view = None
        self.inline_error = None
        return _pack_whole(_REQUEST_HEAD, self.client_id, seq, ack << 48, small)

    def track_inline(self, peer: Addr, small: bytes, now: float) -> int:
        """The inline call's record (after its datagram left: it is off the round trip's
        critical path); returns its rpc_id."""
        seq = self._inline_seq
        self._next_seq = seq + 1
        calls = self._calls
        if not calls:
            self._lowest = seq
        calls[seq] = _ClientRpc(peer, self.client_id, seq, (small,), len(small), now)
        self._retired = None
        self.stats.datagrams_out += 1
        if self._tick_at is None:
            self._tick_at = now + self._ri
            self.deadline_moved = True
        return seq

    def answered_inline(self, payload: memoryview) -> None:
        """The inline call's response arrived before :meth:`track_inline` (the caller received
        it right after sending: ``SockOps.call_whole``): the call is over, without a record.
        ``payload`` becomes ``inline_view``; end the call with :meth:`end_inline`."""
        self._next_seq = self._inline_seq + 1
        self.inline_view = payload
        self._retired = None
        stats = self.stats
        stats.datagrams_out += 1
        stats.datagrams_in += 1

    def end_inline(self) -> memoryview | None:
        """End the inline call: its response, or None when it has none (then, unless it
        failed, it is cancelled: the server is told and a late response is dropped)."""
        seq = self._inline_seq
        view = self.inline_view
        self._inline_seq = 0
        self.inline_view = None
        self.inline_error = None
        if view is None and seq:
            self.cancel(seq, 0.0)
        return view

    def adopt_inline(self) -> int:
        """Make the inline call, without response yet, an ordinary call (its response goes to
        ``response_sink`` or ``events`` like any other); returns its rpc_id. Raises
        RuntimeError when it has a response or failed (take those with :meth:`end_inline`)."""
        seq = self._inline_seq
        if not seq or self.inline_view is not None or self.inline_error is not None:
            raise RuntimeError("no inline call waiting for its response")
        self._inline_seq = 0
        return seq

    # -- server role --------------------------------------------------------------------------
    def reply(self, token: RequestToken, message: Sequence[Buffer], now: float) -> None:
        """Send the response for a delivered request. A reply for a request the client has
        cancelled or abandoned is dropped silently. Raises ValueError over ``max_message`` (the
        request stays in progress so a smaller error reply can follow)."""
        if token is self._last_token:  # the request just delivered: skip the lookups
            rpc: _ServerRpc | None = self._last_rpc
        else:
            owner = self._clients.get((token[0], token[1]))
            rpc = None if owner is None else owner.rpcs.get(token[2])
        if rpc is None or rpc.state != _IN_PROGRESS:
            self.stats.replies_dropped += 1
            return
        if len(message) == 1:
            small: Buffer | None = message[0]
            if type(small) is not bytes or len(small) > _SMALL:
                small = None
        else:
            small = _join_small(message)
        if small is not None:
            views: Sequence[Buffer] = (small,)
            total = len(small)
        else:
            views, total = _gather(message)
        if total > self._max_message:
            raise ValueError(f"message of {total} bytes exceeds max_message {self._max_message}")
        seq = rpc.seq
        if seq < rpc.owner.floor:  # the client gave up on it
            self.stats.replies_dropped += 1
            self._forget(rpc, now)
            return
        if total <= self._frag and small is not None:
            # the common case: the datagram leaves first, the bookkeeping follows (off the
            # round trip's critical path)
            datagram = _pack_whole(_RESPONSE_HEAD, rpc.cid, seq, 0, small)
            send_now = self.send_now
            if send_now is None or self.outbox or not send_now(rpc.peer, datagram):
                self.outbox.append((rpc.peer, (datagram,)))
        rpc.state = _RESPONDING
        rpc.views = views
        rpc.total = total
        rpc.last_heard = now
        self._kept += 1
        self._linger[rpc] = None
        if self._sweep_at is None:
            self._sweep_at = now + self._keep
            self.deadline_moved = True
        if total <= self._frag:
            rpc.sent = total
            rpc.last_tx = now
            if small is None:
                header = _HEADER.pack(_MAGIC, _ALL_DATA, 0, 0, total, rpc.cid, seq, 0, 0, 0)
                self.outbox.append((rpc.peer, (header, *views)))
            self.stats.datagrams_out += 1
        else:
            self._start_fragments(rpc, now)

    # -- input --------------------------------------------------------------------------------
    def receive(self, datagram: bytes | bytearray | memoryview, peer: Addr, now: float) -> bool:
        """Feed one datagram from ``peer``; returns whether it completed a request or response
        (delivered as an event or to a sink). Never raises on bad input: malformed, unknown and
        duplicate datagrams are dropped and counted. A single-datagram payload is delivered as a
        memoryview of ``datagram`` itself, so the driver must not reuse that buffer."""
        self.stats.datagrams_in += 1
        # fast path: a first transmission of a whole message in one bytes datagram; the first
        # word holds magic, kind and flags, the last one offset, frag and ack
        if type(datagram) is bytes:
            size = len(datagram)
            if HEADER_SIZE <= size <= self._max_in:
                # typed, so compiled code compares machine ints instead of objects
                head: int
                length: int
                cid: int
                seq: int
                tail: int
                head, length, cid, seq, tail = _unpack_head(datagram)
                if length == size - HEADER_SIZE:
                    if head == _REQUEST_HEAD and not tail & _TAIL_NO_ACK:
                        return self._request_whole(datagram, peer, cid, seq, tail >> 48, now)
                    if head == _RESPONSE_HEAD and not tail:
                        calls = self._calls
                        rpc = calls.get(seq) if cid == self.client_id else None
                        if rpc is None or rpc.resp is not None or rpc.peer != peer:
                            self.stats.dropped_unknown += 1
                            return False
                        del calls[seq]
                        self._retired = rpc
                        if seq == self._lowest:
                            self._lowest = next(iter(calls)) if calls else self._next_seq
                        if seq == self._inline_seq:
                            self.inline_view = _payload_view(datagram)
                            return True
                        sink = self.response_sink
                        if sink is None:
                            self.events.append((EV_RESPONSE, seq, _payload_view(datagram)))
                        else:
                            sink(seq, _payload_view(datagram))
                        return True
        try:
            return self._receive_general(datagram, peer, now)
        except MalformedPacket:
            self.stats.dropped_malformed += 1
            return False

    def _receive_general(
        self, datagram: bytes | bytearray | memoryview, peer: Addr, now: float
    ) -> bool:
        stats = self.stats
        if type(datagram) is not bytes:
            datagram = _byte_view_untrusted(datagram)
        size = len(datagram)
        if size > self._max_in:
            raise MalformedPacket(f"datagram of {size} bytes exceeds max_datagram")
        _, kind, flags, _, length, cid, seq, offset, frag, ack = _parse_header_untrusted(datagram)
        if kind == _ALL_DATA:
            if size - HEADER_SIZE != length or offset or frag:
                raise MalformedPacket("ALL_DATA length disagrees with the datagram")
            if flags & _FROM_CLIENT:
                return self._request_whole(datagram, peer, cid, seq, ack, now)
            if cid != self.client_id:
                stats.dropped_unknown += 1
                return False
            rpc = self._calls.get(seq)
            if rpc is None or rpc.peer != peer or rpc.resp is not None:
                stats.dropped_unknown += 1
                return False
            del self._calls[seq]
            if seq == self._lowest:
                self._lowest = next(iter(self._calls), self._next_seq)
            self._response(seq, memoryview(datagram)[HEADER_SIZE:])
            return True
        if kind == _DATA:
            _check_fragment_untrusted(length, offset, frag, size - HEADER_SIZE)
            if flags & _FROM_CLIENT:
                return self._request_fragment(
                    datagram, peer, cid, seq, length, offset, frag, ack, now
                )
            return self._response_fragment(datagram, peer, cid, seq, length, offset, frag, now)
        if size != HEADER_SIZE:
            raise MalformedPacket("control packet with a payload")
        if flags & _FROM_CLIENT:
            self._control_from_client(kind, flags, peer, cid, seq, length, offset, now)
        else:
            self._control_from_server(kind, flags, peer, cid, seq, length, offset, now)
        return False

    # -- timers -------------------------------------------------------------------------------
    def next_deadline(self) -> float | None:
        """When on_timer must next run; None when nothing is pending."""
        deadline = self._tick_at
        sweep = self._sweep_at
        if sweep is not None and (deadline is None or sweep < deadline):
            return sweep
        return deadline

    def on_timer(self, now: float) -> None:
        """Resends, pings, aborts and expiry; harmless to call early or often."""
        tick = self._tick_at
        if tick is not None and now >= tick:
            self._tick(now)
            self._tick_at = now + self._ri if self._calls or self._partials else None
        sweep = self._sweep_at
        if sweep is not None and now >= sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget kept responses, tombstones and client records ``response_keep`` after their
        last activity. Runs at most about 8 times per ``response_keep``: each run costs
        O(lingering), and with acknowledgements only a client's latest response lingers."""
        keep = self.config.response_keep
        upcoming = None
        for rpc in list(self._linger):
            due = rpc.last_heard + keep
            if due <= now:
                if rpc.state == _RESPONDING:
                    self.stats.responses_expired += 1
                self._forget(rpc, now)
            elif upcoming is None or due < upcoming:
                upcoming = due
        for owner in list(self._idle):
            due = owner.idle_since + keep
            if owner.rpcs:
                del self._idle[owner]
            elif due <= now:
                del self._idle[owner]
                if self._clients.get(owner.key) is owner:
                    del self._clients[owner.key]
                    if owner is self._last_owner:
                        self._last_owner = None
            elif upcoming is None or due < upcoming:
                upcoming = due
        self._sweep_at = None if upcoming is None else max(upcoming, now + keep / 8)

    def _linger_add(self, rpc: _ServerRpc, now: float) -> None:
        self._linger[rpc] = None
        if self._sweep_at is None:
            self._sweep_at = now + self.config.response_keep
            self.deadline_moved = True

    def _tick(self, now: float) -> None:
        ri = self._ri
        abort_after = self.config.abort_after
        stats = self.stats
        for rpc in list(self._calls.values()):
            silent = now - rpc.last_heard
            if silent >= abort_after:
                self._fail(rpc, f"no answer from {rpc.peer!r} for {silent:.3f} s")
            elif silent >= ri and now - rpc.last_ping >= ri:
                rpc.last_ping = now
                resp = rpc.resp
                if resp is None:
                    stats.pings_sent += 1
                    self._send_control(
                        rpc.peer, _RESEND, _FROM_CLIENT | _PING, self._window, rpc.seq, 0
                    )
                else:
                    self._ask_missing(resp, rpc.peer, rpc.cid, rpc.seq, _FROM_CLIENT, now)
        for srpc in list(self._partials):
            msg = srpc.inmsg
            assert msg is not None
            silent = now - msg.last_heard
            if silent >= abort_after:
                stats.partials_expired += 1
                self._forget(srpc, now)
            elif silent >= ri and now - msg.last_resend >= ri:
                self._ask_missing(msg, srpc.peer, srpc.cid, srpc.seq, 0, now)

    # -- internals: sending -------------------------------------------------------------------
    def _send_control(
        self, peer: Addr, kind: int, flags: int, length: int, seq: int, offset: int, cid: int = -1
    ) -> None:
        header = _HEADER.pack(
            _MAGIC, kind, flags, 0, length, self.client_id if cid < 0 else cid, seq, offset, 0, 0
        )
        self.outbox.append((peer, (header,)))
        self.stats.datagrams_out += 1

    def _start_fragments(self, msg: _Sender, now: float) -> None:
        """Index a multi-fragment message's scatter list and send its unscheduled part."""
        starts = []
        at = 0
        for view in msg.views:
            starts.append(at)
            at += len(view)
        msg.starts = starts
        msg.tx = array("d", bytes(8 * -(-msg.total // self._frag)))
        msg.granted = min(msg.total, self._window)
        self._pump(msg, now)

    def _emit(self, msg: _Sender, start: int, end: int, flags: int, now: float) -> int:
        """Queue the fragments of ``msg`` that overlap [start, end); returns where they stop."""
        frag = self._frag
        total = msg.total
        views = msg.views
        starts = msg.starts
        tx = msg.tx
        assert starts is not None and tx is not None
        ack = 0
        if flags & _FROM_CLIENT:
            ack = min(msg.seq - self._lowest, _MAX_ACK)
        outbox = self.outbox
        offset = start - start % frag
        count = 0
        while offset < end:
            n = min(frag, total - offset)
            header = _HEADER.pack(
                _MAGIC, _DATA, flags, 0, total, msg.cid, msg.seq, offset, frag, ack
            )
            i = bisect_right(starts, offset) - 1
            at = offset - starts[i]
            left = n
            parts: list[Buffer] = [header]
            while left:
                view = views[i]
                take = min(len(view) - at, left)
                parts.append(view[at : at + take])
                left -= take
                at = 0
                i += 1
            outbox.append((msg.peer, tuple(parts)))
            tx[offset // frag] = now
            count += 1
            offset += n
        self.stats.datagrams_out += count
        return offset

    def _pump(self, msg: _Sender, now: float) -> None:
        """Send new fragments up to the grant."""
        limit = msg.granted
        if msg.sent >= limit:
            return
        msg.sent = self._emit(msg, msg.sent, limit, msg.flags, now)
        msg.last_tx = now

    def _retransmit(self, msg: _Sender, start: int, end: int, now: float) -> None:
        if msg.starts is None:  # single datagram
            header = _HEADER.pack(
                _MAGIC,
                _ALL_DATA,
                msg.flags | _RETRANSMISSION,
                0,
                msg.total,
                msg.cid,
                msg.seq,
                0,
                0,
                min(msg.seq - self._lowest, _MAX_ACK) if msg.flags & _FROM_CLIENT else 0,
            )
            self.outbox.append((msg.peer, (header, *msg.views)))
            self.stats.datagrams_out += 1
            self.stats.retransmitted_bytes += msg.total
        else:
            # a fragment sent within the quiet period may still be in flight (duplicated RESENDs)
            end = min(end, msg.sent)
            frag = self._frag
            quiet = self._quiet
            flags = msg.flags | _RETRANSMISSION
            tx = msg.tx
            assert tx is not None
            offset = start - start % frag
            while offset < end:
                if now - tx[offset // frag] >= quiet:
                    self._emit(msg, offset, offset + 1, flags, now)
                    self.stats.retransmitted_bytes += min(frag, msg.total - offset)
                offset += frag
        msg.last_tx = now

    def _on_resend(self, msg: _Sender, offset: int, length: int, blind: int, now: float) -> None:
        """The receiver asks for [offset, offset + length); that is also a grant."""
        length = min(length, self._window)
        end = min(offset + length, msg.total)
        if (not blind or now - msg.last_tx >= self._quiet) and (
            msg.starts is None or offset < msg.sent
        ):
            self._retransmit(msg, offset, end, now)
        if msg.starts is not None:
            end = min(end, msg.sent + self._window)
            if end > msg.granted:
                msg.granted = end
            self._pump(msg, now)

    def _ask_missing(
        self, msg: _InMessage, peer: Addr, cid: int, seq: int, flags: int, now: float
    ) -> None:
        msg.last_resend = now
        for offset, length in msg.missing(self._window):
            self.stats.resends_sent += 1
            self._send_control(peer, _RESEND, flags, length, seq, offset, cid)

    def _grant(self, msg: _InMessage, peer: Addr, cid: int, seq: int, flags: int) -> None:
        grant = msg.grant_due(self._window, self._grant_step)
        if grant:
            msg.grant = grant
            header = _HEADER.pack(_MAGIC, _GRANT, flags, 0, msg.total, cid, seq, grant, 0, 0)
            self.outbox.append((peer, (header,)))
            self.stats.datagrams_out += 1

    # -- internals: delivery ------------------------------------------------------------------
    def _response(self, seq: int, payload: memoryview) -> None:
        if seq == self._inline_seq:
            self.inline_view = payload
            return
        sink = self.response_sink
        if sink is None:
            self.events.append((EV_RESPONSE, seq, payload))
        else:
            sink(seq, payload)

    def _request(self, rpc: _ServerRpc, payload: memoryview) -> None:
        self._last_token = rpc.token
        self._last_rpc = rpc
        sink = self.request_sink
        if sink is None:
            self.events.append((EV_REQUEST, rpc.token, payload))
        else:
            sink(rpc.token, payload)

    # -- internals: client side ---------------------------------------------------------------
    def _call_done(self, seq: int) -> None:
        if seq == self._lowest:
            self._lowest = next(iter(self._calls), self._next_seq)

    def _fail(self, rpc: _ClientRpc, reason: str, tell_server: bool = True) -> None:
        del self._calls[rpc.seq]
        self._call_done(rpc.seq)
        self.stats.calls_failed += 1
        if rpc.seq == self._inline_seq:
            self.inline_error = reason
        else:
            self.events.append((EV_FAILED, rpc.seq, reason))
        if tell_server:
            self._send_control(rpc.peer, _ABORT, _FROM_CLIENT, 0, rpc.seq, 0)

    def _client_rpc(self, peer: Addr, cid: int, seq: int) -> _ClientRpc | None:
        rpc = self._calls.get(seq) if cid == self.client_id else None
        if rpc is None or rpc.peer != peer:
            self.stats.dropped_unknown += 1
            return None
        return rpc

    def _response_fragment(
        self,
        datagram: bytes | memoryview,
        peer: Addr,
        cid: int,
        seq: int,
        length: int,
        offset: int,
        frag: int,
        now: float,
    ) -> bool:
        rpc = self._client_rpc(peer, cid, seq)
        if rpc is None:
            return False
        rpc.last_heard = now
        msg = rpc.resp
        if msg is None:
            if length > self._max_message:
                self._fail(rpc, f"response of {length} bytes exceeds max_message")
                return False
            msg = rpc.resp = _InMessage(length, frag, self._window, now)
            rpc.views = ()  # the server has the whole request
        state = msg.add_untrusted(length, offset, frag, memoryview(datagram)[HEADER_SIZE:], now)
        if state == 2:
            del self._calls[seq]
            self._call_done(seq)
            self._response(seq, memoryview(msg.buf))
            return True
        if state == 1:
            self._grant(msg, peer, cid, seq, _FROM_CLIENT)
        else:
            self.stats.duplicates += 1
        return False

    def _control_from_server(
        self,
        kind: int,
        flags: int,
        peer: Addr,
        cid: int,
        seq: int,
        length: int,
        offset: int,
        now: float,
    ) -> None:
        rpc = self._client_rpc(peer, cid, seq)
        if rpc is None:
            return
        rpc.last_heard = now
        if kind == _BUSY:
            return
        if kind == _ABORT:
            self._fail(rpc, _REASONS.get(length, f"aborted by server (code {length})"), False)
            return
        if rpc.resp is not None:  # the request is complete at the server: stale
            self.stats.duplicates += 1
            return
        if kind == _GRANT:
            if rpc.starts is not None and offset > rpc.granted:
                rpc.granted = min(offset, rpc.total, rpc.sent + self._window)
                self._pump(rpc, now)
        elif flags & _RESTART:
            if now - rpc.last_tx >= self._quiet:
                if rpc.starts is None:
                    self._retransmit(rpc, 0, rpc.total, now)
                else:
                    self.stats.retransmitted_bytes += min(rpc.sent, self._window)
                    rpc.sent = 0
                    rpc.granted = min(rpc.total, self._window)
                    self._pump(rpc, now)
        else:
            self._on_resend(rpc, offset, length, 0, now)

    # -- internals: server side ---------------------------------------------------------------
    def _request_whole(
        self, datagram: bytes | memoryview, peer: Addr, cid: int, seq: int, ack: int, now: float
    ) -> bool:
        owner = self._last_owner
        if owner is None or owner.key[0] is not peer or owner.key[1] != cid:
            owner = self._clients.get((peer, cid))
        if owner is None:
            if len(datagram) - HEADER_SIZE > self._max_message:
                self._refuse(peer, cid, seq)
                return False
            key = (peer, cid)
            owner = self._clients[key] = _RemoteClient(key, seq - ack)
            self._last_owner = owner
        else:
            self._last_owner = owner
            rpcs = owner.rpcs
            if seq in rpcs:
                self._duplicate_request(rpcs[seq], now)
                return False
            if seq < owner.floor:
                self.stats.duplicates += 1
                return False
            if len(datagram) - HEADER_SIZE > self._max_message:
                self._refuse(peer, cid, seq)
                return False
        token: RequestToken = (peer, cid, seq)
        rpc = self._spare
        if rpc is None:
            rpc = _ServerRpc(token, owner, _IN_PROGRESS, now)
        else:
            self._spare = None
            rpc.reset(token, owner, _IN_PROGRESS, now)
        owner.rpcs[seq] = rpc
        self._last_token = token
        self._last_rpc = rpc
        if type(datagram) is bytes:
            payload = _payload_view(datagram)
        else:  # (from _receive_general: a view of a bytearray)
            payload = _memoryview(datagram)[HEADER_SIZE:]
        sink = self.request_sink
        if sink is None:
            self.events.append((EV_REQUEST, token, payload))
        else:
            sink(token, payload)
        # the acknowledgement, after the handler (a fast one has replied by now: freeing what
        # the client no longer needs is off the round trip's critical path), and after the
        # insert above, so the client record never looks idle
        floor = seq - ack
        if floor > owner.floor:
            rpcs = owner.rpcs
            # the common case: this request and the previous one, answered, now acknowledged
            prev = rpcs.get(floor - 1) if len(rpcs) == 2 else None
            if prev is not None and prev.state == _RESPONDING:
                owner.floor = floor
                self.stats.responses_acked += 1
                self._kept -= 1
                prev.state = _DEAD
                prev.views = ()
                del self._linger[prev]
                del rpcs[floor - 1]
                # nothing else refers to it (the core hands out tokens, never records): the
                # next request takes it over instead of a new one (an allocation, a teardown)
                self._spare = prev
            else:
                self._advance_floor(owner, floor, now)
        return True

    def _request_fragment(
        self,
        datagram: bytes | memoryview,
        peer: Addr,
        cid: int,
        seq: int,
        length: int,
        offset: int,
        frag: int,
        ack: int,
        now: float,
    ) -> bool:
        key = (peer, cid)
        owner = self._clients.get(key)
        rpc = None
        if owner is not None:
            floor = seq - ack
            if floor > owner.floor:
                self._advance_floor(owner, floor, now)
            rpc = owner.rpcs.get(seq)
            if rpc is None and seq < owner.floor:
                self.stats.duplicates += 1
                return False
        if rpc is None:
            if length > self._max_message:
                self._refuse(peer, cid, seq)
                return False
            if (
                len(self._partials) >= self.config.max_partial_messages
                or self._partial_bytes + length > self.config.max_reassembly_bytes
            ):
                self.stats.dropped_capacity += 1
                return False
            if owner is None:
                owner = self._clients[key] = _RemoteClient(key, seq - ack)
            rpc = _ServerRpc((peer, cid, seq), owner, _RECEIVING, now)
            rpc.inmsg = _InMessage(length, frag, self._window, now)
            owner.rpcs[seq] = rpc
            self._partials[rpc] = None
            self._partial_bytes += length
            if self._tick_at is None:
                self._tick_at = now + self._ri
                self.deadline_moved = True
        elif rpc.state != _RECEIVING:
            self._duplicate_request(rpc, now)
            return False
        msg = rpc.inmsg
        assert msg is not None
        rpc.last_heard = now
        state = msg.add_untrusted(length, offset, frag, memoryview(datagram)[HEADER_SIZE:], now)
        if state == 2:
            del self._partials[rpc]
            self._partial_bytes -= msg.total
            rpc.inmsg = None
            rpc.state = _IN_PROGRESS
            self._request(rpc, memoryview(msg.buf))
            return True
        if state == 1:
            self._grant(msg, peer, cid, seq, 0)
        else:
            self.stats.duplicates += 1
        return False

    def _duplicate_request(self, rpc: _ServerRpc, now: float) -> None:
        """A request packet for an RPC already delivered: never run it again; if a small
        response is ready, resend it (multi-fragment responses wait for the client's RESEND)."""
        self.stats.duplicates += 1
        if rpc.state == _RESPONDING:
            rpc.last_heard = now
            if rpc.starts is None and now - rpc.last_tx >= self._quiet:
                self._retransmit(rpc, 0, rpc.total, now)

    def _refuse(self, peer: Addr, cid: int, seq: int) -> None:
        self.stats.requests_refused += 1
        self._send_control(peer, _ABORT, 0, _REASON_TOO_LARGE, seq, 0, cid)

    def _control_from_client(
        self,
        kind: int,
        flags: int,
        peer: Addr,
        cid: int,
        seq: int,
        length: int,
        offset: int,
        now: float,
    ) -> None:
        owner = self._clients.get((peer, cid))
        rpc = None if owner is None else owner.rpcs.get(seq)
        if rpc is None:
            if kind == _RESEND and (owner is None or seq >= owner.floor):
                # a ping for a request we never saw (or dropped while partial): start over
                self.stats.resends_sent += 1
                self._send_control(peer, _RESEND, _RESTART, self._window, seq, 0, cid)
            elif kind == _ABORT and (owner is None or seq >= owner.floor):
                self._tombstone(peer, cid, seq, owner, now)
            else:
                self.stats.dropped_unknown += 1
            return
        rpc.last_heard = now
        state = rpc.state
        if kind == _RESEND:
            if state == _RESPONDING:
                self._on_resend(rpc, offset, length, flags & _PING, now)
            elif state == _ABORTED:
                self.stats.dropped_unknown += 1
            else:
                self.stats.busy_sent += 1
                self._send_control(peer, _BUSY, 0, 0, seq, 0, cid)
        elif kind == _GRANT:
            if state == _RESPONDING and rpc.starts is not None and offset > rpc.granted:
                rpc.granted = min(offset, rpc.total, rpc.sent + self._window)
                self._pump(rpc, now)
        elif kind == _ABORT:
            if state == _ABORTED:
                self.stats.duplicates += 1
                return
            if state == _IN_PROGRESS:
                self.events.append((EV_ABORTED, rpc.token, None))
            elif state == _RECEIVING:
                self._drop_partial(rpc)
            elif state == _RESPONDING:
                self._kept -= 1
            self.stats.requests_aborted += 1
            rpc.state = _ABORTED
            rpc.views = ()
            self._linger_add(rpc, now)
        else:  # BUSY travels server -> client only
            self.stats.dropped_unknown += 1

    def _tombstone(
        self, peer: Addr, cid: int, seq: int, owner: _RemoteClient | None, now: float
    ) -> None:
        """Remember a cancelled RPC we never saw, so its delayed request is not run."""
        if owner is None:
            key = (peer, cid)
            owner = self._clients[key] = _RemoteClient(key, 0)
        rpc = _ServerRpc((peer, cid, seq), owner, _ABORTED, now)
        owner.rpcs[seq] = rpc
        self._linger_add(rpc, now)
        self.stats.requests_aborted += 1

    def _drop_partial(self, rpc: _ServerRpc) -> None:
        msg = rpc.inmsg
        if msg is not None:
            del self._partials[rpc]
            self._partial_bytes -= msg.total
            rpc.inmsg = None

    def _forget(self, rpc: _ServerRpc, now: float) -> None:
        state = rpc.state
        if state == _DEAD:
            return
        if state == _RECEIVING:
            self._drop_partial(rpc)
        elif state == _RESPONDING:
            self._kept -= 1
        rpc.state = _DEAD
        rpc.views = ()
        self._linger.pop(rpc, None)
        owner = rpc.owner
        if owner.rpcs.get(rpc.seq) is rpc:
            del owner.rpcs[rpc.seq]
            if not owner.rpcs:
                owner.idle_since = now
                self._idle[owner] = None
                if self._sweep_at is None:
                    self._sweep_at = now + self.config.response_keep
                    self.deadline_moved = True

    def _advance_floor(self, owner: _RemoteClient, floor: int, now: float) -> None:
        """The client finished everything below ``floor``: free what it no longer needs."""
        owner.floor = floor
        rpcs = owner.rpcs
        done = []
        for seq, rpc in rpcs.items():  # roughly in sequence order: stop at the floor
            if seq >= floor:
                break
            if rpc.state != _IN_PROGRESS:
                done.append(rpc)
        for rpc in done:
            if rpc.state == _RESPONDING and len(rpcs) > 1:
                # the common case (the previous response, acknowledged), inline: see _forget
                self.stats.responses_acked += 1
                self._kept -= 1
                rpc.state = _DEAD
                rpc.views = ()
                del self._linger[rpc]
                del rpcs[rpc.seq]
            else:
                if rpc.state == _RESPONDING:
                    self.stats.responses_acked += 1
                self._forget(rpc, now)
