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
        live_slots = staticmethod(_relocate.live_slots)
        entry_stamps = staticmethod(_relocate.entry_stamps)
        place_entries = staticmethod(_relocate.place_entries)
        decode_index = staticmethod(_relocate.decode_index)

        @staticmethod
        def compact_range(*args: object) -> tuple[int, ...]:
            calls.append(len(args))
            return real(*args)  # type: ignore[no-any-return]

    monkeypatch.setattr(_cleaner, "_relocate", Spy)
    _drive(om, clock, 5, 3000, {})
    assert calls


def test_combined_cleaning_probes_reads_timestamps_and_places_in_c(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scan's liveness probe and timestamps, each batch's second probe and its placement
    are C calls (the equivalence test above shows they do what the numpy path does)."""
    clock = Clock()
    om = _store(clock)
    calls: dict[str, int] = {"live_slots": 0, "entry_stamps": 0, "place_entries": 0}

    def counted(name: str) -> object:
        real = getattr(_relocate, name)

        def call(*args: object) -> object:
            calls[name] += 1
            return real(*args)

        return staticmethod(call)

    spy = type(
        "Spy",
        (),
        {
            "compact_range": staticmethod(_relocate.compact_range),
            "live_slots": counted("live_slots"),
            "entry_stamps": counted("entry_stamps"),
            "place_entries": counted("place_entries"),
            "decode_index": staticmethod(_relocate.decode_index),
        },
    )
    monkeypatch.setattr(_cleaner, "_relocate", spy)
    _drive(om, clock, 1, 6000, {})
    cleaned = om.cleaner.stats().segments_cleaned
    assert cleaned > 0
    assert calls["entry_stamps"] >= cleaned  # one a scanned chunk: a source at least
    assert calls["live_slots"] > calls["entry_stamps"]  # the scan's and every batch's probe
    assert calls["place_entries"] >= om.cleaner.stats().survivor_segments


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


def _probe_args() -> tuple[list[object], np.ndarray]:
    """Five index entries: a live object in the main bucket, one in the overflow bucket it
    chains to, a dead object, a tombstone of a present segment and one of a gone segment;
    and an IDX_OTHER entry."""
    buckets = 2
    main = np.zeros(8 * buckets, dtype=np.uint64)
    ovf = np.zeros(8, dtype=np.uint64)
    refs = np.array([(1 << 24) | 10, (1 << 24) | 50, (1 << 24) | 90, 0, 0, 0], dtype=np.uint64)
    main[8 + 2] = (np.uint64(0xCD) << np.uint64(48)) | refs[0]  # bucket 1, slot 2
    main[8 + 7] = np.uint64(1 << 47) | np.uint64(buckets)  # chain bit: next is overflow 0
    ovf[5] = refs[1]  # overflow bucket 0, slot 5: slot number 16 + 5
    flags = np.array([0, 0, 0, 1, 1, 4], dtype=np.int64)  # TOMB = 1, OTHER = 4
    aux = np.array([1, 3, 1, 7, 8, 0], dtype=np.uint64)  # bucket bits; tombstones: targets
    present = np.array([2, 7, 9], dtype=np.uint64)
    out = np.full(6, 99, dtype=np.int64)
    ids = np.arange(6, dtype=np.int64)
    return [flags, aux, refs, ids, main, ovf, present, out], out


def test_live_slots_numbers_main_then_overflow_slots_and_judges_tombstones() -> None:
    args, out = _probe_args()
    assert _relocate.live_slots(*args) == 6
    assert out.tolist() == [10, 21, -2, -1, -2, -2]


def test_live_slots_takes_ids_in_any_order() -> None:
    args, _out = _probe_args()
    args[3] = np.array([4, 0], dtype=np.int64)
    out = np.zeros(2, dtype=np.int64)
    args[7] = out
    assert _relocate.live_slots(*args) == 2
    assert out.tolist() == [-2, 10]


def test_live_slots_leaves_objects_without_a_key_hash_to_numpy() -> None:
    args, _out = _probe_args()
    args[0] = np.array([0, 2, 0, 1, 1, 4], dtype=np.int64)  # NO_HASH = 2
    assert _relocate.live_slots(*args) == -1


@pytest.mark.parametrize(
    ("index", "bad"),
    [
        (3, np.array([6], dtype=np.int64)),  # an id past the entries
        (3, np.array([-1], dtype=np.int64)),
        (1, np.zeros(5, dtype=np.uint64)),  # arrays of different lengths
        (4, np.zeros(24, dtype=np.uint64)),  # three buckets
        (7, np.zeros(2, dtype=np.int64)),  # out shorter than ids
        (0, np.zeros(6, dtype=np.int32)),  # not 8-byte items: 3 of them
    ],
)
def test_live_slots_rejects_inconsistent_arguments(index: int, bad: object) -> None:
    args, _out = _probe_args()
    args[index] = bad
    with pytest.raises(ValueError):
        _relocate.live_slots(*args)


def test_live_slots_rejects_a_chain_that_leaves_the_overflow_area() -> None:
    args, _out = _probe_args()
    main = args[4]
    assert isinstance(main, np.ndarray)
    main[8 + 7] = np.uint64(1 << 47) | np.uint64(9)  # overflow bucket 7: there is one
    with pytest.raises(ValueError, match="overflow"):
        _relocate.live_slots(*args)


def test_entry_stamps_reads_each_timestamp_across_seglet_boundaries() -> None:
    """Entries with one and two length bytes; the second's timestamp straddles seglets 0|1,
    which the segment holds at arena positions 64 and 0 (out of order)."""
    seglet = 32
    arena = bytearray(96)
    segment = bytearray(64)
    segment[0] = 0x02  # object, one length byte: content at 2, timestamp at 6..9
    segment[6:10] = (0x11223344).to_bytes(4, "little")
    segment[20] = 0x40 | 0x02  # two length bytes: content at 23, timestamp at 27..30
    segment[27:31] = (0xA1B2C3D4).to_bytes(4, "little")
    arena[64:96] = segment[0:32]
    arena[0:32] = segment[32:64]
    bases = np.array([64, 0], dtype=np.int64)
    out = np.zeros(2, dtype=np.int64)
    _relocate.entry_stamps(arena, seglet, bases, np.array([0, 20], dtype=np.int64), out)
    assert out.tolist() == [0x11223344, 0xA1B2C3D4]


@pytest.mark.parametrize(
    ("off", "match"),
    [(-1, "offset"), (64, "offset"), (58, "header")],
)
def test_entry_stamps_refuses_entries_outside_the_segment(off: int, match: str) -> None:
    arena = bytearray(64)
    out = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        _relocate.entry_stamps(
            arena, 32, np.array([0, 32], dtype=np.int64), np.array([off], dtype=np.int64), out
        )


def test_entry_stamps_refuses_a_seglet_outside_the_arena() -> None:
    with pytest.raises(ValueError, match="outside the arena"):
        _relocate.entry_stamps(
            bytearray(64),
            32,
            np.array([0, 40], dtype=np.int64),
            np.array([0], dtype=np.int64),
            np.zeros(1, dtype=np.int64),
        )


def _place_args() -> tuple[list[object], bytearray, np.ndarray]:
    """Two sources (seglets at 0 and 32; 64) with entries of 20, 16 and 12 bytes; a survivor
    with seglets at 96 and 128 (32 bytes each) filled to byte 4; one hash bucket holding the
    first and third entries (the second is a tombstone)."""
    arena = bytearray(range(160))
    bases = np.array([0, 32, 64, 96, 128], dtype=np.int64)
    main = np.zeros(8, dtype=np.uint64)
    main[1] = (np.uint64(0xEE) << np.uint64(48)) | np.uint64((1 << 24) | 10)
    main[6] = np.uint64((2 << 24) | 0)
    args: list[object] = [
        arena,
        32,  # seglet_size
        bases,
        np.array([0, 2], dtype=np.int64),  # src_first
        3,  # dst_first
        4,  # start
        7 << 24,  # dst_bits
        np.array([2, 0, 1], dtype=np.int64),  # ids: source 1's entry first
        np.array([6, 1, -1], dtype=np.int64),  # slots
        np.array([0, 0, 1], dtype=np.int64),  # src
        np.array([10, 30, 0], dtype=np.int64),  # off: entry 1 straddles 0|1
        np.array([20, 16, 12], dtype=np.int64),  # size
        np.array([0, 1, 0], dtype=np.int64),  # flags: entry 1 a tombstone
        np.array([5, 9, 3], dtype=np.uint64),  # aux
        main,
        np.zeros(0, dtype=np.uint64),  # ovf
        np.zeros(3, dtype=np.uint64),  # words
        np.full(4, 7, dtype=np.int64),  # acct
    ]
    return args, arena, main


def test_place_entries_copies_in_order_repoints_and_accounts() -> None:
    args, arena, main = _place_args()
    before = bytes(arena)
    assert _relocate.place_entries(*args) == 48
    survivor = bytes(arena[96:160])
    # entry 2 (source 1, offset 0: arena 64..76) at 4; entry 0 (arena 10..30) at 16;
    # entry 1 (arena 30..32 then 32..46) at 36, across the survivor's seglets at 32
    assert survivor[4:16] == before[64:76]
    assert survivor[16:36] == before[10:30]
    assert survivor[36:52] == before[30:46]
    assert int(main[6]) == (7 << 24) | 4
    assert int(main[1]) == (0xEE << 48) | (7 << 24) | 16  # the tag kept
    words = args[16]
    assert isinstance(words, np.ndarray)
    assert (words >> np.uint64(40)).tolist() == [4, 16, 36]
    assert (words & np.uint64(7)).tolist() == [0, 0, 1]
    assert ((words >> np.uint64(3)) & np.uint64(0xFF)).tolist() == [3, 5, 9]
    assert args[17].tolist() == [36, 16, 12, 0]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("index", "bad"),
    [
        (5, 60),  # start: 60 + 48 bytes pass the survivor's two seglets
        (7, np.array([3], dtype=np.int64)),  # an id past the entries
        (8, np.array([6, 1, 9], dtype=np.int64)),  # a slot past the table
        (8, np.array([6, 1], dtype=np.int64)),  # fewer slots than ids
        (9, np.array([0, 0, 2], dtype=np.int64)),  # a source that is not there
        (10, np.array([10, 30, 200], dtype=np.int64)),  # an entry past every seglet
        (2, np.array([0, 32, 64, 96, 140], dtype=np.int64)),  # a seglet past the arena
        (17, np.zeros(3, dtype=np.int64)),  # acct shorter than two a source
    ],
)
def test_place_entries_rejects_inconsistent_arguments_and_changes_nothing(
    index: int, bad: object
) -> None:
    args, arena, main = _place_args()
    args[index] = bad
    before = (bytes(arena), main.tobytes())
    with pytest.raises(ValueError):
        _relocate.place_entries(*args)
    assert (bytes(arena), main.tobytes()) == before


def test_the_cleaner_turns_a_refusal_into_an_internal_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    om = _store(clock)

    class Refusing:
        decode_index = staticmethod(_relocate.decode_index)

        @staticmethod
        def compact_range(*args: object) -> tuple[int, ...]:
            raise ValueError("target of source 0 lacks room")

    monkeypatch.setattr(_cleaner, "_relocate", Refusing)
    with pytest.raises(InternalError, match="compaction batch refused"):
        _drive(om, clock, 7, 6000, {})


def _words(entries: list[tuple[int, int, int]]) -> np.ndarray:
    """Index words of (offset, aux, flags) entries."""
    return np.array([off << 40 | aux << 3 | flags for off, aux, flags in entries], dtype=np.uint64)


def _decoded(
    words: np.ndarray, counts: list[int], ends_at: list[int], slots: list[int]
) -> dict[str, list[int]]:
    n = len(words)
    out = {name: np.full(n, 99, dtype=np.int64) for name in ("off", "size", "flags", "src")}
    out |= {name: np.full(n, 99, dtype=np.uint64) for name in ("aux", "ref")}
    _relocate.decode_index(
        words,
        np.array(counts, dtype=np.int64),
        np.array(ends_at, dtype=np.int64),
        np.array([slot << 24 for slot in slots], dtype=np.uint64),
        out["off"],
        out["size"],
        out["flags"],
        out["aux"],
        out["src"],
        out["ref"],
    )
    return {name: a.tolist() for name, a in out.items()}


def test_decode_index_sizes_each_entry_to_the_next_or_the_source_end() -> None:
    aux_max = (1 << 37) - 1
    words = _words([(40, 7, 0), (100, 3, 1), (150, aux_max, 2), (40, 5, 4)])
    got = _decoded(words, [3, 0, 1], [400, 0, 90], [5, 6, 9])
    assert got["off"] == [40, 100, 150, 40]
    assert got["size"] == [60, 50, 250, 50]
    assert got["flags"] == [0, 1, 2, 4]
    assert got["aux"] == [7, 3, aux_max, 5]
    assert got["src"] == [0, 0, 0, 2]
    assert got["ref"] == [5 << 24 | 40, 5 << 24 | 100, 5 << 24 | 150, 9 << 24 | 40]


@pytest.mark.parametrize(
    ("counts", "ends_at", "match"),
    [
        ([2, 1], [200, 100], "counts exceed"),
        ([1], [200], "disagree"),
        ([1, 0], [200, 0], "do not cover"),
        ([1, 0], [40, 0], "size not positive"),
    ],
)
def test_decode_index_rejects_inconsistent_arguments(
    counts: list[int], ends_at: list[int], match: str
) -> None:
    words = _words([(40, 1, 0), (100, 2, 0)])[: 1 if match == "size not positive" else 2]
    if match == "disagree":
        ends_at = [200, 300]
    with pytest.raises(ValueError, match=match):
        _decoded(words, counts, ends_at, [1] * len(counts))


def test_decode_index_rejects_an_entry_that_does_not_advance() -> None:
    with pytest.raises(ValueError, match="size not positive"):
        _decoded(_words([(40, 1, 0), (40, 2, 0)]), [2], [100], [1])


def test_c_pass_entries_equal_the_numpy_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass's per-entry arrays (all of several sources, and a span of one) are the same
    whether the C loop or numpy decodes the index."""
    clock = Clock()
    om = _store(clock)
    _drive(om, clock, 4, 2000, {})
    sources = [s for s in om.log.segments.values() if len(s.idx)][:6]
    assert len(sources) >= 3
    one = max(sources, key=lambda s: len(s.idx))
    spans = [(0, len(one.idx)), (1, len(one.idx) - 1), (2, 3)]

    def arrays(e: object) -> tuple[object, ...]:
        return tuple(
            (name, np.asarray(getattr(e, name)).tolist())
            for name in ("off", "size", "flags", "aux", "src", "ref", "first", "ends", "count")
        )

    c_all = arrays(_cleaner._Entries(sources))
    c_spans = [arrays(_cleaner._Entries([one], span)) for span in spans]
    monkeypatch.setattr(_cleaner, "_relocate", None)
    assert arrays(_cleaner._Entries(sources)) == c_all
    assert [arrays(_cleaner._Entries([one], span)) for span in spans] == c_spans
