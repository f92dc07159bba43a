"""Master-side replication: every log segment kept on R backups (RAMCloud's ReplicaManager,
ReplicatedSegment and BackupSelector in one module).

The log hands segment bytes to :class:`ReplicaManager` through the ``ReplicaSink`` calls
(``open``/``append``/``close``/``free``); the master asks :meth:`ReplicaManager.sync` to be told
when everything handed over so far is durable. Nothing here blocks or waits: RPCs are started
with ``Connection.start`` and their callbacks run inside the dispatcher's poll, so the whole
thing is usable from ``@fast`` handlers. A background task (:meth:`ReplicaManager.run`) provides
the only clock: RPC timeouts, retry back-off and sync deadlines.

Fault handling is convergence (STYLE.md): each segment has a *desired* state (bytes queued,
close queued, free queued, R replicas) and each replica an *acknowledged* state (open, bytes,
closed). ``_converge`` compares them after every event (a sink call, an RPC ending, a server
list, a timer tick) and starts whatever RPCs move them closer; the one event it skips is an
acknowledgement that leaves its replica up to date and commits nothing (the first R - 1 acks of
a write), which cannot let anything else move. No code path assumes an RPC succeeds: a failed
RPC drops the replica, and the next ``_converge`` places a new one.

A durable write is an append, R writeSegment RPCs started back to back in one pass (no task
switch: they leave before the dispatcher polls again), and R acks: two converge passes in all
(the append's and the committing ack's), each one loop over the replicas; the bytes of a small
write are copied once for the R replicas.

Rules:

* R replicas per segment on distinct backups, never on the master's own server; the first is the
  primary (a replacement for a lost primary is the primary). Placement is random among usable
  backups (:class:`RandomBackupSelector`; pluggable).
* At most one writeSegment RPC in flight per replica, so a replica's bytes arrive in order.
  Bytes appended meanwhile go out together in the next RPC (at most ``max_write_bytes`` each).
* Bytes are copied at ``append`` time and kept only until every replica of the segment has
  acknowledged them. A replica that starts late (a replacement) is fed from the master's log
  memory through ``read_segment``, from offset 0.
* A segment's close is sent only once the open of every segment opened after it is committed (on
  R backups): backups always hold an open head, so recovery finds the log's end (RAMCloud's
  ordering between the old and the new head).
* ``free`` is a barrier: freeSegment goes to a replica only after everything queued before the
  ``free`` call (the new head with the digest that drops the segment) is committed, and after
  that replica acknowledged the close. A freed segment is not re-replicated.
* A replica fails on any RPC error (PeerDead, a timeout after ``rpc_timeout``, BACKUP_OPEN_REJECTED,
  CALLER_NOT_IN_CLUSTER, ...) or when its backup leaves the server list (:meth:`set_backups`).
  Its backup is avoided for ``retry_delay``; a still-listed backup gets a best-effort
  freeSegment for the abandoned replica and is not chosen again for that segment until that ends.
* "Committed" is monotonic per segment: bytes (and the close) acknowledged by R replicas at once.
  :meth:`~ReplicaManager.sync` waits for the segments with uncommitted state at the time of the
  call. A closed, committed segment that loses a replica is re-replicated in the background
  (at most ``max_recovery_writes`` such RPCs at once) without holding up later syncs.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeAlias

import attrs
import trio

import rpcfast
from rpcfast._schema import CustomCodec, interface_spec
from services.kvstore._backup import cluster_capnp
from services.kvstore._direct import DirectStruct
from services.kvstore.errors import Retry

log = logging.getLogger("kvstore.replication")

Buffer: TypeAlias = bytes | bytearray | memoryview
SyncCallback: TypeAlias = Callable[[Exception | None], None]

_BACKUP = interface_spec(cluster_capnp.Backup)
_FREE = _BACKUP.by_name["freeSegment"]
_FREE_ATTEMPTS = 3
# writes shorter than this send a bytes copy (shared by the replicas); longer ones a view
_SMALL_WRITE = 4096
_GENERIC_WRITE = _BACKUP.by_name["writeSegment"]
_WRITE_FIELDS = ("masterId", "segmentId", "offset", "data", "open", "close", "primary")
_WRITE_SEGMENT = DirectStruct(
    cluster_capnp.Backup.schema.methods["writeSegment"].param_type, _WRITE_FIELDS
)


def _encode_write(params: dict[str, Any]) -> list[Buffer]:
    """``writeSegment``'s params built in place when the data is a small ``bytes`` copy (the
    common write, sent to R backups); views of larger data go through the generic encoder,
    which sends them without a copy."""
    data = params["data"]
    offset = params["offset"]
    if data.__class__ is bytes and len(data) < _SMALL_WRITE and 0 <= offset < 1 << 32:
        return [
            _WRITE_SEGMENT.encode(
                params["masterId"],
                params["segmentId"],
                offset,
                data,
                params["open"],
                params["close"],
                params["primary"],
            )
        ]
    return _GENERIC_WRITE.params.encode_parts(params)


_WRITE = attrs.evolve(
    _GENERIC_WRITE, params=CustomCodec.over(_GENERIC_WRITE.params, encode=_encode_write)
)
_clock = time.monotonic


class ReplicasUnavailable(Retry):
    """Written data could not reach R backups within the durability timeout; retry later.

    Travels as RETRY: the client backs off and tries again (the replicas may be placed by then).
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(message, min_delay=0.01, max_delay=0.1)


class BackupSelector(Protocol):
    """Picks the backup for a new replica among ``candidates`` (never empty).

    The manager has already removed the master itself, the segment's other replicas and backups
    that failed recently; ``primary`` says whether the replica is the segment's primary.
    """

    def __call__(self, candidates: Sequence[int], *, primary: bool) -> int: ...


class RandomBackupSelector:
    """Uniformly random placement (RAMCloud's default, without the disk-speed weighting)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()

    def __call__(self, candidates: Sequence[int], *, primary: bool) -> int:
        return candidates[self._rng.randrange(len(candidates))]


@attrs.frozen(kw_only=True)
class ReplicationStats:
    """Counters of a :class:`ReplicaManager`.

    ``writes_sent`` below the number of appends times R shows appends sharing RPCs;
    ``buffered_bytes`` is what is copied and not yet acknowledged by every replica.
    """

    segments: int
    replicas: int
    backups: int
    buffered_bytes: int
    bytes_sent: int
    writes_sent: int
    writes_in_flight: int
    frees_sent: int
    failures: int
    replacements: int
    sync_waiters: int
    sync_timeouts: int


@attrs.define(eq=False)
class _Replica:
    """One replica of a segment on one backup, as acknowledged by that backup."""

    backup_id: int
    primary: bool
    opened: bool = False
    acked: int = 0
    closed: bool = False
    call: _Call | None = None
    freeing: bool = False
    free_attempts: int = 0


@attrs.define(eq=False)
class _Segment:
    """Desired state (``length``, ``closed``, ``free_requested``) and the replicas working on it."""

    id: int
    seq: int  # order of opening
    length: int
    buf: bytearray  # bytes [base, length): not yet acknowledged by every replica
    base: int = 0
    closed: bool = False
    free_requested: bool = False
    free_ready: bool = False
    removed: bool = False
    # committed (monotonic): -1 until the open is on R replicas, then bytes on R replicas
    committed: int = -1
    committed_close: bool = False
    # segments opened before this one was closed, whose open must commit before the close goes out
    close_after: list[_Segment] | None = None
    replicas: list[_Replica] = attrs.Factory(list)
    # backups holding an abandoned replica of this segment, being freed there
    discarding: set[int] = attrs.Factory(set)
    lost: int = 0  # replicas lost so far: later placements are replacements
    # the last small write's bytes (start, end, copy): the R replicas usually send the same range
    chunk: tuple[int, int, bytes] | None = None

    def is_committed(self, length: int, close: bool) -> bool:
        return (
            self.removed
            or self.free_requested
            or (self.committed >= length and (self.committed_close or not close))
        )

    def fully_committed(self) -> bool:
        return self.committed >= self.length and (self.committed_close or not self.closed)


@attrs.define(eq=False)
class _Call:
    """One RPC in flight."""

    kind: Literal["write", "free", "discard"]
    segment: _Segment
    replica: _Replica | None
    backup_id: int
    started: float
    end: int = 0
    open: bool = False
    close: bool = False
    from_log: bool = False
    pending: Any = None
    finished: bool = False


@attrs.define(eq=False)
class _Waiter:
    """A sync (``callback``) or a free barrier (``freeing``): released when ``need`` commits."""

    need: list[tuple[_Segment, int, bool]]
    deadline: float
    callback: SyncCallback | None = None
    freeing: _Segment | None = None

    def satisfied(self) -> bool:
        # (a loop, not all() over a generator: this is checked on every commit)
        for seg, length, close in self.need:  # noqa: SIM110
            if not seg.is_committed(length, close):
                return False
        return True


def _slice_views(views: Sequence[Buffer], start: int, end: int) -> Buffer | None:
    """Bytes ``[start, end)`` of the concatenation of ``views`` (None if they are shorter)."""
    pieces: list[Buffer] = []
    pos = 0
    for view in views:
        n = len(view)
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            pieces.append(memoryview(view)[lo - pos : hi - pos])
        pos += n
        if pos >= end:
            break
    if pos < end:
        return None
    if len(pieces) == 1:
        return pieces[0]
    return b"".join(pieces)


class ReplicaManager:
    """Keeps every segment of one master's log on R backups (implements ``ReplicaSink``).

    Make it inside trio (connections bind to this run's dispatcher) and run :meth:`run` in a
    nursery. ``read_segment(segment_id)`` returns views of the bytes the log holds for a segment
    (valid during the call; None once the log dropped it): replacements copy from there.
    Sink calls with impossible arguments (an append to an unknown or closed segment, at the
    wrong offset) raise ``ValueError``; backup trouble never raises.
    """

    def __init__(
        self,
        master_id: int,
        replicas: int,
        *,
        select_backups: BackupSelector | None = None,
        read_segment: Callable[[int], Sequence[Buffer] | None],
        rpc_timeout: float = 0.5,
        durability_timeout: float = 1.0,
        retry_delay: float = 0.05,
        max_write_bytes: int = 1024 * 1024,
        max_recovery_writes: int = 8,
        tick: float = 0.01,
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must not be negative")
        if max_write_bytes <= 0 or max_recovery_writes <= 0:
            raise ValueError("max_write_bytes and max_recovery_writes must be positive")
        self.master_id = master_id
        self.replicas = replicas
        self._select = select_backups if select_backups is not None else RandomBackupSelector()
        self._read_segment = read_segment
        self._rpc_timeout = rpc_timeout
        self._durability_timeout = durability_timeout
        self._retry_delay = retry_delay
        self._max_write = max_write_bytes
        self._max_recovery = max_recovery_writes
        self._tick = tick
        self._backups: dict[int, str] = {}
        self._conns: dict[int, rpcfast.Connection] = {}
        self._avoid_until: dict[int, float] = {}
        self._segments: dict[int, _Segment] = {}
        self._active: dict[int, _Segment] = {}  # segments that may need work
        self._opening: dict[int, _Segment] = {}  # segments whose open is not committed yet
        self._seq = 0
        self._calls: set[_Call] = set()
        self._recovery_writes = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._barriers: collections.deque[_Waiter] = collections.deque()
        self._converging = False
        self._again = False
        self._wake: trio.Event | None = None  # set while the timer sleeps until there is work
        # counters
        self._bytes_sent = 0
        self._writes_sent = 0
        self._frees_sent = 0
        self._failures = 0
        self._replacements = 0
        self._sync_timeouts = 0

    # -- ReplicaSink ---------------------------------------------------------------------------
    def open(self, segment_id: int, data: Buffer) -> None:
        """A new segment with its first bytes; replicas are placed at once."""
        if self.replicas == 0:
            return
        if segment_id in self._segments:
            raise ValueError(f"segment {segment_id} is already open")
        self._seq += 1
        seg = _Segment(id=segment_id, seq=self._seq, length=len(data), buf=bytearray(data))
        self._segments[segment_id] = seg
        self._active[segment_id] = seg
        self._opening[segment_id] = seg
        self._converge()

    def append(self, segment_id: int, offset: int, data: Buffer) -> None:
        if self.replicas == 0 or not len(data):
            return
        seg = self._live_segment(segment_id)
        if seg.closed:
            raise ValueError(f"append to closed segment {segment_id}")
        if offset != seg.length:
            raise ValueError(f"append at {offset}, segment {segment_id} has {seg.length} bytes")
        seg.buf += data
        seg.length += len(data)
        self._active[segment_id] = seg
        self._converge()

    def close(self, segment_id: int) -> None:
        """No more appends; the close goes out once later segments' opens have committed."""
        if self.replicas == 0:
            return
        seg = self._live_segment(segment_id)
        if seg.closed:
            return
        self._mark_closed(seg)
        self._active[segment_id] = seg
        self._converge()

    def free(self, segment_id: int) -> None:
        """The log no longer needs the segment: its replicas are freed once that is safe."""
        seg = self._segments.get(segment_id)
        if seg is None or seg.free_requested:
            return
        seg.free_requested = True
        self._opening.pop(segment_id, None)  # nothing waits for a freed segment's open
        if not seg.closed:
            self._mark_closed(seg)
        need = self._uncommitted()
        if need:
            self._barriers.append(_Waiter(need, deadline=float("inf"), freeing=seg))
        else:
            seg.free_ready = True
        self._active[segment_id] = seg
        self._converge()

    # -- durability ----------------------------------------------------------------------------
    def sync(self, callback: SyncCallback) -> None:
        """Call ``callback(None)`` once everything handed over so far is on R backups.

        Runs ``callback`` at once if it already is. If that takes longer than
        ``durability_timeout`` (too few usable backups), ``callback(ReplicasUnavailable)``.
        The callback runs on the trio thread (inside the dispatcher's poll or the timer).
        """
        need = self._uncommitted()
        if not need:
            callback(None)
            return
        self._waiters.append(
            _Waiter(need, deadline=_clock() + self._durability_timeout, callback=callback)
        )
        self._kick()

    def _mark_closed(self, seg: _Segment) -> None:
        seg.closed = True
        seg.close_after = [s for s in self._opening.values() if s.seq > seg.seq]

    def _uncommitted(self) -> list[tuple[_Segment, int, bool]]:
        need = []
        for seg in self._active.values():
            if not seg.free_requested and not seg.fully_committed():
                need.append((seg, seg.length, seg.closed))
        return need

    # -- membership ----------------------------------------------------------------------------
    def set_backups(self, backups: Sequence[tuple[int, str]]) -> None:
        """The backups that are up (server id, address), from the latest server list.

        Replicas on backups no longer listed are dropped and placed again elsewhere.
        """
        listed = {sid: addr for sid, addr in backups if sid != self.master_id}
        gone = {sid for sid, addr in self._backups.items() if listed.get(sid) != addr}
        self._backups = listed
        if gone:
            for seg in self._segments.values():
                for rep in list(seg.replicas):
                    if rep.backup_id in gone:
                        self._drop(seg, rep, discard=False)
            for call in list(self._calls):
                if call.backup_id in gone:
                    self._cancel(call)  # (only discards are left)
            for sid in gone:
                self._conns.pop(sid, None)
        for seg in self._segments.values():
            if len(seg.replicas) < self.replicas and not seg.free_requested:
                self._active[seg.id] = seg
        self._converge()

    # -- the timer -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Retries, RPC timeouts and sync deadlines; run in a nursery until cancelled."""
        while True:
            if self._quiet():  # nothing to time out or retry: sleep until there is
                self._wake = trio.Event()
                await self._wake.wait()
            else:
                await trio.sleep(self._tick)
            self._on_tick(_clock())

    def _quiet(self) -> bool:
        return not (self._calls or self._waiters or self._active or self._again)

    def _kick(self) -> None:
        """Work for the timer appeared: wake it if it sleeps (see :meth:`run`)."""
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    def _on_tick(self, now: float) -> None:
        for call in list(self._calls):
            if now - call.started > self._rpc_timeout and not call.finished:
                self._cancel(call)
                self._finish(call, rpcfast.RpcTimeout(f"no answer within {self._rpc_timeout} s"))
        self._converge()
        expired: list[_Waiter] = []
        while self._waiters and self._waiters[0].deadline <= now:
            expired.append(self._waiters.popleft())
        for waiter in expired:
            assert waiter.callback is not None
            if waiter.satisfied():  # (queued behind one that is not)
                self._notify(waiter.callback, None)
                continue
            self._sync_timeouts += 1
            self._notify(waiter.callback, ReplicasUnavailable(self._shortfall(waiter)))

    def _shortfall(self, waiter: _Waiter) -> str:
        for seg, length, close in waiter.need:
            if not seg.is_committed(length, close):
                return (
                    f"segment {seg.id}: {len(seg.replicas)} of {self.replicas} replicas placed, "
                    f"{len(self._backups)} backups listed"
                )
        return "durability timeout"

    # -- statistics ----------------------------------------------------------------------------
    def stats(self) -> ReplicationStats:
        segs = self._segments.values()
        return ReplicationStats(
            segments=len(self._segments),
            replicas=sum(len(s.replicas) for s in segs),
            backups=len(self._backups),
            buffered_bytes=sum(len(s.buf) for s in segs),
            bytes_sent=self._bytes_sent,
            writes_sent=self._writes_sent,
            writes_in_flight=sum(c.kind == "write" for c in self._calls),
            frees_sent=self._frees_sent,
            failures=self._failures,
            replacements=self._replacements,
            sync_waiters=len(self._waiters),
            sync_timeouts=self._sync_timeouts,
        )

    # -- convergence ---------------------------------------------------------------------------
    def _converge(self) -> None:
        """Start every RPC that moves a segment toward its desired state; release waiters."""
        if self._converging:
            self._again = True  # (called from inside: an RPC failed as it started)
            return
        self._converging = True
        try:
            self._again = True
            while self._again:
                self._again = False
                now = _clock()
                for seg in list(self._active.values()):
                    if not self._converge_segment(seg, now):
                        self._active.pop(seg.id, None)
        finally:
            self._converging = False
        self._release_waiters()
        if self._wake is not None and not self._quiet():
            self._kick()

    def _converge_segment(self, seg: _Segment, now: float) -> bool:
        """Move one segment forward; return whether it still needs attention."""
        if seg.removed:
            return False
        r = self.replicas
        if not seg.free_requested:
            while len(seg.replicas) < r:
                backup = self._choose(seg, now)
                if backup is None:
                    break
                primary = not any(rep.primary for rep in seg.replicas)
                seg.replicas.append(_Replica(backup_id=backup, primary=primary))
                if seg.lost:
                    self._replacements += 1
        close_ok = seg.closed and self._close_allowed(seg)
        # One pass (this runs on every append and every ack): a replica with an RPC in flight
        # or still behind keeps the segment active; one that is done needs nothing unless its
        # segment is being freed. (A copy: _advance may drop the replica it advances.)
        busy = False
        length = seg.length
        for rep in list(seg.replicas):
            if rep.call is not None:
                busy = True
            elif (
                rep.opened
                and rep.acked >= length
                and (rep.closed or not close_ok)
                and not seg.free_ready
            ):
                continue
            elif not seg.removed:
                busy = True
                self._advance(seg, rep, close_ok, now)
        if seg.free_requested and not seg.replicas and not seg.discarding:
            seg.removed = True
            self._segments.pop(seg.id, None)
            seg.buf = bytearray()
            seg.chunk = None
            return False
        self._trim(seg)
        return (
            busy
            or seg.free_requested
            or bool(seg.discarding)
            or (seg.closed and not close_ok)
            or len(seg.replicas) < r
        )

    @staticmethod
    def _replica_done(seg: _Segment, rep: _Replica, close_ok: bool) -> bool:
        return rep.opened and rep.acked >= seg.length and (rep.closed or not close_ok)

    def _close_allowed(self, seg: _Segment) -> bool:
        after = seg.close_after
        if after:
            if not all(s.committed >= 0 or s.removed or s.free_requested for s in after):
                return False
            seg.close_after = None
        return True

    def _advance(self, seg: _Segment, rep: _Replica, close_ok: bool, now: float) -> None:
        """Start the next RPC this replica needs, if any (it has none in flight).

        (_converge_segment calls it only for a replica that is behind, or while freeing.)
        """
        if seg.free_ready:
            done = self._replica_done(seg, rep, close_ok)
            if rep.freeing or (done and close_ok):
                if rep.backup_id in self._backups and rep.free_attempts < _FREE_ATTEMPTS:
                    self._start_free(seg, rep, now)
                else:
                    seg.replicas.remove(rep)
                return
            if done:
                return
        start = rep.acked if rep.opened else 0
        end = min(seg.length, start + self._max_write)
        close = close_ok and end == seg.length
        from_log = start < seg.base
        if from_log:
            if seg.closed and self._recovery_writes >= self._max_recovery:
                return  # background re-replication of closed segments is rate limited
            views = self._read_segment(seg.id)
            data = _slice_views(views, start, end) if views is not None else None
            if data is None:
                if seg.free_requested:  # the log let go of it: nothing to complete
                    self._drop(seg, rep, discard=rep.opened)
                return
            self._start_write(seg, rep, start, end, close, data, from_log=True, now=now)
            return
        if end - start < _SMALL_WRITE:
            # bytes, made once for the R replicas: the params encoder copies bytes inline
            cached = seg.chunk
            if cached is not None and cached[0] == start and cached[1] == end:
                small = cached[2]
            else:
                base = seg.base
                small = bytes(seg.buf[start - base : end - base])
                seg.chunk = (start, end, small)
            self._start_write(seg, rep, start, end, close, small, from_log=False, now=now)
            return
        with memoryview(seg.buf) as whole, whole[start - seg.base : end - seg.base] as chunk:
            self._start_write(seg, rep, start, end, close, chunk, from_log=False, now=now)

    def _trim(self, seg: _Segment) -> None:
        """Drop copied bytes that every replica fed from the copy has acknowledged."""
        if not seg.buf:
            return  # (the copy holds [base, length): nothing to drop, base is the length)
        # where each replica's next write starts (an unopened one's open may be in flight);
        # the lowest of those at or past base (a plain loop: this runs on every ack)
        base = seg.base
        upto = -1
        for rep in seg.replicas:
            acked = rep.acked
            if acked >= base and (upto < 0 or acked < upto):
                upto = acked
        if upto < 0:
            if seg.free_requested or (seg.closed and seg.fully_committed()):
                # closed and on R backups (or being freed): replacements read the log
                seg.base = seg.length
                seg.buf = bytearray()
            return
        if upto > base:
            del seg.buf[: upto - base]
            seg.base = upto

    def _choose(self, seg: _Segment, now: float) -> int | None:
        taken = {rep.backup_id for rep in seg.replicas}
        candidates = [
            sid
            for sid in self._backups
            if sid not in taken
            and sid not in seg.discarding
            and self._avoid_until.get(sid, 0.0) <= now
        ]
        if not candidates:
            return None
        return self._select(candidates, primary=not any(rep.primary for rep in seg.replicas))

    # -- RPCs ----------------------------------------------------------------------------------
    def _conn(self, backup_id: int) -> rpcfast.Connection:
        conn = self._conns.get(backup_id)
        if conn is None:
            conn = self._conns[backup_id] = rpcfast.connect(self._backups[backup_id])
        return conn

    def _start_write(
        self,
        seg: _Segment,
        rep: _Replica,
        start: int,
        end: int,
        close: bool,
        data: Buffer,
        *,
        from_log: bool,
        now: float,
    ) -> None:
        opening = not rep.opened
        call = _Call("write", seg, rep, rep.backup_id, now, end, opening, close, from_log)
        params = {
            "masterId": self.master_id,
            "segmentId": seg.id,
            "offset": start,
            "data": data,
            "open": opening,
            "close": close,
            "primary": rep.primary,
        }
        rep.call = call
        self._writes_sent += 1
        self._bytes_sent += end - start
        if from_log:
            self._recovery_writes += 1
        self._start(call, _WRITE, params)

    def _start_free(self, seg: _Segment, rep: _Replica, now: float) -> None:
        rep.freeing = True
        rep.free_attempts += 1
        call = _Call("free", seg, rep, rep.backup_id, now)
        rep.call = call
        self._frees_sent += 1
        self._start(call, _FREE, {"masterId": self.master_id, "segmentId": seg.id})

    def _discard(self, seg: _Segment, backup_id: int) -> None:
        """Best-effort free of an abandoned replica on a backup that is still listed."""
        seg.discarding.add(backup_id)
        call = _Call("discard", seg, None, backup_id, _clock())
        self._frees_sent += 1
        self._start(call, _FREE, {"masterId": self.master_id, "segmentId": seg.id})

    def _start(self, call: _Call, method: Any, params: dict[str, Any]) -> None:
        self._calls.add(call)
        self._kick()

        def done(_result: Any, error: Exception | None) -> None:
            if self._finish(call, error):
                self._converge()

        try:
            pending = self._conn(call.backup_id).start(_BACKUP, method, params, done)
        except Exception as exc:  # a bad address, a closed transport: that backup failed
            log.warning("cannot call backup %#x: %s", call.backup_id, exc)
            self._finish(call, exc)
            self._again = True
            return
        if not call.finished:
            call.pending = pending

    def _cancel(self, call: _Call) -> None:
        if call.pending is not None and not call.finished:
            conn = self._conns.get(call.backup_id)
            if conn is not None:
                conn.cancel(call.pending)
        if call.kind != "discard" or call.finished:
            return
        # a cancelled discard ends here: its callback will not run
        self._finish(call, rpcfast.RpcTimeout("cancelled"))

    def _finish(self, call: _Call, error: Exception | None) -> bool:
        """An RPC ended (or was given up on): fold the outcome into the replica's state.

        Returns False only when a converge would find nothing to do: a write acknowledged by a
        replica that is now up to date, with nothing committed by it (the first R - 1 acks of
        each write), so no other replica, segment or waiter can move.
        """
        if call.finished:
            return False
        call.finished = True
        self._calls.discard(call)
        if call.from_log:
            self._recovery_writes -= 1
        seg, rep = call.segment, call.replica
        if call.kind == "discard":
            seg.discarding.discard(call.backup_id)
            self._active[seg.id] = seg
            return True
        assert rep is not None
        if rep.call is not call:
            return True  # the replica was dropped meanwhile
        rep.call = None
        self._active[seg.id] = seg
        if call.kind == "free":
            if error is None:
                seg.replicas.remove(rep)
            # else the next converge tries again (a few times, while the backup is listed)
            return True
        if error is not None:
            self._failures += 1
            log.info(
                "replica of segment %d on backup %#x failed (%s: %s): replacing it",
                seg.id,
                call.backup_id,
                type(error).__name__,
                error,
            )
            self._avoid(call.backup_id)
            # a refusal created nothing; after a timeout or a lost peer the replica may exist
            refused = isinstance(error, rpcfast.RemoteError) and call.open
            self._drop(seg, rep, discard=rep.opened or not refused)
            return True
        rep.opened = True
        rep.acked = call.end
        if call.close:
            rep.closed = True
        committed, committed_close = seg.committed, seg.committed_close
        self._update_committed(seg)
        return (
            call.from_log  # (a recovery write's slot is free: a waiting one may start)
            or seg.committed != committed
            or seg.committed_close != committed_close
            or rep.acked < seg.length
            or (seg.closed and not rep.closed)
            or seg.free_requested
            or len(seg.replicas) < self.replicas  # (placing the missing one may work now)
        )

    def _avoid(self, backup_id: int) -> None:
        self._avoid_until[backup_id] = _clock() + self._retry_delay

    def _drop(self, seg: _Segment, rep: _Replica, *, discard: bool) -> None:
        """Forget a replica (its backup failed or left); the next converge replaces it."""
        if rep not in seg.replicas:
            return
        seg.replicas.remove(rep)
        call, rep.call = rep.call, None
        if call is not None and not call.finished:
            self._cancel(call)
            call.finished = True
            self._calls.discard(call)
            if call.from_log:
                self._recovery_writes -= 1
        seg.lost += 1
        self._active[seg.id] = seg
        if discard and rep.backup_id in self._backups:
            self._discard(seg, rep.backup_id)

    def _update_committed(self, seg: _Segment) -> None:
        r = self.replicas
        replicas = seg.replicas
        # (plain loops: this runs on every ack; the usual case is exactly R opened replicas)
        opened = 0
        level = -1
        closed = 0
        for rep in replicas:
            if rep.opened:
                opened += 1
                if level < 0 or rep.acked < level:
                    level = rep.acked
                if rep.closed:
                    closed += 1
        if opened >= r:
            if opened > r:  # (a replacement catching up beside R others)
                acked = sorted((rep.acked for rep in replicas if rep.opened), reverse=True)
                level = acked[r - 1]
            if level > seg.committed:
                seg.committed = level
                self._opening.pop(seg.id, None)
        # (a replica is closed only after its segment is)
        if seg.closed and not seg.committed_close and closed >= r:
            seg.committed_close = True

    # -- waiters -------------------------------------------------------------------------------
    def _release_waiters(self) -> None:
        while self._barriers and self._barriers[0].satisfied():
            seg = self._barriers.popleft().freeing
            assert seg is not None
            seg.free_ready = True
            if not seg.removed:
                self._active[seg.id] = seg
                self._again = True
        if self._again and not self._converging:
            self._converge()
            return
        ready: list[SyncCallback] = []
        while self._waiters and self._waiters[0].satisfied():
            callback = self._waiters.popleft().callback
            assert callback is not None
            ready.append(callback)
        for callback in ready:
            self._notify(callback, None)

    @staticmethod
    def _notify(callback: SyncCallback, error: Exception | None) -> None:
        try:
            callback(error)
        except Exception:  # the caller's bug must not leave the manager half-updated
            log.exception("sync callback failed")

    def _live_segment(self, segment_id: int) -> _Segment:
        seg = self._segments.get(segment_id)
        if seg is None or seg.free_requested:
            raise ValueError(f"segment {segment_id} is not open")
        return seg
