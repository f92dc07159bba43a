"""The compact hash table: candidates, compare-and-swap, overflow chains, memory per object."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.kvstore.log import HashTable
from services.kvstore.log._hashtable import (
    CHAIN_BIT,
    ENTRIES_PER_BUCKET,
    REF_MASK,
    bucket_scan_py,
)
from services.kvstore.log._segments import IDX_AUX_BITS, IDX_AUX_MASK


def _h(bucket: int, secondary: int) -> int:
    return secondary << 48 | bucket


def test_lookup_returns_candidates_with_matching_secondary_hash_only() -> None:
    t = HashTable(16)
    t.insert(_h(3, 7), 100)
    t.insert(_h(3, 8), 200)
    t.insert(_h(3 + 16, 7), 300)  # same bucket, same secondary: a real collision
    assert sorted(t.lookup(_h(3, 7))) == [100, 300]
    assert t.lookup(_h(3, 8)) == [200]
    assert t.lookup(_h(4, 7)) == []


def test_replace_is_compare_and_swap() -> None:
    t = HashTable(4)
    t.insert(_h(1, 1), 10)
    assert not t.replace(_h(1, 1), 11, 12)
    assert t.replace(_h(1, 1), 10, 12)
    assert t.lookup(_h(1, 1)) == [12]
    assert not t.contains(_h(1, 1), 10)


def test_full_bucket_chains_into_overflow_and_never_fails() -> None:
    t = HashTable(2)
    refs = list(range(1, 101))
    for r in refs:
        t.insert(_h(0, r), r)
    assert t.count == 100
    assert t.overflow_buckets >= 100 // 7 - 1
    for r in refs:
        assert t.lookup(_h(0, r)) == [r]
    assert sorted(t.bucket_refs(0)) == refs
    for r in refs[::2]:
        assert t.remove(_h(0, r), r)
    assert sorted(t.all_refs()) == refs[1::2]
    # Freed slots in the chain are reused without growing the overflow area.
    used = t.overflow_buckets
    for r in refs[::2]:
        t.insert(_h(0, r), r + 1000)
    assert t.overflow_buckets == used


def _chained_overflow_buckets(t: HashTable) -> int:
    """Overflow buckets reachable from the main area through chain pointers."""
    last = ENTRIES_PER_BUCKET - 1
    seen = 0
    for b in range(t.num_buckets):
        e = int(t._main[b * ENTRIES_PER_BUCKET + last])
        while e & CHAIN_BIT:
            seen += 1
            i = (e & REF_MASK) - t.num_buckets
            e = int(t._ovf[i * ENTRIES_PER_BUCKET + last])
    return seen


def test_emptied_overflow_buckets_are_unlinked_and_reused() -> None:
    t = HashTable(2)
    refs = list(range(1, 201))
    for r in refs:
        t.insert(_h(0, r), r)
    grown = t.overflow_buckets
    held = t.nbytes
    assert grown >= 200 // 7 - 1
    for r in refs[8:]:  # back to what fits in the main bucket, removed newest first
        assert t.remove(_h(0, r), r)
    assert t.overflow_buckets == _chained_overflow_buckets(t) <= 1
    for r in refs[:8]:
        assert t.remove(_h(0, r), r)
    assert t.overflow_buckets == _chained_overflow_buckets(t) == 0
    assert t.lookup(_h(0, 1)) == [] and t.all_refs() == []
    # Churn through another bucket reuses the unlinked buckets: the area does not grow.
    for r in refs:
        t.insert(_h(1, r), r)
    assert t.overflow_buckets == grown
    assert t.nbytes == held
    assert sorted(t.bucket_refs(1)) == refs
    slots = t.find_slots(np.full(len(refs), 1, dtype=np.uint64), np.array(refs, dtype=np.uint64))
    assert (slots >= 0).all()


def test_occupied_buckets_skips_empty_ones() -> None:
    t = HashTable(64)
    for b in (2, 9, 40):
        t.insert(_h(b, 1), b + 1)
    assert t.occupied_buckets(0, 64) == [2, 9, 40]
    assert t.occupied_buckets(10, 20) == []
    assert t.occupied_buckets(60, 100) == []


def test_bad_arguments_rejected() -> None:
    with pytest.raises(ValueError):
        HashTable(3)
    t = HashTable(1)
    with pytest.raises(ValueError):
        t.insert(0, 0)
    with pytest.raises(ValueError):
        t.insert(0, 1 << 47)


def test_memory_per_object_stays_compact() -> None:
    n = 20_000
    t = HashTable.for_memory(n * 12)  # the RAMCloud rule: table sized from memory
    rng = random.Random(5)
    for i in range(n):
        t.insert(rng.getrandbits(64), i + 1)
    assert t.count == n
    assert t.nbytes / n <= 16


class HashTableModel(RuleBasedStateMachine):
    """Random inserts, swaps and removes against a dict, in a tiny table to force chains."""

    def __init__(self) -> None:
        super().__init__()
        self.table = HashTable(4)
        self.model: dict[int, int] = {}  # ref -> hash
        self.next_ref = 1

    @rule(bucket=st.integers(0, 7), secondary=st.integers(0, 3))
    def insert(self, bucket: int, secondary: int) -> None:
        h = _h(bucket, secondary)
        self.table.insert(h, self.next_ref)
        self.model[self.next_ref] = h
        self.next_ref += 1

    @rule(data=st.data())
    def replace(self, data: st.DataObject) -> None:
        if not self.model:
            return
        ref = data.draw(st.sampled_from(sorted(self.model)))
        h = self.model.pop(ref)
        assert self.table.replace(h, ref, self.next_ref)
        self.model[self.next_ref] = h
        self.next_ref += 1

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        if not self.model:
            return
        ref = data.draw(st.sampled_from(sorted(self.model)))
        assert self.table.remove(self.model.pop(ref), ref)
        assert not self.table.remove(_h(0, 0), ref)

    @rule(data=st.data(), remove=st.booleans())
    def through_slot(self, data: st.DataObject, remove: bool) -> None:
        """What the object manager does: find the entry once, then swap or clear it there."""
        if not self.model:
            return
        ref = data.draw(st.sampled_from(sorted(self.model)))
        h = self.model.pop(ref)
        (slot,) = [s for r, s in self.table.candidates(h) if r == ref]
        if remove:
            self.table.clear_slot(slot)
        else:
            self.table.set_slot(slot, h, self.next_ref)
            self.model[self.next_ref] = h
            self.next_ref += 1

    @invariant()
    def agrees(self) -> None:
        assert sorted(self.table.all_refs()) == sorted(self.model)
        assert self.table.count == len(self.model)
        assert self.table.overflow_buckets == _chained_overflow_buckets(self.table)
        for ref, h in self.model.items():
            assert ref in self.table.lookup(h)
        for ref, h in self.model.items():
            assert ref in self.table.lookup(h)
            assert sorted(r for r, _ in self.table.candidates(h)) == sorted(self.table.lookup(h))


HashTableModel.TestCase.settings = settings(max_examples=40, stateful_step_count=60, deadline=None)
test_hash_table_model = HashTableModel.TestCase


def test_find_slots_and_set_slots_agree_with_the_one_by_one_paths() -> None:
    """The cleaner's batch probe finds exactly the live (hash, ref) pairs, in main buckets and
    overflow chains alike, and its batch update repoints exactly those entries."""
    import numpy as np

    t = HashTable(4)  # tiny: most entries end up in overflow chains
    rng = random.Random(5)
    live = {_h(rng.randrange(1 << 40), rng.randrange(1 << 16)): r for r in range(1, 200)}
    for h, r in live.items():
        t.insert(h, r)
    dead = [(_h(rng.randrange(1 << 40), rng.randrange(1 << 16)), r) for r in range(500, 540)]
    # A live entry's bucket bits suffice (the cleaner's entry index keeps no secondary hash);
    # a dead reference is absent even from a live key's bucket.
    pairs = (
        [(h & IDX_AUX_MASK, r) for h, r in live.items()]
        + dead
        + [(h, r + 1000) for h, r in list(live.items())[:20]]
    )
    hashes = np.array([h for h, _ in pairs], dtype=np.uint64)
    refs = np.array([r for _, r in pairs], dtype=np.uint64)
    slots = t.find_slots(hashes, refs)
    assert [int(s) >= 0 for s in slots] == [i < len(live) for i in range(len(pairs))]
    assert [int(s) for s in slots[: len(live)]] == [t.slot_of(h, r) for h, r in live.items()]
    assert t.find_slots(hashes[:0], refs[:0]).shape == (0,)
    found = slots >= 0
    t.set_slots(slots[found], refs[found] + np.uint64(10_000))
    for h, r in live.items():
        assert r + 10_000 in t.lookup(h)  # the secondary hash is kept
        assert not t.contains(h, r)
    assert t.count == len(live)


def test_buckets_must_be_named_by_the_hash_bits_the_entry_index_keeps() -> None:
    """The cleaner finds entries from IDX_AUX_BITS of key hash: a bigger table is refused."""
    with pytest.raises(ValueError, match="bucket index"):
        HashTable(1 << (IDX_AUX_BITS + 1))


_entry = st.one_of(
    st.just(0),
    st.integers(1, REF_MASK),  # a reference with tag 0
    st.builds(lambda tag, ref: tag << 48 | ref, st.integers(0, 0xFFFF), st.integers(1, REF_MASK)),
    st.builds(lambda b: CHAIN_BIT | b, st.integers(1, 1 << 20)),  # a chain pointer
    st.integers(0, (1 << 64) - 1),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_entry, min_size=8, max_size=24),
    st.integers(0, 16),
    st.one_of(st.integers(0, 0xFFFF).map(lambda t: t << 1), st.integers(0, (1 << 17) - 1)),
)
def test_bucket_scan_in_c_matches_its_pure_twin(entries: list[int], entry: int, tag: int) -> None:
    encode = pytest.importorskip("services.kvstore.log._encode")
    area = np.array(entries, dtype=np.uint64).data
    if entry + ENTRIES_PER_BUCKET > len(entries):
        with pytest.raises(IndexError):
            encode.bucket_scan(area, entry, tag)
        return
    got = encode.bucket_scan(area, entry, tag)
    assert got == bucket_scan_py(area, entry, tag)
    row = entries[entry : entry + ENTRIES_PER_BUCKET]
    assert got & 0xFF == sum(1 << i for i, e in enumerate(row) if e and e >> 47 == tag)
    assert got >> 8 == (row[-1] & REF_MASK if row[-1] & CHAIN_BIT else 0)


def test_bucket_scan_rejects_bad_arguments() -> None:
    encode = pytest.importorskip("services.kvstore.log._encode")
    area = np.zeros(8, dtype=np.uint64).data
    assert encode.bucket_scan(area, 0, 0) == 0
    with pytest.raises(IndexError):
        encode.bucket_scan(area, 1, 0)
    with pytest.raises(OverflowError):
        encode.bucket_scan(area, -1, 0)
    with pytest.raises(TypeError):
        encode.bucket_scan(area, 0)
    with pytest.raises(TypeError):
        encode.bucket_scan(12, 0, 0)
