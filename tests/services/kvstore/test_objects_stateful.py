"""The object manager against a plain dict, with the cleaner interleaved between operations.

The arena is small (1 MiB, 32 KiB segments of 4 KiB seglets) and the values large, so live
data reaches ~80% of the write limit and memory is allocated to the last seglet: the cleaner has
to compact and clean constantly, in slices, while reads, writes, removes, increments and table
drops run between them. Every read, every version and the live-byte count are checked.
"""

from __future__ import annotations

import attrs
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from services.kvstore import (
    InvalidParameter,
    ObjectDoesntExist,
    ObjectExists,
    ObjectManager,
    RejectRules,
    Retry,
    StorageConfig,
    WrongVersion,
)
from services.kvstore.log import object_entry_size
from services.kvstore.log._log import TOMB_CELL_SHIFT, TOMB_COUNT_MASK

CONFIG = StorageConfig(
    total_bytes=1 << 20,
    segment_size=32 << 10,
    seglet_size=4 << 10,
    cleaner_reserve_segments=2,
    cleaner_bytes_per_step=6 << 10,
)
TABLES = (1, 2)
KEYS = [b"key-%02d" % i for i in range(18)]
sizes = st.one_of(st.integers(0, 64), st.integers(1000, 20_000))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class KvModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.om = ObjectManager(CONFIG, clock=self.clock)
        self.model: dict[tuple[int, bytes], tuple[bytes, int]] = {}
        self.last_version: dict[tuple[int, bytes], int] = {}  # survives removes and drops
        self.retries = 0

    @initialize(compaction=st.booleans())
    def setup(self, compaction: bool) -> None:
        if not compaction:
            self.om = ObjectManager(
                attrs.evolve(CONFIG, compaction_enabled=False), clock=self.clock
            )
        for t in TABLES:
            self.om.add_tablet(t)

    # -- helpers ---------------------------------------------------------------------

    def _tick(self) -> None:
        self.clock.now += 1.0
        self.om.cleaner.step(1.0, self.clock.now)

    def _retrying(self, op: str, table: int, key: bytes, arg: bytes | int) -> int | tuple[int, int]:
        """Run a write, remove or increment; on Retry the cleaner must make room (a remove's
        tombstone needs log space too), or it is a deadlock."""
        for _ in range(30):
            try:
                if op == "write":
                    assert isinstance(arg, bytes)
                    return self.om.write(table, key, arg)
                if op == "remove":
                    return self.om.remove(table, key)
                assert isinstance(arg, int)
                return self.om.increment(table, key, arg)
            except Retry:
                self.retries += 1
                for _ in range(2000):
                    if not self.om.cleaner.step(1.0, self.clock.now):
                        break
        raise AssertionError(f"{op} stuck on Retry: {self.om.stats()}")

    def _stored(self, table: int, key: bytes, value: bytes, version: int) -> None:
        k = (table, key)
        old = self.model.get(k)
        if old is not None:
            assert version == old[1] + 1
        else:
            assert version > self.last_version.get(k, 0)
        self.model[k] = (value, version)
        self.last_version[k] = version

    # -- rules -----------------------------------------------------------------------

    @rule(
        table=st.sampled_from(TABLES),
        key=st.sampled_from(KEYS),
        size=sizes,
        fill=st.integers(0, 255),
    )
    def write(self, table: int, key: bytes, size: int, fill: int) -> None:
        value = bytes([fill]) * size
        version = self._retrying("write", table, key, value)
        assert isinstance(version, int)
        self._stored(table, key, value, version)
        self._tick()

    @rule(table=st.sampled_from(TABLES), size=st.integers(8000, 20_000), fill=st.integers(0, 255))
    def fill_table(self, table: int, size: int, fill: int) -> None:
        for key in KEYS:
            value = bytes([fill]) * size
            version = self._retrying("write", table, key, value)
            assert isinstance(version, int)
            self._stored(table, key, value, version)
            self._tick()

    @rule(
        table=st.sampled_from(TABLES),
        key=st.sampled_from(KEYS),
        kind=st.sampled_from(["exists", "doesnt_exist", "le", "ne"]),
        offset=st.integers(-1, 1),
    )
    def conditional_write(self, table: int, key: bytes, kind: str, offset: int) -> None:
        current = self.model.get((table, key))
        version = current[1] if current else 0
        given = max(0, version + offset)
        rules = RejectRules(
            given_version=given,
            exists=kind == "exists",
            doesnt_exist=kind == "doesnt_exist",
            version_le_given=kind == "le",
            version_ne_given=kind == "ne",
        )
        expected: type[Exception] | None = None
        if current is None:
            expected = ObjectDoesntExist if rules.doesnt_exist else None
        elif rules.exists:
            expected = ObjectExists
        elif (rules.version_le_given and version <= given) or (
            rules.version_ne_given and version != given
        ):
            expected = WrongVersion
        try:
            new = self.om.write(table, key, b"cond", rules)
        except Retry:
            return
        except (ObjectDoesntExist, ObjectExists, WrongVersion) as exc:
            assert type(exc) is expected
            return
        assert expected is None
        self._stored(table, key, b"cond", new)
        self._tick()

    @rule(table=st.sampled_from(TABLES), key=st.sampled_from(KEYS))
    def remove(self, table: int, key: bytes) -> None:
        removed = self._retrying("remove", table, key, 0)
        current = self.model.pop((table, key), None)
        assert removed == (current[1] if current else 0)
        self._tick()

    @rule(table=st.sampled_from(TABLES), key=st.sampled_from(KEYS), delta=st.integers(-1000, 1000))
    def increment(self, table: int, key: bytes, delta: int) -> None:
        current = self.model.get((table, key))
        if current is not None and len(current[0]) != 8:
            try:
                self.om.increment(table, key, delta)
            except InvalidParameter:
                return
            raise AssertionError("increment of a non-8-byte value succeeded")
        old = int.from_bytes(current[0], "little", signed=True) if current else 0
        result = self._retrying("increment", table, key, delta)
        assert isinstance(result, tuple)
        value, version = result
        assert value == old + delta
        self._stored(table, key, value.to_bytes(8, "little", signed=True), version)
        self._tick()

    @precondition(lambda self: bool(self.model))
    @rule(table=st.sampled_from(TABLES))
    def drop_table(self, table: int) -> None:
        gone = [k for k in self.model if k[0] == table]
        assert self.om.drop_table(table) == len(gone)
        for k in gone:
            del self.model[k]
        self.om.add_tablet(table)
        self._tick()

    @rule(slices=st.integers(1, 40))
    def clean(self, slices: int) -> None:
        for _ in range(slices):
            self.clock.now += 0.5
            self.om.cleaner.step(1.0, self.clock.now)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def reads_match(self) -> None:
        for table in TABLES:
            for key in KEYS:
                expected = self.model.get((table, key))
                try:
                    value, version = self.om.read(table, key)
                except ObjectDoesntExist:
                    assert expected is None
                    continue
                assert expected is not None
                assert (bytes(value), version) == expected

    @invariant()
    def accounting_matches(self) -> None:
        s = self.om.stats()
        assert s.objects == len(self.model)
        assert s.live_bytes == sum(
            object_entry_size(len(k), len(v)) for (_t, k), (v, _ver) in self.model.items()
        )
        assert s.free_seglets + s.seglets_in_use == s.total_seglets
        assert s.tombstone_bytes >= 0
        # the cleaner's tombstone ledger: per target segment, one cell per holder
        log = self.om.log
        total_bytes = total_count = 0
        for segment_id in log.segments:
            cells = log.tombstone_holders(segment_id).values()
            assert all(c & TOMB_COUNT_MASK > 0 for c in cells)
            held = sum(c >> TOMB_CELL_SHIFT for c in cells)
            assert log.retirable_bytes(segment_id) == held
            total_bytes += held
            total_count += sum(c & TOMB_COUNT_MASK for c in cells)
        assert (total_bytes, total_count) == (log.live_tombstone_bytes, log.tombstone_count)


KvModel.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
test_object_manager_against_model = KvModel.TestCase


def test_cleaner_really_works_in_the_model_setup() -> None:
    """The stateful test's setup does force cleaning: fill twice, then check the counters."""
    m = KvModel()
    m.setup(compaction=True)
    for fill in range(6):
        for table in TABLES:
            m.fill_table(table, 20_000, fill)
    m.reads_match()
    m.accounting_matches()
    s = m.om.stats()
    assert s.cleaner.compactions + s.cleaner.cleanings > 0
    assert s.live_bytes > 0.75 * s.write_limit_bytes
    m.teardown()
