"""The cleaner: balancer rules, scores, compaction, combined cleaning with replicas, tombstone
retirement, and correctness when requests run between cleaning slices."""

from __future__ import annotations

import math
import random

import attrs
import pytest

from services.kvstore import ObjectDoesntExist, ObjectManager, Retry, StorageConfig, key_hash
from services.kvstore.log import (
    CleanerTask,
    HashTable,
    Log,
    LogCleaner,
    LogDigestEntry,
    ObjectEntry,
    Pool,
    SegmentState,
    TombstoneEntry,
    _cleaner,
    choose_task,
    cleaning_score,
    compaction_score,
    iter_entries_untrusted,
    object_entry_size,
    tombstone_entry_size,
)
from services.kvstore.log._cleaner import (
    COST_BATCH,
    COST_COMMIT_SEGMENT,
    COST_ENTRY,
    COST_SCAN_ENTRY,
)
from services.kvstore.log._entries import Buffer

CONFIG = StorageConfig(
    total_bytes=1 << 20,
    segment_size=32 << 10,
    seglet_size=4 << 10,
    cleaner_reserve_segments=2,
    cleaner_bytes_per_step=64 << 10,
)


class TickingClock:
    """Advances one second per call, so every object gets its own timestamp."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class RecordingSink:
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
        assert segment_id not in self.closed and offset == len(self.replicas[segment_id])
        self.replicas[segment_id] += bytes(data)
        self.events.append(("append", segment_id))

    def close(self, segment_id: int) -> None:
        assert segment_id not in self.closed
        self.closed.add(segment_id)
        self.events.append(("close", segment_id))

    def free(self, segment_id: int) -> None:
        assert segment_id in self.closed and segment_id not in self.freed
        self.freed.add(segment_id)
        self.events.append(("free", segment_id))

    def latest_digest(self) -> tuple[int, tuple[int, ...]]:
        best: tuple[int, tuple[int, ...]] = (-1, ())
        for sid, data in self.replicas.items():
            if sid in self.freed:
                continue
            for _, e in iter_entries_untrusted(data):
                if isinstance(e, LogDigestEntry) and sid > best[0]:
                    best = (sid, e.segment_ids)
        return best

    def replay(self) -> dict[tuple[int, bytes], tuple[bytes, int]]:
        """What crash recovery would rebuild from the replicas the newest digest names."""
        _head, ids = self.latest_digest()
        objects: dict[tuple[int, bytes], ObjectEntry] = {}
        tombs: dict[tuple[int, bytes], int] = {}
        for sid in ids:
            assert sid not in self.freed, f"digest names freed segment {sid}"
            for _, e in iter_entries_untrusted(self.replicas[sid]):
                if isinstance(e, ObjectEntry):
                    k = (e.table_id, e.key)
                    if k not in objects or objects[k].version < e.version:
                        objects[k] = e
                elif isinstance(e, TombstoneEntry):
                    k = (e.table_id, e.key)
                    tombs[k] = max(tombs.get(k, 0), e.object_version)
        return {k: (o.value, o.version) for k, o in objects.items() if o.version > tombs.get(k, 0)}


def _write(m: ObjectManager, key: bytes, value: bytes, now: float) -> int:
    for _ in range(50):
        try:
            return m.write(1, key, value)
        except Retry:
            for _ in range(1000):
                if not m.cleaner.step(0.05, now):
                    break
    raise AssertionError("write kept getting Retry")


def _model_check(m: ObjectManager, model: dict[bytes, bytes]) -> None:
    for k, v in model.items():
        assert bytes(m.read(1, k)[0]) == v
    assert m.stats().live_bytes == sum(object_entry_size(len(k), len(v)) for k, v in model.items())
    assert m.stats().objects == len(model)


@pytest.mark.parametrize(
    ("t", "live", "tomb", "disk", "compaction", "failed", "task"),
    [
        (50.0, 40.0, 0.0, 10.0, True, False, CleanerTask.SLEEP),
        (89.9, 10.0, 0.0, 10.0, True, False, CleanerTask.SLEEP),
        (90.0, 10.0, 0.0, 10.0, True, False, CleanerTask.COMPACT),
        (92.0, 86.0, 0.0, 10.0, True, False, CleanerTask.SLEEP),  # needs T >= (100+L)/2 = 93
        (93.0, 86.0, 0.0, 10.0, True, False, CleanerTask.COMPACT),
        (95.0, 50.0, 20.0, 10.0, True, False, CleanerTask.CLEAN),  # U >= 0.4 * (100 - L)
        (95.0, 50.0, 19.9, 10.0, True, False, CleanerTask.COMPACT),
        (95.0, 50.0, 0.0, 10.0, False, False, CleanerTask.CLEAN),
        (95.0, 50.0, 0.0, 10.0, True, True, CleanerTask.CLEAN),
        (10.0, 5.0, 0.0, 95.0, True, False, CleanerTask.CLEAN),  # backup log nearly full
        (10.0, 5.0, 0.0, 10.0, False, True, CleanerTask.SLEEP),
    ],
)
def test_tombstone_ratio_balancer(
    t: float,
    live: float,
    tomb: float,
    disk: float,
    compaction: bool,
    failed: bool,
    task: CleanerTask,
) -> None:
    assert (
        choose_task(
            memory_utilization=t,
            live_utilization=live,
            tombstone_utilization=tomb,
            disk_utilization=disk,
            compaction_enabled=compaction,
            compaction_failed=failed,
        )
        is task
    )


def test_balancer_counts_the_reserves_as_unallocated_memory() -> None:
    """Paper section 5.2: cleaning starts once unallocated seglets, of every pool, are at most
    half of the free memory, both measured against all log memory. The reserves (an eighth of
    this log) are part of that half, not on top of it."""
    m = ObjectManager(CONFIG)
    m.add_tablet(1)
    log = m.log
    pool = log.allocator
    total = pool.total_seglets
    starved = 2 * log.seglets_per_segment
    for i in range(2000):  # overwrites of ten keys: memory fills with dead bytes
        if pool.free_count(Pool.DEFAULT) <= starved + 4:
            break
        _write(m, b"k%d" % (i % 10), bytes([i % 251]) * 1000, 1e9)
    free = pool.free_count(Pool.DEFAULT)
    assert starved <= free <= starved + 4
    t, live, tomb, disk = m.cleaner.utilizations()
    assert t == pytest.approx(100.0 * (total - pool.total_free()) / total)
    assert live == pytest.approx(100.0 * log.live_object_bytes / (total * log.seglet_size))
    assert m.cleaner.next_task() is CleanerTask.SLEEP and not m.cleaner.wants_to_run()
    # Measured against the DEFAULT pool alone, memory would count as low already.
    default = pool.capacity(Pool.DEFAULT)
    assert (
        choose_task(
            memory_utilization=100.0 * (default - free) / default,
            live_utilization=100.0 * log.live_object_bytes / log.default_pool_bytes,
            tombstone_utilization=tomb,
            disk_utilization=disk,
            compaction_enabled=True,
            compaction_failed=False,
        )
        is CleanerTask.COMPACT
    )
    for i in range(40):  # fewer than two segments' seglets free: the cleaner must run
        _write(m, b"k%d" % (i % 10), b"x" * 1000, 1e9)
        if pool.free_count(Pool.DEFAULT) < starved:
            break
    assert pool.free_count(Pool.DEFAULT) < starved
    assert m.cleaner.wants_to_run() and m.cleaner.next_task() is CleanerTask.COMPACT


def test_cleaning_for_memory_ranks_segments_by_the_memory_they_hold() -> None:
    """A head closed early holds few bytes, all live: on disk it looks cheap to clean (low
    utilisation of the full segment), in memory cleaning it frees almost nothing. While the
    backup log has room the cleaner cleans for memory, so a half-dead full segment of the same
    age ranks first."""
    m = ObjectManager(CONFIG, clock=TickingClock())
    m.add_tablet(1)
    log = m.log
    for i in range(6):
        _write(m, b"a%d" % i, b"a" * 1000, 1e9)
    log.roll_over()  # as a cleaning commit does
    for i in range(26):
        _write(m, b"b%d" % i, b"b" * 1000, 1e9)
    log.roll_over()
    for i in range(0, 26, 2):  # half of the full segment dies (tombstones go to the head)
        m.remove(1, b"b%d" % i)
    short, full = sorted(log.cleanable_segments(), key=lambda s: s.created)
    size = log.segment_size
    assert short.live_bytes / size < full.live_bytes / size  # on disk: short is cheaper
    assert short.live_bytes / short.allocated_bytes > full.live_bytes / full.allocated_bytes
    assert log.disk_utilization() < 95
    ranked = m.cleaner.ranked_for_cleaning(1e9)
    assert ranked.index(full) < ranked.index(short)


def test_cost_benefit_uses_segment_age_and_prefers_empty_and_old() -> None:
    size = 1000
    assert cleaning_score(0, size, 5.0) == math.inf
    assert cleaning_score(500, size, 10.0) == pytest.approx(10.0)  # (100-50)*10/50
    assert cleaning_score(500, size, 20.0) > cleaning_score(500, size, 10.0)
    assert cleaning_score(200, size, 10.0) > cleaning_score(800, size, 10.0)
    assert compaction_score(0, 3, 100) == math.inf
    assert compaction_score(100, 2, 100) > compaction_score(200, 2, 100)


def test_idle_cleaner_sleeps() -> None:
    m = ObjectManager(CONFIG)
    m.add_tablet(1)
    m.write(1, b"k", b"v")
    assert not m.cleaner.step(0.01, 0.0)
    assert not m.cleaner.wants_to_run()
    assert m.cleaner.describe() == "idle"


def test_compaction_shrinks_segments_in_memory_only() -> None:
    sink = RecordingSink()
    m = ObjectManager(CONFIG, replica_sink=sink, clock=TickingClock())
    m.add_tablet(1)
    model: dict[bytes, bytes] = {}
    for round_ in range(120):
        for i in range(10):
            value = bytes([round_]) * 2500
            _write(m, b"k%d" % i, value, 1e9)
            model[b"k%d" % i] = value
        m.cleaner.step(0.05, 1e9)
    stats = m.stats().cleaner
    assert stats.compactions > 0
    assert stats.seglets_freed > 0
    # chosen segments held dead bytes: their live bytes over the memory they held is below 1
    assert 0 < stats.compacted_live_bytes < stats.compacted_allocated_bytes
    _model_check(m, model)
    # Compacted segments keep their ids, and backups are not told about compaction.
    compacted = [s for s in m.log.segments.values() if len(s.seglets) < CONFIG.seglets_per_segment]
    assert compacted
    for s in compacted:
        if s.state is SegmentState.CLOSED:
            assert s.id in sink.replicas and s.id not in sink.freed
    # What the backups hold still recovers exactly the live data.
    assert sink.replay() == {(1, k): (v, m.read(1, k)[1]) for k, v in model.items()}


def test_combined_cleaning_writes_survivors_and_frees_cleaned_replicas() -> None:
    sink = RecordingSink()
    config = attrs.evolve(CONFIG, compaction_enabled=False)
    m = ObjectManager(config, replica_sink=sink, clock=TickingClock())
    m.add_tablet(1)
    model: dict[bytes, bytes] = {}
    for round_ in range(200):
        for i in range(12):
            key = b"k%d" % (i + 12 * (round_ % 3 == 0))
            value = bytes([round_ % 256]) * (500 + 40 * i)
            _write(m, key, value, 1e9)
            model[key] = value
        if round_ % 4 == 0:
            m.remove(1, b"k%d" % round_)
            model.pop(b"k%d" % round_, None)
        m.cleaner.step(0.05, 1e9)
    stats = m.stats().cleaner
    assert stats.cleanings > 0 and stats.segments_cleaned > 0 and stats.survivor_segments > 0
    assert stats.compactions == 0
    _model_check(m, model)
    assert sink.replay() == {(1, k): (v, m.read(1, k)[1]) for k, v in model.items()}
    # Every freed replica was closed before, and was freed only after a newer head was opened.
    for sid in sink.freed:
        freed_at = sink.events.index(("free", sid))
        opens_before = [e for e in sink.events[:freed_at] if e[0] == "open" and e[1] > sid]
        assert opens_before
    # Survivors hold entries in age order.
    digest_holders = {sid for sid, d in sink.replicas.items() if _has_digest(d)}
    survivors = [sid for sid in sink.replicas if sid not in digest_holders]
    assert survivors
    for sid in survivors:
        stamps = [
            e.timestamp
            for _, e in iter_entries_untrusted(sink.replicas[sid])
            if isinstance(e, ObjectEntry | TombstoneEntry)
        ]
        assert stamps == sorted(stamps)


def _has_digest(data: bytearray) -> bool:
    return any(isinstance(e, LogDigestEntry) for _, e in iter_entries_untrusted(data))


def test_tombstones_retire_when_the_dead_objects_segment_is_cleaned() -> None:
    config = attrs.evolve(CONFIG, compaction_enabled=False)
    m = ObjectManager(config, clock=TickingClock())
    m.add_tablet(1)
    for i in range(40):
        m.write(1, b"k%d" % i, b"x" * 600)
    for i in range(40):
        m.remove(1, b"k%d" % i)
    assert m.stats().tombstones == 40
    assert m.stats().tombstone_bytes > 0
    # Fill with churn so the cleaner must run and clean the segments those objects lived in.
    model: dict[bytes, bytes] = {}
    for round_ in range(60):
        for i in range(8):
            _write(m, b"c%d" % i, bytes([round_]) * 2000, 1e9)
            model[b"c%d" % i] = bytes([round_]) * 2000
        m.cleaner.step(0.05, 1e9)
    assert m.stats().cleaner.segments_cleaned > 0
    s = m.stats()
    assert s.tombstones < 40 + 8 * 60
    for i in range(40):
        with pytest.raises(ObjectDoesntExist):
            m.read(1, b"k%d" % i)
    _model_check(m, model)


@pytest.mark.parametrize("compaction", [True, False])
def test_requests_between_slices_are_never_undone(compaction: bool) -> None:
    """Overwrites and removes between cleaning slices win over the cleaner's copies."""
    config = attrs.evolve(CONFIG, cleaner_bytes_per_step=1500, compaction_enabled=compaction)
    sink = RecordingSink()
    m = ObjectManager(config, replica_sink=sink, clock=TickingClock())
    m.add_tablet(1)
    model: dict[bytes, bytes] = {}
    keys = [b"key%d" % i for i in range(30)]
    slices_with_pass = 0
    for round_ in range(2500):
        key = keys[(round_ * 7) % len(keys)]
        if round_ % 5 == 4:
            m.remove(1, key)
            model.pop(key, None)
        else:
            value = bytes([round_ % 256]) * (300 + (round_ * 37) % 1800)
            _write(m, key, value, 1e9)
            model[key] = value
        m.cleaner.step(1.0, 1e9)
        slices_with_pass += m.cleaner.busy
    assert slices_with_pass > 10  # requests really did run in the middle of passes
    for _ in range(1000):
        if not m.cleaner.step(1.0, 1e9):
            break
    _model_check(m, model)
    for k in keys:
        if k not in model:
            with pytest.raises(ObjectDoesntExist):
                m.read(1, k)
    assert sink.replay() == {(1, k): (v, m.read(1, k)[1]) for k, v in model.items()}


def test_every_entry_is_found_through_the_hash_table_after_cleaning() -> None:
    config = attrs.evolve(CONFIG, compaction_enabled=False)
    m = ObjectManager(config, clock=TickingClock())
    m.add_tablet(1)
    for round_ in range(100):
        for i in range(20):
            _write(m, b"k%d" % i, bytes([round_ % 256]) * 1500, 1e9)
        m.cleaner.step(0.05, 1e9)
    assert m.stats().cleaner.cleanings > 0
    for i in range(20):
        (ref,) = m.hash_table.lookup(key_hash(1, b"k%d" % i))
        assert m.log.segment_at(ref).state in (SegmentState.CLOSED, SegmentState.HEAD)


def test_run_until_idle_stops_when_the_balancer_sleeps() -> None:
    m = ObjectManager(CONFIG, clock=TickingClock())
    m.add_tablet(1)
    for round_ in range(60):
        for i in range(10):
            try:
                m.write(1, b"k%d" % i, bytes([round_]) * 2500)
            except Retry:
                assert m.cleaner.wants_to_run()
                m.cleaner.run_until_idle(1e9)
    steps = m.cleaner.run_until_idle(1e9)
    assert steps < 10_000
    assert not m.cleaner.busy
    assert not m.cleaner.step(1.0, 1e9)


class JitterClock:
    """Advances a second per call, give or take 40: timestamps come out of order locally, so
    the cleaner's scan has to sort its chunks (real clocks need no sort; the bound must hold
    without that luck)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._base = 1000.0

    def __call__(self) -> float:
        self._base += 1.0
        return self._base + self._rng.uniform(-40.0, 40.0)


class CountingHandlers:
    """The object manager's cleaner handlers, counting the per-entry fallback calls."""

    def __init__(self, om: ObjectManager) -> None:
        self._om = om
        self.checks = 0

    @property
    def hash_table(self) -> HashTable:
        return self._om.hash_table

    def object_hash_if_live(self, ref: int) -> int | None:
        self.checks += 1
        return self._om.object_hash_if_live(ref)


class SurvivorBytesSink(RecordingSink):
    """Also counts the bytes appended to survivor segments (what cleaning sends to backups)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: Log | None = None
        self.survivors: set[int] = set()
        self.survivor_bytes = 0

    def open(self, segment_id: int, data: Buffer) -> None:
        super().open(segment_id, data)
        if self.log is not None and self.log.segments[segment_id].state is SegmentState.SURVIVOR:
            self.survivors.add(segment_id)

    def append(self, segment_id: int, offset: int, data: Buffer) -> None:
        super().append(segment_id, offset, data)
        if segment_id in self.survivors:
            self.survivor_bytes += len(data)


STEP_UNITS = 2048
BOUNDED = StorageConfig(
    total_bytes=2 << 20,
    segment_size=128 << 10,  # ~900 small objects a segment: far more than one step's share
    seglet_size=8 << 10,
    cleaner_reserve_segments=2,
    cleaner_bytes_per_step=STEP_UNITS,
)


@pytest.mark.parametrize("compaction", [True, False])
def test_every_step_stays_within_its_work_budget(compaction: bool) -> None:
    """Scanning, copying and committing all advance in bounded slices.

    The time budget is generous here, so the work units (``cleaner_bytes_per_step``) bound each
    step; the entries relocated and the survivor bytes a step causes are counted independently
    of the cleaner's own meter.
    """
    # A low tombstone ratio makes combined cleaning run beside compaction: with the reserves
    # counted as free memory (a quarter of this small log) compaction alone would keep up.
    config = attrs.evolve(BOUNDED, compaction_enabled=compaction, tombstone_ratio=0.15)
    sink = SurvivorBytesSink()
    m = ObjectManager(config, replica_sink=sink, clock=JitterClock(3))
    sink.log = m.log
    handlers = CountingHandlers(m)
    cleaner = LogCleaner(m.log, handlers, config)
    m.add_tablet(1)
    rng = random.Random(11)
    keys = [b"k%05d" % i for i in range(4500)]  # ~0.6 MiB live of a ~1.5 MiB pool
    model: dict[bytes, bytes] = {}
    entry = object_entry_size(6, 100)
    # Largest single unit of work a step may end with: a batch of one entry, scanning one
    # source of a cleaning pass (entries are at least 30 bytes), or (in the step that
    # finishes a pass) a commit, which touches every segment.
    unit = max(
        COST_BATCH + COST_ENTRY + entry + entry // 8,
        2 * COST_BATCH + COST_SCAN_ENTRY * (config.segment_size // 30),
    )
    commit = COST_COMMIT_SEGMENT * (2 * config.max_live_segments_per_pass + 2) + 8 * (
        config.total_bytes // config.segment_size
    )
    steps = busy_steps = 0
    for i in range(16_000):
        key = keys[rng.randrange(len(keys))] if i >= len(keys) else keys[i]
        value = bytes([i % 251]) * 100
        for _ in range(200):
            try:
                m.write(1, key, value)
                break
            except Retry:
                cleaner.step(10.0, 1e9)
        model[key] = value
        if not cleaner.wants_to_run():
            continue
        before = (sink.survivor_bytes, cleaner.stats())
        cleaner.step(10.0, 1e9)
        after = cleaner.stats()
        steps += 1
        busy_steps += cleaner.busy
        finished = after.cleanings + after.compactions > before[1].cleanings + before[1].compactions
        assert cleaner.last_step_work <= STEP_UNITS + unit + (commit if finished else 0)
        moved = after.entries_relocated - before[1].entries_relocated
        assert moved <= STEP_UNITS // (COST_ENTRY + tombstone_entry_size(6)) + 1
        assert sink.survivor_bytes - before[0] <= STEP_UNITS + entry
    assert handlers.checks == 0  # the write paths index every object with its key hash
    stats = cleaner.stats()
    assert stats.cleanings > 0
    assert (stats.compactions > 0) is compaction
    assert busy_steps > 50 and steps > busy_steps  # passes really spanned many steps
    _model_check(m, model)
    assert sink.replay() == {(1, k): (v, m.read(1, k)[1]) for k, v in model.items()}


@pytest.mark.parametrize("merge_elements", [None, 128])
def test_survivors_are_in_age_order_even_when_scanned_out_of_order(
    merge_elements: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 128, a batch merges at most 128 // k candidates of each of k sources' runs (and
    takes no more than that in all): the merge must stay exact."""
    if merge_elements is not None:
        monkeypatch.setattr(_cleaner, "MERGE_ELEMENTS", merge_elements)
    sink = RecordingSink()
    config = attrs.evolve(BOUNDED, compaction_enabled=False, cleaner_bytes_per_step=64 << 10)
    m = ObjectManager(config, replica_sink=sink, clock=JitterClock(5))
    m.add_tablet(1)
    rng = random.Random(2)
    for i in range(12_000):
        _write(m, b"k%05d" % (i if i < 4500 else rng.randrange(4500)), b"v" * 100, 1e9)
        if i % 16 == 0:
            m.cleaner.step(1.0, 1e9)
    assert m.stats().cleaner.survivor_segments > 0
    digest_holders = {sid for sid, d in sink.replicas.items() if _has_digest(d)}
    for sid in set(sink.replicas) - digest_holders:
        stamps = [
            e.timestamp
            for _, e in iter_entries_untrusted(sink.replicas[sid])
            if isinstance(e, ObjectEntry | TombstoneEntry)
        ]
        assert stamps == sorted(stamps)


class CountingTimer:
    """A step-budget clock that advances one tick each time it is read."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.reads * 1e-6


def test_the_time_budget_alone_ends_a_step() -> None:
    """With unlimited work units a step ends on time: the cleaner reads its timer after each
    unit of work (a batch, a scanned source), so a budget of N ticks allows about N units."""
    config = attrs.evolve(BOUNDED, cleaner_bytes_per_step=1 << 40, compaction_enabled=False)
    m = ObjectManager(config, clock=JitterClock(7))
    handlers = CountingHandlers(m)
    timer = CountingTimer()
    cleaner = LogCleaner(m.log, handlers, config, timer=timer)
    m.add_tablet(1)
    rng = random.Random(3)
    ticks = 2
    steps = cut = 0
    for i in range(12_000):
        key = b"k%05d" % (i if i < 4500 else rng.randrange(4500))
        for _ in range(500):
            try:
                m.write(1, key, b"v" * 100)
                break
            except Retry:
                cleaner.step(ticks * 1e-6, 1e9)
        if cleaner.wants_to_run():
            reads = timer.reads
            cleaner.step(ticks * 1e-6, 1e9)
            steps += 1
            cut += cleaner.busy
            assert timer.reads - reads <= ticks + 4  # the deadline, then checks until it passes
    assert steps > 5
    assert cut > 0  # some step ended on time with its pass unfinished
    assert cleaner.stats().bytes_relocated > 0


# A 4 MiB log that 1 KB objects can fill to 90% of *total* memory (``rpcfast-perf cleaner
# --quick`` at 90%): a 2-segment survivor reserve and a 98% write limit.
SMALL_LOG_AT_90 = StorageConfig(
    total_bytes=4 << 20,
    segment_size=64 << 10,
    seglet_size=2 << 10,
    cleaner_reserve_segments=2,
    write_limit=0.98,
    hash_table_bytes=64 << 10,
)


@pytest.mark.parametrize("seed", [1, 2])
def test_cleaner_never_wedges_with_memory_full_of_small_overwritten_objects(seed: int) -> None:
    """Regression: 100 B objects at 90% of the DEFAULT pool, few segments, small reserves.

    Writes got Retry forever: compacted segments were too dense for combined cleaning to pay
    (survivor overhead was overestimated) and the tombstones of the dead objects, which a
    cleaning of their targets would retire, were not counted as a benefit.
    """
    config = StorageConfig(
        total_bytes=2 << 20,
        segment_size=64 << 10,
        seglet_size=2 << 10,
        cleaner_reserve_segments=2,
        write_limit=0.98,
        hash_table_bytes=64 << 10,
    )
    now = [0.0]
    om = ObjectManager(config, clock=lambda: now[0])
    om.add_tablet(1)
    value = b"v" * 92
    keys = int(0.90 * om.log.default_pool_bytes / object_entry_size(8, len(value)))
    rng = random.Random(seed)
    steps = 0

    def write(key_id: int) -> None:
        nonlocal steps
        for _ in range(2000):
            try:
                om.write(1, key_id.to_bytes(8, "big"), value)
            except Retry:
                steps += 1
                assert om.cleaner.step(1.0, now[0]), "writes refused and the cleaner is idle"
            else:
                now[0] += 0.001
                return
        raise AssertionError("write still refused after 2000 cleaner steps")

    for key_id in range(keys):
        write(key_id)
    for _ in range(config.total_bytes // object_entry_size(8, len(value))):
        write(rng.randrange(keys))
    assert steps > 0  # the workload did fill memory
    for key_id in rng.sample(range(keys), 50):
        assert om.read(1, key_id.to_bytes(8, "big"))[0] == value


@pytest.mark.parametrize("seed", [1, 2])
def test_cleaner_keeps_up_at_90_percent_of_total_memory_on_a_small_log(seed: int) -> None:
    """Regression: 1 KB objects at 90% of *total* memory (reserves included), a 4 MiB log
    with a 2-segment survivor reserve (``rpcfast-perf cleaner --quick`` at 90%).

    Writes got Retry forever: survivors of a pass had to fit in the free seglets all at once,
    and no pair of dense segments freed a whole one, nor did a head find a whole free segment
    to roll over into. Sources are now emptied and freed one after the other, and heads grow
    from the seglets the cleaner frees a few at a time.
    """
    config = SMALL_LOG_AT_90
    now = [0.0]
    om = ObjectManager(config, clock=lambda: now[0])
    om.add_tablet(1)
    value = b"v" * 992
    keys = int(0.90 * config.total_bytes / object_entry_size(8, len(value)))
    rng = random.Random(seed)
    versions: dict[int, int] = {}
    refused = 0

    def write(key_id: int) -> None:
        nonlocal refused
        for _ in range(5000):
            try:
                versions[key_id] = om.write(1, key_id.to_bytes(8, "big"), value)
            except Retry:
                refused += 1
                assert om.cleaner.step(1.0, now[0]), "writes refused and the cleaner is idle"
            else:
                now[0] += 0.001
                if om.cleaner.wants_to_run():
                    om.cleaner.step(1.0, now[0])
                return
        raise AssertionError(f"write still refused after 5000 cleaner steps: {om.stats()}")

    for key_id in range(keys):
        write(key_id)
    for _ in range(keys // 4):
        write(rng.randrange(keys))
    stats = om.stats()
    assert stats.objects == keys
    assert stats.live_bytes == keys * object_entry_size(8, len(value))
    assert stats.cleaner.segments_cleaned > 0 and stats.cleaner.aborted_passes == 0
    for key_id in rng.sample(range(keys), 200):
        got, version = om.read(1, key_id.to_bytes(8, "big"))
        assert bytes(got) == value and version == versions[key_id]


def test_a_pass_takes_on_a_bounded_number_of_index_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction pass's setup is numpy work over all its sources' entries in one step: past
    MAX_PASS_ENTRIES it takes no further source (its first always), and the cleaner still
    keeps up at ~65% of the log (combined cleaning, which is not capped, included)."""
    cap = 2500  # BOUNDED's segments hold ~970 entries of these objects: two fit, three do not
    monkeypatch.setattr(_cleaner, "MAX_PASS_ENTRIES", cap)
    m = ObjectManager(BOUNDED, clock=JitterClock(3))
    m.add_tablet(1)
    rng = random.Random(4)
    passes: set[int] = set()
    keys = 10_000  # ~65% of the log
    for i in range(40_000):
        _write(m, b"k%05d" % (i if i < keys else rng.randrange(keys)), b"v" * 100, 1e9)
        if i % 8 == 0:
            m.cleaner.step(1.0, 1e9)
            job = m.cleaner._pass
            if isinstance(job, _cleaner._Compaction) and id(job) not in passes:
                passes.add(id(job))
                sizes = [len(seg.idx) for seg in job.sources]
                assert len(sizes) == 1 or sum(sizes) <= cap, sizes
    stats = m.stats().cleaner
    assert stats.compactions + stats.cleanings > 20
    for k in rng.sample(range(keys), 100):
        assert m.read(1, b"k%05d" % k)[0] == b"v" * 100


@pytest.mark.parametrize("cap", [10**9, 1000])
def test_the_pass_entry_cap_limits_how_many_sources_compaction_takes(
    cap: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cleaner, "MAX_PASS_ENTRIES", cap)
    m = ObjectManager(attrs.evolve(BOUNDED, cleaner_bytes_per_step=1 << 20), clock=JitterClock(1))
    m.add_tablet(1)
    for i in range(9000):  # ~9 segments, then every other object overwritten: all compactable
        _write(m, b"k%05d" % i, b"v" * 100, 1e9)
    for i in range(0, 9000, 2):
        _write(m, b"k%05d" % i, b"w" * 100, 1e9)
    job = m.cleaner._start_compaction()
    assert isinstance(job, _cleaner._Compaction)
    sizes = [len(seg.idx) for seg in job.sources]
    if cap == 10**9:
        assert len(sizes) > 1 and sum(sizes) > 1000  # the cap below has something to cut
    else:
        assert len(sizes) == 1  # the first source always, however many entries it has


@pytest.mark.parametrize("compaction", [True, False])
def test_an_interrupted_step_stops_after_one_small_unit_and_loses_nothing(
    compaction: bool,
) -> None:
    """A step whose ``interrupt`` always says "a request waits" does one unit of work (a batch
    of at most ``INTERRUPTIBLE_BATCH_UNITS``, a scan chunk, a commit), and passes cut that
    fine still finish with every write intact."""
    config = attrs.evolve(
        BOUNDED,
        cleaner_bytes_per_step=1 << 30,
        compaction_enabled=compaction,
        tombstone_ratio=0.15,
    )
    sink = SurvivorBytesSink()
    m = ObjectManager(config, replica_sink=sink, clock=JitterClock(5))
    sink.log = m.log
    m.add_tablet(1)
    asked = 0

    def interrupt() -> bool:
        nonlocal asked
        asked += 1
        return True

    entry = object_entry_size(6, 100)
    batch = _cleaner.INTERRUPTIBLE_BATCH_UNITS + entry + entry // 8 + COST_ENTRY
    scan = 2 * COST_BATCH + COST_SCAN_ENTRY * _cleaner.INTERRUPTIBLE_SCAN_CHUNK
    commit = COST_COMMIT_SEGMENT * (2 * config.max_live_segments_per_pass + 2) + 8 * (
        config.total_bytes // config.segment_size
    )
    rng = random.Random(5)
    keys = [b"k%05d" % i for i in range(4500)]
    model: dict[bytes, bytes] = {}
    steps = cut = 0
    for i in range(14_000):
        key = keys[rng.randrange(len(keys))] if i >= len(keys) else keys[i]
        value = bytes([i % 251]) * 100
        for _ in range(2000):
            try:
                m.write(1, key, value)
                break
            except Retry:
                m.cleaner.step(10.0, 1e9, interrupt)
        model[key] = value
        if m.cleaner.wants_to_run():
            before = m.cleaner.stats()
            asked_before = asked
            m.cleaner.step(10.0, 1e9, interrupt)
            after = m.cleaner.stats()
            finished = after.cleanings + after.compactions > before.cleanings + before.compactions
            steps += 1
            cut += m.cleaner.busy
            assert asked > asked_before or not m.cleaner.last_step_work
            assert m.cleaner.last_step_work <= max(batch, scan) + (commit if finished else 0)
    stats = m.cleaner.stats()
    assert steps > 100 and cut > 50  # passes really were cut into many one-unit steps
    assert stats.cleanings > 0
    assert (stats.compactions > 0) is compaction
    _model_check(m, model)
    assert sink.replay() == {(1, k): (v, m.read(1, k)[1]) for k, v in model.items()}


def test_a_sequential_pass_batches_several_whole_sources_while_their_ages_follow_on() -> None:
    """When survivors may not all exist at once (memory nearly full), a pass empties its
    sources one after the other. A batch still goes on from one source into the next, as long
    as the next one's oldest entry is no older than the batch's last (survivors stay in age
    order), the batch has room, and the survivors of the batch plus the next whole source
    surely fit: one batch's fixed numpy work then serves several small sources."""
    sink = RecordingSink()
    config = SMALL_LOG_AT_90
    now = [0.0]
    om = ObjectManager(config, replica_sink=sink, clock=lambda: now[0])
    om.add_tablet(1)
    value = b"v" * 992
    keys = int(0.90 * config.total_bytes / object_entry_size(8, len(value)))
    rng = random.Random(5)
    model: dict[bytes, bytes] = {}
    cleaner = om.cleaner

    def write(key_id: int) -> None:
        key = key_id.to_bytes(8, "big")
        sized = value[: 900 + key_id % 90]
        for _ in range(5000):
            try:
                om.write(1, key, sized)
            except Retry:
                assert cleaner.step(1.0, now[0])
            else:
                model[key] = sized
                now[0] += 0.001
                if cleaner.wants_to_run():
                    cleaner.step(1.0, now[0])
                return
        raise AssertionError("write still refused")

    def finish_pass() -> None:
        while cleaner.busy:
            cleaner.step(1.0, now[0])

    for key_id in range(keys):
        write(key_id)
    spanned = 0
    for _ in range(8):
        for _ in range(keys // 8):
            write(rng.randrange(keys))
        finish_pass()
        job = cleaner._start_cleaning(now[0])
        if job is None or not job.sequential:
            continue
        budget = _cleaner._Budget(1 << 40, math.inf, lambda: 0.0)
        while not cleaner._scan(job, budget):
            pass
        e = job.entries
        assert e is not None
        runs = [r for r, run in enumerate(job.runs) if len(run)]
        # What the first batch may take, by the rule: whole runs while it holds.
        want: list[int] = [runs[0]]
        ahead = int(e.size[job.runs[runs[0]]].sum())
        for r in runs[1:]:
            if job.run_keys[r][0] < job.run_keys[want[-1]][-1]:
                break
            if not cleaner._fits_next(job, job.sources[r], ahead):
                break
            want.append(r)
            ahead += int(e.size[job.runs[r]].sum())
        ids = cleaner._next_batch(job, 1 << 40)
        expected = [int(i) for r in want for i in job.runs[r]]
        assert ids.tolist() == expected
        assert sorted(set(e.src[ids].tolist())) == want
        spanned += len(want) > 1
        cleaner._pass = job  # the rest of the pass as the cleaner runs it
        finish_pass()
    assert spanned >= 2
    assert om.stats().cleaner.aborted_passes == 0
    _model_check(om, model)
    assert sink.replay() == {(1, k): (v, om.read(1, k)[1]) for k, v in model.items()}
    digest_holders = {sid for sid, d in sink.replicas.items() if _has_digest(d)}
    for sid in set(sink.replicas) - digest_holders - sink.freed:
        stamps = [
            e.timestamp
            for _, e in iter_entries_untrusted(sink.replicas[sid])
            if isinstance(e, ObjectEntry | TombstoneEntry)
        ]
        assert stamps == sorted(stamps)
