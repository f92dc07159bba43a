"""Compaction's C inner loop (``_relocate.c``) against the cleaner's numpy path."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest

from services.kvstore import ObjectManager, Retry, StorageConfig
from services.kvstore.errors import InternalError
from services.kvstore.log import _cleaner

_relocate = pytest.importorskip(
    "services.kvstore.log._relocate", reason="C compaction not built (pure-Python install)"
)

TABLE = 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _store(clock: Clock, buckets_bytes: int = 4096) -> ObjectManager:
    config = StorageConfig(
        total_bytes=64 * 16 * 1024,
        segment_size=16 * 1024,
        seglet_size=1024,
        cleaner_reserve_segments=4,
        hash_table_bytes=buckets_bytes,  # small: chains spill into the overflow area
        cleaner_bytes_per_step=8 * 1024,
    )
    om = ObjectManager(config, clock=clock)
    om.add_tablet(TABLE)
    return om


@pytest.fixture
def numpy_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_cleaner, "_relocate", None)
    yield


def _state(om: ObjectManager) -> tuple[object, ...]:
    log = om.log
    segments = sorted(
        (s.id, s.length, s.live_bytes, s.tombstone_bytes, s.idx.tobytes(), s.read(0, s.length))
        for s in log.segments.values()
    )
    main, ovf = om.hash_table.areas()
    stats = om.cleaner.stats()
    return (
        segments,
        main.tobytes(),
        ovf.tobytes(),
        stats.bytes_relocated,
        stats.segments_compacted,
        stats.segments_cleaned,
    )


def _drive(om: ObjectManager, clock: Clock, seed: int, ops: int, model: dict[bytes, bytes]) -> None:
    """Overwrites, inserts and removes of a few hundred keys, with cleaner steps between;
    reads are checked against ``model``."""
    rng = random.Random(seed)
    for i in range(ops):
        clock.now += 0.01
        key = b"key-%d" % rng.randrange(300)
        try:
            if rng.random() < 0.15 and key in model:
                om.remove(TABLE, key)
                del model[key]
            else:
                value = bytes([i % 251]) * rng.choice((20, 200, 700, 1500))
                om.write(TABLE, key, value)
                model[key] = value
        except Retry:
            pass
        if i % 7 == 0 and om.cleaner.wants_to_run():
            om.cleaner.step(10.0, clock.now)
    for key, value in model.items():
        assert om.read(TABLE, key)[0] == value


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_compaction_leaves_exactly_what_the_numpy_path_leaves(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same workload, same clock, step budgets bound by work units only: the two paths must
    leave the same segments, bytes, index words, hash table and statistics."""
    states = []
    relocated = []
    for relocate in (_relocate, None):
        monkeypatch.setattr(_cleaner, "_relocate", relocate)
        clock = Clock()
        om = _store(clock)
        model: dict[bytes, bytes] = {}
        _drive(om, clock, seed, 6000, model)
        states.append(_state(om))
        relocated.append(om.cleaner.stats().segments_compacted)
    assert relocated[0] > 20  # compaction did run, many times
    assert om.hash_table.overflow_buckets > 0 or seed != 1  # chains were exercised
    assert states[0] == states[1]


def test_c_path_is_used_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    om = _store(clock)
    calls = []
    real = _relocate.compact_range

    class Spy:
        @staticmethod
        def compact_range(*args: object) -> tuple[int, ...]:
            calls.append(len(args))
            return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(_cleaner, "_relocate", Spy)
    _drive(om, clock, 5, 3000, {})
    assert calls


def _batch_args(room: int) -> tuple[list[object], bytearray, np.ndarray]:
    """One source segment (two seglets of 64 B) with two live objects of 40 B and a target
    with ``room`` bytes; hash table: one bucket pointing at both."""
    arena = bytearray(range(256))
    seglet = 64
    bases = np.array([0, 64, 128, 192], dtype=np.int64)  # source: 0, 64; target: 128, 192
    refs = np.array([(1 << 24) | 0, (1 << 24) | 40], dtype=np.uint64)
    main = np.zeros(8, dtype=np.uint64)
    main[0] = (np.uint64(0xAB) << np.uint64(48)) | refs[0]
    main[3] = refs[1]
    args: list[object] = [
        arena,
        seglet,
        bases,
        4,  # nbases
        np.array([0], dtype=np.int64),  # src_first
        np.array([2], dtype=np.int64),  # dst_first
        np.array([0], dtype=np.int64),  # dst_length
        np.array([room], dtype=np.int64),  # dst_limit
        np.array([2 << 24], dtype=np.uint64),  # dst_bits
        1,  # ntargets
        np.zeros(2, dtype=np.int64),  # src
        np.array([0, 40], dtype=np.int64),  # off
        np.array([40, 40], dtype=np.int64),  # size
        np.zeros(2, dtype=np.int64),  # flags
        np.zeros(2, dtype=np.uint64),  # aux
        refs,
        main,
        np.zeros(0, dtype=np.uint64),  # ovf
        np.zeros(0, dtype=np.uint64),  # present
        np.zeros(4, dtype=np.uint64),  # words
        np.full(3, 7, dtype=np.int64),  # acct (zeroed by the call)
        0,  # first
        2,  # limit
        1000,  # room
        4,  # max_batch
        2,  # cost_entry
    ]
    return args, arena, main


def test_compact_range_copies_across_seglets_and_repoints() -> None:
    args, arena, main = _batch_args(room=128)
    before = bytes(arena)
    # charge: (40 >> 3) + 2 per entry
    assert _relocate.compact_range(*args) == (2, 2, 80, 14, 0, 0)
    assert bytes(arena[128:168]) == before[0:40]
    assert bytes(arena[168:192]) + bytes(arena[192:208]) == before[40:80]  # cut at 192
    assert int(main[0]) == (0xAB << 48) | (2 << 24) | 0  # the tag kept
    assert int(main[3]) == (2 << 24) | 40
    assert args[6].tolist() == [80]  # type: ignore[attr-defined]
    assert args[20].tolist() == [80, 0, 2]  # type: ignore[attr-defined]
    assert (args[19][:2] >> np.uint64(40)).tolist() == [0, 40]  # type: ignore[index]


@pytest.mark.parametrize(("room", "end"), [(0, 1), (46, 1), (47 + 47, 2), (10**6, 2)])
def test_compact_range_cuts_the_batch_by_its_cost(room: int, end: int) -> None:
    """An entry costs size + size/8 + cost_entry (40 + 5 + 2 = 47); a batch takes at least
    one, and stops before the one that would pass the room."""
    args, _arena, main = _batch_args(room=128)
    args[23] = room
    result = _relocate.compact_range(*args)
    assert result[:3] == (end, end, 40 * end)
    assert int(main[3]) == ((2 << 24) | 40 if end == 2 else (1 << 24) | 40)


def test_compact_range_hands_entries_without_a_key_hash_to_the_numpy_path() -> None:
    args, arena, main = _batch_args(room=128)
    args[13] = np.array([0, 2], dtype=np.int64)  # the second entry has no key hash
    before = (bytes(arena), main.tobytes())
    assert _relocate.compact_range(*args) == (2, -1, 0, 14, 0, 0)
    assert (bytes(arena), main.tobytes()) == before


def test_compact_range_refuses_a_target_without_room_and_changes_nothing() -> None:
    args, arena, main = _batch_args(room=79)
    before = (bytes(arena), main.tobytes(), args[20].tobytes())  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="lacks room"):
        _relocate.compact_range(*args)
    assert (bytes(arena), main.tobytes(), args[20].tobytes()) == before  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("index", "bad"),
    [
        (2, np.array([0, 64, 128, 250], dtype=np.int64)),  # a seglet past the arena
        (3, 5),  # more seglets than bases holds
        (9, 2),  # more targets than the per-target arrays hold
        (10, np.array([0, 1], dtype=np.int64)),  # an entry of a source without a target
        (12, np.array([40], dtype=np.int64)),  # arrays of different lengths
        (16, np.zeros(24, dtype=np.uint64)),  # three buckets: not a power of two
        (19, np.zeros(3, dtype=np.uint64)),  # words shorter than max_batch
        (22, 3),  # limit past the entries
        (21, 2),  # first not below limit
    ],
)
def test_compact_range_rejects_inconsistent_arguments(index: int, bad: object) -> None:
    args, arena, main = _batch_args(room=128)
    args[index] = bad
    before = (bytes(arena), main.tobytes())
    with pytest.raises(ValueError):
        _relocate.compact_range(*args)
    assert (bytes(arena), main.tobytes()) == before


def test_the_cleaner_turns_a_refusal_into_an_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    om = _store(clock)

    class Refusing:
        @staticmethod
        def compact_range(*args: object) -> tuple[int, ...]:
            raise ValueError("target of source 0 lacks room")

    monkeypatch.setattr(_cleaner, "_relocate", Refusing)
    with pytest.raises(InternalError, match="compaction batch refused"):
        _drive(om, clock, 7, 6000, {})
