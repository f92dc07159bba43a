"""The in-memory log: head segment, roll-over with digests, references, accounting, epochs.

A reference names an entry as ``slot << 24 | offset`` (47 bits: 23-bit segment slot, 24-bit offset,
so segments are at most 16 MiB). Slots, not segment ids, are used because a compacted segment keeps
its id but lives in new seglets; the old copy keeps its slot until no reader can still see it.

Accounting is exact: every segment knows its live bytes (live objects plus live tombstones). A
tombstone stays live while the segment that held its object is part of the log; an index from
that segment's id to the segments holding its tombstones lets the log retire them the moment the
segment leaves, instead of RAMCloud's periodic tombstone scans.

Freed segments go to a pending list and their seglets are reused only when every read that began
before the free has ended (``begin_read``/``end_read``: an epoch scheme like RCU's wait-for-readers,
paper section 6.3). Replication is reached only through the :class:`ReplicaSink` protocol.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Protocol

import attrs

from services.kvstore.log._entries import (
    SAFE_VERSION_ENTRY_SIZE,
    SEGMENT_HEADER_ENTRY_SIZE,
    Buffer,
    EntryType,
    build_log_digest,
    build_object,
    build_safe_version,
    build_segment_header,
    build_tombstone,
    log_digest_size,
)

try:  # the request paths' entry encoders in C (built with the compiled engine), else struct's
    from services.kvstore.log._encode import write_object_into, write_tombstone_into
except ImportError:
    from services.kvstore.log._entries import (
        write_object_into,
        write_tombstone_into,
    )
from services.kvstore.log._segments import (
    IDX_AUX_MASK,
    IDX_NO_HASH,
    IDX_OFFSET_SHIFT,
    IDX_OTHER,
    IDX_SHIFT,
    IDX_TOMB,
    Pool,
    SegletAllocator,
    Segment,
    SegmentState,
)

OFFSET_BITS = 24
OFFSET_MASK = (1 << OFFSET_BITS) - 1
MAX_SLOTS = 1 << 23
MiB = 1 << 20
KiB = 1 << 10

EMERGENCY_HEAD_SEGMENTS = 2
SURVIVOR_SEGMENTS_TO_RESERVE = 15

# An entry to append: (type, buffers, total size including its header, aux). aux is a tombstone's
# target segment id, an object's key hash (or -1: unknown, the cleaner hashes the key).
AppendEntry = tuple[int, Sequence[Buffer], int, int]


# A holder's cell in :meth:`Log.tombstone_holders`: its live tombstone bytes for one target
# segment, shifted, plus their count. One int, not a list: a list per (target, holder) pair
# was ~130 bytes and a GC-tracked container (W1 of ``rpcfast-perf memory``: 28k of them).
TOMB_CELL_SHIFT: Final = 32
TOMB_COUNT_MASK: Final = (1 << 32) - 1
_NO_HOLDERS: dict[int, int] = {}


class LogFull(Exception):
    """No seglets for a new head segment: the cleaner has to free memory first."""


class ReplicaSink(Protocol):
    """Where the log sends segment bytes for replication (backups implement it later).

    Calls arrive in log order: ``open`` carries a segment's first bytes (header, digest),
    ``append`` the bytes written at ``offset``, ``close`` ends the segment (no more appends),
    ``free`` says the replicas are no longer needed. ``data`` is a view into log memory that is
    valid only during the call: copy what must be kept.
    """

    def open(self, segment_id: int, data: Buffer) -> None: ...

    def append(self, segment_id: int, offset: int, data: Buffer) -> None: ...

    def close(self, segment_id: int) -> None: ...

    def free(self, segment_id: int) -> None: ...


class NullReplicaSink:
    """The sink for R=0 (no backups): nothing to send, nothing to wait for."""

    def open(self, segment_id: int, data: Buffer) -> None:
        pass

    def append(self, segment_id: int, offset: int, data: Buffer) -> None:
        pass

    def close(self, segment_id: int) -> None:
        pass

    def free(self, segment_id: int) -> None:
        pass


_POSITIVE = (
    "total_bytes",
    "segment_size",
    "seglet_size",
    "cleaner_bytes_per_step",
    "max_live_segments_per_pass",
)


@attrs.frozen(kw_only=True)
class StorageConfig:
    """Sizes and policies of one master's storage engine (log, hash table, cleaner).

    ``cleaner_reserve_segments`` defaults to RAMCloud's 15 survivor segments, capped at an eighth
    of the log (at least one) so that small test arenas stay usable. ``hash_table_bytes``
    defaults to 10% of ``total_bytes`` (RAMCloud's ``--hashTableMemory``).
    ``cleaner_bytes_per_step`` bounds the work of one :meth:`LogCleaner.step`, in bytes copied
    (scanning, sorting and committing are charged in byte equivalents).

    ``prefault_memory`` touches every page of the arena and the hash table at start-up. It is
    off by default. Both are mapped with small pages, so a first write into a fresh page costs
    one fault of ~3-6 us (rarely up to ~0.5 ms): about +0.1 us per 100-byte write, amortised,
    on the first pass through memory, and nothing after. Prefaulting the default 512 MiB arena
    and its 51 MiB table takes ~0.65-0.95 s here and commits all ~560 MiB at once, which
    tests, tools and several servers on one host should not pay for memory they may never
    use. (numpy's transparent huge pages, used before, stalled first touches for up to ~10 ms
    and took ~2.6 s to prefault.) Turn it on for benchmarks that must not see even the small
    faults.
    """

    total_bytes: int = 512 * MiB
    segment_size: int = 8 * MiB
    seglet_size: int = 64 * KiB
    cleaner_reserve_segments: int | None = None
    hash_table_bytes: int | None = None
    write_limit: float = 0.95
    disk_expansion_factor: float = 2.0
    compaction_enabled: bool = True
    tombstone_ratio: float = 0.40
    cleaner_bytes_per_step: int = 256 * KiB
    max_live_segments_per_pass: int = 10
    log_id: int = 0
    prefault_memory: bool = False

    def __attrs_post_init__(self) -> None:
        # (checked here rather than with attrs validators: mypyc compiles this module, and its
        # native classes take plain defaults only)
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.cleaner_reserve_segments is not None and self.cleaner_reserve_segments < 1:
            # combined cleaning writes its survivors there: without one it can wedge a full log
            raise ValueError("cleaner_reserve_segments must be at least 1")
        if self.segment_size % self.seglet_size:
            raise ValueError("segment_size must be a multiple of seglet_size")
        if self.segment_size > 1 << OFFSET_BITS:
            raise ValueError("segment_size must be at most 16 MiB (24-bit offsets)")
        if not 0.0 < self.write_limit <= 1.0:
            raise ValueError("write_limit must be in (0, 1]")
        if self.disk_expansion_factor < 1.0:
            raise ValueError("disk_expansion_factor must be at least 1")
        if self.reserve_segments + 2 > self.total_bytes // self.segment_size:
            raise ValueError("total_bytes too small for the reserves plus two segments")
        if self.max_append_bytes < self.seglet_size // 2:
            raise ValueError(
                "segment_size too small for a log digest of this many seglets "
                "(use larger seglets or segments)"
            )

    @property
    def metadata_bytes(self) -> int:
        """Bytes every segment keeps for its header, the log digest and a safe version."""
        return (
            SEGMENT_HEADER_ENTRY_SIZE
            + log_digest_size(self.total_seglets)
            + SAFE_VERSION_ENTRY_SIZE
        )

    @property
    def max_append_bytes(self) -> int:
        return self.segment_size - self.metadata_bytes

    @property
    def seglets_per_segment(self) -> int:
        return self.segment_size // self.seglet_size

    @property
    def total_seglets(self) -> int:
        return self.total_bytes // self.seglet_size

    @property
    def cleaner_segments(self) -> int:
        if self.cleaner_reserve_segments is not None:
            return self.cleaner_reserve_segments
        full = self.total_bytes // self.segment_size
        return min(SURVIVOR_SEGMENTS_TO_RESERVE, max(1, full // 8))

    @property
    def reserve_segments(self) -> int:
        return EMERGENCY_HEAD_SEGMENTS + self.cleaner_segments


class EpochTracker:
    """Counts reads in flight per epoch so freed memory is reused only after they end."""

    def __init__(self) -> None:
        self.current = 1
        self._active: dict[int, int] = {}

    def begin(self) -> int:
        epoch = self.current
        self._active[epoch] = self._active.get(epoch, 0) + 1
        return epoch

    def end(self, epoch: int) -> None:
        left = self._active[epoch] - 1
        if left:
            self._active[epoch] = left
        else:
            del self._active[epoch]

    def oldest_active(self) -> int | None:
        return min(self._active) if self._active else None

    def bump(self) -> int:
        """Close the current epoch; return it (reads from it may still see freed memory)."""
        epoch = self.current
        self.current += 1
        return epoch


class Log:
    """Appends entries at the head, rolls it over, and keeps per-segment accounting."""

    def __init__(
        self,
        config: StorageConfig,
        sink: ReplicaSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        safe_version: Callable[[], int] = lambda: 1,
    ) -> None:
        self.config = config
        self.seglet_size = config.seglet_size
        self.segment_size = config.segment_size
        self.seglets_per_segment = config.seglets_per_segment
        total = config.total_seglets
        spp = self.seglets_per_segment
        self.allocator = SegletAllocator(
            total,
            self.seglet_size,
            EMERGENCY_HEAD_SEGMENTS * spp,
            config.cleaner_segments * spp,
            prefault=config.prefault_memory,
        )
        self._arena = self.allocator.view
        self._replicating = False
        self.sink = sink if sink is not None else NullReplicaSink()
        self.clock = clock
        self.safe_version = safe_version
        self.epochs = EpochTracker()
        # Segment by slot (a reference's upper bits); None for a free slot. Read-only outside.
        self.slots: list[Segment | None] = []
        self._free_slots: list[int] = []
        # Every segment whose data is reachable: in the log (head, closed, emergency head) or a
        # survivor that joins it at the next digest. Keyed by segment id.
        self.segments: dict[int, Segment] = {}
        # Bumped whenever a segment id joins or leaves ``segments`` (the cleaner caches the
        # sorted ids, which decide tombstone liveness, until it changes).
        self.segment_set_changes = 0
        self._survivor_count = 0
        self._next_id = 1
        self._pending: list[tuple[int, Segment]] = []
        # Seglets of cleaning sources emptied before their pass commits: (epoch, seglets).
        self._pending_seglets: list[tuple[int, list[int]]] = []
        # target segment id -> {holder segment id -> cell (live tombstone bytes, count)}
        self._tombs: dict[int, dict[int, int]] = {}
        # target segment id -> the sum of its ``_tombs`` cells' bytes (what the cleaner ranks
        # by: summing the cells per segment made each ranking O(live tombstones))
        self._retirable: dict[int, int] = {}
        self.live_object_bytes = 0
        self.object_count = 0
        self.live_tombstone_bytes = 0
        self.tombstone_count = 0
        self.max_entry_seen = 0
        self.emergency_heads_used = 0
        self.metadata_bytes = config.metadata_bytes
        self.max_append_bytes = config.max_append_bytes
        full = total / self.seglets_per_segment
        self._disk_percent_per_segment = 100.0 / (full * config.disk_expansion_factor)
        self.head: Segment = self._open_head(Pool.DEFAULT, SegmentState.HEAD)
        self._write_head_metadata(self.head, None)

    @property
    def sink(self) -> ReplicaSink:
        return self._sink

    @sink.setter
    def sink(self, sink: ReplicaSink) -> None:
        self._sink = sink
        # Without backups the append paths skip building the views the sink would ignore.
        self._replicating = not isinstance(sink, NullReplicaSink)

    # -- references ----------------------------------------------------------------------

    def segment_at(self, ref: int) -> Segment:
        seg = self.slots[ref >> OFFSET_BITS]
        if seg is None:
            raise KeyError(f"reference {ref:#x} names a freed slot")
        return seg

    def entry_at(self, ref: int) -> tuple[int, memoryview, int, int, int]:
        """``(type, buffer, content_start, content_len, total)`` of the entry ``ref`` names."""
        seg = self.slots[ref >> OFFSET_BITS]
        assert seg is not None
        return seg.entry_at(ref & OFFSET_MASK)

    @staticmethod
    def ref(segment: Segment, offset: int) -> int:
        return segment.slot << OFFSET_BITS | offset

    # -- segments ------------------------------------------------------------------------

    def _new_segment(
        self, seglets: list[int], state: SegmentState, segment_id: int | None = None
    ) -> Segment:
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            slot = len(self.slots)
            if slot >= MAX_SLOTS:
                raise RuntimeError("out of segment slots")
            self.slots.append(None)
        if segment_id is None:
            segment_id = self._next_id
            self._next_id += 1
        seg = Segment(
            segment_id,
            slot,
            seglets,
            self.allocator.view,
            self.seglet_size,
            self.segment_size,
            self.clock(),
            state,
        )
        self.slots[slot] = seg
        seg.append([build_segment_header(self.config.log_id, segment_id, self.segment_size)])
        return seg

    def digest_ids(self, exclude: Segment | None = None) -> list[int]:
        """Ids of the segments in the log (what a new head's digest lists)."""
        return sorted(
            s.id
            for s in self.segments.values()
            if s.state is not SegmentState.SURVIVOR and s is not exclude
        )

    def _open_head(self, pool: Pool, state: SegmentState) -> Segment:
        """A new head: from DEFAULT, seglets for its metadata and one more; an emergency head
        gets a full segment's seglets.

        A head grows a seglet at a time as it fills (:meth:`_grow_head`), so the log does not
        need a whole free segment to roll over, and the balancer's memory use does not count
        an empty head as full: taking a whole segment up front hid up to a segment of free
        memory from it, memory that would otherwise hold dead bytes for the cleaner.
        """
        if pool is Pool.DEFAULT:
            # The digest names at most every segment there is, this head included.
            meta = (
                SEGMENT_HEADER_ENTRY_SIZE
                + log_digest_size(len(self.segments) + 1)
                + SAFE_VERSION_ENTRY_SIZE
            )
            want = min(self.seglets_per_segment, -(-meta // self.seglet_size) + 1)
            seglets = self.allocator.alloc(pool, want)
        else:
            seglets = self.allocator.alloc(pool, self.seglets_per_segment)
        if seglets is None:
            raise LogFull("no seglets for a head segment")
        seg = self._new_segment(seglets, state)
        self.segments[seg.id] = seg
        self.segment_set_changes += 1
        return seg

    def roll_over(self, *, emergency_ok: bool = False) -> bool:
        """Start a new head (header, digest, safe version) and close the old one.

        With ``emergency_ok`` (the cleaner committing a pass) an emergency head is used when the
        DEFAULT pool is empty; it holds only the digest and is freed at the next roll-over.
        Returns False if no head could be allocated.
        """
        self.reclaim()
        old = self.head
        try:
            new = self._open_head(Pool.DEFAULT, SegmentState.HEAD)
        except LogFull:
            if not emergency_ok:
                return False
            try:
                new = self._open_head(Pool.EMERGENCY_HEAD, SegmentState.EMERGENCY_HEAD)
            except LogFull:
                return False
            self.emergency_heads_used += 1
        self._write_head_metadata(new, old if old.state is SegmentState.EMERGENCY_HEAD else None)
        if old.state is SegmentState.EMERGENCY_HEAD:
            del self.segments[old.id]
            self.segment_set_changes += 1
            self.sink.free(old.id)
            self.release(old)
        else:
            old.state = SegmentState.CLOSED
            old.seal_index()
            self.sink.close(old.id)
            self.allocator.free(old.trim())
        if new.state is SegmentState.EMERGENCY_HEAD:
            self.sink.close(new.id)
        self.head = new
        return True

    def _write_head_metadata(self, head: Segment, exclude: Segment | None) -> None:
        digest = build_log_digest(self.digest_ids(exclude))
        head.append([digest, build_safe_version(self.safe_version())])
        self.sink.open(head.id, head.read(0, head.length))

    def release(self, seg: Segment) -> None:
        """Retire a segment's memory once no read that might still see it is in flight."""
        seg.state = SegmentState.FREED
        self._pending.append((self.epochs.bump(), seg))

    def hollow(self, seg: Segment) -> int:
        """Give up the memory of a cleaning source whose live entries have all moved.

        The segment stays in the log (and in digests) until its pass commits; only its seglets
        go, once no read that might still see them is in flight. Freeing each source as soon
        as it is emptied lets the next source's survivors use its seglets, so a pass needs
        room for about one source's survivors, not all of them. Returns the seglets given up.
        """
        seglets = seg.give_up_seglets()
        if seglets:
            self._pending_seglets.append((self.epochs.bump(), seglets))
        return len(seglets)

    def reclaim(self) -> int:
        """Reuse the seglets of retired segments no read can reach; return how many."""
        if not self._pending and not self._pending_seglets:
            return 0
        oldest = self.epochs.oldest_active()
        keep: list[tuple[int, Segment]] = []
        freed = 0
        if self._pending_seglets:
            waiting: list[tuple[int, list[int]]] = []
            for epoch, seglets in self._pending_seglets:
                if oldest is not None and oldest <= epoch:
                    waiting.append((epoch, seglets))
                    continue
                freed += len(seglets)
                self.allocator.free(seglets)
            self._pending_seglets = waiting
        for epoch, seg in self._pending:
            if oldest is not None and oldest <= epoch:
                keep.append((epoch, seg))
                continue
            seglets = seg.give_up_seglets()
            freed += len(seglets)
            self.allocator.free(seglets)
            self.slots[seg.slot] = None
            self._free_slots.append(seg.slot)
        self._pending = keep
        return freed

    @property
    def pending_free_segments(self) -> int:
        """Retired segments (and emptied sources) whose memory waits for readers to finish."""
        return len(self._pending) + len(self._pending_seglets)

    # -- reads ---------------------------------------------------------------------------

    def begin_read(self) -> int:
        return self.epochs.begin()

    def end_read(self, epoch: int) -> None:
        self.epochs.end(epoch)

    @contextlib.contextmanager
    def reading(self) -> Iterator[int]:
        """Keep every memoryview handed out inside the block valid until it exits."""
        epoch = self.epochs.begin()
        try:
            yield epoch
        finally:
            self.epochs.end(epoch)

    # -- appends and accounting ----------------------------------------------------------

    def append(self, entries: Sequence[AppendEntry]) -> list[int]:
        """Append entries atomically (all in the same head segment); return their references.

        Raises :class:`LogFull` when the head is full and no new head can be allocated.
        """
        total = 0
        for e in entries:
            total += e[2]
        head = self.head
        if head.state is not SegmentState.HEAD or head.room() < total:
            if total > self.max_append_bytes:
                raise ValueError("entries larger than a segment can hold")
            if not self._grow_head(total):
                if not self.roll_over():
                    raise LogFull("log memory exhausted")
                if not self._grow_head(total):
                    raise LogFull("log memory exhausted")
            head = self.head
        start = head.length
        base = head.slot << OFFSET_BITS
        refs: list[int] = []
        for entry_type, parts, size, target in entries:
            offset = head.append(parts)
            refs.append(base | offset)
            if size > self.max_entry_seen:
                self.max_entry_seen = size
            if entry_type == EntryType.OBJ:
                if target >= 0:
                    head.index_entry(offset, 0, target)
                else:
                    head.index_entry(offset, IDX_NO_HASH, 0)
                head.live_bytes += size
                self.live_object_bytes += size
                self.object_count += 1
            elif entry_type == EntryType.OBJTOMB:
                head.index_entry(offset, IDX_TOMB, target)
                self._count_tombstone(head, target, size)
            else:
                head.index_entry(offset, IDX_OTHER, 0)
        if self._replicating:
            self._sink.append(head.id, start, head.read(start, head.length - start))
        return refs

    def _grow_head(self, total: int) -> bool:
        """Make room for ``total`` bytes in the head with DEFAULT seglets, if its capacity
        allows and they are free; False otherwise (the caller rolls over)."""
        head = self.head
        if head.state is not SegmentState.HEAD or head.capacity - head.length < total:
            return False
        short = total - head.room()
        if short <= 0:
            return True
        seglets = self.allocator.alloc(Pool.DEFAULT, -(-short // self.seglet_size))
        if seglets is None:
            return False
        head.grow(seglets)
        return True

    def _count_tombstone(self, head: Segment, target: int, size: int) -> None:
        if target not in self.segments:
            return  # its object's segment is gone already: dead on arrival
        head.live_bytes += size
        head.tombstone_bytes += size
        self.live_tombstone_bytes += size
        self.tombstone_count += 1
        retirable = self._retirable
        retirable[target] = retirable.get(target, 0) + size
        cell = size << TOMB_CELL_SHIFT | 1
        holders = self._tombs.get(target)
        if holders is None:
            self._tombs[target] = {head.id: cell}
        else:
            holder = head.id
            holders[holder] = holders.get(holder, 0) + cell

    def append_object(
        self,
        table_id: int,
        key: Buffer,
        value: Buffer,
        version: int,
        timestamp: int,
        size: int,
        dead_ref: int = 0,
        dead_version: int = 0,
        dead_size: int = 0,
        tombstone_size: int = 0,
        key_hash: int = -1,
    ) -> int:
        """Append one object (``size`` = its :func:`object_entry_size`); return its reference.

        For an overwrite, ``dead_ref`` names the version it replaces (``dead_version``,
        ``dead_size`` bytes): its tombstone (``tombstone_size`` bytes) goes first, in the same
        head segment, and the old entry is accounted dead (as :meth:`free_object` would).
        This is :meth:`append` for the request paths: when the entries fit in the head's current
        seglet they are encoded in place. ``key_hash`` goes into the segment's entry index for
        the cleaner (-1: unknown). Raises :class:`LogFull` like :meth:`append`.
        """
        dead = self.slots[dead_ref >> OFFSET_BITS] if dead_ref else None
        total = size + tombstone_size
        head = self.head
        start = head.length
        pos = head.claim(total) if head.state is SegmentState.HEAD else -1
        if pos >= 0:
            arena = self._arena
            try:
                if dead is None:
                    write_object_into(arena, pos, table_id, key, value, version, timestamp)
                else:
                    write_object_into(
                        arena, pos, table_id, key, value, version, timestamp, dead.id, dead_version
                    )
            except BaseException:
                head.length = start  # bad arguments (say, a key that is no buffer): append nothing
                raise
            idx = head.idx
            if dead is not None:
                dead_id = dead.id
                idx.append(start << IDX_OFFSET_SHIFT | dead_id << IDX_SHIFT | IDX_TOMB)
                # _count_tombstone inlined (every overwrite comes here). The dead object was
                # live, so its segment is in the log and the tombstone starts out live.
                head.live_bytes += tombstone_size
                head.tombstone_bytes += tombstone_size
                self.live_tombstone_bytes += tombstone_size
                self.tombstone_count += 1
                retirable = self._retirable
                retirable[dead_id] = retirable.get(dead_id, 0) + tombstone_size
                cell = tombstone_size << TOMB_CELL_SHIFT | 1
                holders = self._tombs.get(dead_id)
                if holders is None:
                    self._tombs[dead_id] = {head.id: cell}
                else:
                    holder = head.id
                    holders[holder] = holders.get(holder, 0) + cell
            if key_hash >= 0:
                idx.append(
                    (start + tombstone_size) << IDX_OFFSET_SHIFT
                    | (key_hash & IDX_AUX_MASK) << IDX_SHIFT
                )
            else:
                idx.append((start + tombstone_size) << IDX_OFFSET_SHIFT | IDX_NO_HASH)
            if size > self.max_entry_seen:
                self.max_entry_seen = size
            if tombstone_size > self.max_entry_seen:
                self.max_entry_seen = tombstone_size
            head.live_bytes += size
            self.live_object_bytes += size
            self.object_count += 1
            if self._replicating:
                self._sink.append(head.id, start, arena[pos : pos + total])
            ref = head.slot << OFFSET_BITS | (start + tombstone_size)
        else:
            entries: list[AppendEntry] = []
            if dead is not None:
                tparts, _ = build_tombstone(table_id, key, dead.id, dead_version, timestamp)
                entries.append((EntryType.OBJTOMB, tparts, tombstone_size, dead.id))
            parts, _ = build_object(table_id, key, value, version, timestamp)
            entries.append((EntryType.OBJ, parts, size, key_hash))
            ref = self.append(entries)[-1]
        if dead is not None:
            dead.live_bytes -= dead_size
            self.live_object_bytes -= dead_size
            self.object_count -= 1
        return ref

    def append_tombstone(
        self,
        table_id: int,
        key: Buffer,
        timestamp: int,
        size: int,
        dead_ref: int,
        dead_version: int,
        dead_size: int,
    ) -> int:
        """Append the tombstone (``size`` bytes) of a removed object and account it dead.

        ``dead_ref`` names the removed version (``dead_version``, ``dead_size`` bytes).
        Returns the tombstone's reference; see :meth:`append_object`.
        """
        dead = self.slots[dead_ref >> OFFSET_BITS]
        assert dead is not None
        head = self.head
        start = head.length
        pos = head.claim(size) if head.state is SegmentState.HEAD else -1
        if pos >= 0:
            arena = self._arena
            try:
                write_tombstone_into(arena, pos, table_id, key, dead.id, dead_version, timestamp)
            except BaseException:
                head.length = start
                raise
            if size > self.max_entry_seen:
                self.max_entry_seen = size
            head.index_entry(start, IDX_TOMB, dead.id)
            self._count_tombstone(head, dead.id, size)
            if self._replicating:
                self._sink.append(head.id, start, arena[pos : pos + size])
            ref = head.slot << OFFSET_BITS | start
        else:
            parts, _ = build_tombstone(table_id, key, dead.id, dead_version, timestamp)
            ref = self.append([(EntryType.OBJTOMB, parts, size, dead.id)])[0]
        dead.live_bytes -= dead_size
        self.live_object_bytes -= dead_size
        self.object_count -= 1
        return ref

    def free_object(self, ref: int, size: int) -> None:
        """The object entry at ``ref`` (``size`` bytes) is dead: it was overwritten or removed."""
        seg = self.slots[ref >> OFFSET_BITS]
        assert seg is not None
        seg.live_bytes -= size
        self.live_object_bytes -= size
        self.object_count -= 1

    def tombstone_live(self, target_id: int) -> bool:
        """A tombstone is needed while the segment of the object it kills is still around."""
        return target_id in self.segments

    def tombstone_holders(self, target_id: int) -> dict[int, int]:
        """Live tombstones of objects in ``target_id``: holder id -> a cell, ``bytes <<
        TOMB_CELL_SHIFT | count``.

        Read-only for callers: the cleaner weighs what retiring them would free.
        """
        return self._tombs.get(target_id, _NO_HOLDERS)

    def retirable_bytes(self, target_id: int) -> int:
        """Bytes of the live tombstones of objects in ``target_id``, wherever they are: what
        leaves the log with that segment (the sum over :meth:`tombstone_holders`)."""
        return self._retirable.get(target_id, 0)

    def move_tombstones(
        self, target_id: int, from_id: int, to_id: int, size: int, count: int = 1
    ) -> None:
        """``count`` live tombstones (``size`` bytes) of objects in ``target_id`` moved."""
        if from_id == to_id:
            return
        holders = self._tombs[target_id]
        moved = size << TOMB_CELL_SHIFT | count
        left = holders[from_id] - moved
        if left & TOMB_COUNT_MASK == 0:
            del holders[from_id]
        else:
            holders[from_id] = left
        holders[to_id] = holders.get(to_id, 0) + moved

    def _retire_tombstones_for(self, target_id: int) -> None:
        self._retirable.pop(target_id, None)
        for holder_id, cell in self._tombs.pop(target_id, {}).items():
            size = cell >> TOMB_CELL_SHIFT
            self.live_tombstone_bytes -= size
            self.tombstone_count -= cell & TOMB_COUNT_MASK
            holder = self.segments.get(holder_id)
            if holder is not None:
                holder.live_bytes -= size
                holder.tombstone_bytes -= size

    # -- cleaner support -----------------------------------------------------------------

    def take_seglets(self, count: int) -> list[int]:
        """Up to ``count`` seglets for the cleaner: its reserve first, then DEFAULT."""
        out: list[int] = []
        for pool in (Pool.CLEANER, Pool.DEFAULT):
            n = min(count - len(out), self.allocator.free_count(pool))
            if n > 0:
                got = self.allocator.alloc(pool, n)
                assert got is not None
                out.extend(got)
        return out

    def new_side_segment(
        self, seglets: list[int], state: SegmentState, segment_id: int | None = None
    ) -> Segment:
        """A survivor (new id, joins the log at the next digest) or a compaction target."""
        seg = self._new_segment(seglets, state, segment_id)
        if state is SegmentState.SURVIVOR:
            self.segments[seg.id] = seg
            self.segment_set_changes += 1
            self._survivor_count += 1
            self.sink.open(seg.id, seg.read(0, seg.length))
        return seg

    def finish_compaction(self, old: Segment, new: Segment) -> int:
        """Swap the compacted copy in; return the seglets given back."""
        spare = new.trim()
        self.allocator.free(spare)
        new.state = SegmentState.CLOSED
        new.seal_index()
        new.created = old.created
        self.segments[new.id] = new
        before = len(old.seglets)
        self.release(old)
        return before - len(new.seglets)

    def commit_cleaning(self, survivors: Sequence[Segment], cleaned: Sequence[Segment]) -> None:
        """Survivors join the log, the cleaned segments leave it, a new digest records both."""
        for s in survivors:
            s.state = SegmentState.CLOSED
            s.seal_index()
        self._survivor_count -= len(survivors)
        for c in cleaned:
            del self.segments[c.id]
        self.segment_set_changes += 1
        for c in cleaned:
            self._retire_tombstones_for(c.id)
        if not self.roll_over(emergency_ok=True):
            raise RuntimeError(
                "no head segment for the cleaner's digest, not even an emergency one"
            )
        for c in cleaned:
            self.sink.free(c.id)
            self.release(c)

    def cleanable_segments(self) -> list[Segment]:
        return [s for s in self.segments.values() if s.state is SegmentState.CLOSED]

    # -- utilisation ---------------------------------------------------------------------

    @property
    def default_pool_bytes(self) -> int:
        return self.allocator.capacity(Pool.DEFAULT) * self.seglet_size

    def memory_utilization(self) -> float:
        """Percent of the DEFAULT pool allocated to segments (the balancer's T)."""
        cap = self.allocator.capacity(Pool.DEFAULT)
        return 100.0 * (cap - self.allocator.free_count(Pool.DEFAULT)) / cap

    def disk_utilization(self) -> float:
        """Percent of the on-backup log budget (full-size segments x expansion factor) in use."""
        return (len(self.segments) - self._survivor_count) * self._disk_percent_per_segment

    @property
    def segments_in_log(self) -> int:
        """Segments the newest digest names (or will): all but survivors not yet committed."""
        return len(self.segments) - self._survivor_count
