"""The two-level log cleaner: segment compaction and combined cleaning, run in bounded slices.

Segment compaction rewrites one segment's live entries into fewer seglets (memory only; the
segment keeps its id and its replicas). Combined cleaning takes several segments chosen by
cost-benefit with *segment* age, ``(1-u)*age/u`` (paper section 9), sorts their live entries by
age into survivor segments, and drops the cleaned segments from the log with a new digest; the
replica sink sees survivors opened, appended and closed, then the cleaned segments freed. The
tombstone-ratio balancer (RAMCloud's default ``tombstoneRatio:0.40``) picks the task.

There are no threads: :meth:`LogCleaner.step` does a bounded slice of work and returns, so a
server calls it from its event loop between requests. Liveness is checked when an entry is
copied, and the hash table is updated by compare-and-swap in the same slice, so an object
overwritten or removed between slices is never resurrected.

Every phase is incremental, so a slice stays within its time budget and within
``cleaner_bytes_per_step`` work units (bytes copied; scanning, sorting and committing are
charged in byte equivalents, see the ``COST_*`` constants):

* scanning walks the sources entry by entry, recording each candidate as one integer key,
  ``timestamp << 40 | source << 24 | offset``, which orders by age and locates the entry;
* sorting happens in chunks of at most ``RUN_CHUNK`` keys as they are scanned (a segment's
  entries are nearly always in age order already, so a chunk usually only needs the check);
  sorted chunks that continue each other join one run. Chunks are kept as ``array('Q')``
  (8 bytes a key), so no slice ever allocates, grows or frees one big list of Python ints
  (freeing 700,000 of them at the end of a pass took ~7 ms);
* relocation merges the runs lazily (``heapq.merge``), copying one live entry at a time and
  dropping each chunk as soon as it is consumed;
* committing (closing the last survivor, the new digest, freeing the cleaned segments) gets
  a slice of its own; its cost grows with the number of segments in the log, not with data.
"""

from __future__ import annotations

import enum
import heapq
import math
import struct
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import attrs

from services.kvstore.errors import InternalError
from services.kvstore.log._entries import (
    SEGMENT_HEADER_ENTRY_SIZE,
    TOMB_SEGMENT_OFFSET,
    TOMB_TIMESTAMP_OFFSET,
    EntryType,
)
from services.kvstore.log._log import Log, StorageConfig
from services.kvstore.log._segments import Pool, Segment, SegmentState

MAX_CLEANABLE_MEMORY_UTILIZATION = 98
MIN_DISK_UTILIZATION = 95
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_OBJ_TIMESTAMP = 4
_OBJ = int(EntryType.OBJ)
_OBJTOMB = int(EntryType.OBJTOMB)

# Work units charged against cleaner_bytes_per_step, in bytes-copied equivalents (measured
# here: scanning an entry ~0.5 us, checking one's liveness ~1.5 us, copying one ~1 us plus
# ~10 ns per byte).
COST_SCAN_ENTRY = 16  # plus an eighth of the entry's size
COST_SORT_KEY = 4  # per key in a chunk that was out of order
COST_MERGE_RUN = 64  # per run, once, when relocation starts
COST_CANDIDATE = 64  # per entry considered for relocation, plus its size if copied
COST_COMMIT_SEGMENT = 512  # per segment the commit touches (survivors, cleaned, the log's)
RUN_CHUNK = 256  # keys sorted at once (~30 us if in random order): the longest sort in a slice
_SOURCE_BITS = 8  # a key is 32 bits of timestamp, 8 of source, 24 of offset: one u64
_MAX_SOURCES = 1 << _SOURCE_BITS
_OFFSET_MASK = (1 << 24) - 1


class CleanerHandlers(Protocol):
    """What the cleaner needs from the owner of the hash table (the object manager)."""

    def object_hash_if_live(self, ref: int) -> int | None:
        """The key hash of the object entry at ``ref`` if the hash table points at it, else None."""
        ...

    def object_relocated(self, key_hash: int, old_ref: int, new_ref: int) -> bool:
        """Compare-and-swap the hash table entry from ``old_ref`` to ``new_ref``."""
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

    ``u`` is measured against the full segment size (the replica on backups), ``age`` is the
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
    seglets_freed: int
    compaction_failures: int
    aborted_passes: int
    emergency_heads_used: int


class _Budget:
    """What one step may still do: work units, and time until ``deadline`` on ``timer``."""

    __slots__ = ("deadline", "timer", "units")

    def __init__(self, units: int, deadline: float, timer: Callable[[], float]) -> None:
        self.units = units
        self.deadline = deadline
        self.timer = timer

    def spent(self) -> bool:
        return self.units <= 0 or self.timer() >= self.deadline


class _Compaction:
    def __init__(self, source: Segment, target: Segment) -> None:
        self.source = source
        self.target = target
        self.cursor = 0


class _Cleaning:
    def __init__(self, sources: list[Segment], reservation: list[int]) -> None:
        self.sources = sources
        self.source_ids = {s.id for s in sources}
        self.reservation = reservation
        # Tombstones not copied because their target is a source: (source, target id, bytes).
        self.dropped: list[tuple[Segment, int, int]] = []
        self.scanning = True
        self.scan_index = 0
        self.scan_offset = 0
        # Candidate keys (timestamp << 32 | source << 24 | offset): the chunk being scanned,
        # whether it is still in order, and the sorted runs made of finished chunks.
        self.chunk: list[int] = []
        self.chunk_sorted = True
        self.runs: list[deque[array[int]]] = []
        self.order: Iterator[int] | None = None  # the runs merged by age
        self.relocated_all = False
        self.item_index = 0
        self.item_count = 0
        self.survivors: list[Segment] = []
        self.current: Segment | None = None
        self.flushed = 0
        self.aborted = False


def _drain(run: deque[array[int]]) -> Iterator[int]:
    """A run's keys in order, letting go of each chunk once it is consumed."""
    while run:
        yield from run.popleft()


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
        self._seglets_freed = 0
        self._compaction_failures = 0
        self._aborted = 0

    # -- policy --------------------------------------------------------------------------

    def utilizations(self) -> tuple[float, float, float, float]:
        """``(T, L, U, disk)`` in percent: memory, live objects, live tombstones, backup log.

        T counts as 100 once the DEFAULT pool holds less than two head segments: with few,
        large segments the 90% rule alone would sleep while the next roll-over cannot happen.
        """
        log = self._log
        pool = log.default_pool_bytes
        starved = log.allocator.free_count(Pool.DEFAULT) < 2 * log.seglets_per_segment
        return (
            100.0 if starved else log.memory_utilization(),
            min(100.0, 100.0 * log.live_object_bytes / pool),
            min(100.0, 100.0 * log.live_tombstone_bytes / pool),
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
        free = allocator.free_count(Pool.DEFAULT)
        in_use = allocator.capacity(Pool.DEFAULT) - free
        if (
            in_use * 10 < 9 * allocator.capacity(Pool.DEFAULT)
            and free >= 2 * log.seglets_per_segment
            and log.disk_utilization() < MIN_DISK_UTILIZATION
        ):
            return False
        return self.next_task() is not CleanerTask.SLEEP

    def stats(self) -> CleanerStats:
        return CleanerStats(
            compactions=self._compactions,
            cleanings=self._cleanings,
            segments_compacted=self._segments_compacted,
            segments_cleaned=self._segments_cleaned,
            survivor_segments=self._survivors,
            bytes_relocated=self._bytes_relocated,
            seglets_freed=self._seglets_freed,
            compaction_failures=self._compaction_failures,
            aborted_passes=self._aborted,
            emergency_heads_used=self._log.emergency_heads_used,
        )

    # -- driving -------------------------------------------------------------------------

    def step(self, budget_seconds: float, now: float) -> bool:
        """Do up to ``budget_seconds`` (and ``cleaner_bytes_per_step`` units) of cleaning.

        ``now`` comes from the same clock the log stamps segments with; it ages segments for
        cost-benefit. Returns whether any work was done (memory reclaimed, entries copied or a
        pass started or finished); False means the balancer says sleep. A step overruns its
        budget by at most one unit of work (one entry, one sorted chunk, one commit).
        """
        units = self._config.cleaner_bytes_per_step
        budget = _Budget(units, self._timer() + budget_seconds, self._timer)
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

    # -- compaction ----------------------------------------------------------------------

    def _start_compaction(self) -> _Compaction | None:
        log = self._log
        size = log.seglet_size
        best: Segment | None = None
        best_need = 0
        best_score = -1.0
        for seg in log.cleanable_segments():
            need = -(-(seg.live_bytes + SEGMENT_HEADER_ENTRY_SIZE) // size)
            unused = len(seg.seglets) - need
            if unused <= 0:
                continue
            score = compaction_score(seg.live_bytes, unused, size)
            if score > best_score:
                best, best_need, best_score = seg, need, score
        if best is None:
            return None
        seglets = log.take_seglets(best_need)
        if len(seglets) < best_need:
            log.allocator.free(seglets)
            return None
        target = log.new_side_segment(seglets, SegmentState.COMPACTING, best.id)
        return _Compaction(best, target)

    def _run_compaction(self, job: _Compaction, budget: _Budget) -> bool:
        log = self._log
        src, dst = job.source, job.target
        offset = job.cursor
        end = src.length
        while offset < end:
            entry_type, buf, pos, _n, total = src.entry_at(offset)
            if entry_type == _OBJ:
                budget.units -= COST_CANDIDATE
                old_ref = log.ref(src, offset)
                key_hash = self._handlers.object_hash_if_live(old_ref)
                if key_hash is not None:
                    self._check_room(dst, total)
                    new_ref = log.relocate(src, offset, entry_type, total, dst)
                    if not self._handlers.object_relocated(key_hash, old_ref, new_ref):
                        raise InternalError("hash table lost an object during compaction")
                    self._bytes_relocated += total
                    budget.units -= total
            elif entry_type == _OBJTOMB:
                budget.units -= COST_CANDIDATE
                (target_id,) = _U64.unpack_from(buf, pos + TOMB_SEGMENT_OFFSET)
                if log.tombstone_live(target_id):
                    self._check_room(dst, total)
                    log.relocate(src, offset, entry_type, total, dst)
                    self._bytes_relocated += total
                    budget.units -= total
            else:
                budget.units -= COST_SCAN_ENTRY
            offset += total
            if budget.spent():
                break
        job.cursor = offset
        if offset < end:
            return False
        freed = log.finish_compaction(src, dst)
        budget.units -= COST_COMMIT_SEGMENT
        self._seglets_freed += freed
        self._compactions += 1
        self._segments_compacted += 1
        self._compaction_failed = False
        return True

    @staticmethod
    def _check_room(dst: Segment, total: int) -> None:
        if dst.room() < total:
            raise InternalError("compaction target too small: live-byte accounting is wrong")

    # -- combined cleaning ---------------------------------------------------------------

    def _survivor_seglets(self, live: int) -> int:
        """Worst-case seglets the survivors of ``live`` bytes need (entries never split).

        A survivor is closed only when the next entry does not fit, so it holds more than
        ``segment_size - max_entry`` bytes and, trimmed, wastes less than ``max_entry`` bytes
        of its seglets; only the last one may waste most of a seglet. (Charging a whole seglet
        per survivor, as before, exceeded the dead space of dense segments: a pass of ten then
        never paid and the cleaner wedged with memory full.)
        """
        if live <= 0:
            return 0
        log = self._log
        header = SEGMENT_HEADER_ENTRY_SIZE
        per_segment = max(1, log.segment_size - header - log.max_entry_seen)
        count = -(-live // per_segment)
        waste = count * (header + log.max_entry_seen)
        return -(-(live + waste) // log.seglet_size) + 1

    def _start_cleaning(self, now: float) -> _Cleaning | None:
        """Choose sources by cost-benefit; start a pass if it frees memory now or soon.

        The benefit counts, besides the sources' dead bytes, live tombstones that the pass
        retires: those inside the sources whose target is a source too are dropped instead of
        copied (``intra``), those elsewhere die at the commit and become compactable
        (``elsewhere``). A pass whose survivors cost at most what it frees at once is started
        when it retires tombstones elsewhere; otherwise memory full of tombstones of dead
        objects in dense (compacted) segments would wedge the cleaner.
        """
        log = self._log
        segment_size = log.segment_size
        holders_of = log.tombstone_holders
        scored: list[tuple[float, int, Segment]] = []
        for seg in log.cleanable_segments():
            dense = seg.live_bytes * 100 > MAX_CLEANABLE_MEMORY_UTILIZATION * seg.allocated_bytes
            if dense and not holders_of(seg.id):
                continue
            retirable = sum(cell[0] for cell in holders_of(seg.id).values())
            score = cleaning_score(seg.live_bytes, segment_size, now - seg.created, retirable)
            scored.append((score, -seg.live_bytes, seg))
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        available = log.allocator.free_count(Pool.CLEANER) + log.allocator.free_count(Pool.DEFAULT)
        picked = self._pick_sources([t[2] for t in scored], available)
        if picked is None:
            # Memory is too tight for the best-scored set: take the segments with the most
            # freeable bytes per live byte instead (dense old segments may score higher).
            by_room = sorted(
                (t[2] for t in scored),
                key=lambda seg: (seg.allocated_bytes - seg.live_bytes) / max(1, seg.live_bytes),
                reverse=True,
            )
            picked = self._pick_sources(by_room, available)
        if picked is None:
            return None
        chosen, need = picked
        return _Cleaning(chosen, log.take_seglets(need))

    def _pick_sources(
        self, candidates: list[Segment], available: int
    ) -> tuple[list[Segment], int] | None:
        """Greedily take ``candidates`` in order; the sources and survivor seglets, if it pays.

        Segments whose survivors would not fit in ``available`` seglets are skipped.
        """
        log = self._log
        holders_of = log.tombstone_holders
        cap = self._config.max_live_segments_per_pass * log.segment_size
        chosen: list[Segment] = []
        chosen_ids: set[int] = set()
        live = 0
        freed = 0
        intra = 0  # tombstone bytes in sources whose target is a source: dropped
        retired = 0  # all live tombstone bytes whose target is a source
        for seg in candidates:
            if len(chosen) == _MAX_SOURCES:
                break
            more = live + seg.live_bytes
            holders = holders_of(seg.id)
            gain = holders[seg.id][0] if seg.id in holders else 0
            for holder_id, cell in holders.items():
                if holder_id in chosen_ids:
                    gain += cell[0]
            for other in chosen:
                held = holders_of(other.id).get(seg.id)
                if held is not None:
                    gain += held[0]
            if chosen and more - intra - gain > cap:
                continue
            if self._survivor_seglets(more - intra - gain) > available:
                continue
            chosen.append(seg)
            chosen_ids.add(seg.id)
            live = more
            intra += gain
            retired += sum(cell[0] for cell in holders.values())
            freed += len(seg.seglets)
        if not chosen:
            return None
        need = self._survivor_seglets(live - intra)
        now_gain = freed - need
        if now_gain < 1 and (now_gain < 0 or retired - intra < log.seglet_size):
            return None
        return chosen, need

    def _run_cleaning(self, job: _Cleaning, budget: _Budget) -> bool:
        if job.scanning and (not self._scan(job, budget) or budget.spent()):
            return False
        if job.order is None:
            self._merge_runs(job, budget)
            if budget.spent():
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
        """Record candidate entries as age-ordered keys; True once all sources are scanned."""
        sources = job.sources
        while job.scan_index < len(sources):
            seg = sources[job.scan_index]
            entry_at = seg.entry_at
            source = job.scan_index << 24
            chunk = job.chunk
            last = chunk[-1] if chunk else -1
            offset = job.scan_offset
            end = seg.length
            while offset < end:
                entry_type, buf, pos, _n, total = entry_at(offset)
                offset_before = offset
                offset += total
                budget.units -= COST_SCAN_ENTRY + (total >> 3)
                if entry_type == _OBJ:
                    key = _U32.unpack_from(buf, pos + _OBJ_TIMESTAMP)[0] << 32 | source
                elif entry_type == _OBJTOMB:
                    key = _U32.unpack_from(buf, pos + TOMB_TIMESTAMP_OFFSET)[0] << 32 | source
                else:
                    if budget.spent():
                        break
                    continue
                key |= offset_before
                if key < last:
                    job.chunk_sorted = False
                chunk.append(key)
                last = key
                if len(chunk) >= RUN_CHUNK:
                    self._end_chunk(job, budget)
                    chunk = job.chunk
                    last = -1
                if budget.spent():
                    break
            job.scan_offset = offset
            if offset < end:
                return False
            job.scan_index += 1
            job.scan_offset = 0
            if budget.spent():
                return False
        self._end_chunk(job, budget)
        job.scanning = False
        return True

    @staticmethod
    def _merge_runs(job: _Cleaning, budget: _Budget) -> None:
        """Set up the age-ordered walk over all runs (lazy: relocation pulls from it)."""
        budget.units -= COST_MERGE_RUN * len(job.runs)
        job.order = heapq.merge(*(_drain(run) for run in job.runs))
        job.runs = []

    @staticmethod
    def _end_chunk(job: _Cleaning, budget: _Budget) -> None:
        """Sort the chunk just scanned (if needed) and add it to the runs."""
        chunk = job.chunk
        if not chunk:
            return
        if not job.chunk_sorted:
            chunk.sort()
            budget.units -= COST_SORT_KEY * len(chunk)
        keys = array("Q", chunk)
        job.item_count += len(keys)
        first = keys[0]
        for run in reversed(job.runs):  # the newest run first: usually the one it continues
            if run[-1][-1] < first:
                run.append(keys)
                break
        else:
            job.runs.append(deque((keys,)))
        job.chunk = []
        job.chunk_sorted = True

    def _relocate(self, job: _Cleaning, budget: _Budget) -> None:
        log = self._log
        handlers = self._handlers
        sources = job.sources
        assert job.order is not None
        for item in job.order:
            job.item_index += 1
            src = sources[item >> 24 & (_MAX_SOURCES - 1)]
            offset = item & _OFFSET_MASK
            entry_type, buf, pos, _n, total = src.entry_at(offset)
            budget.units -= COST_CANDIDATE
            key_hash = None
            target_id = 0
            old_ref = 0
            if entry_type == _OBJ:
                old_ref = log.ref(src, offset)
                key_hash = handlers.object_hash_if_live(old_ref)
                if key_hash is None:
                    if budget.spent():
                        break
                    continue
            else:
                (target_id,) = _U64.unpack_from(buf, pos + TOMB_SEGMENT_OFFSET)
                if not log.tombstone_live(target_id):
                    if budget.spent():
                        break
                    continue
                if target_id in job.source_ids:
                    # Its target leaves the log in this same commit: nothing to copy. (If the
                    # target stays after all, the commit keeps this source too.)
                    src.live_bytes -= total
                    src.tombstone_bytes -= total
                    job.dropped.append((src, target_id, total))
                    if budget.spent():
                        break
                    continue
            dst = self._room_for(job, total)
            if dst is None:
                job.aborted = True
                break
            new_ref = log.relocate(src, offset, entry_type, total, dst)
            if key_hash is not None:
                if not handlers.object_relocated(key_hash, old_ref, new_ref):
                    raise InternalError("hash table lost an object during cleaning")
            else:
                log.move_tombstone(target_id, src.id, dst.id, total)
            self._bytes_relocated += total
            budget.units -= total
            if budget.spent():
                break
        else:
            job.relocated_all = True
        self._flush(job)

    def _take(self, job: _Cleaning, count: int) -> list[int] | None:
        got = job.reservation[:count]
        del job.reservation[:count]
        if len(got) < count:
            got.extend(self._log.take_seglets(count - len(got)))
        if len(got) < count:
            job.reservation.extend(got)
            return None
        return got

    def _room_for(self, job: _Cleaning, total: int) -> Segment | None:
        log = self._log
        size = log.seglet_size
        cur = job.current
        if cur is not None and cur.capacity - cur.length >= total:
            short = total - cur.room()
            if short > 0:
                more = self._take(job, -(-short // size))
                if more is None:
                    return None
                cur.grow(more)
            return cur
        count = -(-(SEGMENT_HEADER_ENTRY_SIZE + total) // size)
        seglets = self._take(job, count)
        if seglets is None:
            return None
        if cur is not None:
            self._close_survivor(job, cur)
        seg = log.new_side_segment(seglets, SegmentState.SURVIVOR)
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
        before = sum(len(s.seglets) for s in cleaned)
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
        restored). Staying can cascade, hence the loop (at most one round per source).
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
            return f"compacting segment {job.source.id} at {job.cursor}/{job.source.length}"
        phase = "scanning" if job.scanning else "relocating"
        return f"cleaning {len(job.sources)} segments, {phase} {job.item_index}/{job.item_count}"
