"""``rpcfast-perf cleaner``: what log cleaning costs writes (FAST'14 Figures 6, 7 and 9).

Sections (``--sections``):

* ``sweep``: fill the log with sequential keys to a utilisation (live object bytes over total
  log memory; the reserves are kept small so 90% can be asked for), then overwrite keys
  (uniform, or Zipfian with 90% of writes to 15% of the keys): 1.5x the log memory to warm up,
  1x measured, each bounded in time (``cut`` marks a bound hit). ``copied/new`` is every byte
  the cleaner copied in memory (compaction and combined cleaning) per new object byte;
  ``backup/new`` is Figure 7's metric (survivor bytes the replica sink receives per byte of new
  log data) and ``wcost`` the backup log's write cost, ``1 + backup/new``. ``u_comp`` and
  ``u_clean`` are the memory utilisation (live over held bytes) of the segments compaction and
  combined cleaning chose: each copies about ``u/(1-u)`` bytes per byte it frees.
* ``latency``: Figure 9. 100-byte objects, uniform, at 90% (or the highest of 85, 80, ... at
  which the engine does not wedge) vs the same writes in a log so large the cleaner never runs;
  closed loop (back to back: a write's latency includes the slice that ran before it) and open
  loop (Poisson arrivals at ``--load`` of the closed-loop capacity; slices run only while no
  request waits, as in the server's event loop), for each slice budget.
* ``design``: the GIL question of the engine's issue. We time the parts of real cooperative
  slices (compaction's C kernel, the rest), the IPC cost of
  relocation batches over a pipe and over shared memory, and run a prototype of the owner's
  side of a separate cleaner process: the writer applies relocation batches (real hash-table
  CAS calls) that a second process sends at the measured relocation rate, after burning the
  measured CPU time of the work it would take over; the writer blocks when it runs more than
  ``PROTOTYPE_BACKLOG`` relocations ahead (memory is finite).
* ``server``: the same questions end to end (``perf/_cleaner_server.py``): a real one-server
  cluster (R = 0) per point, loaded through ``KvClient``, its cleaner running as a server runs
  it; throughput under the paper's stress load (10 multi-writes of 75 in flight) and one
  write at a time ("Sequential"), and Figure 9 as the paper measured it (one client, back to
  back) with whole and with yielding slices against an idle-cleaner server, interleaved.
  Between blocks each server settles (its cleaner finishes its backlog, so that it does not
  run beside the next server's block); ``in_window`` is the part of ``copied/new`` that ran
  while the measured writes did, which is what their latencies saw.

Conclusion (``rpcfast-perf cleaner --json cleaner.json``, 16 MiB log, 2-core shared host):

* Compaction moves entries in C (``services/kvstore/log/_relocate.c``: liveness probes, copies
  and hash-table repointing, one call per batch) and the engine and cleaner are compiled with
  mypyc. Per relocated entry at 90%: 0.08 us in the kernel and 0.30 us for the rest (choosing,
  scanning, combined cleaning's numpy batches, committing) for 100 B objects; 0.28 and 0.99 us
  for 1 KB (tombstones included: 32-40 relocations per write). The numpy path took 2-4 us, the
  per-entry Python cleaner before it 6-15 us.
  The numpy slicing and accounting around each kernel call cost ~50 us a batch, which bounded
  small batches; the kernel now takes the pass's arrays whole and cuts the batch itself
  (``compact_range``). Engine-level, writes refused until the cleaner ran, 1 KB at 90% of a
  32 MB log, three interleaved pairs: 1.40-1.66 -> 1.16-1.52 us of cleaning per relocated
  entry (17% less in the median pair); 100 B: 0.36-0.43 -> 0.34-0.37 us.
  Combined cleaning's probes, timestamp gathers and placements are C calls too
  (``live_slots``, ``entry_stamps``, ``place_entries``): per entry it relocates at 90% of a
  16 MB log, 1.1-1.3 -> 0.7-0.8 us (100 B) and 5.8-6.3 -> 3.8-5.0 us (1 KB: few entries a
  batch); at 100 B it had been over a third of the cleaner's time. A pass's entry arrays
  are decoded from its sources' index words in one C loop (``decode_index``): ~22 us instead
  of ~57 for sixteen 128 KB sources of 1 KB objects; in process, 1 KB at 90%, nine
  interleaved pairs, the cleaner's time a write went 24.7 -> 19.3 us (medians).
* Throughput at 90% against 30%: 1 KB uniform 0.32x (21.5k vs 68.4k writes/s; 0.24x with the
  numpy path), zipfian 0.49x; 100 B uniform 0.41x; 10 KB uniform 0.36x. Bytes copied per new
  byte (1 KB, uniform) are ~9 at 80% and ~22 at 90%, with the chosen segments ~94% live in
  memory (``u_comp``): at 90% of the log the 10% of free memory goes to the reserves (3.1%),
  the unallocated half the paper's balancer keeps, seglet tails (~1%), live tombstones (~1%)
  and the head's unfilled part, leaving ~1.5% as dead bytes to reclaim. Even an ideal cleaner
  left with the ~5% the paper's rule leaves for dead bytes would copy ~9 bytes per new byte,
  so the issue's 0.8x at 90% needs a balancer that keeps less memory unallocated as well as
  cheap relocation; the paper measured ~0.5x in C++.
* Write latency at 90% (100 B, uniform), cooperative slices: closed loop median 0.76-0.92x the
  no-cleaner run (whose 8x larger log costs cache misses), p99 11-25x; open loop at the same
  offered rate median 1.79x/1.94x with 0.5/2 ms slices (19.6x with 0.2 ms: the per-slice
  overhead), p99 1.3-2.3 ms.
* The separate-process prototype (owner applies relocation batches the other process sends)
  now costs the writer more than the work it takes over: applying a batch costs 0.07-0.28 us
  per relocation (batches of 1024-128) plus a round trip, against 0.08-0.28 us for the whole
  kernel in process; its closed-loop median was 1.8x and its open loop fell behind.
* Choice, as built: cooperative slices in the server's event loop (``_master.run_cleaner``,
  0.5 ms), with relocation in C. What remains interpreted is the 0.3-1.0 us per relocation of
  choosing, scanning and committing, and combined cleaning's batches; the latency target
  (cleaner adds <= 5% to the median) is not met in the open loop of this engine-level loop.
* End to end (``--sections server``, 32 MB log, 256 KB segments, 8 KB seglets; seven runs, the
  machine's own speed drifting ~25% between them): with one client writing back to back
  (Figure 9's method), 100-byte writes at 90% had a median 1.01, 1.02, 1.02, 1.10, 1.11,
  1.12 and 1.23x an idle-cleaner server's in interleaved blocks, p99 1.3-6x: not the issue's <= 1.05
  in every run. A slice that yields as soon as a request waits (``--cleaner-interruptible``)
  cut p99 in most runs (0.4-3.5x) but its median was 1.02-1.24x, and under the stress load
  its one small unit per loop let the cleaner fall behind (Retry even at 30%), so whole
  slices stay the default. Throughput at 90% against 30%, whole slices: one write at a time
  0.45-0.61x (1 KB) and 0.35-0.72x (100 B); under the stress load 0.26-0.44x (1 KB) and
  0.32-0.36x (100 B). Where the time goes at 1 KB, 90% (perf record of the engine): 71%
  cleaning, 16% of all time in memmove alone (~17 bytes copied per new byte: the chosen
  segments are ~94% live, because at 90% of a 16-32 MB log the reserves (3%), the free memory
  the balancer keeps (2%), live tombstones (1.5%) and unwritten seglet tails (1%) leave ~2%
  of memory as dead bytes; letting the balancer keep less free memory changed nothing at this
  size, as the reserves and the head-segment floor set the free pools). The copying alone
  costs more per write than the 0.8x target leaves for cleaning.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from attrs import define, field, frozen

from perf import _args, _stats
from perf._cleaner_server import (
    QUICK_SERVER_SCALE,
    SERVER_COLUMNS,
    SERVER_SCALE,
    server_section,
)
from perf._stats import Column, Row

if TYPE_CHECKING:
    from services.kvstore import ObjectManager
    from services.kvstore.log import Segment

HELP = "Log cleaner: write throughput, cleaner cost and write latency vs memory utilisation."

CONCLUSION = (
    "cooperative 0.5 ms slices in the server's event loop, compaction's inner loop in C; the "
    "separate-process prototype costs the writer more than it takes over; see the docstring"
)

KiB = 1 << 10
MiB = 1 << 20
SIZES: tuple[int, ...] = (100, 1000, 10000)
UTILIZATIONS: tuple[int, ...] = (30, 50, 70, 80, 90)
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "zipfian")
BUDGETS_S: tuple[float, ...] = (0.0002, 0.0005, 0.002)
DEFAULT_BUDGET_S = 0.0005
SECTIONS: tuple[str, ...] = ("sweep", "latency", "design", "server")
LATENCY_SIZE = 100
LATENCY_UTILIZATION = 90
LATENCY_FALLBACKS: tuple[int, ...] = (90, 85, 80, 75, 70)
CLEANER_RESERVE_SEGMENTS = 2
WRITE_LIMIT = 0.98
MAX_RETRY_STEPS = 20_000
KEY_BYTES = 8
PROTOTYPE_BATCH = 128
PROTOTYPE_BACKLOG = 16 * PROTOTYPE_BATCH  # relocations the writer may run ahead of its cleaner
_TABLE = 1
_CHUNK = 4096


@frozen
class Scale:
    """Sizes and bounds of one run; ``--quick`` uses a tiny one."""

    memory_bytes: int
    segment_size: int
    seglet_size: int
    warm_factor: float  # bytes overwritten before measuring, as a multiple of log memory
    measure_factor: float  # bytes overwritten while measuring, likewise
    warm_s: float
    measure_s: float
    latency_writes: int
    latency_s: float
    ipc_batches: int


DEFAULT_SCALE = Scale(16 * MiB, 128 * KiB, 4 * KiB, 1.5, 1.0, 15.0, 8.0, 60_000, 5.0, 2000)
QUICK_SCALE = Scale(4 * MiB, 64 * KiB, 2 * KiB, 0.3, 0.2, 1.0, 1.0, 1500, 0.5, 50)


def object_entry_bytes(size: int) -> int:
    """Log bytes of one object of ``size`` key+value bytes."""
    from services.kvstore.log import object_entry_size

    return object_entry_size(KEY_BYTES, size - KEY_BYTES)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def make_store(scale: Scale, objects: int, memory_bytes: int | None = None) -> ObjectManager:
    """A store with the scale's log geometry, small reserves and a 98% write limit, so that
    90% of *total* log memory can hold live objects; one hash bucket per four objects."""
    from services.kvstore import ObjectManager, StorageConfig

    total = memory_bytes if memory_bytes is not None else scale.memory_bytes
    total -= total % scale.segment_size
    seglet = scale.seglet_size
    while seglet < scale.segment_size and 8 * (total // seglet) > scale.segment_size // 4:
        seglet *= 2  # a big log: keep the digest's reserved room (8 B a seglet) small
    config = StorageConfig(
        total_bytes=total,
        segment_size=scale.segment_size,
        seglet_size=seglet,
        cleaner_reserve_segments=CLEANER_RESERVE_SEGMENTS,
        write_limit=WRITE_LIMIT,
        hash_table_bytes=64 * _pow2_at_least(max(1, objects // 4)),
        prefault_memory=True,
    )
    sink = CountingSink()
    om = ObjectManager(config, replica_sink=sink)
    sink.attach(om)
    om.add_tablet(_TABLE)
    return om


class CountingSink:
    """A replica sink that counts bytes bound for backups: new log data vs cleaner survivors."""

    def __init__(self) -> None:
        self._segments: dict[int, Segment] | None = None
        self._survivors: set[int] = set()
        self.head_bytes = 0
        self.survivor_bytes = 0

    def attach(self, om: ObjectManager) -> None:
        self._segments = om.log.segments

    def open(self, segment_id: int, data: Any) -> None:
        from services.kvstore.log import SegmentState

        seg = self._segments.get(segment_id) if self._segments is not None else None
        if seg is not None and seg.state is SegmentState.SURVIVOR:
            self._survivors.add(segment_id)
            self.survivor_bytes += len(data)
        else:
            self.head_bytes += len(data)

    def append(self, segment_id: int, offset: int, data: Any) -> None:
        if segment_id in self._survivors:
            self.survivor_bytes += len(data)
        else:
            self.head_bytes += len(data)

    def close(self, segment_id: int) -> None:
        self._survivors.discard(segment_id)

    def free(self, segment_id: int) -> None:
        pass


# -- the cooperative write loop ---------------------------------------------------------------


@define
class Window:
    """What one stretch of writes did."""

    writes: int = 0
    seconds: float = 0.0
    cleaner_s: float = 0.0
    wants_s: float = 0.0
    stalls: int = 0
    truncated: bool = False
    write_samples: list[float] = field(factory=list)
    loop_samples: list[float] = field(factory=list)


class StuckError(RuntimeError):
    """Writes keep getting Retry and the cleaner frees nothing: the log is wedged."""


class Writer:
    """Writes objects of one size, running the cleaner in slices as a server's loop would.

    ``cleaner`` may be any object with ``step`` and ``wants_to_run`` (the design section passes
    an instrumented :class:`~services.kvstore.log.LogCleaner`); None disables cleaning except
    when a write is refused.
    """

    def __init__(
        self, om: ObjectManager, size: int, budget_s: float, cleaner: Any | None = None
    ) -> None:
        self.om = om
        self.size = size
        self.budget_s = budget_s
        self.cleaner = cleaner if cleaner is not None else om.cleaner
        self.value = memoryview(os.urandom(size - KEY_BYTES))

    def write_one(self, key: bytes, window: Window) -> None:
        """One write; a Retry runs cleaner slices until it succeeds (bounded)."""
        from services.kvstore import Retry

        om = self.om
        for _ in range(MAX_RETRY_STEPS):
            try:
                om.write(_TABLE, key, self.value)
                return
            except Retry:
                window.stalls += 1
                t0 = time.perf_counter()
                progressed = self.cleaner.step(self.budget_s, time.monotonic())
                window.cleaner_s += time.perf_counter() - t0
                if not progressed and not self.cleaner.wants_to_run():
                    raise StuckError("writes refused and the cleaner has nothing to do") from None
        raise StuckError(f"write still refused after {MAX_RETRY_STEPS} cleaner slices")

    def fill(self, count: int, deadline: float) -> Window:
        """Create keys ``0..count-1`` in order (the cleaner runs only if a write is refused)."""
        window = Window()
        start = time.perf_counter()
        for key_id in range(count):
            self.write_one(key_id.to_bytes(KEY_BYTES, "big"), window)
            window.writes += 1
            if key_id % _CHUNK == 0 and time.perf_counter() > deadline:
                window.truncated = True
                break
        window.seconds = time.perf_counter() - start
        return window

    def closed_loop(
        self,
        keys: Iterator[int],
        count: int,
        seconds: float,
        *,
        cooperative: bool = True,
        record: bool = False,
        between: Callable[[], None] | None = None,
    ) -> Window:
        """Back-to-back overwrites; after each, one slice if the cleaner wants to run.

        ``write_samples`` time the write alone (including slices forced by Retry);
        ``loop_samples`` time completion to completion, so each includes the slice (or the
        ``between`` work) that ran before it: the latency of a zero-RTT back-to-back client.
        """
        window = Window()
        cleaner = self.cleaner
        budget = self.budget_s
        perf = time.perf_counter
        start = perf()
        deadline = start + seconds
        last = start
        for i, key_id in enumerate(keys):
            if i >= count:
                break
            t0 = perf()
            self.write_one(key_id.to_bytes(KEY_BYTES, "big"), window)
            t1 = perf()
            if record:
                window.write_samples.append(t1 - t0)
                window.loop_samples.append(t1 - last)
            last = t1
            window.writes += 1
            if cooperative:
                wants = cleaner.wants_to_run()
                t2 = perf()
                window.wants_s += t2 - t1
                if wants:
                    cleaner.step(budget, time.monotonic())
                    window.cleaner_s += perf() - t2
            if between is not None:
                between()
            if t1 > deadline:
                window.truncated = True
                break
        window.seconds = perf() - start
        return window

    def open_loop(
        self,
        keys: Iterator[int],
        rate: float,
        count: int,
        seconds: float,
        *,
        cooperative: bool = True,
        idle: Callable[[], bool] | None = None,
        between: Callable[[], None] | None = None,
        seed: int = 7,
    ) -> Window:
        """Poisson arrivals at ``rate``/s; idle time goes to cleaner slices (or ``idle``).

        A sample is completion minus arrival, so it includes waiting behind a slice that was
        running when the request arrived, and behind earlier requests.
        """
        window = Window()
        cleaner = self.cleaner
        budget = self.budget_s
        perf = time.perf_counter
        rng = random.Random(seed)
        start = perf()
        deadline = start + seconds
        arrival = start + rng.expovariate(rate)
        served = 0
        while served < count:
            now = perf()
            if now >= arrival:
                key_id = next(keys)
                self.write_one(key_id.to_bytes(KEY_BYTES, "big"), window)
                done = perf()
                window.write_samples.append(done - arrival)
                served += 1
                if between is not None:
                    between()
                arrival += rng.expovariate(rate)
                if done > deadline:
                    window.truncated = True
                    break
                continue
            if idle is not None and idle():
                continue
            if cooperative:
                wants = cleaner.wants_to_run()
                t1 = perf()
                window.wants_s += t1 - now
                if wants:
                    cleaner.step(budget, time.monotonic())
                    window.cleaner_s += perf() - t1
        window.writes = served
        window.seconds = perf() - start
        return window


def key_stream(n: int, distribution: str, seed: int) -> Iterator[int]:
    """Endless key ids drawn from ``distribution`` over ``[0, n)``."""
    from perf._workloads import KeyChooser

    chooser = KeyChooser(n, distribution, seed=seed)
    while True:
        yield from chooser.draw(_CHUNK)


def writes_for(factor: float, size: int, scale: Scale) -> int:
    """Overwrites that put ``factor`` times the log memory of new objects into the log: the
    cleaner reaches steady state only after the log has turned over, whatever the live count."""
    return max(1, int(factor * scale.memory_bytes / object_entry_bytes(size)))


def objects_for(utilization: int, size: int, memory_bytes: int) -> int:
    return max(1, int(utilization / 100 * memory_bytes / object_entry_bytes(size)))


# -- sweep (Figures 6 and 7) ---------------------------------------------------------------------


def sweep_point(
    size: int, distribution: str, utilization: int, scale: Scale, budget_s: float, seed: int
) -> Row:
    """Throughput and cleaner cost at one (size, distribution, utilisation)."""
    base: Row = {
        "section": "sweep",
        "object_bytes": size,
        "distribution": distribution,
        "utilization_target": utilization,
        "budget_ms": budget_s * 1e3,
    }
    n = objects_for(utilization, size, scale.memory_bytes)
    try:
        om = make_store(scale, n)
        writer = Writer(om, size, budget_s)
        writer.fill(n, time.perf_counter() + 10 * scale.warm_s)
        keys = key_stream(n, distribution, seed)
        warm = writer.closed_loop(keys, writes_for(scale.warm_factor, size, scale), scale.warm_s)
        s0 = om.stats()
        sink = om.log.sink
        assert isinstance(sink, CountingSink)
        head0, surv0 = sink.head_bytes, sink.survivor_bytes
        win = writer.closed_loop(
            keys, writes_for(scale.measure_factor, size, scale), scale.measure_s
        )
        s1 = om.stats()
    except Exception as exc:
        return {**base, "error": f"{type(exc).__name__}: {exc}"}
    new_log_bytes = win.writes * object_entry_bytes(size)
    head = sink.head_bytes - head0
    survivors = sink.survivor_bytes - surv0
    relocated = s1.cleaner.bytes_relocated - s0.cleaner.bytes_relocated
    return {
        **base,
        "objects": n,
        "utilization": s1.live_bytes / s1.total_bytes,
        "memory_in_use": s1.memory_utilization,
        "tombstone_fraction": s1.tombstone_bytes / s1.total_bytes,
        "writes": win.writes,
        "seconds": win.seconds,
        "objects_per_s": win.writes / win.seconds,
        "mb_per_s": win.writes * size / win.seconds / MiB,
        "cleaner_time_fraction": win.cleaner_s / win.seconds,
        "wants_time_fraction": win.wants_s / win.seconds,
        "relocated_per_new_byte": relocated / new_log_bytes,
        "backup_ratio": survivors / head if head else None,
        "write_cost": (head + survivors) / head if head else None,
        "compacted_use": _chosen_use(s0.cleaner, s1.cleaner, "compacted"),
        "cleaned_use": _chosen_use(s0.cleaner, s1.cleaner, "cleaned"),
        "compactions": s1.cleaner.compactions - s0.cleaner.compactions,
        "cleanings": s1.cleaner.cleanings - s0.cleaner.cleanings,
        "stalls": win.stalls,
        "warm_writes": warm.writes,
        "truncated": int(warm.truncated or win.truncated),
    }


def _chosen_use(before: Any, after: Any, kind: str) -> float | None:
    """Memory utilisation of the segments the cleaner chose (``kind``: compacted or cleaned)
    in a window: what it copied per byte freed follows from it (u/(1-u))."""
    live = getattr(after, f"{kind}_live_bytes") - getattr(before, f"{kind}_live_bytes")
    held = getattr(after, f"{kind}_allocated_bytes") - getattr(before, f"{kind}_allocated_bytes")
    return live / held if held else None


def add_relative_throughput(rows: list[Row]) -> None:
    """``vs_30``: throughput over the same size and distribution's throughput at 30%."""
    base: dict[tuple[object, object], float] = {}
    for r in rows:
        if r.get("section") == "sweep" and r.get("utilization_target") == 30 and "error" not in r:
            base[(r["object_bytes"], r["distribution"])] = float(r["objects_per_s"] or 0.0)
    for r in rows:
        if r.get("section") != "sweep" or "error" in r:
            continue
        ref = base.get((r["object_bytes"], r["distribution"]))
        r["vs_30"] = float(r["objects_per_s"] or 0.0) / ref if ref else None


# -- latency (Figure 9) --------------------------------------------------------------------------


@define
class Curves:
    """Latency samples by label, for the CDF plot."""

    samples: dict[str, list[float]] = field(factory=dict)


def _latency_store(scale: Scale, utilization: int, cleaner: bool) -> tuple[ObjectManager, int]:
    n = objects_for(utilization, LATENCY_SIZE, scale.memory_bytes)
    if cleaner:
        return make_store(scale, n), n
    # Big enough that the fill plus every later write (object and tombstone) stays under the
    # balancer's 90% threshold: the cleaner never has anything to do.
    per_write = object_entry_bytes(LATENCY_SIZE) + 64
    writes = 4 * scale.latency_writes + 1
    need = n * object_entry_bytes(LATENCY_SIZE) + writes * per_write
    return make_store(scale, n, memory_bytes=int(need / 0.8) + 16 * scale.segment_size), n


def prepared_store(
    scale: Scale, utilization: int, cleaner: bool, seed: int
) -> tuple[ObjectManager, int]:
    """A filled store; with the cleaner, also overwritten into (bounded) steady state."""
    om, n = _latency_store(scale, utilization, cleaner)
    writer = Writer(om, LATENCY_SIZE, DEFAULT_BUDGET_S)
    writer.fill(n, time.perf_counter() + 10 * scale.warm_s)
    if cleaner:
        writer.closed_loop(
            key_stream(n, "uniform", seed),
            writes_for(scale.warm_factor, LATENCY_SIZE, scale),
            scale.warm_s,
        )
    return om, n


def feasible_store(
    scale: Scale, seed: int, log: Callable[[str], None]
) -> tuple[ObjectManager, int, int]:
    """The cleaner store at ``LATENCY_UTILIZATION``, or the highest of the fallbacks at which
    the engine does not wedge (writes refused while the cleaner finds nothing to do)."""
    last: StuckError | None = None
    for utilization in LATENCY_FALLBACKS:
        try:
            om, n = prepared_store(scale, utilization, True, seed)
            return om, n, utilization
        except StuckError as exc:
            log(f"  {LATENCY_SIZE} B at {utilization}%: {exc}; trying lower")
            last = exc
    raise StuckError(f"wedged at every utilisation tried: {last}")


def _name(cleaner: bool, budget: float) -> str:
    return f"cleaner {budget * 1e3:g} ms" if cleaner else "no cleaner"


def latency_section(
    scale: Scale, load: float, seed: int, curves: Curves, log: Callable[[str], None]
) -> tuple[list[Row], int | None]:
    """Closed- and open-loop latency with the cleaner at each budget and without it.

    Returns the rows and the utilisation used (None if no store could be prepared).
    """
    rows: list[Row] = []
    try:
        with_cleaner = feasible_store(scale, seed, log)
    except Exception as exc:
        return [{"section": "latency", "error": f"{type(exc).__name__}: {exc}"}], None
    utilization = with_cleaner[2]
    stores: dict[bool, tuple[ObjectManager, int]] = {True: with_cleaner[:2]}
    try:
        stores[False] = prepared_store(scale, utilization, False, seed)
    except Exception as exc:
        rows.append({"section": "latency", "error": f"{type(exc).__name__}: {exc}"})
    runs: list[tuple[str, bool, float]] = [("off", False, DEFAULT_BUDGET_S)]
    runs += [("on", True, b) for b in BUDGETS_S]
    capacity: float | None = None
    common: Row = {"section": "latency", "utilization_target": utilization}
    for label, cleaner, budget in runs:
        if cleaner not in stores:
            continue
        om, n = stores[cleaner]
        writer = Writer(om, LATENCY_SIZE, budget)
        s0 = om.stats().cleaner
        try:
            keys = key_stream(n, "uniform", seed + 1)
            closed = writer.closed_loop(keys, scale.latency_writes, scale.latency_s, record=True)
        except Exception as exc:
            rows.append(
                {
                    **common,
                    "mode": "closed",
                    "cleaner": label,
                    "budget_ms": budget * 1e3,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            continue
        rate = closed.writes / closed.seconds
        if cleaner and budget == DEFAULT_BUDGET_S:
            capacity = rate
        s1 = om.stats().cleaner
        curves.samples[f"closed: {_name(cleaner, budget)}"] = closed.loop_samples
        rows.append(
            {
                **common,
                "mode": "closed",
                "cleaner": label,
                "budget_ms": budget * 1e3 if cleaner else None,
                "objects_per_s": rate,
                "cleaner_time_fraction": closed.cleaner_s / closed.seconds,
                "cleaner_ran": int(s1.bytes_relocated != s0.bytes_relocated),
                "stalls": closed.stalls,
                **_stats.quantiles_us(closed.loop_samples),
                "write_only_median_us": _stats.summarize(closed.write_samples).median_s * 1e6,
            }
        )
    if capacity is None:
        return rows, utilization
    rate = load * capacity
    for label, cleaner, budget in runs:
        if cleaner not in stores:
            continue
        om, n = stores[cleaner]
        writer = Writer(om, LATENCY_SIZE, budget)
        s0 = om.stats().cleaner
        try:
            win = writer.open_loop(
                key_stream(n, "uniform", seed + 2), rate, scale.latency_writes, scale.latency_s
            )
        except Exception as exc:
            rows.append(
                {
                    **common,
                    "mode": "open",
                    "cleaner": label,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
            continue
        s1 = om.stats().cleaner
        curves.samples[f"open: {_name(cleaner, budget)}"] = win.write_samples
        rows.append(
            {
                **common,
                "mode": "open",
                "cleaner": label,
                "budget_ms": budget * 1e3 if cleaner else None,
                "offered_per_s": rate,
                "objects_per_s": win.writes / win.seconds,
                "cleaner_time_fraction": win.cleaner_s / win.seconds,
                "cleaner_ran": int(s1.bytes_relocated != s0.bytes_relocated),
                "stalls": win.stalls,
                **_stats.quantiles_us(win.write_samples),
            }
        )
    add_latency_ratios(rows)
    return rows, utilization


def add_latency_ratios(rows: list[Row]) -> None:
    """``median_ratio``/``p99_ratio``: over the no-cleaner run of the same mode."""
    ref: dict[object, Row] = {
        r["mode"]: r for r in rows if r.get("cleaner") == "off" and "error" not in r
    }
    for r in rows:
        base = ref.get(r.get("mode"))
        if base is None or "error" in r or r.get("section") not in ("latency", "design"):
            continue
        for key in ("median_us", "p99_us"):
            mine, theirs = r.get(key), base.get(key)
            if isinstance(mine, float) and isinstance(theirs, float) and theirs > 0:
                r[key.replace("_us", "_ratio")] = mine / theirs


# -- design: cooperative slices vs a separate cleaner process -------------------------------------


class _Stopwatch:
    """Wraps a callable, summing the time spent in it and counting calls."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.s = 0.0
        self.n = 0

    def __call__(self, *args: Any) -> Any:
        t0 = time.perf_counter()
        result = self.fn(*args)
        self.s += time.perf_counter() - t0
        self.n += 1
        return result

    def reset(self) -> None:
        self.s = 0.0
        self.n = 0


def breakdown(size: int, utilization: int, scale: Scale, budget_s: float, seed: int) -> Row:
    """Where a cooperative cleaner's time goes: what another process could take over.

    Compaction moves entries in C (``_relocate.compact_range``: the batch's cut, liveness
    probes, copies and hash-table repointing in one call per batch), timed per batch through
    the module's reference and reported per relocated entry (``kernel``), beside the rest of
    the cleaner's time (choosing segments, scanning indexes, combined cleaning's batches,
    committing, the balancer). The engine is compiled, so its methods cannot be
    wrapped one by one. On a pure-Python install the kernel is absent and everything counts
    as the rest.
    """
    from services.kvstore.log import _cleaner as cleaner_module

    n = objects_for(utilization, size, scale.memory_bytes)
    om = make_store(scale, n)
    relocate = cleaner_module._relocate  # type: ignore[attr-defined]
    kernel = _Stopwatch(relocate.compact_range if relocate is not None else lambda *a: ())
    writer = Writer(om, size, budget_s)
    try:
        if relocate is not None:
            # the same module global the cleaner reads for every batch (benchmark only)
            setattr(cleaner_module, "_relocate", _KernelProxy(relocate, kernel))  # noqa: B010
        writer.fill(n, time.perf_counter() + 10 * scale.warm_s)
        keys = key_stream(n, "uniform", seed)
        writer.closed_loop(keys, writes_for(scale.warm_factor, size, scale), scale.warm_s)
        kernel.reset()
        before = om.stats().cleaner.entries_relocated
        win = writer.closed_loop(
            keys, writes_for(scale.measure_factor, size, scale), scale.measure_s
        )
    finally:
        setattr(cleaner_module, "_relocate", relocate)  # noqa: B010
    relocations = om.stats().cleaner.entries_relocated - before
    rest_s = max(0.0, win.cleaner_s - kernel.s)
    write_s = max(0.0, win.seconds - win.cleaner_s - win.wants_s)
    per = max(1, relocations)
    return {
        "section": "design",
        "part": "breakdown",
        "object_bytes": size,
        "utilization_target": utilization,
        "writes": win.writes,
        "relocations": relocations,
        "relocations_per_write": relocations / max(1, win.writes),
        "batches": kernel.n,
        "write_us": write_s / max(1, win.writes) * 1e6,
        "wants_us_per_write": win.wants_s / max(1, win.writes) * 1e6,
        "cleaner_us_per_write": win.cleaner_s / max(1, win.writes) * 1e6,
        "kernel_us_per_reloc": kernel.s / per * 1e6,
        "rest_us_per_reloc": rest_s / per * 1e6,
        "cleaner_us_per_reloc": win.cleaner_s / per * 1e6,
    }


class _KernelProxy:
    """Stands in for the ``_relocate`` module with a timed ``compact_range``; combined
    cleaning's kernels (``live_slots``, ``entry_stamps``, ``place_entries``) are the module's
    own, untimed: their time counts as the rest."""

    def __init__(self, module: Any, compact_range: Callable[..., Any]) -> None:
        self._module = module
        self.compact_range = compact_range

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _shm_view(shm: Any) -> memoryview:
    view = shm.buf
    if view is None:
        raise RuntimeError("shared memory block is closed")
    return memoryview(view)


def _ipc_child(conn: Connection, mode: str, shm_name: str | None, nbytes: int, rounds: int) -> None:
    """Send ``rounds`` relocation batches of ``nbytes`` (pipe, or shared memory + a doorbell)."""
    from multiprocessing import shared_memory

    payload = os.urandom(nbytes)
    shm = shared_memory.SharedMemory(name=shm_name) if shm_name is not None else None
    try:
        for _ in range(rounds):
            if shm is not None:
                _shm_view(shm)[:nbytes] = payload
                conn.send_bytes(b"x")
            else:
                conn.send_bytes(payload)
            conn.recv_bytes()
    finally:
        if shm is not None:
            shm.close()
        conn.close()


def ipc_cost(mode: str, batch: int, rounds: int) -> Row:
    """Owner-side cost and round trip of one batch of ``batch`` relocation records (3 x u64)."""
    from multiprocessing import shared_memory

    nbytes = 24 * batch
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    shm = shared_memory.SharedMemory(create=True, size=nbytes) if mode == "shm" else None
    proc = ctx.Process(
        target=_ipc_child,
        args=(child, mode, shm.name if shm is not None else None, nbytes, rounds),
        daemon=True,
    )
    proc.start()
    child.close()
    owner: list[float] = []
    trips: list[float] = []
    decoded = 0
    try:
        last = time.perf_counter()
        for _ in range(rounds):
            if not parent.poll(30.0):
                raise TimeoutError("IPC child stopped sending")
            t0 = time.perf_counter()
            data = parent.recv_bytes()
            view = _shm_view(shm)[:nbytes] if shm is not None else memoryview(data)
            records = view.cast("Q").tolist()
            if shm is not None:
                del view
            decoded += len(records)
            t1 = time.perf_counter()
            parent.send_bytes(b"k")
            owner.append(t1 - t0 + (time.perf_counter() - t1))
            trips.append(time.perf_counter() - last)
            last = time.perf_counter()
    finally:
        parent.close()
        proc.join(10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(10.0)
        if shm is not None:
            shm.close()
            shm.unlink()
    owner_s = _stats.summarize(owner).median_s
    return {
        "section": "design",
        "part": "ipc",
        "mode": mode,
        "batch": batch,
        "records_decoded": decoded,
        "owner_us_per_batch": owner_s * 1e6,
        "owner_us_per_reloc": owner_s / batch * 1e6,
        "round_trip_us": _stats.summarize(trips[1:] or trips).median_s * 1e6,
    }


def _prototype_child(
    conn: Connection,
    shm_name: str,
    objects: int,
    relocs_per_write: float,
    cleaner_us_per_reloc: float,
    batch: int,
    seconds: float,
) -> None:
    """The cleaner process of the prototype: paces relocation batches to the owner's writes
    and burns the CPU time the scan, liveness checks and copies would take."""
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=shm_name)
    view = _shm_view(shm)
    words = view.cast("Q")
    try:
        rng = random.Random(11)
        sent = 0
        conn.send_bytes(b"")  # ready: the owner starts writing only now
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not words[1]:
            target = int(words[0] * relocs_per_write)
            if target - sent < batch:
                time.sleep(0.0002)
                continue
            t0 = time.perf_counter()
            records: list[int] = []
            for _ in range(batch):
                i = rng.randrange(objects)
                h, ref = words[2 + 2 * i], words[3 + 2 * i]
                records += (h, ref, ref)
            while time.perf_counter() - t0 < cleaner_us_per_reloc * batch * 1e-6:
                pass
            try:
                conn.send_bytes(array("Q", records).tobytes())
            except BrokenPipeError:
                break  # the owner finished its run first
            sent += batch
    finally:
        words.release()
        view.release()
        shm.close()
        conn.close()


def prototype(
    scale: Scale, parts: Row, utilization: int, rate: float | None, seed: int, curves: Curves
) -> list[Row]:
    """The owner's side of a separate cleaner process, run for real (see the module doc).

    The store is the no-cleaner one (its own cleaner never runs); a second process sends
    ``relocations_per_write`` CAS records per write in batches, after spending the moved part
    of the cleaner's time per relocation; the writer applies each batch between requests.
    """
    from multiprocessing import shared_memory

    from services.kvstore import key_hash

    rows: list[Row] = []
    relocs_per_write = float(parts["relocations_per_write"] or 0.0)
    # The other process would take over all of it but applying the repointing, which runs
    # inside the C kernel now and is not timed apart: a slight overestimate of its share.
    moved_us = float(parts["cleaner_us_per_reloc"] or 0.0)
    om, n = _latency_store(scale, utilization, cleaner=False)
    writer = Writer(om, LATENCY_SIZE, DEFAULT_BUDGET_S)
    writer.fill(n, time.perf_counter() + 10 * scale.warm_s)
    shm = shared_memory.SharedMemory(create=True, size=8 * (2 + 2 * n))
    words = _shm_view(shm).cast("Q")
    for k in range(n):
        h = key_hash(_TABLE, k.to_bytes(KEY_BYTES, "big"))
        words[2 + 2 * k] = h
        words[3 + 2 * k] = om.hash_table.lookup(h)[0]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    run_s = 2 * scale.latency_s + 30.0
    proc = ctx.Process(
        target=_prototype_child,
        args=(child, shm.name, n, relocs_per_write, max(0.0, moved_us), PROTOTYPE_BATCH, run_s),
        daemon=True,
    )
    proc.start()
    child.close()
    counters = {"writes": 0, "applied": 0, "failed": 0, "batches": 0}
    throttled = {"s": 0.0}
    relocated = om.object_relocated

    def count() -> None:
        counters["writes"] += 1
        words[0] = counters["writes"]
        # Memory is finite: a writer that runs ahead of its cleaner gets Retry until it
        # catches up. Model that as blocking while the backlog exceeds a few batches.
        behind = counters["writes"] * relocs_per_write - counters["applied"]
        if behind > PROTOTYPE_BACKLOG:
            t0 = time.perf_counter()
            deadline = t0 + 30.0
            while behind > PROTOTYPE_BACKLOG / 2 and time.perf_counter() < deadline:
                if parent.poll(0.05):
                    drain()
                behind = counters["writes"] * relocs_per_write - counters["applied"]
            throttled["s"] += time.perf_counter() - t0

    def drain() -> bool:
        if not parent.poll(0):
            return False
        records = memoryview(parent.recv_bytes()).cast("Q").tolist()
        failed = 0
        for j in range(0, len(records), 3):
            if not relocated(records[j], records[j + 1], records[j + 2]):
                failed += 1
        counters["applied"] += len(records) // 3
        counters["failed"] += failed
        counters["batches"] += 1
        return True

    def between() -> None:
        count()
        drain()

    try:
        if not parent.poll(60.0) or parent.recv_bytes() != b"":
            raise TimeoutError("prototype cleaner process did not start")
        keys = key_stream(n, "uniform", seed + 1)
        closed = writer.closed_loop(
            keys,
            scale.latency_writes,
            scale.latency_s,
            cooperative=False,
            record=True,
            between=between,
        )
        closed_applied = counters["applied"]
        closed_throttled = throttled["s"]
        closed_rate = closed.writes / closed.seconds
        curves.samples["closed: separate process (prototype)"] = closed.loop_samples
        rows.append(
            {
                "section": "design",
                "part": "prototype",
                "utilization_target": utilization,
                "mode": "closed",
                "objects_per_s": closed_rate,
                "relocations_applied": closed_applied,
                "relocations_per_write": closed_applied / max(1, closed.writes),
                "throttled_fraction": closed_throttled / closed.seconds,
                "target_relocations_per_write": relocs_per_write,
                **_stats.quantiles_us(closed.loop_samples),
            }
        )
        offered = rate if rate is not None else 0.5 * closed_rate
        before = counters["applied"]
        opened = writer.open_loop(
            keys,
            offered,
            scale.latency_writes,
            scale.latency_s,
            cooperative=False,
            idle=drain,
            between=count,
        )
        curves.samples["open: separate process (prototype)"] = opened.write_samples
        rows.append(
            {
                "section": "design",
                "part": "prototype",
                "utilization_target": utilization,
                "mode": "open",
                "offered_per_s": offered,
                "objects_per_s": opened.writes / opened.seconds,
                "relocations_applied": counters["applied"] - before,
                "relocations_per_write": (counters["applied"] - before) / max(1, opened.writes),
                "throttled_fraction": (throttled["s"] - closed_throttled) / opened.seconds,
                "target_relocations_per_write": relocs_per_write,
                **_stats.quantiles_us(opened.write_samples),
            }
        )
    finally:
        words[1] = 1
        words.release()
        parent.close()
        proc.join(10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(10.0)
        shm.close()
        shm.unlink()
    return rows


def design_section(
    scale: Scale,
    budget_s: float,
    utilization: int | None,
    rate: float | None,
    seed: int,
    curves: Curves,
) -> list[Row]:
    """Slice breakdown (100 B and 1 KB), IPC batch costs, and the owner-side prototype.

    The breakdown starts at the latency section's utilisation (or the first fallback) and
    walks down the fallbacks while the engine wedges.
    """
    rows: list[Row] = []
    parts: Row | None = None
    start = utilization if utilization is not None else LATENCY_FALLBACKS[0]
    tries = tuple(u for u in LATENCY_FALLBACKS if u <= start) or (start,)
    for size in (LATENCY_SIZE, 1000):
        try:
            row: Row | None = None
            for util in tries:
                try:
                    row = breakdown(size, util, scale, budget_s, seed)
                    break
                except StuckError:
                    if util == tries[-1]:
                        raise
            assert row is not None
        except Exception as exc:
            row = {
                "section": "design",
                "part": "breakdown",
                "object_bytes": size,
                "error": f"{type(exc).__name__}: {exc}",
            }
        rows.append(row)
        if size == LATENCY_SIZE and "error" not in row:
            parts = row
    for mode in ("pipe", "shm"):
        for batch in (16, 128, 1024):
            try:
                rows.append(ipc_cost(mode, batch, scale.ipc_batches))
            except Exception as exc:
                rows.append(
                    {
                        "section": "design",
                        "part": "ipc",
                        "mode": mode,
                        "batch": batch,
                        "error": f"{type(exc).__name__}: {exc}",
                    }
                )
    if parts is not None:
        try:
            util = int(parts["utilization_target"] or LATENCY_UTILIZATION)
            rows.extend(prototype(scale, parts, util, rate, seed, curves))
        except Exception as exc:
            rows.append(
                {"section": "design", "part": "prototype", "error": f"{type(exc).__name__}: {exc}"}
            )
    return rows


# -- plots, tables, command line -----------------------------------------------------------------


def plot(rows: Sequence[Row], curves: Curves, stem: Path) -> list[Path]:
    """PNG files beside the JSON: throughput and cleaner cost vs utilisation, latency CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    sweep = [r for r in rows if r.get("section") == "sweep" and "error" not in r]
    sizes = sorted({int(r["object_bytes"] or 0) for r in sweep})
    if sweep:
        for name, metrics, ylabel in (
            ("throughput", (("objects_per_s", "-", "writes/s"),), "writes/s"),
            (
                "cost",
                (
                    ("relocated_per_new_byte", "-", "copied in memory"),
                    ("backup_ratio", "--", "survivors to backups (Fig. 7)"),
                ),
                "cleaner bytes / new bytes",
            ),
        ):
            fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 3.6), squeeze=False)
            for ax, size in zip(axes[0], sizes, strict=True):
                for dist in DISTRIBUTIONS:
                    pts = sorted(
                        (int(r["utilization_target"] or 0), r)
                        for r in sweep
                        if r["object_bytes"] == size and r["distribution"] == dist
                    )
                    color = f"C{DISTRIBUTIONS.index(dist)}"
                    for metric, style, what in metrics:
                        xs = [u for u, r in pts if isinstance(r.get(metric), float)]
                        ys = [float(r[metric] or 0.0) for u, r in pts if u in xs]
                        label = dist if len(metrics) == 1 else f"{dist}: {what}"
                        ax.plot(xs, ys, style, color=color, marker="o", label=label)
                ax.set_title(f"{size}-byte objects")
                ax.set_xlabel("memory utilisation (%)")
                ax.set_ylabel(ylabel)
                ax.grid(True, alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            fig.tight_layout()
            path = stem.with_name(f"{stem.name}-{name}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    if curves.samples:
        util = next(
            (
                r["utilization_target"]
                for r in rows
                if r.get("section") == "latency" and "error" not in r
            ),
            LATENCY_UTILIZATION,
        )
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
        for ax, mode in zip(axes[0], ("closed", "open"), strict=True):
            for label, samples in curves.samples.items():
                if not label.startswith(mode) or not samples:
                    continue
                ordered = sorted(samples)
                count = len(ordered)
                lat_us = [s * 1e6 for s in ordered]
                slower = [1.0 - i / count for i in range(count)]
                ax.step(lat_us, slower, where="post", label=label.split(": ", 1)[1])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("write latency (us)")
            ax.set_ylabel("fraction of writes slower")
            ax.set_title(f"{mode} loop, {LATENCY_SIZE} B objects, {util}%")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}-latency.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


SWEEP_COLUMNS = (
    Column("object_bytes", "size"),
    Column("distribution", "keys"),
    Column("utilization_target", "util%"),
    Column("utilization", "live", "{:.2f}"),
    Column("objects_per_s", "writes/s", "{:.0f}"),
    Column("mb_per_s", "MB/s", "{:.2f}"),
    Column("vs_30", "vs30%", "{:.2f}"),
    Column("relocated_per_new_byte", "copied/new", "{:.2f}"),
    Column("backup_ratio", "backup/new", "{:.2f}"),
    Column("write_cost", "wcost", "{:.2f}"),
    Column("compacted_use", "u_comp", "{:.3f}"),
    Column("cleaned_use", "u_clean", "{:.3f}"),
    Column("tombstone_fraction", "tombs", "{:.1%}"),
    Column("cleaner_time_fraction", "clean%", "{:.0%}"),
    Column("wants_time_fraction", "wants%", "{:.0%}"),
    Column("stalls", "stalls"),
    Column("truncated", "cut"),
)
LATENCY_COLUMNS = (
    Column("mode", "mode"),
    Column("cleaner", "cleaner"),
    Column("budget_ms", "budget_ms", "{:g}"),
    Column("objects_per_s", "writes/s", "{:.0f}"),
    Column("median_us", "median_us", "{:.1f}"),
    Column("p99_us", "p99_us", "{:.1f}"),
    Column("p999_us", "p99.9_us", "{:.1f}"),
    Column("median_ratio", "median_x", "{:.2f}"),
    Column("p99_ratio", "p99_x", "{:.2f}"),
    Column("cleaner_time_fraction", "clean%", "{:.0%}"),
    Column("stalls", "stalls"),
    Column("relocations_per_write", "relocs/write", "{:.1f}"),
    Column("throttled_fraction", "throttled", "{:.0%}"),
)
BREAKDOWN_COLUMNS = (
    Column("object_bytes", "size"),
    Column("utilization_target", "util%"),
    Column("relocations_per_write", "relocs/write", "{:.2f}"),
    Column("write_us", "write_us", "{:.1f}"),
    Column("wants_us_per_write", "wants_us", "{:.1f}"),
    Column("cleaner_us_per_write", "clean_us/write", "{:.1f}"),
    Column("kernel_us_per_reloc", "kernel_us/reloc", "{:.2f}"),
    Column("rest_us_per_reloc", "rest_us/reloc", "{:.2f}"),
    Column("cleaner_us_per_reloc", "clean_us/reloc", "{:.2f}"),
)
IPC_COLUMNS = (
    Column("mode", "mode"),
    Column("batch", "batch"),
    Column("owner_us_per_batch", "owner_us/batch", "{:.1f}"),
    Column("owner_us_per_reloc", "owner_us/reloc", "{:.3f}"),
    Column("round_trip_us", "round_trip_us", "{:.1f}"),
)


def render(rows: Sequence[Row]) -> str:
    ok = [r for r in rows if "error" not in r]
    parts: list[str] = []

    def section(title: str, selected: list[Row], columns: Sequence[Column]) -> None:
        if selected:
            parts.extend(["", title, _stats.format_table(selected, columns)])

    section(
        "Overwrite throughput and cleaner cost vs utilisation (live object bytes / log memory)",
        [r for r in ok if r.get("section") == "sweep"],
        SWEEP_COLUMNS,
    )
    section(
        f"Write latency, {LATENCY_SIZE} B objects, uniform (util% as shown); "
        "x = over the no-cleaner run",
        [r for r in ok if r.get("section") == "latency"]
        + [r for r in ok if r.get("part") == "prototype"],
        (Column("part", "design"), Column("utilization_target", "util%"), *LATENCY_COLUMNS),
    )
    section(
        "Where a cooperative slice's time goes (per relocated object; owner% = what stays in "
        "the writer)",
        [r for r in ok if r.get("part") == "breakdown"],
        BREAKDOWN_COLUMNS,
    )
    section(
        "Relocation batches across processes (3 x u64 per record), owner-side cost",
        [r for r in ok if r.get("part") == "ipc"],
        IPC_COLUMNS,
    )
    section(
        "End to end: a one-server cluster (R = 0) through KvClient; heavy = 10 multi-writes of "
        "75 in flight, sequential = one write at a time; latency rows x = over the idle-cleaner "
        "server, interleaved",
        [r for r in ok if r.get("section") == "server"],
        SERVER_COLUMNS,
    )
    errors = [r for r in rows if "error" in r]
    if errors:
        parts += ["", "Errors"]
        for r in errors:
            where = " ".join(
                str(r[k])
                for k in ("section", "part", "object_bytes", "distribution", "utilization_target")
                if r.get(k) is not None
            )
            parts.append(f"  {where}: {r['error']}")
    return "\n".join(parts).lstrip("\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="write results here, PNG plots beside it")
    parser.add_argument("--quick", action="store_true", help="tiny log and short bounds (smoke)")
    parser.add_argument(
        "--sections",
        type=_args.subset_of(SECTIONS),
        default=SECTIONS,
        metavar="NAME,...",
        help=f"subset of {','.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--sizes", type=_args.positive_int_list, default=SIZES, metavar="N,...")
    parser.add_argument(
        "--utilizations", type=_args.positive_int_list, default=UTILIZATIONS, metavar="PCT,..."
    )
    parser.add_argument(
        "--distributions",
        type=_args.subset_of(DISTRIBUTIONS),
        default=DISTRIBUTIONS,
        metavar="NAME,...",
    )
    parser.add_argument(
        "--budget-ms",
        type=float,
        default=DEFAULT_BUDGET_S * 1e3,
        help="cleaner slice budget for the sweep (default %(default)s)",
    )
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="open-loop offered rate as a fraction of closed-loop capacity (default %(default)s)",
    )
    parser.add_argument("--memory-mb", type=float, help="log memory (default 16, quick 4)")
    parser.add_argument("--seed", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    scale = QUICK_SCALE if args.quick else DEFAULT_SCALE
    if args.memory_mb is not None:
        memory = int(args.memory_mb * MiB)
        scale = Scale(
            memory,
            scale.segment_size,
            scale.seglet_size,
            scale.warm_factor,
            scale.measure_factor,
            scale.warm_s,
            scale.measure_s,
            scale.latency_writes,
            scale.latency_s,
            scale.ipc_batches,
        )
    budget = args.budget_ms / 1e3
    if not 0 < args.load < 1 or budget <= 0:
        print("--load must be in (0, 1) and --budget-ms > 0", file=sys.stderr)
        return 2

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows: list[Row] = []
    curves = Curves()
    if "sweep" in args.sections:
        for size in args.sizes:
            for dist in args.distributions:
                for util in args.utilizations:
                    log(f"sweep: {size} B, {dist}, {util}%")
                    rows.append(sweep_point(size, dist, util, scale, budget, args.seed))
        add_relative_throughput(rows)
    rate: float | None = None
    latency_util: int | None = None
    if "latency" in args.sections:
        log("latency: closed and open loop, with and without the cleaner")
        latency_rows, latency_util = latency_section(scale, args.load, args.seed, curves, log)
        rows.extend(latency_rows)
        for r in latency_rows:
            if r.get("mode") == "open" and r.get("cleaner") == "off" and "error" not in r:
                rate = float(r["offered_per_s"] or 0.0) or None
    if "design" in args.sections:
        log("design: slice breakdown, IPC batches, separate-process prototype")
        rows.extend(design_section(scale, budget, latency_util, rate, args.seed, curves))
        add_latency_ratios(rows)
    if "server" in args.sections:
        server_scale = QUICK_SERVER_SCALE if args.quick else SERVER_SCALE
        rows.extend(server_section(args.sizes, args.utilizations, server_scale, args.seed, log))
    print(render(rows))
    if args.json:
        path = Path(args.json)
        _stats.write_json(
            path,
            rows,
            _stats.machine_info(("rpcfast", "numpy", "matplotlib")),
            {
                "quick": bool(args.quick),
                "memory_bytes": scale.memory_bytes,
                "segment_size": scale.segment_size,
                "seglet_size": scale.seglet_size,
                "cleaner_reserve_segments": CLEANER_RESERVE_SEGMENTS,
                "write_limit": WRITE_LIMIT,
                "budget_s": budget,
                "budgets_s": list(BUDGETS_S),
                "load": args.load,
                "key_bytes": KEY_BYTES,
                "warm_factor": scale.warm_factor,
                "measure_factor": scale.measure_factor,
                "bounds_s": {"warm": scale.warm_s, "measure": scale.measure_s},
                "latency_writes": scale.latency_writes,
                "sections": list(args.sections),
                "server_scale": attrs.asdict(QUICK_SERVER_SCALE if args.quick else SERVER_SCALE),
                "conclusion": CONCLUSION,
            },
        )
        stem = path.with_suffix("")
        for png in plot(rows, curves, stem):
            log(f"wrote {png}")
    return 0 if any("error" not in r for r in rows) else 1
