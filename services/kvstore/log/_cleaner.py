"""The two-level log cleaner: segment compaction and combined cleaning, run in bounded slices.

Segment compaction rewrites one segment's live entries into fewer seglets (memory only; the
segment keeps its id and its replicas). Combined cleaning takes several segments chosen by
cost-benefit with *segment* age, ``(1-u)*age/u`` (paper section 9), sorts their live entries by
age into survivor segments, and drops the cleaned segments from the log with a new digest; the
replica sink sees survivors opened, appended and closed, then the cleaned segments freed. The
tombstone-ratio balancer (RAMCloud's default ``tombstoneRatio:0.40``) picks the task; memory
use is measured as in the paper (section 5.2), against all log memory with the reserve pools
counted as unallocated.

There are no threads: :meth:`LogCleaner.step` does a bounded slice of work and returns, so a
server calls it from its event loop between requests.

Relocation works on batches of entries with numpy, never parsing entries one by one: every
segment carries an index written at append time (offset, flags, key hash or tombstone target;
see :class:`~services.kvstore.log.Segment`). For a batch, liveness is one vectorised probe of
the hash table (a reference is unique, so an object is live iff its bucket chain holds exactly
its reference), runs of live entries that are contiguous in the source are copied with one
slice copy each, and the hash table is repointed with one scatter. Check, copy and repoint
happen in the same slice, so an object overwritten or removed between slices is never
resurrected. Copying bytes keeps each entry's checksum, which recovery verifies; the cleaner
trusts its own memory as the request paths do. Where the C kernels are built
(``_relocate.c``), a compaction batch is one call, and combined cleaning's probes, timestamp
gathers and placements are one call each; the numpy path is their twin.

Combined cleaning scans each source once (its index plus the entries' timestamps, gathered
with numpy), sorts each source's candidates by age, and relocates in global age order by
merging the per-source runs a batch at a time. A source is emptied as soon as the merge has
passed its last candidate, and its seglets are given back right then (they stay unreachable to
new data until readers are done), so the survivors of later sources can use them: a pass needs
room for about one source's survivors, not all of them, and dense segments can be cleaned with
only the survivor reserve free. Sources are ordered by age as well, so they usually empty in
turn.

Work is charged against ``cleaner_bytes_per_step`` in bytes-copied equivalents (``COST_*``); a
step overruns its budget by at most one batch, and batches are sized to the budget left.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable
from typing import Protocol

import attrs
import numpy as np

from services.kvstore.errors import InternalError
from services.kvstore.log._entries import SEGMENT_HEADER_ENTRY_SIZE
from services.kvstore.log._hashtable import HashTable
from services.kvstore.log._log import OFFSET_BITS, TOMB_CELL_SHIFT, Log, StorageConfig
from services.kvstore.log._segments import (
    IDX_AUX_MASK,
    IDX_FLAGS,
    IDX_NO_HASH,
    IDX_OFFSET_SHIFT,
    IDX_OTHER,
    IDX_SHIFT,
    IDX_TOMB,
    Pool,
    Segment,
    SegmentState,
    copy_runs,
)

try:  # compaction's inner loop in C (built with the compiled engine), else the numpy path
    from services.kvstore.log import _relocate
except ImportError:
    _relocate = None  # type: ignore[assignment]


def _c_kernel() -> bool:
    """Whether compaction's C kernel is there (tests take it away to compare the paths)."""
    return _relocate is not None


MAX_CLEANABLE_MEMORY_UTILIZATION = 98
MIN_DISK_UTILIZATION = 95

# Work units charged against cleaner_bytes_per_step, in bytes-copied equivalents.
COST_BATCH = 256  # per batch: a dozen numpy calls on its entries
COST_ENTRY = 2  # per entry considered, plus an eighth of its size, plus its size if copied
COST_SCAN_ENTRY = 2  # per entry of a source scanned for a cleaning pass (a source a unit)
COST_COMMIT_SEGMENT = 512  # per segment the commit touches (survivors, cleaned, the log's)
MAX_BATCH = 4096  # entries in one batch at most
COMPACT_AT_ONCE = 16  # segments compacted in one pass at most
# Index entries a compaction pass takes on at most (its first source always): its setup (the
# _Entries arrays) is numpy work over all of them in one step, and sixteen 8 MB segments of
# 100-byte objects hold ~1.5M entries (~60-100 ms). Compaction frees memory one source at a
# time, so a smaller pass costs only amortisation. Combined cleaning is not capped: a pass of
# too few sources may not pay for its survivors, and the cleaner wedged in tests when it was.
MAX_PASS_ENTRIES = 1 << 17
# Candidates merged for one combined-cleaning batch at most: each of k runs offers
# MERGE_ELEMENTS // k (a batch never takes more from all runs together, which keeps the merge
# exact); thirty runs of MAX_BATCH each made every batch sort 120k keys (~5 ms).
MERGE_ELEMENTS = 8192
# Index entries a cleaning scan reads in one go (a step reads at least one chunk).
SCAN_CHUNK = 16384
# Work one batch may take in an interruptible step (``LogCleaner.step``'s ``interrupt``): a
# waiting request waits for at most one batch, tens of microseconds, not for the whole slice.
INTERRUPTIBLE_BATCH_UNITS = 16 * 1024
# The scan's chunk in an interruptible step, in index entries.
INTERRUPTIBLE_SCAN_CHUNK = 2048


class CleanerHandlers(Protocol):
    """What the cleaner needs from the owner of the hash table (the object manager)."""

    @property
    def hash_table(self) -> HashTable:
        """The table the cleaner probes and repoints in batches."""
        ...

    def object_hash_if_live(self, ref: int) -> int | None:
        """The key hash of the object entry at ``ref`` if the hash table points at it, else None.

        Only for objects appended without their key hash (the index marks them).
        """
        ...


class CleanerTask(enum.Enum):
    SLEEP = "sleep"
    COMPACT = "compact"
    CLEAN = "clean"


def choose_task(
    *,
    memory_utilization: float,
    live_utilization: float,
    tombstone_utilization: float,
    disk_utilization: float,
    compaction_enabled: bool,
    compaction_failed: bool,
    tombstone_ratio: float = 0.40,
) -> CleanerTask:
    """RAMCloud's ``TombstoneRatioBalancer`` for one cleaner (all arguments in percent).

    Memory is low when ``T >= max(90, (100+L)/2)``. Combined cleaning runs when the backup log is
    95% full, or when memory is low and compaction is off, has just freed nothing, or undead
    tombstones reach ``ratio * (100 - L)``; otherwise compaction runs if memory is low.
    """
    memory_low = memory_utilization >= max(90.0, (100.0 + live_utilization) / 2.0)
    if disk_utilization >= MIN_DISK_UTILIZATION:
        return CleanerTask.CLEAN
    if memory_low and (
        not compaction_enabled
        or compaction_failed
        or tombstone_utilization >= tombstone_ratio * (100.0 - live_utilization)
    ):
        return CleanerTask.CLEAN
    if memory_low and compaction_enabled:
        return CleanerTask.COMPACT
    return CleanerTask.SLEEP


def cleaning_score(
    live_bytes: int, segment_size: int, age: float, retirable_bytes: int = 0
) -> float:
    """Cost-benefit of cleaning a segment: ``(100-u)*age/u`` with u its integer percent use.

    ``u`` is measured against ``segment_size``: the full segment size for the replica on
    backups, or the memory the segment holds when cleaning for memory. ``age`` is the
    segment's age, not its objects' (paper section 9); an empty segment scores infinity.
    ``retirable_bytes`` (live tombstones elsewhere that die when the segment leaves the log)
    count as freeable: without them a dense segment full of overwritten objects' successors'
    tombstones would never be chosen, and those tombstones could never go.
    """
    u = max(0, live_bytes - retirable_bytes) * 100 // segment_size
    return math.inf if u == 0 else (100 - u) * max(0.0, age) / u


def compaction_score(live_bytes: int, freeable_seglets: int, seglet_size: int) -> float:
    """How much compacting a segment pays: freeable bytes per live byte (x1000, as RAMCloud)."""
    if live_bytes == 0:
        return math.inf
    return 1000.0 * freeable_seglets * seglet_size / live_bytes


@attrs.frozen
class CleanerStats:
    compactions: int
    cleanings: int
    segments_compacted: int
    segments_cleaned: int
    survivor_segments: int
    bytes_relocated: int
    entries_relocated: int
    seglets_freed: int
    compaction_failures: int
    aborted_passes: int
    emergency_heads_used: int
    # Live and allocated bytes of the segments chosen, at choosing time: their ratio is the
    # memory utilisation the cleaner works at, which sets the bytes copied per byte freed.
    compacted_live_bytes: int
    compacted_allocated_bytes: int
    cleaned_live_bytes: int
    cleaned_allocated_bytes: int


class _Budget:
    """What one step may still do: work units, and time until ``deadline`` on ``timer``.

    With an ``interrupt`` (a step that yields to waiting requests), batches take at most
    ``INTERRUPTIBLE_BATCH_UNITS`` each and the step also ends as soon as ``interrupt()`` says so.
    """

    __slots__ = ("deadline", "interrupt", "quantum", "timer", "units")

    def __init__(
        self,
        units: int,
        deadline: float,
        timer: Callable[[], float],
        interrupt: Callable[[], bool] | None = None,
    ) -> None:
        self.units = units
        self.deadline = deadline
        self.timer = timer
        self.interrupt = interrupt
        self.quantum = INTERRUPTIBLE_BATCH_UNITS if interrupt is not None else units

    def batch_units(self) -> int:
        """Work the next batch may take."""
        return min(self.units, self.quantum)

    def spent(self) -> bool:
        if self.units <= 0 or self.timer() >= self.deadline:
            return True
        interrupt = self.interrupt
        return interrupt is not None and interrupt()


_NO_SEGMENTS = np.empty(0, dtype=np.uint64)
_OFFSET_SHIFT = np.uint64(IDX_OFFSET_SHIFT)
_SHIFT = np.uint64(IDX_SHIFT)
_FLAGS = np.uint64(IDX_FLAGS)
_AUX_MASK = np.uint64(IDX_AUX_MASK)


def _index_words(off: np.ndarray, aux: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Entry-index words (see ``IDX_*``) for entries at offsets ``off`` (int64)."""
    out: np.ndarray = (
        (off.astype(np.uint64) << _OFFSET_SHIFT) | (aux << _SHIFT) | flags.astype(np.uint64)
    )
    return out


class _Entries:
    """The indexed entries of a pass's sources, as parallel numpy arrays (one row an entry).

    ``src`` numbers the source, ``off``/``size`` locate the entry in it, ``flags`` and ``aux``
    come from the index (``aux`` gets the key hash filled in for unhashed objects).
    """

    off: np.ndarray
    size: np.ndarray
    flags: np.ndarray
    aux: np.ndarray
    src: np.ndarray
    ref: np.ndarray

    def __init__(self, sources: list[Segment], span: tuple[int, int] | None = None) -> None:
        """Every entry of ``sources``; or, with ``span = (start, stop)``, entries
        ``[start, stop)`` of the one source."""
        if span is None:
            counts = [len(seg.idx) for seg in sources]
            joined = b"".join([seg.idx.tobytes() for seg in sources])
            ends_at = [seg.length for seg in sources]  # where each source's last entry ends
        else:
            (seg,) = sources
            start, stop = span
            counts = [stop - start]
            joined = seg.idx[start:stop].tobytes()
            ends_at = [seg.length if stop >= len(seg.idx) else seg.idx[stop] >> IDX_OFFSET_SHIFT]
        total = sum(counts)
        words = np.frombuffer(joined, dtype=np.uint64)
        ends = list(itertools.accumulate(counts))
        self.first: list[int] = [0, *ends[:-1]]
        self.ends = ends  # entry number just past each source's entries
        self.count = total
        slot_bits = [seg.slot << OFFSET_BITS for seg in sources]
        if _c_kernel():  # one C loop instead of a dozen numpy passes (~5% of the cleaner's time)
            assert _relocate is not None
            self.allocate(total)
            try:
                _relocate.decode_index(
                    words,
                    np.array(counts, dtype=np.int64),
                    np.array(ends_at, dtype=np.int64),
                    np.array(slot_bits, dtype=np.uint64),
                    self.off,
                    self.size,
                    self.flags,
                    self.aux,
                    self.src,
                    self.ref,
                )
            except ValueError as exc:
                raise InternalError(f"segment index inconsistent: {exc}") from exc
            return
        off = (words >> _OFFSET_SHIFT).astype(np.int64)
        size = np.empty(total, dtype=np.int64)
        size[:-1] = off[1:] - off[:-1]
        last = [e - 1 for e, c in zip(ends, counts, strict=True) if c]
        size[last] = [at for at, c in zip(ends_at, counts, strict=True) if c] - off[last]
        self.off = off
        self.size = size
        self.flags = (words & _FLAGS).astype(np.int64)
        self.aux = (words >> _SHIFT) & _AUX_MASK
        self.src = np.repeat(np.arange(len(sources), dtype=np.int64), counts)
        self.ref = np.array(slot_bits, dtype=np.uint64)[self.src] | off.astype(np.uint64)

    def allocate(self, total: int) -> None:
        """Fresh (unfilled) arrays for ``total`` entries."""
        self.off = np.empty(total, dtype=np.int64)
        self.size = np.empty(total, dtype=np.int64)
        self.flags = np.empty(total, dtype=np.int64)
        self.aux = np.empty(total, dtype=np.uint64)
        self.src = np.empty(total, dtype=np.int64)
        self.ref = np.empty(total, dtype=np.uint64)

    def keep(self, ids: np.ndarray, source: int) -> None:
        """Keep entries ``ids`` only (of a one-source block, numbered ``source`` in its pass)."""
        self.off = self.off[ids]
        self.size = self.size[ids]
        self.flags = self.flags[ids]
        self.aux = self.aux[ids]
        self.ref = self.ref[ids]
        self.src = np.full(len(ids), source, dtype=np.int64)
        self.count = len(ids)
        self.first = [0]
        self.ends = [self.count]


def _join(blocks: list[_Entries]) -> _Entries:
    """Blocks of entries as one, in order (a source's scanned chunks; the first is reused)."""
    e = blocks[0]
    if len(blocks) > 1:
        e.off = np.concatenate([b.off for b in blocks])
        e.size = np.concatenate([b.size for b in blocks])
        e.flags = np.concatenate([b.flags for b in blocks])
        e.aux = np.concatenate([b.aux for b in blocks])
        e.ref = np.concatenate([b.ref for b in blocks])
        e.src = np.concatenate([b.src for b in blocks])
        ends = np.cumsum([b.count for b in blocks])
        e.first = [0, *ends[:-1].tolist()]
        e.ends = ends.tolist()
        e.count = int(ends[-1])
    return e


class _Compaction:
    """Compaction of several segments in turn, each into its own target, in shared batches.

    A source's target is allocated just before its entries are reached, so the seglets of
    the sources compacted before it (given back as each finishes) can serve it.
    """

    def __init__(self, sources: list[Segment]) -> None:
        self.sources = sources
        self.targets: list[Segment] = []  # one per source reached so far
        self.entries = _Entries(sources)
        self.cursor = 0
        self.stop = self.entries.count  # entries of sources that got no target are skipped
        self.finished = 0  # sources whose compacted copy has replaced them
        # Seglet arena positions: every source's, then each target's as it is given one
        # (filled up to _filled); where each source's and each target's start.
        lists = [seg.bases for seg in sources]
        counts = [len(b) for b in lists]
        self._filled = sum(counts)
        self._bases = np.empty(2 * self._filled + 16, dtype=np.int64)
        self._bases[: self._filled] = list(itertools.chain.from_iterable(lists))
        self._src_first = np.cumsum([0, *counts[:-1]]).astype(np.int64)
        self._dst_first = np.zeros(len(sources), dtype=np.int64)
        self._based = 0  # targets whose seglets are in _bases
        # Each target's fill, end and reference bits for the C kernel, which advances
        # dst_length as it copies (the Segment objects get it after every batch), and what
        # the kernel moved per source in its last batch.
        n = len(sources)
        self.dst_length = np.zeros(n, dtype=np.int64)
        self.dst_limit = np.zeros(n, dtype=np.int64)
        self.dst_bits = np.zeros(n, dtype=np.uint64)
        self.acct = np.zeros(3 * n, dtype=np.int64)

    def add_target(self, target: Segment) -> None:
        k = len(self.targets)
        self.targets.append(target)
        self.dst_length[k] = target.length
        self.dst_limit[k] = target.limit
        self.dst_bits[k] = target.slot << OFFSET_BITS

    def sync_lengths(self) -> None:
        """After the numpy path moved entries: the C kernel's view of the targets' fill."""
        for g, t in enumerate(self.targets):
            self.dst_length[g] = t.length

    def bases(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(bases, src_first, dst_first)`` for the sources that have targets (copy_runs):
        arena positions of seglets, and where each source and target starts."""
        k = self.sync_bases()
        return self._bases[: self._filled], self._src_first[:k], self._dst_first[:k]

    def sync_bases(self) -> int:
        """Add the seglets of targets given since the last call; returns the targets."""
        k = len(self.targets)
        while self._based < k:
            b = self.targets[self._based].bases
            end = self._filled + len(b)
            if end > len(self._bases):
                self._bases = np.concatenate((self._bases, np.empty(end, dtype=np.int64)))
            self._bases[self._filled : end] = b
            self._dst_first[self._based] = self._filled
            self._filled = end
            self._based += 1
        return k


class _Cleaning:
    """A combined-cleaning pass.

    With room for all survivors (``sequential`` False) live entries move in global age order.
    Otherwise the sources are relocated one after the other (oldest first, each in age
    order), so each is emptied, and its seglets freed, before the next one starts.
    """

    def __init__(self, sources: list[Segment], reservation: list[int], *, sequential: bool) -> None:
        self.sources = sources  # oldest first
        self.source_ids = {s.id for s in sources}
        self.source_id_array = np.array([s.id for s in sources], dtype=np.uint64)
        self.reservation = reservation
        self.sequential = sequential
        # Tombstones not copied because their target leaves the log with this pass:
        # (source, target id, bytes).
        self.dropped: list[tuple[Segment, int, int]] = []
        self.entries: _Entries | None = None  # set once every source is scanned
        self.joined: _Entries | None = None  # the scanned sources' live entries, filled in
        self.scanned = 0  # live entries in joined
        self.scan_pos = 0  # index entries of the source being scanned read so far
        self.chunks: list[_Entries] = []  # its live entries so far, and their timestamps
        self.chunk_stamps: list[np.ndarray] = []
        self.scan_index = 0
        # Per source: its candidates' entry numbers in age order, and how many are consumed.
        self.runs: list[np.ndarray] = []
        self.run_keys: list[np.ndarray] = []
        self.cursors: list[int] = []
        self.left: list[int] = []  # candidates of each source not yet relocated or dropped
        self.last_key = 0  # timestamp of the last candidate taken
        self.emptied: set[int] = set()  # ids of sources whose memory is given back
        self.freed_seglets = 0
        self.relocated_all = False
        self.item_index = 0
        self.item_count = 0
        self.survivors: list[Segment] = []
        self.current: Segment | None = None
        self.flushed = 0
        self.aborted = False


class LogCleaner:
    """Frees log memory in slices; see the module docstring. Call :meth:`step` often."""

    def __init__(
        self,
        log: Log,
        handlers: CleanerHandlers,
        config: StorageConfig | None = None,
        *,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._log = log
        self._handlers = handlers
        self._config = config if config is not None else log.config
        self._timer = timer  # what step budgets are measured on
        self._pass: _Compaction | _Cleaning | None = None
        self.last_step_work = 0
        self._compaction_failed = False
        self._compactions = 0
        self._cleanings = 0
        self._segments_compacted = 0
        self._segments_cleaned = 0
        self._survivors = 0
        self._bytes_relocated = 0
        self._entries_relocated = 0
        self._seglets_freed = 0
        self._compaction_failures = 0
        self._aborted = 0
        self._chosen = [0, 0, 0, 0]  # the *_live_bytes / *_allocated_bytes stats
        self._total_seglets = log.allocator.total_seglets
        self._present = _NO_SEGMENTS
        self._present_at = -1
        self._words = np.empty(MAX_BATCH, dtype=np.uint64)  # the C kernel's index words

    # -- policy --------------------------------------------------------------------------

    def utilizations(self) -> tuple[float, float, float, float]:
        """``(T, L, U, disk)`` in percent: memory, live objects, live tombstones, backup log.

        As in the paper (section 5.2), T and L are fractions of *all* log memory and free
        seglets of every pool count as unallocated, the reserves included: the balancer keeps
        half of the free memory unallocated, and the reserves are part of that half. Measured
        against the DEFAULT pool alone, the reserves came on top of it: at 90% live bytes they,
        the unallocated half and seglet tails left ~1.5% of memory as dead bytes in segments,
        so segments were cleaned at ~95% use (~25-30 bytes copied per new byte).

        T counts as 100 once the DEFAULT pool holds less than two head segments: with few,
        large segments the 90% rule alone would sleep while the next roll-over cannot happen.
        """
        log = self._log
        total = self._total_seglets
        allocator = log.allocator
        starved = allocator.free_count(Pool.DEFAULT) < 2 * log.seglets_per_segment
        memory = log.seglet_size * total
        return (
            100.0 if starved else 100.0 * (total - allocator.total_free()) / total,
            min(100.0, 100.0 * log.live_object_bytes / memory),
            min(100.0, 100.0 * log.live_tombstone_bytes / memory),
            log.disk_utilization(),
        )

    def next_task(self) -> CleanerTask:
        t, live, tomb, disk = self.utilizations()
        return choose_task(
            memory_utilization=t,
            live_utilization=live,
            tombstone_utilization=tomb,
            disk_utilization=disk,
            compaction_enabled=self._config.compaction_enabled,
            compaction_failed=self._compaction_failed,
            tombstone_ratio=self._config.tombstone_ratio,
        )

    @property
    def busy(self) -> bool:
        """A pass is under way (more :meth:`step` calls will finish it)."""
        return self._pass is not None

    def wants_to_run(self) -> bool:
        """Whether :meth:`step` has anything to do now (cheap: for the server's idle check)."""
        if self._pass is not None or self._log.pending_free_segments > 0:
            return True
        # The balancer sleeps for certain below 90% memory use (and a nearly empty backup log):
        # answer that without computing every utilisation, as this runs between requests.
        log = self._log
        allocator = log.allocator
        total = self._total_seglets
        if (
            (total - allocator.total_free()) * 10 < 9 * total
            and allocator.free_count(Pool.DEFAULT) >= 2 * log.seglets_per_segment
            and log.disk_utilization() < MIN_DISK_UTILIZATION
        ):
            return False
        return self.next_task() is not CleanerTask.SLEEP

    def activity(self) -> tuple[int, int, int]:
        """What :meth:`wants_to_run` looks at, as a fingerprint that changes whenever its answer
        may: free seglets, segments in the log, memory waiting to be freed."""
        log = self._log
        return (log.allocator.total_free(), len(log.segments), log.pending_free_segments)

    def stats(self) -> CleanerStats:
        return CleanerStats(
            compactions=self._compactions,
            cleanings=self._cleanings,
            segments_compacted=self._segments_compacted,
            segments_cleaned=self._segments_cleaned,
            survivor_segments=self._survivors,
            bytes_relocated=self._bytes_relocated,
            entries_relocated=self._entries_relocated,
            seglets_freed=self._seglets_freed,
            compaction_failures=self._compaction_failures,
            aborted_passes=self._aborted,
            emergency_heads_used=self._log.emergency_heads_used,
            compacted_live_bytes=self._chosen[0],
            compacted_allocated_bytes=self._chosen[1],
            cleaned_live_bytes=self._chosen[2],
            cleaned_allocated_bytes=self._chosen[3],
        )

    def _count_chosen(self, sources: list[Segment], first: int) -> None:
        self._chosen[first] += sum(s.live_bytes for s in sources)
        self._chosen[first + 1] += sum(s.allocated_bytes for s in sources)

    # -- driving -------------------------------------------------------------------------

    def step(
        self,
        budget_seconds: float,
        now: float,
        interrupt: Callable[[], bool] | None = None,
    ) -> bool:
        """Do up to ``budget_seconds`` (and ``cleaner_bytes_per_step`` units) of cleaning.

        ``now`` comes from the same clock the log stamps segments with; it ages segments for
        cost-benefit. Returns whether any work was done (memory reclaimed, entries copied or a
        pass started or finished); False means the balancer says sleep. A step overruns its
        budget by at most one unit of work (one batch, one scanned chunk, one commit).

        ``interrupt`` (a server passes "a request is waiting") makes the step yield early: it
        is asked after every unit of work, and units are then small (``INTERRUPTIBLE_*``), so
        a request that arrives during a slice waits for one unit rather than the slice. That
        trades the median for the tail: see ``run_cleaner``.
        """
        units = self._config.cleaner_bytes_per_step
        budget = _Budget(units, self._timer() + budget_seconds, self._timer, interrupt)
        did = self._log.reclaim() > 0
        starts = 0
        while True:
            if self._pass is None:
                if starts >= 4:
                    break
                starts += 1
                self._pass = self._start_pass(now)
                if self._pass is None:
                    break
            did = True
            if isinstance(self._pass, _Compaction):
                done = self._run_compaction(self._pass, budget)
            else:
                done = self._run_cleaning(self._pass, budget)
            if done:
                self._pass = None
            if budget.spent():
                break
        self.last_step_work = units - budget.units
        return did

    def run_until_idle(self, now: float, max_steps: int = 10_000) -> int:
        """Step until the balancer sleeps (or ``max_steps``); returns the steps taken."""
        for i in range(max_steps):
            if not self.step(1.0, now):
                return i
        return max_steps

    def _start_pass(self, now: float) -> _Compaction | _Cleaning | None:
        task = self.next_task()
        if task is CleanerTask.SLEEP:
            return None
        if task is CleanerTask.COMPACT:
            compaction = self._start_compaction()
            if compaction is not None:
                return compaction
            self._compaction_failed = True
            self._compaction_failures += 1
            return self._start_cleaning(now)
        cleaning = self._start_cleaning(now)
        if cleaning is None and self._config.compaction_enabled:
            return self._start_compaction()
        return cleaning

    # -- moving batches of entries -------------------------------------------------------

    def _live(self, job: _Compaction | _Cleaning, ids: np.ndarray) -> np.ndarray:
        """Hash-table slots of the entries ``ids`` (-1 for tombstones), -2 where dead."""
        e = job.entries
        assert e is not None
        return self._live_entries(e, ids)

    def _live_entries(self, e: _Entries, ids: np.ndarray) -> np.ndarray:
        """:meth:`_live` for entries ``ids`` of ``e``: one C call (``_relocate.live_slots``)
        where the kernel is built and every object has its key hash in the index, else numpy.
        """
        if _c_kernel():
            assert _relocate is not None
            main, ovf = self._handlers.hash_table.areas()
            slots = np.empty(len(ids), dtype=np.int64)
            try:
                done = _relocate.live_slots(
                    e.flags, e.aux, e.ref, ids, main, ovf, self._present_segments(), slots
                )
            except ValueError as exc:
                raise InternalError(f"liveness probe refused: {exc}") from exc
            if done >= 0:
                return slots
        flags = e.flags[ids]
        out = np.full(len(ids), -1, dtype=np.int64)
        if not flags.any():  # objects only, all with their key hash: the common case
            found = self._handlers.hash_table.find_slots(e.aux[ids], e.ref[ids])
            out[found < 0] = -2
            out[found >= 0] = found[found >= 0]
            return out
        obj = (flags & (IDX_TOMB | IDX_OTHER)) == 0
        hashed = obj & ((flags & IDX_NO_HASH) == 0)
        table = self._handlers.hash_table
        if hashed.any():
            where = np.flatnonzero(hashed)
            sel = ids[where]
            found = table.find_slots(e.aux[sel], e.ref[sel])
            out[where] = np.where(found >= 0, found, -2)
        unhashed = np.flatnonzero(obj & ~hashed)
        for i in unhashed.tolist():
            g = int(ids[i])
            ref = int(e.ref[g])
            h = self._handlers.object_hash_if_live(ref)
            if h is None:
                out[i] = -2
                continue
            e.aux[g] = h & IDX_AUX_MASK
            e.flags[g] &= ~IDX_NO_HASH
            out[i] = table.slot_of(h, ref)
        tombs = np.flatnonzero((flags & IDX_TOMB) != 0)
        if len(tombs):
            # A tombstone is live while its target segment is in the log: one sorted lookup
            # (batches of 1 KB objects carry a tombstone for nearly every object).
            present = self._present_segments()
            targets = e.aux[ids[tombs]]
            at = np.minimum(np.searchsorted(present, targets), len(present) - 1)
            out[tombs[present[at] != targets]] = -2
        out[(flags & IDX_OTHER) != 0] = -2
        return out

    def _place(
        self,
        job: _Cleaning,
        ids: np.ndarray,
        slots: np.ndarray,
        dst: Segment,
    ) -> int:
        """Copy live entries ``ids`` (in this order) to the end of ``dst``; repoint and account.

        ``dst`` has the room. Returns the bytes copied.
        """
        e = job.entries
        assert e is not None
        sources = job.sources
        if _c_kernel():
            return self._place_c(job, e, ids, slots, dst)
        src = e.src[ids]
        off = e.off[ids]
        size = e.size[ids]
        n = len(ids)
        start = dst.length
        ends = off + size
        # Runs: consecutive entries of one source that are back to back there.
        brk = np.flatnonzero((src[1:] != src[:-1]) | (off[1:] != ends[:-1])) + 1
        first = np.concatenate(([0], brk))
        last = np.concatenate((brk, [n])) - 1
        new_off = start + np.cumsum(size) - size
        bases, src_first, dst_first = self._bases_table(sources, [dst])
        copy_runs(
            self._log.allocator.view,
            self._log.seglet_size,
            bases,
            src_first[src[first]],
            off[first],
            np.full(len(first), dst_first[0]),
            new_off[first],
            ends[last] - off[first],
        )
        total = int(size.sum())
        dst.length = start + total
        flags = e.flags[ids]
        aux = e.aux[ids]
        objs = slots >= 0
        if objs.any():
            new_refs = np.uint64(dst.slot << OFFSET_BITS) | new_off[objs].astype(np.uint64)
            self._handlers.hash_table.set_slots(slots[objs], new_refs)
        dst.idx.frombytes(_index_words(new_off, aux, flags).tobytes())
        # Accounting: every entry here was live in its source.
        tomb = (flags & IDX_TOMB) != 0
        dst.live_bytes += total
        if len(sources) == 1:
            sources[0].live_bytes -= total
            if tomb.any():
                tomb_bytes = int(size[tomb].sum())
                sources[0].tombstone_bytes -= tomb_bytes
                dst.tombstone_bytes += tomb_bytes
                if sources[0].id != dst.id:
                    self._move_tombstones(sources, src[tomb], aux[tomb], size[tomb], dst)
        else:
            per_src = np.bincount(src, weights=size, minlength=len(sources))
            for i in np.flatnonzero(per_src).tolist():
                sources[i].live_bytes -= int(per_src[i])
            if tomb.any():
                per_tomb = np.bincount(src[tomb], weights=size[tomb], minlength=len(sources))
                for i in np.flatnonzero(per_tomb).tolist():
                    sources[i].tombstone_bytes -= int(per_tomb[i])
                dst.tombstone_bytes += int(size[tomb].sum())
                self._move_tombstones(sources, src[tomb], aux[tomb], size[tomb], dst)
        self._bytes_relocated += total
        self._entries_relocated += n
        return total

    def _place_c(
        self, job: _Cleaning, e: _Entries, ids: np.ndarray, slots: np.ndarray, dst: Segment
    ) -> int:
        """:meth:`_place` in one C call (``_relocate.place_entries``), then the accounting."""
        assert _relocate is not None
        sources = job.sources
        n = len(ids)
        bases, src_first, dst_first = self._bases_table(sources, [dst])
        main, ovf = self._handlers.hash_table.areas()
        words = np.empty(n, dtype=np.uint64)
        acct = np.empty(2 * len(sources), dtype=np.int64)
        try:
            total = int(
                _relocate.place_entries(
                    self._log.allocator.view,
                    self._log.seglet_size,
                    bases,
                    src_first,
                    int(dst_first[0]),
                    dst.length,
                    dst.slot << OFFSET_BITS,
                    ids,
                    slots,
                    e.src,
                    e.off,
                    e.size,
                    e.flags,
                    e.aux,
                    main,
                    ovf,
                    words,
                    acct,
                )
            )
        except ValueError as exc:
            raise InternalError(f"survivor placement refused: {exc}") from exc
        dst.length += total
        dst.idx.frombytes(words.tobytes())
        dst.live_bytes += total
        tomb_total = 0
        for i in np.flatnonzero(acct[0::2]).tolist():
            moved = int(acct[2 * i])
            tomb_bytes = int(acct[2 * i + 1])
            sources[i].live_bytes -= moved
            sources[i].tombstone_bytes -= tomb_bytes
            tomb_total += tomb_bytes
        if tomb_total:
            dst.tombstone_bytes += tomb_total
            if len(sources) > 1 or sources[0].id != dst.id:
                tomb = np.flatnonzero((e.flags[ids] & IDX_TOMB) != 0)
                t_ids = ids[tomb]
                self._move_tombstones(sources, e.src[t_ids], e.aux[t_ids], e.size[t_ids], dst)
        self._bytes_relocated += total
        self._entries_relocated += n
        return total

    def _move_tombstones(
        self,
        sources: list[Segment],
        src: np.ndarray,
        targets: np.ndarray,
        size: np.ndarray,
        dst: Segment,
    ) -> None:
        cells: dict[tuple[int, int], list[int]] = {}
        for s, t, z in zip(src.tolist(), targets.tolist(), size.tolist(), strict=True):
            cell = cells.get((s, t))
            if cell is None:
                cells[(s, t)] = [z, 1]
            else:
                cell[0] += z
                cell[1] += 1
        move = self._log.move_tombstones
        for (s, t), (z, c) in cells.items():
            move(t, sources[s].id, dst.id, z, c)

    # -- compaction ----------------------------------------------------------------------

    def _start_compaction(self) -> _Compaction | None:
        """Pick the segments that pay most to compact (RAMCloud's score), several at once.

        They share numpy batches, which spreads the fixed cost of a batch and of choosing;
        each gets its own target when its turn comes and replaces its source when done.
        Segments scoring under half the best wait for a later pass.
        """
        log = self._log
        size = log.seglet_size
        header = SEGMENT_HEADER_ENTRY_SIZE
        scored: list[tuple[float, Segment]] = []
        for seg in log.cleanable_segments():
            live = seg.live_bytes
            unused = len(seg.seglets) - -(-(live + header) // size)
            if unused > 0:
                scored.append((math.inf if live == 0 else unused * size / live, seg))
        if not scored:
            return None
        scored.sort(key=lambda t: t[0], reverse=True)
        best = scored[0][0]
        sources: list[Segment] = []
        entries = 0
        for score, seg in scored[:COMPACT_AT_ONCE]:
            if score * 2 < best or (sources and entries + len(seg.idx) > MAX_PASS_ENTRIES):
                break
            sources.append(seg)
            entries += len(seg.idx)
        job = _Compaction(sources)
        if not self._target_for(job, 0):
            return None
        self._count_chosen(sources, 0)
        return job

    def _target_for(self, job: _Compaction, k: int) -> bool:
        """Give source ``k`` (the next without one) its target; False if no seglets."""
        log = self._log
        src = job.sources[k]
        need = -(-(src.live_bytes + SEGMENT_HEADER_ENTRY_SIZE) // log.seglet_size)
        seglets = log.take_seglets(need)
        if len(seglets) < need:
            log.reclaim()
            seglets += log.take_seglets(need - len(seglets))
        if len(seglets) < need:
            log.allocator.free(seglets)
            return False
        job.add_target(log.new_side_segment(seglets, SegmentState.COMPACTING, src.id))
        return True

    def _batch_end(self, e: _Entries, first: int, limit: int, units: int) -> int:
        """End of a batch of entries ``[first, end)`` costing about ``units`` at most (the
        numpy path's cut; ``_relocate.compact_range`` cuts the same way): an entry costs
        COST_ENTRY, an eighth of its size and its size."""
        end = min(limit, first + MAX_BATCH)
        size = e.size[first:end]
        cost = np.cumsum(size + (size >> 3) + COST_ENTRY)
        room = units - COST_BATCH
        if int(cost[-1]) <= room:
            return end
        return first + max(1, int(np.searchsorted(cost, room, side="right")))

    def _run_compaction(self, job: _Compaction, budget: _Budget) -> bool:
        e = job.entries
        sources = len(job.sources)
        while job.cursor < job.stop:
            k = len(job.targets)
            if k < sources and e.first[k] <= job.cursor:
                # the next source's target, now that those before it gave their seglets back
                if not self._target_for(job, k):
                    job.stop = e.first[k]
                    break
                continue
            first = job.cursor
            limit = job.stop if k >= sources else min(job.stop, e.first[k])
            units = budget.batch_units()
            if _c_kernel():
                end, charge, done = self._compact_batch_c(job, first, limit, units)
            else:
                end, charge, done = self._batch_end(e, first, limit, units), 0, False
            if not done:  # the numpy path (no C kernel, or an entry without its key hash)
                charge = int((e.size[first:end] >> 3).sum()) + COST_ENTRY * (end - first)
                ids = np.arange(first, end)
                slots = self._live(job, ids)
                live = slots != -2
                if live.any():
                    charge += self._compact_batch(job, ids[live], slots[live])
                    job.sync_lengths()
            job.cursor = end
            budget.units -= COST_BATCH + charge
            while job.finished < len(job.targets) and e.ends[job.finished] <= job.cursor:
                self._finish_one(job)
                budget.units -= COST_COMMIT_SEGMENT
            if budget.spent():
                break
        if job.cursor < job.stop:
            return False
        while job.finished < len(job.targets):  # sources with no entries at all
            self._finish_one(job)
        self._compactions += 1
        self._compaction_failed = False
        return True

    @staticmethod
    def _bases_table(
        sources: list[Segment], targets: list[Segment]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Seglet arena positions of ``sources`` then ``targets``, and where each starts."""
        lists = [s.bases for s in sources] + [t.bases for t in targets]
        starts = np.cumsum([0] + [len(b) for b in lists[:-1]])
        bases = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64)
        return bases, starts[: len(sources)], starts[len(sources) :]

    def _finish_one(self, job: _Compaction) -> None:
        i = job.finished
        self._seglets_freed += self._log.finish_compaction(job.sources[i], job.targets[i])
        self._segments_compacted += 1
        job.finished += 1

    def _present_segments(self) -> np.ndarray:
        """Ids of the segments in the log, sorted (a tombstone is live while its target is);
        rebuilt only when an id joined or left the log."""
        log = self._log
        if self._present_at != log.segment_set_changes:
            segments = log.segments
            self._present = np.sort(np.fromiter(segments, dtype=np.uint64, count=len(segments)))
            self._present_at = log.segment_set_changes
        return self._present

    def _compact_batch_c(
        self, job: _Compaction, first: int, limit: int, units: int
    ) -> tuple[int, int, bool]:
        """One batch from entry ``first`` (not past ``limit``, about ``units`` of work) in one C
        call (``_relocate.compact_range``): the cut, :meth:`_live` and :meth:`_compact_batch`.
        Returns ``(end, work, done)``: the batch is ``[first, end)``, ``work`` its cost in
        units, and ``done`` False where the numpy path must do it (an entry without its key
        hash; nothing was done)."""
        assert _relocate is not None
        e = job.entries
        k = job.sync_bases()
        main, ovf = self._handlers.hash_table.areas()
        words = self._words
        try:
            end, moved, total, charge, g_lo, g_hi = _relocate.compact_range(
                self._log.allocator.view,
                self._log.seglet_size,
                job._bases,
                job._filled,
                job._src_first,
                job._dst_first,
                job.dst_length,
                job.dst_limit,
                job.dst_bits,
                k,
                e.src,
                e.off,
                e.size,
                e.flags,
                e.aux,
                e.ref,
                main,
                ovf,
                self._present_segments(),
                words,
                job.acct,
                first,
                limit,
                units - COST_BATCH,
                MAX_BATCH,
                COST_ENTRY,
            )
        except ValueError as exc:  # nothing was moved
            raise InternalError(f"compaction batch refused: {exc}") from exc
        if moved < 0:
            return end, 0, False
        sources = job.sources
        targets = job.targets
        acct = job.acct
        pos = 0
        for g in range(g_lo, g_hi + 1):
            count = int(acct[3 * g + 2])
            if not count:
                continue
            t = targets[g]
            t.idx.frombytes(words[pos : pos + count].tobytes())
            pos += count
            t.length = int(job.dst_length[g])
            moved_bytes = int(acct[3 * g])
            tomb_bytes = int(acct[3 * g + 1])
            sources[g].live_bytes -= moved_bytes
            t.live_bytes += moved_bytes
            sources[g].tombstone_bytes -= tomb_bytes
            t.tombstone_bytes += tomb_bytes
        self._bytes_relocated += total
        self._entries_relocated += moved
        return end, charge + total, True

    def _compact_batch(self, job: _Compaction, ids: np.ndarray, slots: np.ndarray) -> int:
        """Copy live entries ``ids`` of the sources to their targets; repoint, index, account."""
        e = job.entries
        sources = job.sources
        targets = job.targets
        src = e.src[ids]
        off = e.off[ids]
        size = e.size[ids]
        n = len(ids)
        ends = off + size
        # Groups: entries of one source (ids ascend, so each source's are contiguous).
        group_first = np.flatnonzero(src[1:] != src[:-1]) + 1
        firsts = [0, *group_first.tolist()]
        group_src = src[firsts].tolist()
        csum = np.cumsum(size)
        before = csum - size  # bytes of the batch before each entry
        start_of_group = np.repeat(before[firsts], np.diff([*firsts, n]))
        base = np.array([targets[g].length for g in group_src], dtype=np.int64)
        new_off = np.repeat(base, np.diff([*firsts, n])) + before - start_of_group
        live_bytes = np.bincount(src, weights=size)
        for g in group_src:
            if targets[g].room() < int(live_bytes[g]):
                raise InternalError("compaction target too small: live-byte accounting is wrong")
        # Runs of back-to-back entries (a source's live entries land back to back).
        brk = np.flatnonzero((src[1:] != src[:-1]) | (off[1:] != ends[:-1])) + 1
        first = np.concatenate(([0], brk))
        last = np.concatenate((brk, [n])) - 1
        run_src = src[first]
        bases, src_first, dst_first = job.bases()
        copy_runs(
            self._log.allocator.view,
            self._log.seglet_size,
            bases,
            src_first[run_src],
            off[first],
            dst_first[run_src],
            new_off[first],
            ends[last] - off[first],
        )
        flags = e.flags[ids]
        aux = e.aux[ids]
        objs = slots >= 0
        target_bits = np.array([t.slot << OFFSET_BITS for t in targets], dtype=np.uint64)
        new_refs = target_bits[src[objs]] | new_off[objs].astype(np.uint64)
        self._handlers.hash_table.set_slots(slots[objs], new_refs)
        words = _index_words(new_off, aux, flags).tobytes()
        tomb_bytes = np.bincount(src, weights=size * ((flags & IDX_TOMB) != 0))
        for k, g in enumerate(group_src):
            lo = firsts[k]
            hi = firsts[k + 1] if k + 1 < len(firsts) else n
            t = targets[g]
            t.idx.frombytes(words[8 * lo : 8 * hi])
            moved = int(live_bytes[g])
            tombs = int(tomb_bytes[g])
            t.length += moved
            sources[g].live_bytes -= moved
            t.live_bytes += moved
            sources[g].tombstone_bytes -= tombs
            t.tombstone_bytes += tombs
        total = int(csum[-1])
        self._bytes_relocated += total
        self._entries_relocated += n
        return total

    # -- combined cleaning ---------------------------------------------------------------

    def _survivor_seglets(self, live: int) -> int:
        """Worst-case seglets the survivors of ``live`` bytes need (entries never split).

        A survivor is closed only when the next entry does not fit, so it holds more than
        ``segment_size - max_entry`` bytes and, trimmed, wastes less than ``max_entry`` bytes
        of its seglets; only the last one, never closed for that reason, may waste most of a
        seglet.
        """
        if live <= 0:
            return 0
        log = self._log
        header = SEGMENT_HEADER_ENTRY_SIZE
        per_segment = max(1, log.segment_size - header - log.max_entry_seen)
        count = -(-live // per_segment)
        # Each closed survivor: at most header + max_entry beyond its live bytes once trimmed;
        # the last one: its header plus a partial seglet (the +1).
        waste = (count - 1) * (header + log.max_entry_seen) + header
        return -(-(live + waste) // log.seglet_size) + 1

    def _plan(
        self, chosen: list[Segment], drop: dict[int, int], seg: Segment
    ) -> tuple[int, int, int, int, dict[int, int]]:
        """What adding ``seg`` to ``chosen`` makes of a pass.

        Returns ``(survivor seglets, peak seglets, seglets freed, dropped, drop)``. Sources go
        oldest first and each gives its seglets back once emptied, so the pass needs at most
        ``peak`` seglets beyond those it frees on the way. ``drop`` maps a source to the
        tombstone bytes it need not copy (their target is emptied no later than it);
        ``dropped`` is their sum. ``drop`` for ``chosen`` is updated, not recomputed.
        """
        holders_of = self._log.tombstone_holders
        key = (seg.created, seg.id)
        new = dict(drop)
        mine = holders_of(seg.id)
        own = mine.get(seg.id)
        if own is not None:
            new[seg.id] = new.get(seg.id, 0) + (own >> TOMB_CELL_SHIFT)
        for other in chosen:
            cell = mine.get(other.id)  # other holds tombstones of seg's objects
            if cell is not None and (other.created, other.id) >= key:
                new[other.id] = new.get(other.id, 0) + (cell >> TOMB_CELL_SHIFT)
            cell = holders_of(other.id).get(seg.id)  # seg holds tombstones of other's
            if cell is not None and key >= (other.created, other.id):
                new[seg.id] = new.get(seg.id, 0) + (cell >> TOMB_CELL_SHIFT)
        live = 0
        freed = 0
        peak = 0
        for s in sorted([*chosen, seg], key=lambda x: (x.created, x.id)):
            live += s.live_bytes - new.get(s.id, 0)
            peak = max(peak, self._survivor_seglets(live) - freed)
            freed += len(s.seglets)
        return self._survivor_seglets(live), peak, freed, sum(new.values()), new

    def ranked_for_cleaning(self, now: float) -> list[Segment]:
        """Cleanable segments, best cost-benefit first (segments too dense to pay are left out).

        While the backup log has room the cleaner runs for memory, so ``u`` is live bytes over
        the memory a segment holds; scored against the full segment size (RAMCloud's disk
        utilisation), compacted segments and heads closed early by a commit look cheap while
        freeing almost nothing: at 90% the chosen segments were ~95% live in memory but ~45%
        on disk. Once the backup log is nearly full, ``u`` is the disk utilisation again.
        """
        log = self._log
        segment_size = log.segment_size
        holders_of = log.tombstone_holders
        for_memory = log.disk_utilization() < MIN_DISK_UTILIZATION
        scored: list[tuple[float, int, Segment]] = []
        for seg in log.cleanable_segments():
            dense = seg.live_bytes * 100 > MAX_CLEANABLE_MEMORY_UTILIZATION * seg.allocated_bytes
            if dense and not holders_of(seg.id):
                continue
            retirable = log.retirable_bytes(seg.id)
            size = max(1, seg.allocated_bytes) if for_memory else segment_size
            score = cleaning_score(seg.live_bytes, size, now - seg.created, retirable)
            scored.append((score, -seg.live_bytes, seg))
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [t[2] for t in scored]

    def _start_cleaning(self, now: float) -> _Cleaning | None:
        """Choose sources by cost-benefit; start a pass if it frees memory now or soon.

        The benefit counts, besides the sources' dead bytes, live tombstones that the pass
        retires: those elsewhere die at the commit and become compactable. A pass whose
        survivors cost at most what it frees at once is started when it retires tombstones
        elsewhere; otherwise memory full of tombstones of dead objects in dense (compacted)
        segments would wedge the cleaner.
        """
        log = self._log
        ranked = self.ranked_for_cleaning(now)
        available = log.allocator.free_count(Pool.CLEANER) + log.allocator.free_count(Pool.DEFAULT)
        picked = self._pick_sources(ranked, available)
        if picked is None:
            # Memory is too tight for the best-scored set: take the segments with the most
            # freeable bytes per live byte instead (dense old segments may score higher).
            by_room = sorted(
                ranked,
                key=lambda seg: (seg.allocated_bytes - seg.live_bytes) / max(1, seg.live_bytes),
                reverse=True,
            )
            picked = self._pick_sources(by_room, available)
        if picked is None:
            return None
        chosen, need, peak = picked
        chosen.sort(key=lambda s: (s.created, s.id))
        self._count_chosen(chosen, 2)
        available = log.allocator.free_count(Pool.CLEANER) + log.allocator.free_count(Pool.DEFAULT)
        if need <= available:
            return _Cleaning(chosen, log.take_seglets(need), sequential=False)
        return _Cleaning(chosen, log.take_seglets(peak), sequential=True)

    def _pick_sources(
        self, candidates: list[Segment], available: int
    ) -> tuple[list[Segment], int, int] | None:
        """Greedily take ``candidates`` in order; the sources, survivor and peak seglets.

        A segment is skipped if the pass's peak survivor need would pass ``available``.
        """
        log = self._log
        cap = self._config.max_live_segments_per_pass * log.segment_size
        chosen: list[Segment] = []
        drop: dict[int, int] = {}
        need = peak = freed = dropped = retired = 0
        worth: float = -math.inf
        best: tuple[float, int, int, int, int, int, int] | None = None
        live = 0
        # Candidates far down the order rarely join; looking at them all costs a lot.
        for seg in candidates[: 4 * self._config.max_live_segments_per_pass + 8]:
            if live >= cap:
                break
            t_need, t_peak, t_freed, t_dropped, t_drop = self._plan(chosen, drop, seg)
            if chosen and live + seg.live_bytes - t_dropped > cap:
                continue
            if t_peak > available:
                continue
            # Worth: seglets freed at the commit, plus tombstone bytes elsewhere that it
            # retires (compactable afterwards). A segment that lowers it is left out, unless
            # it holds a seglet of dead bytes itself: the worst-case survivor estimate charges
            # survivors' slack to whichever segment needs a new one, so a later one may pay it
            # back. The pass is the prefix of the segments taken that is worth most.
            t_retired = retired + log.retirable_bytes(seg.id)
            trial_worth = float((t_freed - t_need) * log.seglet_size + t_retired - t_dropped)
            roomy = seg.allocated_bytes - seg.live_bytes >= log.seglet_size
            if trial_worth <= worth and not roomy:
                continue
            chosen.append(seg)
            drop = t_drop
            need, peak, freed, dropped, retired = t_need, t_peak, t_freed, t_dropped, t_retired
            worth = trial_worth
            live += seg.live_bytes
            if best is None or worth >= best[0]:
                best = (worth, len(chosen), need, peak, freed, dropped, retired)
        if best is None:
            return None
        _worth, count, need, peak, freed, dropped, retired = best
        del chosen[count:]
        now_gain = freed - need
        if now_gain < 1 and (now_gain < 0 or retired - dropped < log.seglet_size):
            return None
        return chosen, need, peak

    def _run_cleaning(self, job: _Cleaning, budget: _Budget) -> bool:
        scanning = job.entries is None or job.scan_index < len(job.sources)
        if scanning and (not self._scan(job, budget) or budget.spent()):
            return False
        if not job.relocated_all and not job.aborted:
            self._relocate(job, budget)
            if budget.spent():
                return False  # even when relocation is done: the commit gets its own slice
            if not job.relocated_all and not job.aborted:
                return False
        self._commit(job, budget)
        return True

    def _scan(self, job: _Cleaning, budget: _Budget) -> bool:
        """Sort each source's live entries by age; True once every source is done.

        A source is read ``SCAN_CHUNK`` index entries at a time into blocks of its own, and
        only live entries are kept (an entry never comes back to life; placement checks
        again), so a step's numpy work is a chunk's entries, not a source's or the pass's:
        twenty-five 8 MB segments of 100-byte objects hold ~1.3M entries, ~160 ms of arrays
        built at once. The blocks are joined once every source is scanned.
        """
        while job.scan_index < len(job.sources):
            i = job.scan_index
            seg = job.sources[i]
            start = job.scan_pos
            chunk = SCAN_CHUNK if budget.interrupt is None else INTERRUPTIBLE_SCAN_CHUNK
            stop = min(len(seg.idx), start + chunk)
            block = _Entries([seg], (start, stop))
            ids = np.flatnonzero((block.flags & IDX_OTHER) == 0)
            ids = ids[self._live_entries(block, ids) != -2]
            scanned = block.count
            block.keep(ids, i)
            stamp = self._stamps(seg, block.off)
            job.chunks.append(block)
            job.chunk_stamps.append(stamp)
            job.scan_pos = stop
            budget.units -= 2 * COST_BATCH + COST_SCAN_ENTRY * scanned
            if stop >= len(seg.idx):  # the source is read: its run, in age order
                block = _join(job.chunks)
                stamps = np.concatenate(job.chunk_stamps)
                order = np.argsort(stamps, kind="stable")
                job.runs.append(order + job.scanned)  # entry numbers of the joined pass
                job.run_keys.append(stamps[order])
                job.cursors.append(0)
                job.left.append(block.count)
                job.item_count += block.count
                self._append_block(job, block)
                job.scanned += block.count
                job.chunks = []
                job.chunk_stamps = []
                job.scan_pos = 0
                job.scan_index += 1
            if budget.spent():
                break
        if job.scan_index < len(job.sources):
            return False
        if job.entries is None:
            e = job.joined
            assert e is not None
            n = e.count
            e.off, e.size, e.flags = e.off[:n], e.size[:n], e.flags[:n]
            e.aux, e.ref, e.src = e.aux[:n], e.ref[:n], e.src[:n]
            job.entries = e
            job.joined = None
        return True

    def _stamps(self, seg: Segment, off: np.ndarray) -> np.ndarray:
        """Timestamps (bytes 4..7 of the content) of ``seg``'s entries at offsets ``off``."""
        stamp = np.empty(len(off), dtype=np.int64)
        if _c_kernel():
            assert _relocate is not None
            bases = np.array(seg.bases, dtype=np.int64)
            try:
                _relocate.entry_stamps(self._log.allocator.view, seg.seglet_size, bases, off, stamp)
            except ValueError as exc:
                raise InternalError(f"timestamp gather refused: {exc}") from exc
            return stamp
        arena = self._log.allocator.arena
        content = off + 2 + (arena[seg.positions(off)] >> 6).astype(np.int64)
        stamp[:] = 0
        for k in range(4):
            stamp |= arena[seg.positions(content + 4 + k)].astype(np.int64) << (8 * k)
        return stamp

    @staticmethod
    def _append_block(job: _Cleaning, block: _Entries) -> None:
        """Copy a scanned source's live entries into the pass's arrays (allocated for every
        index entry of the pass at the first source, filled a source at a time), so that no
        step joins the whole pass at once."""
        e = job.joined
        if e is None:
            total = sum(len(seg.idx) for seg in job.sources)
            e = _Entries([job.sources[0]], (0, 0))
            e.allocate(total)
            e.count = 0
            e.first = []
            e.ends = []
            job.joined = e
        a = e.count
        b = a + block.count
        e.off[a:b] = block.off
        e.size[a:b] = block.size
        e.flags[a:b] = block.flags
        e.aux[a:b] = block.aux
        e.ref[a:b] = block.ref
        e.src[a:b] = block.src
        e.first.append(a)
        e.ends.append(b)
        e.count = b

    def _next_batch(self, job: _Cleaning, units: int) -> np.ndarray:
        """The next candidates in global age order, about ``units`` of work; consumes them.

        A sequential pass offers one source at a time, but a batch goes on into the next
        source while nothing must happen in between (see the loop). Its sources are small where
        segments are (each is what the pass's survivors need room for), and a batch's fixed
        numpy work (liveness, placement, copies) then served ~60 1 KB entries: batches of
        several sources cut combined cleaning's cost per relocated entry by about a quarter
        (1 KB and 100 B objects at 90% of a 16 MB log).
        """
        e = job.entries
        assert e is not None
        heads: list[np.ndarray] = []
        keys: list[np.ndarray] = []
        owner: list[np.ndarray] = []
        if job.sequential:
            per_run = MAX_BATCH
        else:
            active = sum(1 for r, run in enumerate(job.runs) if job.cursors[r] < len(run))
            per_run = max(64, min(MAX_BATCH, MERGE_ELEMENTS // max(1, active)))
        offered = offered_bytes = offered_cost = 0  # sequential: what earlier runs offered
        for r, run in enumerate(job.runs):
            c = job.cursors[r]
            if c >= len(run):
                continue
            if job.sequential and c == 0:
                if heads:
                    # The batch goes on into this source only if nothing needs doing first:
                    # its oldest entry is no older than the last one offered (the survivor
                    # stays in age order), the batch has room for more, and the survivors of
                    # what is offered plus this whole source surely fit.
                    if (
                        offered >= MAX_BATCH
                        or offered_cost >= units - COST_BATCH
                        or job.run_keys[r][0] < int(keys[-1][-1])
                        or not self._fits_next(job, job.sources[r], offered_bytes)
                    ):
                        break
                else:
                    if len(run) and job.current is not None and job.run_keys[r][0] < job.last_key:
                        # Older than what the survivor holds: start a new one, so each
                        # survivor stays in age order.
                        self._close_survivor(job, job.current)
                        job.current = None
                    if not self._fits_next(job, job.sources[r]):
                        # Not even this source's survivors fit any more: end the pass here,
                        # cleanly, rather than leave a source half moved.
                        break
            take = run[c : c + per_run - offered]
            heads.append(take)
            keys.append(job.run_keys[r][c : c + len(take)])
            owner.append(np.full(len(take), r, dtype=np.int64))
            if job.sequential:
                if c + len(take) < len(run):
                    break  # a source only partly offered: the next batch goes on with it
                size = e.size[take]
                offered += len(take)
                offered_bytes += int(size.sum())
                offered_cost += int((size + (size >> 3)).sum()) + COST_ENTRY * len(take)
        if not heads:
            return np.empty(0, dtype=np.int64)
        ids = np.concatenate(heads)
        if len(heads) == 1:
            runs_of = owner[0]
            sorted_keys = keys[0]
        elif job.sequential:  # whole runs in order, each no older than the one before
            runs_of = np.concatenate(owner)
            sorted_keys = np.concatenate(keys)
        else:
            order = np.argsort(np.concatenate(keys), kind="stable")
            ids = ids[order]
            runs_of = np.concatenate(owner)[order]
            sorted_keys = np.concatenate(keys)[order]
        size = e.size[ids]
        fits = np.cumsum(size + (size >> 3) + COST_ENTRY) <= max(1, units - COST_BATCH)
        # At most per_run: a run offered only that many, and one of its later entries may be
        # older than anything past the first per_run of the merge.
        count = max(1, min(per_run, int(fits.sum())))
        ids = ids[:count]
        job.last_key = int(sorted_keys[count - 1])
        taken = np.bincount(runs_of[:count], minlength=len(job.runs))
        for r in np.flatnonzero(taken).tolist():
            job.cursors[r] += int(taken[r])
        return ids

    def _fits_next(self, job: _Cleaning, src: Segment, ahead: int = 0) -> bool:
        """Whether the survivors of ``src`` surely fit in the seglets the pass can get, after
        ``ahead`` bytes of entries still to be placed before them."""
        log = self._log
        log.reclaim()
        have = (
            len(job.reservation)
            + log.allocator.free_count(Pool.CLEANER)
            + log.allocator.free_count(Pool.DEFAULT)
        )
        cur = job.current
        spare = 0 if cur is None else cur.room()
        return self._survivor_seglets(ahead + src.live_bytes - spare) <= have

    def _relocate(self, job: _Cleaning, budget: _Budget) -> None:
        e = job.entries
        assert e is not None
        sources = job.sources
        while True:
            ids = self._next_batch(job, budget.batch_units())
            if len(ids) == 0:
                job.relocated_all = True
                break
            slots = self._live(job, ids)
            budget.units -= COST_BATCH + COST_ENTRY * len(ids) + int(e.size[ids].sum() >> 3)
            job.item_index += len(ids)
            live = slots != -2
            tomb = live & (slots == -1)
            if tomb.any():
                # A tombstone whose target is emptied already (or is its own holder) leaves
                # with this pass for sure: drop it instead of copying it. Tombstones are most
                # of a pass's entries when overwrites are small, so this is all vectorised.
                t_ids = ids[tomb]
                targets = e.aux[t_ids]
                holders = e.src[t_ids]
                drop = targets == job.source_id_array[holders]
                if job.emptied:
                    emptied = np.sort(
                        np.fromiter(job.emptied, dtype=np.uint64, count=len(job.emptied))
                    )
                    at = np.minimum(np.searchsorted(emptied, targets), len(emptied) - 1)
                    drop |= emptied[at] == targets
                if drop.any():
                    d_ids = t_ids[drop]
                    # (holder, target) pairs and their bytes, summed: what the commit needs
                    pair = (e.src[d_ids].astype(np.uint64) << np.uint64(40)) | e.aux[d_ids]
                    order = np.argsort(pair, kind="stable")
                    pair = pair[order]
                    first = np.flatnonzero(np.concatenate(([True], pair[1:] != pair[:-1])))
                    sums = np.add.reduceat(e.size[d_ids][order], first)
                    for key, size in zip(pair[first].tolist(), sums.tolist(), strict=True):
                        src = sources[key >> 40]
                        src.live_bytes -= size
                        src.tombstone_bytes -= size
                        job.dropped.append((src, key & IDX_AUX_MASK, size))
                    where = np.flatnonzero(tomb)[drop]
                    live[where] = False
            keep = ids[live]
            kept_slots = slots[live]
            placed = 0
            while placed < len(keep):
                rest = keep[placed:]
                dst = self._room_for(job, int(e.size[rest[0]]))
                if dst is None:
                    job.aborted = True
                    break
                room = dst.capacity - dst.length
                k = int(np.searchsorted(np.cumsum(e.size[rest]), room, side="right"))
                k = max(1, k)
                nbytes = int(e.size[rest[:k]].sum())
                if not self._grow(job, dst, nbytes):
                    job.aborted = True
                    break
                budget.units -= self._place(job, rest[:k], kept_slots[placed : placed + k], dst)
                placed += k
                self._flush(job)
            if job.aborted:
                # What was not placed stays live in its source, which then stays in the log.
                break
            done = np.bincount(e.src[ids], minlength=len(sources))
            for i in np.flatnonzero(done).tolist():
                job.left[i] -= int(done[i])
                src = sources[i]
                if job.left[i] == 0 and src.live_bytes == 0:
                    job.freed_seglets += self._log.hollow(src)
                    job.emptied.add(src.id)
            if job.emptied:
                self._log.reclaim()
            if budget.spent():
                break
        self._flush(job)

    def _take(self, job: _Cleaning, count: int) -> list[int] | None:
        got = job.reservation[:count]
        del job.reservation[:count]
        if len(got) < count:
            got.extend(self._log.take_seglets(count - len(got)))
        if len(got) < count:
            self._log.reclaim()
            got.extend(self._log.take_seglets(count - len(got)))
        if len(got) < count:
            job.reservation.extend(got)
            return None
        return got

    def _grow(self, job: _Cleaning, dst: Segment, nbytes: int) -> bool:
        """Give ``dst`` the seglets to hold ``nbytes`` more (within its capacity)."""
        short = nbytes - dst.room()
        if short <= 0:
            return True
        more = self._take(job, -(-short // self._log.seglet_size))
        if more is None:
            return False
        dst.grow(more)
        return True

    def _room_for(self, job: _Cleaning, total: int) -> Segment | None:
        """The survivor the next entry (``total`` bytes) goes to; None if no seglets."""
        cur = job.current
        if cur is not None and cur.capacity - cur.length >= total:
            return cur
        count = -(-(SEGMENT_HEADER_ENTRY_SIZE + total) // self._log.seglet_size)
        seglets = self._take(job, count)
        if seglets is None:
            return None
        if cur is not None:
            self._close_survivor(job, cur)
        seg = self._log.new_side_segment(seglets, SegmentState.SURVIVOR)
        job.survivors.append(seg)
        job.current = seg
        job.flushed = seg.length
        self._survivors += 1
        return seg

    def _flush(self, job: _Cleaning) -> None:
        cur = job.current
        if cur is not None and cur.length > job.flushed:
            self._log.sink.append(
                cur.id, job.flushed, cur.read(job.flushed, cur.length - job.flushed)
            )
            job.flushed = cur.length

    def _close_survivor(self, job: _Cleaning, seg: Segment) -> None:
        self._flush(job)
        self._log.allocator.free(seg.trim())
        self._log.sink.close(seg.id)

    def _commit(self, job: _Cleaning, budget: _Budget) -> None:
        log = self._log
        if job.current is not None:
            self._close_survivor(job, job.current)
            job.current = None
        if job.aborted:
            self._aborted += 1
        cleaned = self._cleaned_sources(job)
        budget.units -= COST_COMMIT_SEGMENT * (len(job.survivors) + len(cleaned))
        if not cleaned and not job.survivors:
            log.allocator.free(job.reservation)
            job.reservation = []
            return
        before = sum(len(s.seglets) for s in cleaned) + job.freed_seglets
        used = sum(len(s.seglets) for s in job.survivors)
        budget.units -= COST_COMMIT_SEGMENT + 8 * log.segments_in_log  # the new digest
        log.commit_cleaning(job.survivors, cleaned)
        log.allocator.free(job.reservation)
        job.reservation = []
        self._seglets_freed += before - used
        self._cleanings += 1
        self._segments_cleaned += len(cleaned)
        self._compaction_failed = False

    @staticmethod
    def _cleaned_sources(job: _Cleaning) -> list[Segment]:
        """Sources with nothing live left, keeping any that drops a tombstone of one that stays.

        After an aborted pass some sources keep live entries and stay in the log; a tombstone
        of an object in one of them must not vanish, so its holder stays too (its accounting
        restored). Only a source's own tombstones or those of emptied sources are dropped, so
        a holder that stays still has them in memory. Staying can cascade, hence the loop.
        """
        staying = {s.id for s in job.sources if s.live_bytes != 0}
        restore = True
        while restore:
            restore = False
            for src, target_id, _size in job.dropped:
                if target_id in staying and src.id not in staying:
                    staying.add(src.id)
                    restore = True
        for src, _target_id, size in job.dropped:
            if src.id in staying:
                src.live_bytes += size
                src.tombstone_bytes += size
        job.dropped = []
        return [s for s in job.sources if s.id not in staying]

    def describe(self) -> str:
        """One line for logs: the pass under way, if any."""
        job = self._pass
        if job is None:
            return "idle"
        if isinstance(job, _Compaction):
            ids = ", ".join(str(s.id) for s in job.sources)
            return f"compacting segments {ids} at {job.cursor}/{job.entries.count}"
        phase = "scanning" if job.scan_index < len(job.sources) else "relocating"
        return f"cleaning {len(job.sources)} segments, {phase} {job.item_index}/{job.item_count}"
