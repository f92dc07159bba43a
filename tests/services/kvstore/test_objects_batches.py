"""ObjectManager.multi_write, the batched write path: the same outcomes, versions and log
contents as one write per item, per-item errors, and order kept when memory fills mid-batch."""

from __future__ import annotations

from collections.abc import Sequence

from services.kvstore import (
    KeyTooLarge,
    KvError,
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
from services.kvstore._objects import MAX_HASH

SMALL = StorageConfig(
    total_bytes=1 << 20,
    segment_size=32 << 10,
    seglet_size=4 << 10,
    cleaner_reserve_segments=2,
    cleaner_bytes_per_step=64 << 10,
)
Batch = Sequence[tuple[int, bytes | memoryview, bytes | memoryview, RejectRules | None]]


def _manager() -> ObjectManager:
    m = ObjectManager(SMALL, clock=lambda: 1000.0)
    m.add_tablet(1)
    m.add_tablet(2, 0, MAX_HASH // 2)  # half of table 2 lives elsewhere
    return m


def _one_by_one(m: ObjectManager, batch: Batch) -> list[int | KvError]:
    out: list[int | KvError] = []
    for table_id, key, value, rules in batch:
        try:
            out.append(m.write(table_id, key, value, rules))
        except KvError as exc:
            out.append(exc)
    return out


def _comparable(results: list[int | KvError]) -> list[object]:
    return [r if isinstance(r, int) else (type(r), str(r)) for r in results]


def test_multi_write_matches_one_write_per_item() -> None:
    elsewhere = next(b"t2-%d" % i for i in range(100) if key_hash(2, b"t2-%d" % i) > MAX_HASH // 2)
    batches: list[Batch] = [
        [(1, b"k%d" % i, b"v" * i, None) for i in range(50)],
        [
            (1, b"k3", b"new", None),  # overwrite
            (1, b"k3", b"newer", None),  # the same key twice in a batch: in order
            (1, memoryview(b"view-key"), memoryview(b"view-value"), None),
            (1, b"", b"", None),
            (1, b"k" * 65536, b"v", None),
            (1, b"huge", bytes(SMALL.segment_size), None),
            (7, b"no-such-table", b"v", None),
            (2, elsewhere, b"v", None),
            (2, b"t2-0" if key_hash(2, b"t2-0") <= MAX_HASH // 2 else b"x", b"mine", None),
            (1, b"k4", b"refused", RejectRules(exists=True)),
            (1, b"k5", b"stale", RejectRules(given_version=1, version_ne_given=True)),
            (1, b"k6", b"checked", RejectRules(given_version=7, version_ne_given=True)),
            (1, b"fresh", b"ok", RejectRules(exists=True)),
        ],
    ]
    batched, single = _manager(), _manager()
    for batch in batches:
        got = batched.multi_write(batch)
        assert _comparable(got) == _comparable(_one_by_one(single, batch))
    assert isinstance(got[4], ValueTooLarge)  # a 64 KiB key does not fit a 32 KiB segment
    assert isinstance(got[5], ValueTooLarge)
    assert isinstance(got[6], UnknownTablet) and isinstance(got[7], UnknownTablet)
    assert isinstance(got[9], ObjectExists) and isinstance(got[10], WrongVersion)
    assert isinstance(got[0], int) and got[1] == got[0] + 1 and isinstance(got[11], int)
    for table_id, key, _value, _rules in [*batches[0], *batches[1]]:
        try:
            expected = bytes(single.read(table_id, key)[0])
        except KvError as exc:
            assert type(exc) is type(_raises(batched, table_id, key))
            continue
        assert bytes(batched.read(table_id, key)[0]) == expected
    assert bytes(batched.read(1, b"k3")[0]) == b"newer"
    a, b = batched.stats(), single.stats()
    assert (a.live_bytes, a.tombstone_bytes, a.objects, a.tombstones) == (
        b.live_bytes,
        b.tombstone_bytes,
        b.objects,
        b.tombstones,
    )
    assert batched.safe_version == single.safe_version


def _raises(m: ObjectManager, table_id: int, key: bytes | memoryview) -> KvError:
    try:
        m.read(table_id, key)
    except KvError as exc:
        return exc
    raise AssertionError("read succeeded")


def _churn(on_full: bool) -> tuple[ObjectManager, list[list[int | KvError]], int]:
    """Overwrite 50 keys (each twice per batch) well past memory size without a cleaner."""
    m = ObjectManager(SMALL, clock=lambda: 1000.0)
    m.add_tablet(1)
    calls = 0

    def clean() -> None:
        nonlocal calls
        calls += 1
        for _ in range(1000):
            if not m.cleaner.step(0.05, 1e6):
                return
        raise AssertionError("cleaner never went idle")

    outcomes = []
    for round_ in range(40):
        batch: list[tuple[int, bytes, bytes, RejectRules | None]] = []
        for i in range(50):
            key = b"key%d" % i
            batch.append((1, key, bytes([round_]) * 400, None))
            batch.append((1, key, bytes([round_ + 100]) * 400, None))
        outcomes.append(m.multi_write(batch, clean if on_full else None))
        if on_full:  # each key holds its second value of the batch
            for i in range(50):
                assert bytes(m.read(1, b"key%d" % i)[0]) == bytes([round_ + 100]) * 400
    return m, outcomes, calls


def test_multi_write_lets_the_cleaner_run_and_keeps_the_batch_order() -> None:
    m, outcomes, calls = _churn(on_full=True)
    assert calls > 0  # 1.6 MB written into 1 MB: memory filled up mid-batch
    assert all(isinstance(v, int) for batch in outcomes for v in batch)
    for i in range(50):
        assert bytes(m.read(1, b"key%d" % i)[0]) == bytes([139]) * 400


def test_multi_write_without_a_cleaner_reports_retry_per_item() -> None:
    m, outcomes, calls = _churn(on_full=False)
    results = [v for batch in outcomes for v in batch]
    assert calls == 0
    assert any(isinstance(v, Retry) for v in results)
    written = sum(isinstance(v, int) for v in results)
    assert m.stats().retries == len(results) - written
    for batch in outcomes:  # a key's second write in a batch follows its first
        for first, second in zip(batch[::2], batch[1::2], strict=True):
            if isinstance(first, int) and isinstance(second, int):
                assert second == first + 1


def test_multi_write_size_limits() -> None:
    m = ObjectManager(
        StorageConfig(total_bytes=48 << 20, segment_size=8 << 20, cleaner_reserve_segments=1)
    )
    m.add_tablet(1)
    got = m.multi_write(
        [
            (1, b"k" * 65536, b"v", None),
            (1, b"k" * 65535, b"v", None),
            (1, b"big", bytes((1 << 20) + 1), None),
            (1, b"big", bytes(1 << 20), None),
        ]
    )
    assert isinstance(got[0], KeyTooLarge) and isinstance(got[2], ValueTooLarge)
    assert got[1] == 1 and got[3] == 2
    assert bytes(m.read(1, b"big")[0]) == bytes(1 << 20)


def test_an_item_that_found_memory_full_is_retried_before_the_next_one() -> None:
    m = ObjectManager(SMALL, clock=lambda: 1000.0)
    m.add_tablet(1)
    first = m.write(1, b"x", b"1")
    fillers = []
    for i in range(2000):  # live data up to the write limit
        try:
            m.write(1, b"f%d" % i, bytes(900))
        except Retry:
            _step_until_idle(m)
            try:
                m.write(1, b"f%d" % i, bytes(900))
            except Retry:
                break
        fillers.append(b"f%d" % i)
    else:
        raise AssertionError("memory never filled up")

    def make_room() -> None:
        for key in fillers[:10]:
            m.remove(1, key)
        del fillers[:10]
        _step_until_idle(m)

    # the big write finds memory full; the small one after it would fit even then
    got = m.multi_write([(1, b"x", bytes(2000), None), (1, b"x", b"small", None)], make_room)
    assert got == [first + 1, first + 2]
    assert bytes(m.read(1, b"x")[0]) == b"small"


def _step_until_idle(m: ObjectManager) -> None:
    for _ in range(5000):
        if not m.cleaner.step(0.05, 1e6):
            return
    raise AssertionError("cleaner never went idle")
