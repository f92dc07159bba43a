"""Seglets, the seglet allocator with its reserve pools, and in-memory segments.

All log memory is one arena cut into fixed-size seglets. A segment is an ordered list of seglets, so
a compacted segment can shrink to fewer seglets without a general-purpose allocator (paper section
5.1). Entries never cross a segment boundary but may cross seglet boundaries; the read paths hand
out a zero-copy ``memoryview`` when an entry lies inside one seglet and a copy otherwise.
"""

from __future__ import annotations

import enum
import mmap
from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from services.kvstore.log._entries import Buffer

PAGE_SIZE = mmap.PAGESIZE

# The per-segment entry index (see :class:`Segment`): one 64-bit word per entry,
# ``offset << IDX_OFFSET_SHIFT | aux << IDX_SHIFT | flags``, so the words of a segment ascend.
# An object's aux is the low IDX_AUX_BITS of its key hash: enough to name its hash-table bucket
# (the table finds an entry by bucket and reference, the secondary hash is not needed).
IDX_TOMB = 1  # a tombstone; its aux is the id of the segment that held its object
IDX_NO_HASH = 2  # an object whose key hash was not given (its aux is 0): the cleaner hashes it
IDX_OTHER = 4  # not a cleaner candidate (no aux)
IDX_FLAGS = 7
IDX_SHIFT = 3
IDX_AUX_BITS = 37
IDX_AUX_MASK = (1 << IDX_AUX_BITS) - 1
IDX_OFFSET_SHIFT = IDX_SHIFT + IDX_AUX_BITS  # 40: 24 bits of segment offset above
_NO_HUGE_PAGES = getattr(mmap, "MADV_NOHUGEPAGE", None)
FEW_RUNS = 32  # copy_runs cuts this many runs or fewer in plain Python


def anonymous_zeros(nbytes: int, *, prefault: bool = False) -> np.ndarray:
    """A zero-filled byte array in its own anonymous mapping, backed by small pages.

    Not ``np.zeros``: numpy asks for transparent huge pages on large arrays, and with the
    kernel's ``defrag=madvise`` setting the first touch of each 2 MiB page then stalls for up
    to ~10 ms (zeroing plus compaction) inside whatever request or cleaner slice touched it.
    Small pages fault in ~3-6 us each instead. ``prefault`` touches every page now (about
    0.4-0.6 s per 512 MiB here) so that no request pays even that.
    """
    region = mmap.mmap(-1, max(nbytes, 1))
    if _NO_HUGE_PAGES is not None:
        try:
            region.madvise(_NO_HUGE_PAGES)
        except OSError:  # kernels without transparent huge pages refuse the advice
            pass
    array = np.frombuffer(region, dtype=np.uint8, count=nbytes)
    if prefault:
        array[::PAGE_SIZE] = 0
    return array


def copy_runs(
    arena: memoryview,
    seglet_size: int,
    bases: np.ndarray,
    src_first: np.ndarray,
    src_off: np.ndarray,
    dst_first: np.ndarray,
    dst_off: np.ndarray,
    length: np.ndarray,
) -> None:
    """Copy many runs of bytes between segments: one slice copy per contiguous stretch.

    Run ``r`` moves ``length[r]`` bytes from offset ``src_off[r]`` of one segment to offset
    ``dst_off[r]`` of another; a segment is named by where its seglets' arena positions start
    in ``bases`` (``src_first[r]``, ``dst_first[r]``). The runs are cut wherever either side
    crosses a seglet boundary, with numpy, and stretches that stay contiguous on both sides
    are merged, so the Python loop does nothing but slice copies.

    A few runs (long live stretches of a dense segment) are cut in plain Python instead: the
    numpy way costs ~40 calls, ~150 us whatever the size, three times the copying itself for
    the ~10 runs of a 1 KB-object batch.
    """
    size = seglet_size
    count = len(length)
    if count == 0:
        return
    if count <= FEW_RUNS:
        _copy_few_runs(arena, size, bases, src_first, src_off, dst_first, dst_off, length)
        return
    stream = np.cumsum(length) - length  # where each run starts in the copied stream
    total = int(stream[-1] + length[-1])
    runs = np.arange(count)
    cuts = [stream]
    for off in (src_off, dst_off):
        first = size - off % size  # run-relative position of its first seglet boundary
        n = np.maximum(0, (length - first + size - 1) // size)
        if n.any():
            which = np.repeat(runs, n)
            k = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            cuts.append(stream[which] + first[which] + k * size)
    at = stream
    if len(cuts) > 1:  # sorted, duplicates dropped (np.unique would import numpy.ma)
        at = np.sort(np.concatenate(cuts))
        at = at[np.concatenate(([True], at[1:] != at[:-1]))]
    n = np.diff(np.append(at, total))
    run = np.searchsorted(stream, at, side="right") - 1
    x = at - stream[run]
    s = src_off[run] + x
    d = dst_off[run] + x
    spos = bases[src_first[run] + s // size] + s % size
    dpos = bases[dst_first[run] + d // size] + d % size
    if len(n) > 1:
        joined = (spos[1:] == spos[:-1] + n[:-1]) & (dpos[1:] == dpos[:-1] + n[:-1])
        if joined.any():
            keep = np.flatnonzero(np.concatenate(([True], ~joined)))
            n = np.add.reduceat(n, keep)
            spos = spos[keep]
            dpos = dpos[keep]
    for a, b, c in zip(spos.tolist(), dpos.tolist(), n.tolist(), strict=True):
        arena[b : b + c] = arena[a : a + c]


def _copy_few_runs(
    arena: memoryview,
    size: int,
    bases: np.ndarray,
    src_first: np.ndarray,
    src_off: np.ndarray,
    dst_first: np.ndarray,
    dst_off: np.ndarray,
    length: np.ndarray,
) -> None:
    """:func:`copy_runs` for a few runs: each cut where either side crosses a seglet, pieces
    that stay contiguous on both sides merged, in plain Python."""
    at = bases.tolist()
    pa = pb = pn = 0  # the piece being extended: source and destination positions, length
    for sf, so, df, do, n in zip(
        src_first.tolist(),
        src_off.tolist(),
        dst_first.tolist(),
        dst_off.tolist(),
        length.tolist(),
        strict=True,
    ):
        si, sr = divmod(so, size)
        di, dr = divmod(do, size)
        si += sf
        di += df
        a = at[si] + sr
        b = at[di] + dr
        s_left = size - sr  # bytes to the end of the current seglet on each side
        d_left = size - dr
        while n:
            c = n if n <= s_left else s_left
            if c > d_left:
                c = d_left
            if pn and a == pa + pn and b == pb + pn:
                pn += c
            else:
                if pn:
                    arena[pb : pb + pn] = arena[pa : pa + pn]
                pa, pb, pn = a, b, c
            n -= c
            s_left -= c
            d_left -= c
            if s_left:
                a += c
            else:
                si += 1
                if n:
                    a = at[si]
                s_left = size
            if d_left:
                b += c
            else:
                di += 1
                if n:
                    b = at[di]
                d_left = size
    if pn:
        arena[pb : pb + pn] = arena[pa : pa + pn]


class Pool(enum.IntEnum):
    """Seglet pools. Freed seglets refill EMERGENCY_HEAD, then CLEANER, then DEFAULT."""

    DEFAULT = 0
    CLEANER = 1
    EMERGENCY_HEAD = 2


class SegletAllocator:
    """Owns the arena and hands out seglet numbers from three pools.

    The CLEANER pool is the survivor reserve and EMERGENCY_HEAD holds two head segments' worth, so
    the cleaner can always make progress and the log can always roll over to write a new digest
    (paper section 7). Refilling the reserves first on every free keeps them full.
    """

    def __init__(
        self,
        total_seglets: int,
        seglet_size: int,
        emergency_seglets: int,
        cleaner_seglets: int,
        *,
        prefault: bool = False,
    ) -> None:
        if emergency_seglets + cleaner_seglets >= total_seglets:
            raise ValueError("reserves leave no seglets for the DEFAULT pool")
        self.seglet_size = seglet_size
        self.total_seglets = total_seglets
        self.arena = anonymous_zeros(total_seglets * seglet_size, prefault=prefault)
        self.view = self.arena.data
        order = list(range(total_seglets - 1, -1, -1))  # pop() hands out low numbers first
        self._targets = {
            Pool.EMERGENCY_HEAD: emergency_seglets,
            Pool.CLEANER: cleaner_seglets,
            Pool.DEFAULT: total_seglets - emergency_seglets - cleaner_seglets,
        }
        self._free: dict[Pool, list[int]] = {
            Pool.EMERGENCY_HEAD: order[total_seglets - emergency_seglets :],
            Pool.CLEANER: order[
                total_seglets - emergency_seglets - cleaner_seglets : total_seglets
                - emergency_seglets
            ],
            Pool.DEFAULT: order[: total_seglets - emergency_seglets - cleaner_seglets],
        }

    def capacity(self, pool: Pool) -> int:
        """Seglets the pool holds when nothing is allocated from it."""
        return self._targets[pool]

    def free_count(self, pool: Pool) -> int:
        return len(self._free[pool])

    def is_free(self, seglet: int) -> bool:
        """Whether ``seglet`` sits in a free pool (a linear scan: for checks, not hot paths)."""
        return any(seglet in free for free in self._free.values())

    def total_free(self) -> int:
        free = self._free
        return len(free[Pool.DEFAULT]) + len(free[Pool.CLEANER]) + len(free[Pool.EMERGENCY_HEAD])

    def alloc(self, pool: Pool, count: int) -> list[int] | None:
        """Take ``count`` seglets from ``pool``, or None (taking nothing) if it has fewer."""
        free = self._free[pool]
        if len(free) < count:
            return None
        taken = free[len(free) - count :]
        del free[len(free) - count :]
        taken.reverse()
        return taken

    def free(self, seglets: Iterable[int]) -> None:
        """Return seglets, refilling the emergency and cleaner reserves before DEFAULT."""
        rest = seglets if isinstance(seglets, list) else list(seglets)
        for pool in (Pool.EMERGENCY_HEAD, Pool.CLEANER):
            free = self._free[pool]
            short = self._targets[pool] - len(free)
            if short > 0:
                free.extend(rest[:short])
                rest = rest[short:]
        self._free[Pool.DEFAULT].extend(rest)


class SegmentState(enum.Enum):
    HEAD = "head"
    CLOSED = "closed"  # in the log, cleanable
    SURVIVOR = "survivor"  # written by the cleaner, joins the log at the next digest
    COMPACTING = "compacting"  # a compaction target; replaces its source when done
    EMERGENCY_HEAD = "emergency-head"  # digest only, never cleaned, freed at the next roll-over
    FREED = "freed"  # waiting for in-flight reads to end before its seglets are reused


class Segment:
    """One segment in memory: its seglets, fill level and live-byte accounting.

    ``live_bytes`` counts live objects and live tombstones in this segment; ``capacity`` is the
    logical size (the full segment size: compaction shrinks memory, not the segment on backups).
    ``limit`` is where appends must stop: the capacity or the end of the seglets held.

    ``idx`` indexes every entry after the segment's metadata, in order, one packed word each
    (offset, the low key-hash bits or a tombstone's target segment id, flags: see ``IDX_*``).
    Entries are back to back, so an entry ends where the next starts (the last at ``length``).
    The appenders write it; the cleaner reads it as a numpy array instead of parsing entries
    one by one. It costs 8 bytes an entry until the segment is cleaned; :meth:`seal_index`
    drops the growth slack once the segment stops growing.
    """

    __slots__ = (
        "_bases",
        "_mv",
        "capacity",
        "created",
        "id",
        "idx",
        "length",
        "limit",
        "live_bytes",
        "seglet_size",
        "seglets",
        "slot",
        "state",
        "tombstone_bytes",
    )

    def __init__(
        self,
        segment_id: int,
        slot: int,
        seglets: list[int],
        arena: memoryview,
        seglet_size: int,
        capacity: int,
        created: float,
        state: SegmentState,
    ) -> None:
        self.id = segment_id
        self.slot = slot
        self.seglets = seglets
        self._mv = arena
        self.seglet_size = seglet_size
        self._bases = [s * seglet_size for s in seglets]
        self.capacity = capacity
        self.limit = min(capacity, len(seglets) * seglet_size)
        self.length = 0
        self.live_bytes = 0
        self.tombstone_bytes = 0
        self.created = created
        self.state = state
        self.idx: array[int] = array("Q")

    def __repr__(self) -> str:
        return (
            f"Segment(id={self.id}, slot={self.slot}, state={self.state.value}, "
            f"length={self.length}, live={self.live_bytes}, seglets={len(self.seglets)})"
        )

    @property
    def bases(self) -> list[int]:
        """Arena positions of the segment's seglets, in order (read-only for callers)."""
        return self._bases

    @property
    def allocated_bytes(self) -> int:
        return len(self.seglets) * self.seglet_size

    def room(self) -> int:
        """Bytes that can still be appended with the seglets already held."""
        return self.limit - self.length

    def grow(self, seglets: list[int]) -> None:
        self.seglets.extend(seglets)
        self._bases.extend(s * self.seglet_size for s in seglets)
        self.limit = min(self.capacity, len(self.seglets) * self.seglet_size)

    def trim(self) -> list[int]:
        """Drop (and return) the trailing seglets that hold no bytes."""
        keep = max(1, -(-self.length // self.seglet_size))
        spare = self.seglets[keep:]
        del self.seglets[keep:]
        del self._bases[keep:]
        self.limit = min(self.capacity, len(self.seglets) * self.seglet_size)
        return spare

    def give_up_seglets(self) -> list[int]:
        """Hand every seglet back (the segment is dead); it can hold nothing afterwards."""
        seglets = self.seglets
        self.seglets = []
        self._bases = []
        self.limit = 0
        self.idx = array("Q")
        return seglets

    def index_entry(self, offset: int, flags: int, aux: int) -> None:
        """Record the entry just appended at ``offset`` (appenders call this once per entry)."""
        self.idx.append(offset << IDX_OFFSET_SHIFT | (aux & IDX_AUX_MASK) << IDX_SHIFT | flags)

    def seal_index(self) -> None:
        """Copy the index to an exact-size array: a closed segment's index no longer grows,
        and a growable one holds up to 1/16 spare (more while the heap is fragmented)."""
        self.idx = array("Q", self.idx)

    def positions(self, offsets: np.ndarray) -> np.ndarray:
        """Arena positions of the segment offsets ``offsets`` (int64 numpy arrays)."""
        bases = np.array(self._bases, dtype=np.int64)
        out: np.ndarray = bases[offsets // self.seglet_size] + offsets % self.seglet_size
        return out

    def claim(self, n: int) -> int:
        """Take the next ``n`` bytes if they fit and lie in one seglet: their arena position.

        Returns -1 (taking nothing) otherwise; the caller then appends piecewise or rolls over.
        This is the request paths' append: the caller encodes the entries in place.
        """
        start = self.length
        if start + n > self.limit:
            return -1
        idx, off = divmod(start, self.seglet_size)
        if off + n > self.seglet_size:
            return -1
        self.length = start + n
        return self._bases[idx] + off

    def append(self, parts: Sequence[Buffer]) -> int:
        """Copy ``parts`` back to back at the end; return where they start. Caller checks room."""
        start = self.length
        offset = start
        for part in parts:
            n = len(part)
            if n:
                self.write(offset, part)
                offset += n
        self.length = offset
        return start

    def write(self, offset: int, data: Buffer) -> None:
        size = self.seglet_size
        mv = self._mv
        n = len(data)
        idx, off = divmod(offset, size)
        if off + n <= size:
            pos = self._bases[idx] + off
            mv[pos : pos + n] = data
            return
        src = memoryview(data).cast("B")
        done = 0
        while done < n:
            chunk = min(size - off, n - done)
            pos = self._bases[idx] + off
            mv[pos : pos + chunk] = src[done : done + chunk]
            done += chunk
            idx += 1
            off = 0

    def read(self, offset: int, n: int) -> Buffer:
        """Bytes ``[offset, offset+n)``: a view into the arena if inside one seglet, else a copy."""
        size = self.seglet_size
        idx, off = divmod(offset, size)
        if off + n <= size:
            pos = self._bases[idx] + off
            return self._mv[pos : pos + n]
        out = bytearray(n)
        done = 0
        mv = self._mv
        while done < n:
            chunk = min(size - off, n - done)
            pos = self._bases[idx] + off
            out[done : done + chunk] = mv[pos : pos + chunk]
            done += chunk
            idx += 1
            off = 0
        return bytes(out)

    def entry_at(self, offset: int) -> tuple[int, memoryview, int, int, int]:
        """Decode the entry at ``offset``: ``(type, buffer, content_start, content_len, total)``.

        ``buffer[content_start : content_start + content_len]`` is the content; the buffer is the
        arena itself when the entry lies in one seglet (zero copy), else a private copy.
        """
        size = self.seglet_size
        idx, off = divmod(offset, size)
        mv = self._mv
        pos = self._bases[idx] + off
        first = mv[pos]
        if first < 0x40 and off + 2 <= size:  # the common case: a one-byte length
            length = mv[pos + 1]
            if off + 2 + length <= size:
                return first, mv, pos + 2, length, length + 2
        nlen = (first >> 6) + 1
        if off + 1 + nlen <= size:
            length = int.from_bytes(mv[pos + 1 : pos + 1 + nlen], "little")
        else:
            length = int.from_bytes(self.read(offset + 1, nlen), "little")
        total = 1 + nlen + length
        if off + total <= size:
            return first & 0x3F, mv, pos + 1 + nlen, length, total
        return first & 0x3F, memoryview(self.read(offset + 1 + nlen, length)), 0, length, total

    def entries(self, start: int = 0) -> Iterator[tuple[int, int, int]]:
        """Yield ``(offset, type, total_size)`` for each entry from ``start`` to the fill level."""
        offset = start
        end = self.length
        while offset < end:
            entry_type, _buf, _pos, _n, total = self.entry_at(offset)
            yield offset, entry_type, total
            offset += total
