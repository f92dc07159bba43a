"""Seglet pools and segments: reserve refilling, entries spanning seglets, trimming."""

from __future__ import annotations

import pytest

from services.kvstore.log import EntryType, Pool, SegletAllocator, Segment, SegmentState
from services.kvstore.log._entries import build_object
from services.kvstore.log._segments import PAGE_SIZE, anonymous_zeros


def _allocator() -> SegletAllocator:
    return SegletAllocator(total_seglets=20, seglet_size=64, emergency_seglets=4, cleaner_seglets=6)


def test_pools_start_full_and_alloc_is_all_or_nothing() -> None:
    a = _allocator()
    assert (
        a.free_count(Pool.DEFAULT),
        a.free_count(Pool.CLEANER),
        a.free_count(Pool.EMERGENCY_HEAD),
    ) == (10, 6, 4)
    assert a.alloc(Pool.EMERGENCY_HEAD, 5) is None
    assert a.free_count(Pool.EMERGENCY_HEAD) == 4
    got = a.alloc(Pool.DEFAULT, 3)
    assert got is not None and len(set(got)) == 3
    assert a.free_count(Pool.DEFAULT) == 7


def test_freed_seglets_refill_emergency_then_cleaner_then_default() -> None:
    a = _allocator()
    emergency = a.alloc(Pool.EMERGENCY_HEAD, 2)
    cleaner = a.alloc(Pool.CLEANER, 3)
    default = a.alloc(Pool.DEFAULT, 10)
    assert emergency is not None and cleaner is not None and default is not None
    a.free(default[:4])
    assert a.free_count(Pool.EMERGENCY_HEAD) == 4
    assert a.free_count(Pool.CLEANER) == 5
    assert a.free_count(Pool.DEFAULT) == 0
    a.free(default[4:] + emergency + cleaner)
    assert a.free_count(Pool.CLEANER) == 6
    assert a.free_count(Pool.DEFAULT) == 10
    assert a.total_free() == 20


def _segment(a: SegletAllocator, count: int) -> Segment:
    seglets = a.alloc(Pool.DEFAULT, count)
    assert seglets is not None
    return Segment(1, 0, seglets, a.view, a.seglet_size, 64 * 8, 0.0, SegmentState.HEAD)


def test_entry_spanning_seglets_reads_back_as_a_copy() -> None:
    a = _allocator()
    # Make the segment's seglets non-adjacent so a straddling entry really is discontiguous.
    spacer = a.alloc(Pool.DEFAULT, 1)
    seg = _segment(a, 3)
    assert spacer is not None
    parts, size = build_object(1, b"key", bytes(range(100)), 5, 0)
    seg.append([b"x" * 40])
    offset = seg.append(parts)
    assert offset == 40 and seg.length == 40 + size
    entry_type, buf, pos, length, total = seg.entry_at(offset)
    assert entry_type == EntryType.OBJ and total == size
    content = bytes(buf[pos : pos + length])
    assert content.endswith(bytes(range(100)))
    assert id(buf.obj) != id(a.arena)
    assert not isinstance(seg.read(offset, size), memoryview)
    assert bytes(seg.read(offset, size)) == b"".join(bytes(p) for p in parts)


def test_entry_inside_one_seglet_is_zero_copy() -> None:
    a = _allocator()
    seg = _segment(a, 2)
    parts, _size = build_object(1, b"k", b"v" * 10, 1, 0)
    offset = seg.append(parts)
    _t, buf, pos, length, _total = seg.entry_at(offset)
    assert id(buf.obj) == id(a.arena)  # a view of the arena itself, no copy
    assert bytes(buf[pos + length - 10 : pos + length]) == b"v" * 10


def test_trim_keeps_only_seglets_with_bytes() -> None:
    a = _allocator()
    seg = _segment(a, 4)
    seg.append([b"y" * 70])
    spare = seg.trim()
    assert len(spare) == 2 and len(seg.seglets) == 2
    assert seg.room() == 128 - 70


def test_entries_walks_every_entry() -> None:
    a = _allocator()
    seg = _segment(a, 4)
    sizes = []
    for i in range(5):
        parts, size = build_object(1, b"k%d" % i, b"v" * (i * 7), i, 0)
        seg.append(parts)
        sizes.append(size)
    assert [t for _o, t, _s in seg.entries()] == [EntryType.OBJ] * 5
    assert [s for _o, _t, s in seg.entries()] == sizes


def test_claim_takes_bytes_only_inside_one_seglet_and_the_limit() -> None:
    a = _allocator()
    seg = _segment(a, 2)  # 128 bytes held, capacity 512
    first = seg.claim(60)
    assert first == seg.seglets[0] * 64 and seg.length == 60
    assert seg.claim(10) == -1 and seg.length == 60  # would straddle two seglets
    seg.append([b"z" * 4])
    assert seg.claim(64) == seg.seglets[1] * 64 and seg.length == 128
    assert seg.claim(1) == -1  # past the seglets held
    assert seg.room() == 0


def test_anonymous_arrays_start_zeroed_and_writable() -> None:
    for prefault in (False, True):
        arr = anonymous_zeros(3 * PAGE_SIZE + 5, prefault=prefault)
        assert len(arr) == 3 * PAGE_SIZE + 5 and not arr.any()
        arr[-1] = 7
        assert arr[-1] == 7


@pytest.mark.parametrize(("attempts", "longest"), [(12, 90), (30, 300), (400, 6)])
def test_copy_runs_matches_a_byte_by_byte_copy(attempts: int, longest: int) -> None:
    """Runs between scattered segments, cut at every seglet boundary on either side: a few
    long ones (cut in Python) or many short ones (cut with numpy)."""
    import random

    import numpy as np

    from services.kvstore.log._segments import FEW_RUNS, copy_runs

    rng = random.Random(4)
    size = 64
    a = SegletAllocator(total_seglets=64, seglet_size=size, emergency_seglets=2, cleaner_seglets=2)
    order = a.alloc(Pool.DEFAULT, 48)
    assert order is not None
    rng.shuffle(order)
    segs = [order[i : i + 8] for i in range(0, 48, 8)]  # six segments of 8 scattered seglets
    arena = a.view
    arena[:] = bytes(rng.randrange(256) for _ in range(len(arena)))
    expect = bytearray(arena)
    bases_lists = [[s * size for s in seg] for seg in segs]
    bases = np.array([b for bl in bases_lists for b in bl], dtype=np.int64)
    runs = []
    dst_cursor = {3: 5, 4: 0, 5: 100}
    for _ in range(attempts):
        src = rng.randrange(3)
        dst = rng.choice([3, 4, 5])
        n = rng.randrange(1, longest)
        if dst_cursor[dst] + n > 8 * size:
            continue
        so = rng.randrange(8 * size - n)
        runs.append((src, so, dst, dst_cursor[dst], n))
        dst_cursor[dst] += n

    def pos(seg: int, off: int) -> int:
        return bases_lists[seg][off // size] + off % size

    for src, so, dst, do, n in runs:
        for i in range(n):
            expect[pos(dst, do + i)] = expect[pos(src, so + i)]
    assert (len(runs) <= FEW_RUNS) is (attempts < FEW_RUNS)
    col = list(zip(*runs, strict=True))
    copy_runs(
        arena,
        size,
        bases,
        np.array(col[0]) * 8,
        np.array(col[1]),
        np.array(col[2]) * 8,
        np.array(col[3]),
        np.array(col[4]),
    )
    assert bytes(arena) == bytes(expect)
