"""The compact hash table: one 8-byte entry per object, eight entries per 64-byte bucket.

Entry layout (MSB to LSB, as in RAMCloud's ``HashTable``): 16-bit secondary hash, 1 chain bit,
47-bit reference. The table maps key hashes to opaque references and knows nothing of objects:
:meth:`HashTable.lookup` returns every candidate whose secondary hash matches and the caller
compares keys. A full bucket's last entry becomes a chain pointer (chain bit set, reference
field = bucket number) to a bucket in a growable overflow area, so an insert never fails.
The main area never resizes, which keeps enumeration cursors (bucket numbers) stable across
writes and cleaning. An overflow bucket that empties at the end of its chain is unlinked and
kept for reuse: under churn nearly every bucket passes nine entries at some moment, so keeping
them all would cost about half the main area again (W1: 1 MB beside a 2 MB main area) where
only the few buckets over eight *now* need one. Unlinking moves no live entry, so slots stay
valid.

The entries live in numpy arrays (for the whole-table sweeps), but the per-request paths scan a
bucket with one C call (``_encode.bucket_scan``: a bitmask of the entries whose secondary hash
matches, and the chain pointer) and read or write single entries through a memoryview: numpy
element access from Python costs ~100 ns per item, and the pure twin's ``struct.unpack_from``
into a tuple of eight Python ints cost about a microsecond per lookup.
"""

from __future__ import annotations

import struct
from array import array

import numpy as np

from services.kvstore.log._entries import Buffer
from services.kvstore.log._segments import IDX_AUX_BITS, anonymous_zeros

ENTRIES_PER_BUCKET = 8
BUCKET_BYTES = 64
REF_BITS = 47
REF_MASK = (1 << REF_BITS) - 1
CHAIN_BIT = 1 << REF_BITS
_BUCKET = struct.Struct("<8Q")
_LAST = ENTRIES_PER_BUCKET - 1
_TAG_BITS = np.uint64(0xFFFF << 48)
_CHAIN = np.uint64(CHAIN_BIT)
# An entry's reference field with its chain bit: equal to a reference only in a live object's
# entry (references are nonzero and have no chain bit), whatever its secondary hash.
_REF_FIELD = CHAIN_BIT | REF_MASK
_REF_FIELD_NP = np.uint64(_REF_FIELD)
_MATCHES = (1 << ENTRIES_PER_BUCKET) - 1


def bucket_scan_py(area: Buffer, entry: int, tag: int) -> int:
    """The bucket whose first entry is ``area[entry]``: bit i set when entry i is in use and its
    top 17 bits (secondary hash and chain bit) equal ``tag``; bits 8 and up the bucket its
    chain pointer names (0: none). Pure twin of ``_encode.bucket_scan``."""
    row = _BUCKET.unpack_from(area, entry * 8)
    mask = 0
    for i in range(ENTRIES_PER_BUCKET):
        e = row[i]
        if e and e >> REF_BITS == tag:
            mask |= 1 << i
    last = row[_LAST]
    if last & CHAIN_BIT:
        mask |= (last & REF_MASK) << 8
    return mask


try:  # one C call per bucket (built with the compiled engine), else struct's tuple of ints
    from services.kvstore.log._encode import bucket_scan
except ImportError:
    bucket_scan = bucket_scan_py


class HashTable:
    """Key hash -> log reference; references are nonzero 47-bit integers."""

    def __init__(self, num_buckets: int, *, prefault: bool = False) -> None:
        if num_buckets < 1 or num_buckets & (num_buckets - 1):
            raise ValueError("num_buckets must be a power of two")
        if num_buckets > 1 << IDX_AUX_BITS:
            # The cleaner finds an object's entry from the low key-hash bits its segment's
            # entry index keeps (IDX_AUX_BITS of them), so those must name the bucket.
            raise ValueError(f"too many buckets for a {IDX_AUX_BITS}-bit bucket index")
        self.num_buckets = num_buckets
        self._mask = num_buckets - 1
        # Small pages, like the log arena: buckets are touched at random, and a huge-page fault
        # on first touch would stall a request for milliseconds.
        self._main = anonymous_zeros(num_buckets * BUCKET_BYTES, prefault=prefault).view(np.uint64)
        self._main_mv = self._main.data
        self._ovf = np.zeros(4 * ENTRIES_PER_BUCKET, dtype=np.uint64)
        self._ovf_mv = self._ovf.data
        self._ovf_used = 0  # overflow buckets in chains
        self._ovf_top = 0  # overflow buckets ever handed out (the area's high-water mark)
        self._ovf_free: list[int] = []  # unlinked overflow buckets below _ovf_top
        self._ovf_prev = array("Q")  # per overflow bucket: the bucket whose chain slot names it
        self._main_entries = num_buckets * ENTRIES_PER_BUCKET
        self.count = 0

    @classmethod
    def for_memory(cls, table_bytes: int, *, prefault: bool = False) -> HashTable:
        """A table of ``table_bytes / 64`` buckets, rounded down to a power of two (as RAMCloud)."""
        buckets = max(1, table_bytes // BUCKET_BYTES)
        return cls(1 << (buckets.bit_length() - 1), prefault=prefault)

    @property
    def nbytes(self) -> int:
        """Bytes of table memory held: the main area plus the overflow area's buckets up to
        its high-water mark (unlinked ones included: they stay resident for reuse)."""
        return self._main.nbytes + self._ovf_top * BUCKET_BYTES

    @property
    def overflow_buckets(self) -> int:
        return self._ovf_used

    def _area(self, bucket: int) -> tuple[memoryview, int]:
        """The memoryview holding ``bucket`` and the index of its first entry there."""
        if bucket < self.num_buckets:
            return self._main_mv, bucket * ENTRIES_PER_BUCKET
        return self._ovf_mv, (bucket - self.num_buckets) * ENTRIES_PER_BUCKET

    def lookup(self, key_hash: int) -> list[int]:
        """References whose secondary hash matches ``key_hash``; the caller compares keys."""
        tag = key_hash >> 48 << 1  # compared with e >> 47: chain pointers (bit 47) never match
        area = self._main_mv
        first = (key_hash & self._mask) * ENTRIES_PER_BUCKET
        out: list[int] = []
        while True:
            found = bucket_scan(area, first, tag)
            matches = found & _MATCHES
            while matches:
                low = matches & -matches
                out.append(area[first + low.bit_length() - 1] & REF_MASK)
                matches ^= low
            chain = found >> 8
            if not chain:
                return out
            area, first = self._area(chain)

    def candidates(self, key_hash: int) -> list[tuple[int, int]]:
        """Like :meth:`lookup`, as ``(reference, slot)`` pairs.

        A slot is the entry's position, for :meth:`set_slot` and :meth:`clear_slot` later in
        the same request, which saves searching the bucket again; any :meth:`insert` in
        between may move entries and invalidates it.
        """
        tag = key_hash >> 48 << 1
        bucket = key_hash & self._mask
        area = self._main_mv
        first = bucket * ENTRIES_PER_BUCKET
        out: list[tuple[int, int]] = []
        while True:
            found = bucket_scan(area, first, tag)
            matches = found & _MATCHES
            while matches:
                low = matches & -matches
                i = low.bit_length() - 1
                # slots number main and overflow entries alike: bucket * 8 + i
                out.append((area[first + i] & REF_MASK, bucket * ENTRIES_PER_BUCKET + i))
                matches ^= low
            bucket = found >> 8
            if not bucket:
                return out
            area, first = self._area(bucket)

    def set_slot(self, slot: int, key_hash: int, ref: int) -> None:
        """Point the entry at ``slot`` (from :meth:`candidates`) at ``ref``."""
        if slot < self._main_entries:
            self._main_mv[slot] = key_hash >> 48 << 48 | ref
        else:
            self._ovf_mv[slot - self._main_entries] = key_hash >> 48 << 48 | ref

    def clear_slot(self, slot: int) -> None:
        """Delete the entry at ``slot`` (from :meth:`candidates`)."""
        if slot < self._main_entries:
            self._main_mv[slot] = 0
        else:
            i = slot - self._main_entries
            self._ovf_mv[i] = 0
            self._release_if_empty(i // ENTRIES_PER_BUCKET)
        self.count -= 1

    def _release_if_empty(self, ovf: int) -> None:
        """Unlink overflow bucket ``ovf`` (area-relative) if all its slots are empty, then its
        predecessor likewise. An empty bucket holds no chain pointer, so it ends its chain;
        its predecessor's chain slot becomes a free slot. No live entry moves."""
        mv = self._ovf_mv
        while not any(_BUCKET.unpack_from(mv, ovf * BUCKET_BYTES)):
            prev = self._ovf_prev[ovf]
            pmv, first = self._area(prev)
            pmv[first + _LAST] = 0
            self._ovf_free.append(ovf)
            self._ovf_used -= 1
            if prev < self.num_buckets:
                return
            ovf = prev - self.num_buckets

    def contains(self, key_hash: int, ref: int) -> bool:
        return self._find(key_hash, ref) is not None

    def _find(self, key_hash: int, ref: int) -> tuple[memoryview, int] | None:
        want = key_hash >> 48 << 48 | ref
        mv = self._main_mv
        first = (key_hash & self._mask) * ENTRIES_PER_BUCKET
        while True:
            row = _BUCKET.unpack_from(mv, first * 8)
            if want in row:
                return mv, first + row.index(want)
            last = row[_LAST]
            if not last & CHAIN_BIT:
                return None
            mv, first = self._area(last & REF_MASK)

    def insert(self, key_hash: int, ref: int) -> None:
        """Add an entry (the caller has checked that the key is not present already)."""
        if not 0 < ref <= REF_MASK:
            raise ValueError("reference must be a nonzero 47-bit integer")
        entry = key_hash >> 48 << 48 | ref
        bucket = key_hash & self._mask
        mv = self._main_mv
        first = bucket * ENTRIES_PER_BUCKET
        while True:
            row = _BUCKET.unpack_from(mv, first * 8)
            if 0 in row:
                mv[first + row.index(0)] = entry
                self.count += 1
                return
            last = row[_LAST]
            if not last & CHAIN_BIT:
                break
            bucket = last & REF_MASK
            mv, first = self._area(bucket)
        # Every slot of the chain is full: hang a new overflow bucket off the last one. The
        # overflow area may be reallocated here, so views are taken again afterwards.
        new_bucket = self._new_overflow_bucket(bucket)
        new_mv, new_first = self._area(new_bucket)
        mv, first = self._area(bucket)
        new_mv[new_first] = mv[first + _LAST]
        new_mv[new_first + 1] = entry
        mv[first + _LAST] = CHAIN_BIT | new_bucket
        self.count += 1

    def _new_overflow_bucket(self, prev: int) -> int:
        """An empty overflow bucket (a reused one first) to hang off bucket ``prev``."""
        self._ovf_used += 1
        if self._ovf_free:
            ovf = self._ovf_free.pop()
            self._ovf_prev[ovf] = prev
            return self.num_buckets + ovf
        if (self._ovf_top + 1) * ENTRIES_PER_BUCKET > len(self._ovf):
            grown = np.zeros(2 * len(self._ovf), dtype=np.uint64)
            grown[: len(self._ovf)] = self._ovf
            self._ovf = grown
            self._ovf_mv = grown.data
        ovf = self._ovf_top
        self._ovf_top += 1
        self._ovf_prev.append(prev)
        return self.num_buckets + ovf

    def replace(self, key_hash: int, old_ref: int, new_ref: int) -> bool:
        """Compare-and-swap: point the entry for ``old_ref`` at ``new_ref``; False if absent."""
        tag = key_hash >> 48 << 48
        want = tag | old_ref
        mv = self._main_mv
        first = (key_hash & self._mask) * ENTRIES_PER_BUCKET
        while True:  # _find, inlined: this runs on every overwrite and every cleaner copy
            row = _BUCKET.unpack_from(mv, first * 8)
            if want in row:
                mv[first + row.index(want)] = tag | new_ref
                return True
            last = row[_LAST]
            if not last & CHAIN_BIT:
                return False
            mv, first = self._area(last & REF_MASK)

    def remove(self, key_hash: int, ref: int) -> bool:
        """Delete the entry for ``ref``; False if it is not there."""
        found = self._find(key_hash, ref)
        if found is None:
            return False
        mv, i = found
        mv[i] = 0
        if mv is self._ovf_mv:
            self._release_if_empty(i // ENTRIES_PER_BUCKET)
        self.count -= 1
        return True

    def slot_of(self, key_hash: int, ref: int) -> int:
        """The slot (as :meth:`candidates` numbers them) holding ``ref``, or -1.

        Only the bucket bits of ``key_hash`` are used: a reference is unique in the table.
        """
        mv = self._main_mv
        bucket = key_hash & self._mask
        first = bucket * ENTRIES_PER_BUCKET
        while True:
            row = _BUCKET.unpack_from(mv, first * 8)
            for i, e in enumerate(row):
                if e & _REF_FIELD == ref:
                    return bucket * ENTRIES_PER_BUCKET + i
            last = row[_LAST]
            if not last & CHAIN_BIT:
                return -1
            bucket = last & REF_MASK
            mv, first = self._area(bucket)

    def areas(self) -> tuple[np.ndarray, np.ndarray]:
        """The main and overflow areas (uint64 arrays, eight entries a bucket) for the
        cleaner's C compaction, which probes and repoints entries in place. The overflow
        array is replaced when it grows: ask again for every batch."""
        return self._main, self._ovf

    def find_slots(self, hashes: np.ndarray, refs: np.ndarray) -> np.ndarray:
        """Slots of many ``(key hash, reference)`` entries at once (int64; -1 where absent).

        A reference is unique, so an entry is live iff its reference is in its bucket chain;
        only the hashes' bucket bits are used (the cleaner's entry index keeps no more).
        Main buckets are searched with a few numpy passes; only entries missing from a main
        bucket that chains on are looked up one by one.
        """
        n = len(hashes)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        bucket = (hashes & np.uint64(self._mask)).astype(np.int64)
        rows = self._main.reshape(-1, ENTRIES_PER_BUCKET)[bucket]
        eq = (rows & _REF_FIELD_NP) == refs[:, None]
        hit = eq.any(axis=1)
        slots = np.where(hit, bucket * ENTRIES_PER_BUCKET + eq.argmax(axis=1), -1)
        chained = np.flatnonzero(~hit & ((rows[:, _LAST] & _CHAIN) != 0))
        for i in chained.tolist():
            slots[i] = self.slot_of(int(hashes[i]), int(refs[i]))
        return slots

    def set_slots(self, slots: np.ndarray, refs: np.ndarray) -> None:
        """Point the entries at ``slots`` (from :meth:`find_slots`) at ``refs``, in one pass;
        each keeps its secondary hash."""
        main = slots < self._main_entries
        if main.all():
            self._main[slots] = (self._main[slots] & _TAG_BITS) | refs
            return
        at = slots[main]
        self._main[at] = (self._main[at] & _TAG_BITS) | refs[main]
        for i in np.flatnonzero(~main).tolist():
            j = int(slots[i]) - self._main_entries
            self._ovf[j] = (self._ovf[j] & _TAG_BITS) | refs[i]

    def bucket_refs(self, bucket: int) -> list[int]:
        """Every reference in main bucket ``bucket`` and its overflow chain."""
        out: list[int] = []
        while True:
            mv, first = self._area(bucket)
            row = _BUCKET.unpack_from(mv, first * 8)
            out += [e & REF_MASK for e in row if e and not e & CHAIN_BIT]
            last = row[_LAST]
            if not last & CHAIN_BIT:
                return out
            bucket = last & REF_MASK

    def occupied_buckets(self, start: int, count: int) -> list[int]:
        """Main bucket numbers in ``[start, start+count)`` holding at least one entry."""
        stop = min(self.num_buckets, start + count)
        if start >= stop:
            return []
        rows = self._main[start * ENTRIES_PER_BUCKET : stop * ENTRIES_PER_BUCKET].reshape(
            -1, ENTRIES_PER_BUCKET
        )
        return [int(i) + start for i in np.flatnonzero(rows.any(axis=1))]

    def all_refs(self) -> list[int]:
        """Every reference in the table (for whole-table sweeps such as dropping a table)."""
        out: list[int] = []
        for arr in (self._main, self._ovf[: self._ovf_top * ENTRIES_PER_BUCKET]):
            live = arr[(arr != 0) & ((arr & np.uint64(CHAIN_BIT)) == 0)]
            out.extend(int(x) & REF_MASK for x in live)
        return out
