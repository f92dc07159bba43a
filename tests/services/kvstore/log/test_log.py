"""The log: head roll-over with digests, references, replica sink calls, epochs, accounting."""

from __future__ import annotations

import sys
from array import array

import pytest

from services.kvstore.log import (
    EntryType,
    Log,
    LogDigestEntry,
    LogFull,
    ObjectEntry,
    Pool,
    SafeVersionEntry,
    Segment,
    SegmentHeaderEntry,
    SegmentState,
    StorageConfig,
    iter_entries_untrusted,
    object_entry_size,
    tombstone_entry_size,
)
from services.kvstore.log._entries import Buffer, build_object, build_tombstone
from services.kvstore.log._log import AppendEntry
from services.kvstore.log._segments import (
    IDX_AUX_MASK,
    IDX_NO_HASH,
    IDX_OFFSET_SHIFT,
    IDX_SHIFT,
    IDX_TOMB,
)

SMALL = StorageConfig(
    total_bytes=64 * 4096, segment_size=8 * 4096, seglet_size=4096, cleaner_reserve_segments=1
)


class RecordingSink:
    """Keeps every replica's bytes and the order of calls, and checks the protocol rules."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.replicas: dict[int, bytearray] = {}
        self.closed: set[int] = set()
        self.freed: set[int] = set()

    def open(self, segment_id: int, data: Buffer) -> None:
        assert segment_id not in self.replicas
        self.replicas[segment_id] = bytearray(data)
        self.events.append(("open", segment_id))

    def append(self, segment_id: int, offset: int, data: Buffer) -> None:
        replica = self.replicas[segment_id]
        assert segment_id not in self.closed
        assert offset == len(replica)
        replica += bytes(data)
        self.events.append(("append", segment_id))

    def close(self, segment_id: int) -> None:
        assert segment_id in self.replicas and segment_id not in self.closed
        self.closed.add(segment_id)
        self.events.append(("close", segment_id))

    def free(self, segment_id: int) -> None:
        assert segment_id in self.replicas and segment_id not in self.freed
        self.freed.add(segment_id)
        self.events.append(("free", segment_id))


def _obj(key: bytes, value: bytes, version: int = 1) -> AppendEntry:
    parts, size = build_object(1, key, value, version, 0)
    return (EntryType.OBJ, parts, size, -1)


def test_new_head_starts_with_header_digest_and_safe_version() -> None:
    sink = RecordingSink()
    log = Log(SMALL, sink, clock=lambda: 5.0, safe_version=lambda: 17)
    head = log.head
    entries = [e for _, e in iter_entries_untrusted(sink.replicas[head.id])]
    assert entries == [
        SegmentHeaderEntry(log_id=0, segment_id=head.id, capacity=SMALL.segment_size),
        LogDigestEntry(segment_ids=(head.id,)),
        SafeVersionEntry(safe_version=17),
    ]
    assert head.state is SegmentState.HEAD


def test_append_returns_refs_that_read_back_and_replicas_match_memory() -> None:
    sink = RecordingSink()
    log = Log(SMALL, sink)
    refs = log.append([_obj(b"a", b"1" * 10), _obj(b"b", b"2" * 20)])
    for ref, key in zip(refs, (b"a", b"b"), strict=True):
        entry_type, buf, pos, _length, _total = log.entry_at(ref)
        assert entry_type == EntryType.OBJ
        assert bytes(buf[pos + 27 : pos + 28]) == key
    head = log.head
    assert bytes(sink.replicas[head.id]) == bytes(head.read(0, head.length))
    assert log.live_object_bytes == sum(
        e[2] for e in [_obj(b"a", b"1" * 10), _obj(b"b", b"2" * 20)]
    )
    assert log.object_count == 2


def test_roll_over_opens_new_head_before_closing_old_and_digest_lists_both() -> None:
    sink = RecordingSink()
    log = Log(SMALL, sink)
    first = log.head
    value = b"v" * 3000
    while log.head is first:
        log.append([_obj(b"k", value)])
    second = log.head
    assert sink.events.index(("open", second.id)) < sink.events.index(("close", first.id))
    assert first.state is SegmentState.CLOSED
    digest = [
        e
        for _, e in iter_entries_untrusted(sink.replicas[second.id])
        if isinstance(e, LogDigestEntry)
    ]
    assert digest == [LogDigestEntry(segment_ids=(first.id, second.id))]
    # The closed head's unused seglets were given back.
    assert len(first.seglets) == -(-first.length // SMALL.seglet_size)
    # Every object in the replica of the first segment is intact.
    objects = [
        e for _, e in iter_entries_untrusted(sink.replicas[first.id]) if isinstance(e, ObjectEntry)
    ]
    assert objects and all(o.value == value for o in objects)


def test_log_full_when_no_seglets_are_left() -> None:
    log = Log(SMALL)
    with pytest.raises(LogFull):
        for _ in range(1000):
            log.append([_obj(b"k", b"x" * 4000)])
    # Reserves were not touched by ordinary appends.
    assert log.allocator.total_free() >= (2 + SMALL.cleaner_segments) * SMALL.seglets_per_segment


def test_append_larger_than_a_segment_is_refused() -> None:
    log = Log(SMALL)
    with pytest.raises(ValueError):
        log.append([_obj(b"k", b"x" * SMALL.segment_size)])


def test_released_memory_waits_for_reads_that_began_before() -> None:
    log = Log(SMALL)
    first = log.head
    while log.head is first:
        log.append([_obj(b"k", b"x" * 3000)])
    early = log.begin_read()
    del log.segments[first.id]
    log.release(first)
    late = log.begin_read()
    held = len(first.seglets)
    assert log.reclaim() == 0
    assert log.pending_free_segments == 1
    log.end_read(early)
    assert log.reclaim() == held > 0
    assert log.pending_free_segments == 0
    log.end_read(late)


def test_reading_context_manager_holds_an_epoch() -> None:
    log = Log(SMALL)
    first = log.head
    log.roll_over()
    with log.reading():
        del log.segments[first.id]
        log.release(first)
        assert log.reclaim() == 0
    assert log.reclaim() > 0


def test_tombstone_retires_when_its_target_segment_leaves_the_log() -> None:
    log = Log(SMALL)
    (ref,) = log.append([_obj(b"k", b"x" * 100)])
    target = log.segment_at(ref)
    log.roll_over()
    parts, size = build_tombstone(1, b"k", target.id, 1, 0)
    log.append([(EntryType.OBJTOMB, parts, size, target.id)])
    holder = log.head
    assert log.live_tombstone_bytes == size and log.tombstone_count == 1
    assert holder.live_bytes == size
    assert log.tombstone_live(target.id)
    _, _, _, _, obj_size = log.entry_at(ref)
    log.free_object(ref, obj_size)
    log.commit_cleaning([], [target])
    assert not log.tombstone_live(target.id)
    assert log.live_tombstone_bytes == 0 and log.tombstone_count == 0
    assert holder.live_bytes == 0


def test_tombstone_for_a_segment_already_gone_is_dead_on_arrival() -> None:
    log = Log(SMALL)
    parts, size = build_tombstone(1, b"k", 999, 1, 0)
    log.append([(EntryType.OBJTOMB, parts, size, 999)])
    assert log.live_tombstone_bytes == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"segment_size": 5000, "seglet_size": 4096},
        {"segment_size": 32 << 20, "seglet_size": 64 << 10, "total_bytes": 1 << 30},
        {"total_bytes": 4 * 8 * 4096, "segment_size": 8 * 4096, "seglet_size": 4096},
        {"write_limit": 0.0},
        {"disk_expansion_factor": 0.5},
        {"seglet_size": 0},
        {"cleaner_reserve_segments": 0},
        {"cleaner_reserve_segments": -1},
        # 64k seglets of 4 KiB: their log digest (8 bytes each) would not fit in a segment
        {"total_bytes": 256 << 20, "segment_size": 64 << 10, "seglet_size": 4 << 10},
    ],
)
def test_bad_configs_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StorageConfig(**kwargs)  # type: ignore[arg-type]


def test_default_config_matches_ramcloud() -> None:
    c = StorageConfig()
    assert (c.segment_size, c.seglet_size, c.seglets_per_segment) == (8 << 20, 64 << 10, 128)
    assert c.cleaner_segments == 8  # 64 full segments / 8, under RAMCloud's cap of 15
    assert StorageConfig(total_bytes=4 << 30).cleaner_segments == 15


def _index(seg: Segment) -> list[tuple[int, int, int]]:
    return [(w >> IDX_OFFSET_SHIFT, w & 7, w >> IDX_SHIFT & IDX_AUX_MASK) for w in seg.idx]


def test_every_appended_entry_is_indexed_in_order_with_its_aux() -> None:
    """The cleaner reads entries from the index only: it must list every entry after the
    metadata, back to back to the end, with the key hash or the tombstone's target."""
    log = Log(SMALL)
    one, two = object_entry_size(1, 50), object_entry_size(1, 60)
    h = 0xFEDC_BA98_7654_3210  # only its low bits are kept (enough to name a bucket)
    ref = log.append_object(1, b"k", b"v" * 50, 1, 0, one, key_hash=h)
    tomb = tombstone_entry_size(1)
    ref2 = log.append_object(1, b"k", b"w" * 60, 2, 0, two, ref, 1, one, tomb, key_hash=h)
    (ref3,) = log.append([_obj(b"z", b"q" * 3000)])  # the generic path, hash unknown
    head = log.head
    index = _index(head)
    offsets = [o for o, _f, _x in index]
    parsed = [o for o, _t, _n in head.entries(offsets[0])]
    assert offsets == parsed
    assert offsets[0] > 0 and (head.slot << 24 | offsets[0]) == ref
    assert index[1] == (offsets[1], IDX_TOMB, head.id)
    assert index[2] == (ref2 & 0xFFFFFF, 0, h & IDX_AUX_MASK)
    assert index[3] == (ref3 & 0xFFFFFF, IDX_NO_HASH, 0)


def test_a_closed_segments_index_is_sealed_at_its_exact_size() -> None:
    """A segment's index stops growing when it closes: it keeps no growth slack (8 bytes an
    entry, as the cleaner's memory budget assumes), and its words survive the copy."""
    log = Log(SMALL)
    size = object_entry_size(1, 40)
    first = log.head
    for i in range(2000):
        log.append_object(1, bytes([i % 251]), b"v" * 40, i + 1, 0, size, key_hash=i)
        if log.head is not first:
            break
    assert log.head is not first and first.state is SegmentState.CLOSED
    index = _index(first)
    assert [(f, x) for _o, f, x in index] == [(0, i) for i in range(len(index))]
    assert first.idx.buffer_info()[1] == len(index)
    assert sys.getsizeof(first.idx) - sys.getsizeof(array("Q")) == 8 * len(index)


def test_a_head_takes_seglets_as_it_fills() -> None:
    """A head starts with the seglets for its metadata and one more and grows a seglet at a
    time: an empty head does not count as used memory, a head can open with less than a
    segment free, and near full memory the seglets the cleaner frees a few at a time are
    used at once."""
    log = Log(SMALL)
    pool = log.allocator
    assert len(log.head.seglets) == 2  # header, digest and safe version fit in one
    log.roll_over()
    first = log.head.id
    assert len(log.head.seglets) == 2
    hog = pool.alloc(Pool.DEFAULT, pool.free_count(Pool.DEFAULT) - 3)  # held elsewhere
    assert hog is not None
    refs: list[int] = []
    for _ in range(20):  # bounded: the head takes the three free seglets, then memory is out
        try:
            refs += log.append([_obj(b"k", b"x" * 3000)])
        except LogFull:
            break
    head = log.head
    assert head.id == first and len(head.seglets) == 5 < log.seglets_per_segment
    assert pool.free_count(Pool.DEFAULT) == 0
    assert sum(r >> 24 == head.slot for r in refs) == 6  # entries span seglets: 5 hold 6
    pool.free(hog[:2])
    (ref,) = log.append([_obj(b"k", b"y" * 3000)])
    assert log.head is head and len(head.seglets) == 6  # grown, not rolled over
    assert ref >> 24 == head.slot and log.entry_at(ref)[3] > 3000
