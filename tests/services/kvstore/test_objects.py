"""The object manager: versions, reject rules, increments, multi-ops, tablets, enumeration,
dropping tables, zero-copy reads and read epochs, memory admission."""

from __future__ import annotations

import attrs
import pytest

from services.kvstore import (
    InvalidParameter,
    KeyTooLarge,
    KvError,
    ObjectDoesntExist,
    ObjectExists,
    ObjectManager,
    RejectRules,
    Retry,
    StorageConfig,
    UnknownTablet,
    ValueTooLarge,
    WrongVersion,
    key_hash,
)
from services.kvstore.log import SegmentState, object_entry_size

SMALL = StorageConfig(
    total_bytes=1 << 20,
    segment_size=32 << 10,
    seglet_size=4 << 10,
    cleaner_reserve_segments=2,
    cleaner_bytes_per_step=64 << 10,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def om() -> ObjectManager:
    m = ObjectManager(SMALL, clock=FakeClock())
    m.add_tablet(1)
    m.add_tablet(2)
    return m


def _step_until_idle(m: ObjectManager, now: float = 1e6) -> None:
    for _ in range(5000):
        if not m.cleaner.step(0.05, now):
            return
    raise AssertionError("cleaner never went idle")


def _write(m: ObjectManager, table_id: int, key: bytes, value: bytes) -> int:
    """Write, letting the cleaner catch up when memory is momentarily exhausted."""
    for _ in range(20):
        try:
            return m.write(table_id, key, value)
        except Retry:
            _step_until_idle(m)
    raise AssertionError("write kept getting Retry")


def test_write_read_and_versions(om: ObjectManager) -> None:
    v1 = om.write(1, b"a", b"hello")
    value, version = om.read(1, b"a")
    assert bytes(value) == b"hello" and version == v1 == 1
    assert om.write(1, b"a", b"world") == 2
    assert om.write(1, b"b", b"x") == 2  # master-wide counter: the next unused version
    assert om.write(2, b"a", b"other table") == 3
    assert bytes(om.read(1, b"a")[0]) == b"world"
    assert bytes(om.read(2, b"a")[0]) == b"other table"


def test_versions_never_repeat_after_remove(om: ObjectManager) -> None:
    for _ in range(10):
        om.write(1, b"k", b"v")
    assert om.read(1, b"k")[1] == 10
    assert om.remove(1, b"k") == 10
    assert om.remove(1, b"k") == 0
    with pytest.raises(ObjectDoesntExist):
        om.read(1, b"k")
    assert om.write(1, b"k", b"again") == 11
    assert om.safe_version == 12


def test_empty_key_and_empty_value(om: ObjectManager) -> None:
    om.write(1, b"", b"")
    assert bytes(om.read(1, b"")[0]) == b""


@pytest.mark.parametrize(
    ("rules", "version", "error"),
    [
        (RejectRules(doesnt_exist=True), 0, ObjectDoesntExist),
        (RejectRules(exists=True), 0, None),
        (RejectRules(exists=True), 3, ObjectExists),
        (RejectRules(exists=True, version_ne_given=True, given_version=1), 3, ObjectExists),
        (RejectRules(version_le_given=True, given_version=3), 3, WrongVersion),
        (RejectRules(version_le_given=True, given_version=2), 3, None),
        (RejectRules(version_ne_given=True, given_version=3), 3, None),
        (RejectRules(version_ne_given=True, given_version=4), 3, WrongVersion),
        (RejectRules(version_ne_given=True, given_version=4), 0, None),
        (RejectRules(doesnt_exist=True, version_ne_given=True, given_version=4), 3, WrongVersion),
    ],
)
def test_reject_rules_evaluation_order(
    rules: RejectRules, version: int, error: type[KvError] | None
) -> None:
    if error is None:
        rules.check(version)
        return
    with pytest.raises(error) as info:
        rules.check(version)
    if isinstance(info.value, WrongVersion):
        assert info.value.version == version


def test_reject_rules_apply_to_every_operation(om: ObjectManager) -> None:
    v = om.write(1, b"k", b"1")
    stale = RejectRules(version_ne_given=True, given_version=v + 5)
    with pytest.raises(WrongVersion):
        om.write(1, b"k", b"2", stale)
    with pytest.raises(WrongVersion):
        om.read(1, b"k", stale)
    with pytest.raises(WrongVersion):
        om.remove(1, b"k", stale)
    with pytest.raises(ObjectExists):
        om.write(1, b"k", b"2", RejectRules(exists=True))
    with pytest.raises(ObjectDoesntExist):
        om.remove(1, b"nope", RejectRules(doesnt_exist=True))
    # Nothing changed.
    assert (bytes(om.read(1, b"k")[0]), om.read(1, b"k")[1]) == (b"1", v)
    assert om.write(1, b"k", b"2", RejectRules(version_ne_given=True, given_version=v)) == v + 1


def test_increment(om: ObjectManager) -> None:
    assert om.increment(1, b"n", 5) == (5, 1)
    assert om.increment(1, b"n", -7) == (-2, 2)
    assert bytes(om.read(1, b"n")[0]) == (-2).to_bytes(8, "little", signed=True)
    om.write(1, b"max", (2**63 - 1).to_bytes(8, "little", signed=True))
    assert om.increment(1, b"max", 1)[0] == -(2**63)  # wraps like int64
    om.write(1, b"s", b"short")
    with pytest.raises(InvalidParameter):
        om.increment(1, b"s", 1)
    with pytest.raises(ObjectDoesntExist):
        om.increment(1, b"missing", 1, RejectRules(doesnt_exist=True))
    with pytest.raises(InvalidParameter):
        om.increment(1, b"n", 2**63)


def test_multi_ops_fail_per_item(om: ObjectManager) -> None:
    writes = om.multi_write(
        [
            (1, b"a", b"1", None),
            (9, b"b", b"2", None),
            (1, b"c", b"3", RejectRules(doesnt_exist=True)),
        ]
    )
    assert writes[0] == 1
    assert isinstance(writes[1], UnknownTablet)
    assert isinstance(writes[2], ObjectDoesntExist)
    reads = om.multi_read([(1, b"a", None), (1, b"c", None)])
    assert isinstance(reads[0], tuple) and bytes(reads[0][0]) == b"1"
    assert isinstance(reads[1], ObjectDoesntExist)
    incs = om.multi_increment([(1, b"n", 3, None), (1, b"a", 1, None)])
    assert incs[0] == (3, 2)
    assert isinstance(incs[1], InvalidParameter)
    removes = om.multi_remove([(1, b"a", None), (1, b"zz", RejectRules(doesnt_exist=True))])
    assert removes[0] == 1
    assert isinstance(removes[1], ObjectDoesntExist)


def test_tablets_decide_ownership() -> None:
    m = ObjectManager(SMALL)
    with pytest.raises(UnknownTablet):
        m.write(1, b"k", b"v")
    h = key_hash(1, b"k")
    m.add_tablet(1, h, h)
    assert m.has_tablet(1, h) and not m.has_tablet(1, h + 1)
    m.write(1, b"k", b"v")
    other = next(k for k in (b"k%d" % i for i in range(100)) if key_hash(1, k) != h)
    with pytest.raises(UnknownTablet):
        m.write(1, other, b"v")
    assert m.tablets() == [(1, h, h)]
    assert m.remove_tablet(1, h, h) == 1
    with pytest.raises(UnknownTablet):
        m.read(1, b"k")
    m.add_tablet(1)
    with pytest.raises(ObjectDoesntExist):
        m.read(1, b"k")
    with pytest.raises(UnknownTablet):
        m.remove_tablet(1, 5, 6)


def test_key_hash_depends_on_table_and_key() -> None:
    assert key_hash(1, b"k") == key_hash(1, memoryview(b"k"))
    assert key_hash(1, b"k") != key_hash(2, b"k")
    assert key_hash(1, b"k") != key_hash(1, b"j")
    assert 0 <= key_hash(0, b"") < 2**64


def test_size_limits() -> None:
    m = ObjectManager(
        StorageConfig(total_bytes=48 << 20, segment_size=8 << 20, cleaner_reserve_segments=1)
    )
    m.add_tablet(1)
    m.write(1, b"k" * 65535, b"v")
    with pytest.raises(KeyTooLarge):
        m.write(1, b"k" * 65536, b"v")
    with pytest.raises(KeyTooLarge):
        m.read(1, b"k" * 65536)
    big = bytes(1 << 20)
    m.write(1, b"big", big)
    assert bytes(m.read(1, b"big")[0]) == big
    with pytest.raises(ValueTooLarge):
        m.write(1, b"big", bytes((1 << 20) + 1))


def test_values_larger_than_a_small_segment_are_refused(om: ObjectManager) -> None:
    with pytest.raises(ValueTooLarge):
        om.write(1, b"k", bytes(SMALL.segment_size))


def test_reads_are_zero_copy_views_of_log_memory(om: ObjectManager) -> None:
    om.write(1, b"k", b"v" * 100)
    value, _ = om.read(1, b"k")
    assert isinstance(value, memoryview)
    assert id(value.obj) == id(om.log.allocator.arena)


def test_drop_table_forgets_objects_without_tombstones(om: ObjectManager) -> None:
    for i in range(50):
        om.write(1, b"k%d" % i, b"x" * i)
        om.write(2, b"k%d" % i, b"y" * i)
    before = om.stats()
    assert om.drop_table(1) == 50
    after = om.stats()
    assert after.objects == 50
    assert after.tombstones == before.tombstones
    assert after.live_bytes == sum(object_entry_size(len(b"k%d" % i), i) for i in range(50))
    with pytest.raises(UnknownTablet):
        om.read(1, b"k1")
    om.add_tablet(1)
    with pytest.raises(ObjectDoesntExist):
        om.read(1, b"k1")
    assert bytes(om.read(2, b"k7")[0]) == b"y" * 7
    assert om.write(1, b"k1", b"new") > max(om.read(2, b"k%d" % i)[1] for i in range(50))


def test_enumerate_pages_through_a_tablet_exactly_once(om: ObjectManager) -> None:
    expected = {}
    for i in range(300):
        key = b"key%d" % i
        om.write(1, key, b"v%d" % i)
        expected[key] = b"v%d" % i
    om.write(2, b"key1", b"other table")
    seen: dict[bytes, bytes] = {}
    cursor: bytes | None = None
    pages = 0
    while True:
        objects, cursor = om.enumerate(1, 0, 2**64 - 1, cursor, 200)
        pages += 1
        for key, value, _version in objects:
            assert key not in seen
            seen[key] = bytes(value)
        if cursor is None:
            break
    assert seen == expected
    assert pages > 5


def test_enumerate_filters_by_hash_range(om: ObjectManager) -> None:
    keys = [b"key%d" % i for i in range(200)]
    for k in keys:
        om.write(1, k, b"v")
    mid = 2**63
    objects, cursor = om.enumerate(1, 0, mid, None, 1 << 30)
    assert cursor is None
    assert sorted(k for k, _, _ in objects) == sorted(k for k in keys if key_hash(1, k) <= mid)


def test_enumerate_rejects_bad_cursors_and_unowned_ranges(om: ObjectManager) -> None:
    with pytest.raises(InvalidParameter):
        om.enumerate(1, 0, 10, b"\x01", 100)
    with pytest.raises(InvalidParameter):
        om.enumerate(1, 0, 10, (2**40).to_bytes(8, "little"), 100)
    with pytest.raises(InvalidParameter):
        om.enumerate(1, 10, 0, None, 100)
    with pytest.raises(UnknownTablet):
        om.enumerate(7, 0, 10, None, 100)


def test_enumerate_resumes_across_writes_and_cleaning(om: ObjectManager) -> None:
    stable = {b"s%d" % i: b"stable%d" % i for i in range(150)}
    for k, v in stable.items():
        om.write(1, k, v)
    seen: list[bytes] = []
    objects, cursor = om.enumerate(1, 0, 2**64 - 1, None, 500)
    seen.extend(k for k, _, _ in objects)
    assert cursor is not None
    # Heavy churn on other keys forces cleaning between pages.
    for round_ in range(40):
        for i in range(20):
            _write(om, 1, b"churn%d" % i, bytes([round_]) * 3000)
        om.cleaner.step(0.05, 1e6)
    assert om.stats().cleaner.bytes_relocated > 0
    while cursor is not None:
        objects, cursor = om.enumerate(1, 0, 2**64 - 1, cursor, 500)
        seen.extend(k for k, _, _ in objects)
    stable_seen = [k for k in seen if k.startswith(b"s")]
    assert sorted(stable_seen) == sorted(stable)


def test_live_bytes_track_objects(om: ObjectManager) -> None:
    om.write(1, b"a", b"x" * 100)
    om.write(1, b"b", b"y" * 10)
    om.write(1, b"a", b"z" * 5)
    om.remove(1, b"b")
    s = om.stats()
    assert s.live_bytes == object_entry_size(1, 5)
    assert s.objects == 1
    assert s.tombstones == 2  # one for the overwrite, one for the remove
    assert s.free_bytes + s.seglets_in_use * s.seglet_size == s.total_bytes


def test_reads_in_flight_keep_cleaned_memory_alive() -> None:
    # Combined cleaning only: it takes every cleanable segment, so the one holding "keep" goes.
    m = ObjectManager(attrs.evolve(SMALL, compaction_enabled=False), clock=FakeClock())
    m.add_tablet(1)
    m.write(1, b"keep", b"K" * 2000)
    # Each round holds a read of "keep" open across some churn and cleaning, until a round
    # sees the segment that held "keep" cleaned away while the read was still open.
    for round_ in range(200):
        (ref,) = m.hash_table.lookup(key_hash(1, b"keep"))
        home = m.log.segment_at(ref)
        held = list(home.seglets)
        epoch = m.begin_read()
        value, _ = m.read(1, b"keep")
        for i in range(3):
            _write(m, 1, b"c%d" % i, bytes([round_ % 256]) * 3000)
        m.cleaner.step(0.05, 1e6)
        for _ in range(100):  # finish a pass under way while the read is still open
            if not m.cleaner.busy:
                break
            m.cleaner.step(0.05, 1e6)
        if home.state is SegmentState.FREED:
            break
        m.end_read(epoch)
    assert home.state is SegmentState.FREED
    # The cleaner may give a source's seglets up before the pass commits; either way, none
    # may be handed out again while the read is open.
    assert not any(m.log.allocator.is_free(s) for s in held), "memory a read may see was freed"
    for i in range(3):
        _write(m, 1, b"c%d" % i, b"z" * 3000)
    assert bytes(value) == b"K" * 2000
    m.end_read(epoch)
    m.cleaner.step(0.05, 1e6)
    assert not home.seglets
    assert all(m.log.allocator.is_free(s) for s in held) or m.stats().free_seglets < len(held)
    _step_until_idle(m)  # a pass committed in that step may have retired more segments
    assert m.stats().pending_free_segments == 0
    assert bytes(m.read(1, b"keep")[0]) == b"K" * 2000


def test_writes_near_full_memory_get_retry_and_nothing_is_lost() -> None:
    m = ObjectManager(SMALL, clock=FakeClock())
    m.add_tablet(1)
    written: dict[bytes, bytes] = {}
    retries = 0
    for i in range(2000):
        key = b"key%d" % i
        value = bytes([i % 251]) * 900
        try:
            m.write(1, key, value)
        except Retry:
            retries += 1
            _step_until_idle(m)
            if retries >= 20:
                break
            continue
        written[key] = value
        m.cleaner.step(0.01, 1e6)
    s = m.stats()
    assert retries >= 20
    # Refused only at the write limit (95% of the DEFAULT pool), with that pool all in use.
    assert s.live_bytes + s.tombstone_bytes + object_entry_size(8, 900) > s.write_limit_bytes
    assert m.log.memory_utilization() >= 98.0
    for key, value in written.items():
        assert bytes(m.read(1, key)[0]) == value
    # Removes are still admitted (their tombstones use the space kept back for them) ...
    for key in list(written)[:200]:
        m.remove(1, key)
        del written[key]
    _step_until_idle(m)
    # ... and once the cleaner has run, writes are admitted again.
    m.write(1, b"after", b"a" * 900)
    written[b"after"] = b"a" * 900
    for key, value in written.items():
        assert bytes(m.read(1, key)[0]) == value
    assert m.stats().live_bytes == sum(
        object_entry_size(len(k), len(v)) for k, v in written.items()
    )
