"""``rpcfast-perf memory``: live data vs process RSS under the FAST'14 Table 1 workloads.

Each workload (W1-W8: objects of one size distribution, optionally a mass delete and a switch
to another) is replayed operation for operation against three stores, and at the end we read
the live key+value bytes and the process's resident memory:

* ``kvstore``: an :class:`~services.kvstore.ObjectManager` in a fresh (spawned) process, its
  arena sized so the live data of the worst phase fills ``--kv-fill`` of the log's write pool
  (the paper's point: log-structured memory can run at high utilisation). The cleaner is driven
  between writes (a slice every few writes while it wants to run, and slices until a write that
  got ``Retry`` succeeds), as a server's event loop would.
* ``redis``: a real ``redis-server`` (persistence off) loaded with pipelined SETs and DELs.
* ``pydict``: a ``dict`` of ``bytes`` in a fresh process.

``utilization`` is live bytes over final RSS. A fresh Python process costs tens of MB before it
stores anything (the kvstore worker imports numpy and, through ``services.kvstore.errors``, the
RPC stack: about 50 MB; the dict worker about 20 MB; redis-server 12 MB), which weighs
heavily at small scales, so ``utilization_net`` also divides by RSS minus that baseline (the RSS
measured just before the store is created); it is the figure that carries over to large scales.
``peak_rss_bytes`` (VmHWM) shows the memory a workload needed at its worst moment.

``ceiling`` (kvstore rows) is what the store's design allows at best for the data it held at
the end: live bytes over its own entries alone (the live objects with their entry headers, the
live tombstones) plus one 8-byte hash-table reference per object, as if the log were 100% full
with no free, dead or reserved memory and the process had no interpreter, index or heap. No
tuning of sizes, reserves or the Python heap can lift ``utilization_net`` past it; only
smaller entries, fewer live tombstones or larger objects can.

Neither figure is flattered: ``utilization`` keeps the whole interpreter in the denominator (at
the default 16 MiB live it cannot pass ~0.23 for the kvstore, whose baseline is ~53 MB), and
``utilization_net`` keeps everything the store allocated, reserves and Python heap included.
The kvstore rows also say where the net RSS went: ``arena_bytes`` (the prefaulted log),
``hash_table_bytes`` (main plus overflow area), ``index_bytes`` (the segments' entry indexes)
and ``heap_growth_bytes`` (everything else: the log's Python bookkeeping, numpy's code pages,
allocator slack).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from attrs import frozen

from perf import _args, _stats
from perf._stats import Column, Row

if TYPE_CHECKING:
    from perf._workloads import Workload, WorkloadStream

# The worker processes import this module; it stays free of numpy so that a worker's baseline
# RSS is the interpreter's and its store's, not the generator's.

HELP = "Live data vs RSS for the FAST'14 Table 1 workloads W1-W8: kvstore, redis, Python dict."

SYSTEMS: tuple[str, ...] = ("kvstore", "redis", "pydict")
WORKLOAD_NAMES: tuple[str, ...] = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8")
KEY_BYTES = 8  # perf._workloads.KEY_BYTES, checked in run_one
MiB = 1 << 20
DEFAULT_LIVE_BYTES = 16 * MiB
PHASE_FACTOR = 2.0  # each allocation phase writes 2x the live cap (the paper: 50 GB vs 10 GB)
DEFAULT_KV_FILL = 0.75
DEFAULT_STEP_BUDGET_S = 0.002
DEFAULT_TIMEOUT_S = 900.0
MIN_SEGMENT_BYTES = 16 * 1024
MIN_POOL_SEGMENTS = 40
MAX_SEGMENTS = 256
SEGLETS_PER_SEGMENT = 16
CLEANER_CHECK_EVERY = 16  # writes between the kvstore worker's wants_to_run() checks
MAX_RETRY_STEPS = 10_000
HASH_REF_BYTES = 8  # services.kvstore.log._hashtable: BUCKET_BYTES / ENTRIES_PER_BUCKET
_POOL_BYTES = 1 << 20
_POOL_STRIDE = 4099
_TABLE = 1

COLUMNS = (
    Column("workload", "workload"),
    Column("system", "system"),
    Column("live_mb", "live_MB", "{:.1f}"),
    Column("rss_mb", "rss_MB", "{:.1f}"),
    Column("peak_mb", "peak_MB", "{:.1f}"),
    Column("baseline_mb", "base_MB", "{:.1f}"),
    Column("utilization", "live/rss", "{:.2f}"),
    Column("utilization_net", "live/(rss-base)", "{:.2f}"),
    Column("ceiling", "ceiling", "{:.2f}"),
    Column("seconds", "seconds", "{:.1f}"),
)


@frozen
class Config:
    """One run of the ``memory`` benchmark."""

    workloads: tuple[str, ...]
    systems: tuple[str, ...]
    live_bytes: int
    phase_bytes: int
    kv_fill: float = DEFAULT_KV_FILL
    step_budget_s: float = DEFAULT_STEP_BUDGET_S
    seed: int = 1
    batch_ops: int = 8192
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def scaled(cls, scale: float, **kwargs: Any) -> Config:
        live = max(64 * 1024, int(DEFAULT_LIVE_BYTES * scale))
        return cls(live_bytes=live, phase_bytes=int(live * PHASE_FACTOR), **kwargs)


# -- the kvstore's size for a workload ---------------------------------------------------------


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pool_segments(pool: float, segment: int) -> int:
    return max(MIN_POOL_SEGMENTS, int(-(-pool // segment)))


def _cleaner_segments(pool: float, segment: int) -> int:
    """The engine's default survivor reserve (min(15, total/8)) for a total whose write pool
    is ``pool``: the reserve depends on the total, so iterate to the fixed point."""
    full = _pool_segments(pool, segment)
    cleaner = min(15, max(1, full // 8))
    for _ in range(4):
        cleaner = min(15, max(1, (full + cleaner + 2) // 8))
    return cleaner


def _total_segments(pool: float, segment: int) -> int:
    return _pool_segments(pool, segment) + _cleaner_segments(pool, segment) + 2


def kvstore_config(workload: Workload, live_bytes: int, kv_fill: float) -> dict[str, Any]:
    """``StorageConfig`` arguments sizing the log for ``workload`` at ``live_bytes`` live.

    The write pool holds the worst phase's log bytes (objects with their entry headers, not
    the tombstones deletes add) at ``kv_fill``. Segments hold 16 seglets and are the smallest
    power of two (16 KiB to 1 MiB) that holds two of the largest objects beside the room the
    log keeps for its digest's worst case (8 bytes a seglet) and gives at most
    ``MAX_SEGMENTS`` of them (the reserves and the free head are whole segments, so they
    should be small next to the pool, but compaction works in seglets). Tiny scales get at
    least ``MIN_POOL_SEGMENTS`` segments (the engine wedges with fewer), so their fill is
    lower than asked. The hash table has a
    bucket (8 slots) per eight objects of the smallest-object phase.
    """
    from services.kvstore.log import object_entry_size

    if not 0.0 < kv_fill <= 0.95:
        raise ValueError("kv_fill must be in (0, 0.95]")
    phases = [workload.before] + ([workload.after] if workload.after is not None else [])
    log_bytes = 0.0
    for dist in phases:
        mean = round(dist.mean)
        log_bytes = max(
            log_bytes, live_bytes * object_entry_size(KEY_BYTES, mean - KEY_BYTES) / mean
        )
    pool = log_bytes / kv_fill
    largest = max(d.high for d in phases)
    segment = max(MIN_SEGMENT_BYTES, _pow2_at_least(2 * largest + 4096))
    while segment < MiB:
        total = _total_segments(pool, segment) * segment
        digest_room = segment - 8 * (total // (segment // SEGLETS_PER_SEGMENT)) - 256
        if pool <= MAX_SEGMENTS * segment and digest_room >= 2 * largest + 4096:
            break
        segment *= 2
    cleaner = _cleaner_segments(pool, segment)
    total = _total_segments(pool, segment) * segment
    seglet = segment // SEGLETS_PER_SEGMENT
    max_objects = int(live_bytes / workload.smallest_mean) + 1
    buckets = _pow2_at_least(max(1, max_objects // 8))
    return {
        "total_bytes": total,
        "segment_size": segment,
        "seglet_size": seglet,
        "cleaner_reserve_segments": cleaner,
        "hash_table_bytes": buckets * 64,
        "prefault_memory": True,
    }


def design_floor_bytes(log_live_bytes: int, tombstone_bytes: int, objects: int) -> int:
    """The least memory the kvstore's design needs for what it holds: its live object entries
    (headers included) and live tombstones, and one hash-table reference per object."""
    return log_live_bytes + tombstone_bytes + HASH_REF_BYTES * objects


# -- the worker process (kvstore, pydict) ---------------------------------------------------------


class WorkerError(RuntimeError):
    """The worker process reported an exception (its type and message are the text)."""


def _self_status(field: str) -> int:
    """A ``kB`` field of this process's ``/proc/self/status`` in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/self/status")


def _worker(conn: Connection, system: str, params: dict[str, Any]) -> None:
    """Apply batches from ``conn`` to a fresh store; runs in a spawned process."""
    try:
        _serve(conn, system, params)
    except BaseException as exc:  # report, then exit: the parent turns it into an error row
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _decode(data: bytes) -> tuple[list[int], list[int]]:
    """A ``perf._workloads.Batch`` as (key ids, sizes), without numpy (same-host byte order)."""
    count = len(data) // 12
    view = memoryview(data)
    return view[: 8 * count].cast("Q").tolist(), view[8 * count : 12 * count].cast("I").tolist()


def _serve(conn: Connection, system: str, params: dict[str, Any]) -> None:
    if system == "kvstore":
        import services.kvstore  # noqa: F401  (imports count in the baseline, not as data)
    pool = os.urandom(_POOL_BYTES)
    baseline = _self_status("VmRSS")
    apply: Callable[[list[int], list[int]], None]
    report: Callable[[], dict[str, Any]]
    if system == "kvstore":
        apply, report = _kvstore_store(pool, params)
    elif system == "pydict":
        apply, report = _pydict_store(pool)
    else:
        raise ValueError(f"unknown worker system {system!r}")
    conn.send(("ready", {"baseline_rss_bytes": baseline}))
    while True:
        data = conn.recv_bytes()
        if not data:
            break
        apply(*_decode(data))
        conn.send(("ok", None))
    result = report()
    result["rss_bytes"] = _self_status("VmRSS")
    result["peak_rss_bytes"] = _self_status("VmHWM")
    conn.send(("done", result))


def _kvstore_store(
    pool: bytes, params: dict[str, Any]
) -> tuple[Callable[[list[int], list[int]], None], Callable[[], dict[str, Any]]]:
    from services.kvstore import ObjectManager, Retry, StorageConfig

    config = StorageConfig(**params["kv_config"])
    om = ObjectManager(config)
    om.add_tablet(_TABLE)
    cleaner = om.cleaner
    budget = float(params["step_budget_s"])
    clock = time.monotonic
    view = memoryview(pool)
    limit = _POOL_BYTES - 16 * 1024
    state = {"offset": 0, "ops": 0, "stalls": 0, "cleaner_s": 0.0}

    def apply(keys: list[int], sizes: list[int]) -> None:
        offset = int(state["offset"])
        ops = int(state["ops"])
        stalls = 0
        cleaner_s = 0.0
        perf = time.perf_counter
        for key_id, size in zip(keys, sizes, strict=True):
            key = key_id.to_bytes(KEY_BYTES, "big")
            value = view[offset : offset + size - KEY_BYTES] if size else view[:0]
            offset = (offset + _POOL_STRIDE) % limit
            for _ in range(MAX_RETRY_STEPS):
                try:
                    if size:
                        om.write(_TABLE, key, value)
                    else:
                        om.remove(_TABLE, key)
                    break
                except Retry:
                    stalls += 1
                    t0 = perf()
                    progressed = cleaner.step(budget, clock())
                    cleaner_s += perf() - t0
                    if not progressed and not cleaner.wants_to_run():
                        raise RuntimeError("log full and the cleaner can free nothing") from None
            else:
                raise RuntimeError("write still refused after the cleaner's retry bound")
            ops += 1
            if ops % CLEANER_CHECK_EVERY == 0 and cleaner.wants_to_run():
                t0 = perf()
                cleaner.step(budget, clock())
                cleaner_s += perf() - t0
        state["offset"] = offset
        state["ops"] = ops
        state["stalls"] += stalls
        state["cleaner_s"] += cleaner_s

    def report() -> dict[str, Any]:
        s = om.stats()
        index = sum(seg.idx.itemsize * len(seg.idx) for seg in om.log.segments.values())
        return {
            "index_bytes": index,
            "hash_overflow_buckets": om.hash_table.overflow_buckets,
            "objects": s.objects,
            "log_live_bytes": s.live_bytes,
            "tombstone_bytes": s.tombstone_bytes,
            "arena_bytes": s.total_bytes,
            "hash_table_bytes": s.hash_table_bytes,
            "memory_utilization": s.memory_utilization,
            "bytes_relocated": s.cleaner.bytes_relocated,
            "write_stalls": state["stalls"],
            "cleaner_seconds": state["cleaner_s"],
        }

    return apply, report


def _pydict_store(
    pool: bytes,
) -> tuple[Callable[[list[int], list[int]], None], Callable[[], dict[str, Any]]]:
    store: dict[bytes, bytes] = {}
    limit = _POOL_BYTES - 16 * 1024
    state = {"offset": 0}

    def apply(keys: list[int], sizes: list[int]) -> None:
        offset = state["offset"]
        for key_id, size in zip(keys, sizes, strict=True):
            key = key_id.to_bytes(KEY_BYTES, "big")
            if size:
                store[key] = pool[offset : offset + size - KEY_BYTES]  # a fresh bytes object
                offset = (offset + _POOL_STRIDE) % limit
            else:
                del store[key]
        state["offset"] = offset

    def report() -> dict[str, Any]:
        return {"objects": len(store)}

    return apply, report


# -- driving one run -----------------------------------------------------------------------------


def _recv(conn: Connection, deadline: float, alive: Callable[[], bool]) -> tuple[str, Any]:
    while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            raise TimeoutError("worker did not answer before the time limit")
        if not alive() and not conn.poll(0):
            raise WorkerError("worker process died without a word")
    kind, payload = conn.recv()
    if kind == "error":
        raise WorkerError(str(payload))
    return str(kind), payload


def _run_worker(system: str, stream: WorkloadStream, params: dict[str, Any], timeout: float) -> Row:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, system, params), daemon=True)
    deadline = time.monotonic() + timeout
    proc.start()
    child.close()
    try:
        _kind, ready = _recv(parent, deadline, proc.is_alive)
        for batch in stream.batches():
            parent.send_bytes(batch.to_bytes())
            _recv(parent, deadline, proc.is_alive)
        parent.send_bytes(b"")
        _kind, result = _recv(parent, deadline, proc.is_alive)
    finally:
        parent.close()
        proc.join(10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(10.0)
    row: Row = {"baseline_rss_bytes": int(ready["baseline_rss_bytes"])}
    row.update(result)
    return row


def _run_redis(stream: WorkloadStream, timeout: float) -> Row:
    from perf._redis import RedisServer

    pool = os.urandom(_POOL_BYTES)
    limit = _POOL_BYTES - 16 * 1024
    deadline = time.monotonic() + timeout
    with RedisServer() as server:
        client = server.client()
        try:
            baseline = server.rss_bytes()
            offset = 0
            for batch in stream.batches():
                pipe = client.pipeline(transaction=False)
                for key_id, size in zip(batch.keys.tolist(), batch.sizes.tolist(), strict=True):
                    key = key_id.to_bytes(KEY_BYTES, "big")
                    if size:
                        pipe.set(key, pool[offset : offset + size - KEY_BYTES])
                        offset = (offset + _POOL_STRIDE) % limit
                    else:
                        pipe.delete(key)
                pipe.execute()
                if time.monotonic() > deadline:
                    raise TimeoutError("redis run exceeded the time limit")
            info = client.info("memory")
            rss = server.rss_bytes()
            peak = server.peak_rss_bytes()
            objects = int(client.dbsize())
            client.memory_purge()
            purged = server.rss_bytes()
        finally:
            client.close()
    return {
        "baseline_rss_bytes": baseline,
        "rss_bytes": rss,
        "peak_rss_bytes": peak,
        "rss_after_purge_bytes": purged,
        "objects": objects,
        "used_memory": int(info["used_memory"]),
        "used_memory_rss": int(info["used_memory_rss"]),
        "mem_fragmentation_ratio": float(info["mem_fragmentation_ratio"]),
    }


def run_one(system: str, workload_name: str, config: Config) -> Row:
    """Replay one workload against one system; failures become an error row."""
    from perf import _workloads

    if _workloads.KEY_BYTES != KEY_BYTES:
        raise RuntimeError("perf.memory.KEY_BYTES disagrees with perf._workloads")
    workload = _workloads.WORKLOADS[workload_name]
    stream = _workloads.WorkloadStream(
        workload,
        config.live_bytes,
        config.phase_bytes,
        seed=config.seed,
        batch_ops=config.batch_ops,
    )
    base: Row = {"system": system, "workload": workload_name}
    started = time.perf_counter()
    try:
        if system == "redis":
            measured = _run_redis(stream, config.timeout_s)
        elif system == "kvstore":
            params = {
                "kv_config": kvstore_config(workload, config.live_bytes, config.kv_fill),
                "step_budget_s": config.step_budget_s,
            }
            measured = _run_worker(system, stream, params, config.timeout_s)
        elif system == "pydict":
            measured = _run_worker(system, stream, {}, config.timeout_s)
        else:
            raise ValueError(f"unknown system {system!r}")
    except WorkerError as exc:
        return {**base, "error": str(exc)}
    except Exception as exc:
        return {**base, "error": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - started
    live = stream.live_bytes
    rss = int(measured["rss_bytes"] or 0)
    net = rss - int(measured["baseline_rss_bytes"] or 0)
    row: Row = {
        **base,
        "live_bytes": live,
        "live_objects": stream.live_objects,
        "allocated_bytes": stream.allocated_bytes,
        "writes": stream.writes,
        "deletes": stream.deletes,
        "utilization": live / rss if rss else None,
        "utilization_net": live / net if net > 0 else None,
        "seconds": seconds,
        "live_mb": live / MiB,
    }
    row.update(measured)
    if system == "kvstore":
        parts = ("arena_bytes", "hash_table_bytes", "index_bytes")
        row["heap_growth_bytes"] = net - sum(int(measured[k] or 0) for k in parts)
        row["ceiling"] = live / design_floor_bytes(
            int(measured["log_live_bytes"] or 0),
            int(measured["tombstone_bytes"] or 0),
            int(measured["objects"] or 0),
        )
    row["rss_mb"] = rss / MiB
    row["peak_mb"] = int(measured["peak_rss_bytes"] or 0) / MiB
    row["baseline_mb"] = int(measured["baseline_rss_bytes"] or 0) / MiB
    return row


def run_benchmarks(config: Config, log: Callable[[str], None] = lambda line: None) -> list[Row]:
    from perf._workloads import WORKLOADS

    rows: list[Row] = []
    for workload in config.workloads:
        for system in config.systems:
            log(f"{workload} ({WORKLOADS[workload].describe()}): {system}")
            row = run_one(system, workload, config)
            if "error" in row:
                log(f"  error: {row['error']}")
            else:
                log(f"  live/rss {row['utilization']:.2f} in {row['seconds']:.1f} s")
            rows.append(row)
    return rows


def render(rows: Sequence[Row]) -> str:
    ok = [r for r in rows if "error" not in r]
    parts = [
        "Live key+value bytes vs process RSS at the end of each workload "
        "(base = RSS before the store held anything)",
        _stats.format_table(ok, COLUMNS),
    ]
    errors = [r for r in rows if "error" in r]
    if errors:
        parts += ["", "Errors"]
        parts += [f"  {r['workload']} {r['system']}: {r['error']}" for r in errors]
    return "\n".join(parts)


# -- command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument(
        "--scale",
        type=_args.positive_float,
        default=1.0,
        help=f"multiplies the live cap ({DEFAULT_LIVE_BYTES // MiB} MiB) and the bytes "
        f"allocated ({PHASE_FACTOR}x the cap per phase); default %(default)s",
    )
    parser.add_argument(
        "--systems",
        type=_args.subset_of(SYSTEMS),
        default=SYSTEMS,
        metavar="NAME,...",
        help=f"subset of {','.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument(
        "--workloads",
        type=_args.subset_of(WORKLOAD_NAMES),
        default=WORKLOAD_NAMES,
        metavar="W1,...",
        help="subset of W1..W8 (default: all)",
    )
    parser.add_argument(
        "--kv-fill",
        type=_args.positive_float,
        default=DEFAULT_KV_FILL,
        help="kvstore: worst-phase log bytes / write pool (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_args.positive_float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds allowed per system and workload (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")


def run(args: argparse.Namespace) -> int:
    from perf._workloads import WORKLOADS

    config = Config.scaled(
        args.scale,
        workloads=tuple(args.workloads),
        systems=tuple(args.systems),
        kv_fill=args.kv_fill,
        seed=args.seed,
        timeout_s=args.timeout,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = run_benchmarks(config, log)
    print(render(rows))
    if args.json:
        _stats.write_json(
            args.json,
            rows,
            _stats.machine_info(("rpcfast", "redis", "numpy")),
            {
                "scale": args.scale,
                "live_bytes": config.live_bytes,
                "phase_bytes": config.phase_bytes,
                "kv_fill": config.kv_fill,
                "step_budget_s": config.step_budget_s,
                "seed": config.seed,
                "key_bytes": KEY_BYTES,
                "workloads": {w: WORKLOADS[w].describe() for w in config.workloads},
                "systems": list(config.systems),
            },
        )
    return 0 if any("error" not in r for r in rows) else 1
