"""``rpcfast-perf kv``: the kvstore cluster's latency and throughput, redis and memcached beside it.

One client process measures all three systems, one after the other, in one run on one machine:

* ``kvstore``: a local cluster (coordinator + R+1 storage servers as child processes) for each
  replica count R, in buffered mode, and once more at the largest R in fsync mode. One
  :class:`~services.kvstore.KvClient` does one read or write at a time (latency), then
  ``multi_write``/``multi_read`` batches to one master (objects/s) at the smallest and largest R.
  ``kvstore-rpc`` rows call the owning master through a raw ``Master`` stub, skipping
  KvClient's routing and retries; their calls alternate with KvClient's (round robin) so both
  see the same machine, and the difference is KvClient's own cost.
* ``redis``: a real redis-server via redis-py: GET, SET (no persistence), SET with
  ``appendfsync always``, SET + ``WAIT 1`` (pipelined: one round trip) with a real replica, and
  pipelines of ``--batch`` SETs / GETs.
* ``memcached``: get/set via pymemcache (replies awaited), and get_many/set_many batches.

Every measurement is bounded by count and by time. Read/write rows carry
``ratio_vs_redis_get``: median over redis GET's median for the same payload, a reference taken
in the same run (absolute times drift between runs on a shared machine). ``op: "target"`` rows
check the issue's goals against what was measured, met or not.

On a machine with fewer free cores than busy processes, spinning decides the numbers: the
servers' dispatcher spin budget (``--spin-us``, a list sweeps it), the client's
(``--client-spin-us``), and whether all of them stop spinning after 50 us while the machine is
oversubscribed (``--park-when-busy``, on by default; ``--no-park-when-busy`` for the old policy).
``--share-cpu`` replaces the parking with ``sched_yield`` on every idle spin: nobody sleeps, so
no message waits for a wake-up (on this VM a halted core takes ~40 us to wake; see
rpcfast/dispatch/_dispatcher.py), and a process with work gets a core from a spinner at once.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from attrs import frozen

from perf import _args, _stats
from perf._stats import Column, Row, Value

if TYPE_CHECKING:
    import redis

    from services.kvstore import KvClient

HELP = "kvstore cluster latency and throughput, with redis and memcached measured in the same run."

SYSTEMS: tuple[str, ...] = ("kvstore", "redis", "memcached")
ROW_SYSTEMS: tuple[str, ...] = ("redis", "memcached", "kvstore", "kvstore-rpc")
DEFAULT_REPLICAS: tuple[int, ...] = (0, 1, 2, 3)
DEFAULT_PAYLOADS: tuple[int, ...] = (100, 1000)
DEFAULT_SPIN_US: tuple[float, ...] = (200.0,)
DEFAULT_ITERATIONS = 20000
DEFAULT_SECONDS = 2.0
QUICK_ITERATIONS = 300
QUICK_SECONDS = 0.25
DEFAULT_BATCH = 100
BATCH_PAYLOAD = 100
DEFAULT_KEYS = 1000
QUICK_KEYS = 100
DEFAULT_MEMORY_MB = 128
DEFAULT_SEGMENT_KB = 8192
WARMUP = 200
KV_TIMEOUT_S = 30.0
KV_RPC_TIMEOUT_S = 5.0
WAIT_TIMEOUT_MS = 5000
READY_TIMEOUT_S = 20.0
TARGET_PAYLOAD = 100
READ_SPEEDUP_GOAL = 5.0
WRITE_OVER_READ_GOAL = 3.0
DURABLE_REPLICAS = 3
"""The replica count of the write-over-read goal."""

OPS_ORDER = ("read", "write", "multi_read", "multi_write")
DURABILITY_ORDER = ("none", "buffered", "replica-ack", "fsync")

LATENCY_COLUMNS = (
    Column("op", "op"),
    Column("payload", "payload"),
    Column("system", "system"),
    Column("via", "via"),
    Column("replicas", "R"),
    Column("durability", "durability"),
    Column("spin_us", "spin_us", "{:g}"),
    Column("median_us", "median_us", "{:.1f}"),
    Column("p99_us", "p99_us", "{:.1f}"),
    Column("count", "count"),
    Column("ratio_vs_redis_get", "x_redis_get", "{:.2f}"),
)
THROUGHPUT_COLUMNS = (
    Column("op", "op"),
    Column("payload", "payload"),
    Column("batch", "batch"),
    Column("system", "system"),
    Column("via", "via"),
    Column("replicas", "R"),
    Column("durability", "durability"),
    Column("spin_us", "spin_us", "{:g}"),
    Column("ops_per_s", "objects/s", "{:.0f}"),
    Column("median_us", "batch_median_us", "{:.1f}"),
    Column("p99_us", "batch_p99_us", "{:.1f}"),
    Column("count", "batches"),
)
TARGET_COLUMNS = (
    Column("target", "target"),
    Column("replicas", "R"),
    Column("spin_us", "spin_us", "{:g}"),
    Column("value", "value", "{:.2f}"),
    Column("goal", "goal"),
    Column("met", "met"),
)


@frozen
class Config:
    """One run of the ``kv`` benchmark."""

    payloads: tuple[int, ...]
    replicas: tuple[int, ...]
    spin_us: tuple[float, ...]
    systems: tuple[str, ...]
    iterations: int
    seconds: float
    batch: int = DEFAULT_BATCH
    keys: int = DEFAULT_KEYS
    memory_mb: int = DEFAULT_MEMORY_MB
    segment_kb: int = DEFAULT_SEGMENT_KB
    fsync: bool = True
    directory: str | None = None
    client_spin_us: float | None = None
    """The benchmark client's dispatcher spin (call spin and idle spin); None: rpcfast's."""
    park_when_busy: bool = True
    """Servers and the benchmark client spin politely on an oversubscribed machine
    (``DispatchConfig.park_when_busy``)."""
    share_cpu: bool = False
    """Servers and the benchmark client call ``sched_yield`` on idle spins and never park
    early (``DispatchConfig.share_cpu``; ``park_when_busy`` off)."""

    @property
    def parks_when_busy(self) -> bool:
        """``park_when_busy`` as it applies: a yielding spinner counts as runnable, so the
        two do not mix."""
        return self.park_when_busy and not self.share_cpu


@frozen
class ClusterSpec:
    """One local cluster to measure: R replicas on R+1 servers."""

    replicas: int
    durability: str
    spin_us: float
    multi: bool

    @property
    def servers(self) -> int:
        return self.replicas + 1


Log = Callable[[str], None]


def _quiet(line: str) -> None:
    """The default log: say nothing."""


# -- timing ------------------------------------------------------------------------------------
def time_calls(call: Callable[[], object], iterations: int, seconds: float) -> list[float]:
    """Seconds per call: a short warm-up, then at most ``iterations`` calls, about ``seconds``."""
    warm_until = time.perf_counter() + min(1.0, seconds / 4)
    for _ in range(min(WARMUP, iterations)):
        call()
        if time.perf_counter() > warm_until:
            break
    samples: list[float] = []
    clock = time.perf_counter_ns
    stop = time.perf_counter() + seconds
    for _ in range(iterations):
        t0 = clock()
        call()
        samples.append((clock() - t0) / 1e9)
        if time.perf_counter() > stop:
            break
    return samples


async def time_interleaved_async(
    calls: Sequence[Callable[[], Awaitable[object]]], iterations: int, seconds: float
) -> list[list[float]]:
    """Seconds per call of each of ``calls``, taken round robin (one of each per round) so all
    see the same machine: at most ``iterations`` rounds, about ``seconds`` per call in all."""
    warm_until = time.perf_counter() + min(1.0, seconds / 4) * len(calls)
    for _ in range(min(WARMUP, iterations)):
        for call in calls:
            await call()
        if time.perf_counter() > warm_until:
            break
    samples: list[list[float]] = [[] for _ in calls]
    clock = time.perf_counter_ns
    stop = time.perf_counter() + seconds * len(calls)
    for _ in range(iterations):
        for call, out in zip(calls, samples, strict=True):
            t0 = clock()
            await call()
            out.append((clock() - t0) / 1e9)
        if time.perf_counter() > stop:
            break
    return samples


async def time_calls_async(
    call: Callable[[], Awaitable[object]], iterations: int, seconds: float
) -> list[float]:
    """:func:`time_calls` for a coroutine function (inside trio)."""
    (samples,) = await time_interleaved_async([call], iterations, seconds)
    return samples


# -- rows --------------------------------------------------------------------------------------
def _context(
    via: str, replicas: int, durability: str, spin_us: float | None, servers: int | None
) -> dict[str, Value]:
    return {
        "via": via,
        "replicas": replicas,
        "durability": durability,
        "spin_us": spin_us,
        "servers": servers,
    }


def op_row(
    system: str,
    op: str,
    payload: int,
    samples: Sequence[float],
    context: dict[str, Value],
    batch: int | None = None,
) -> Row:
    """A latency row (one sample per call); with ``batch``, also ``ops_per_s`` in objects/s."""
    row = _stats.latency_row(system, payload, samples)
    row["op"] = op
    row.update(context)
    if batch is not None:
        summary = _stats.summarize(samples)
        row["batch"] = batch
        row["ops_per_s"] = batch * summary.ops_per_s
    return row


def failed_row(
    system: str, op: str, payload: int, error: BaseException | str, context: dict[str, Value]
) -> Row:
    row = _stats.error_row(system, payload, error, op=op)
    row.update(context)
    return row


def _is_ok(row: Row, **fields: Value) -> bool:
    return "error" not in row and all(row.get(k) == v for k, v in fields.items())


def add_ratios(rows: list[Row]) -> None:
    """``ratio_vs_redis_get`` on read/write rows: median over redis GET's, same payload."""
    base: dict[Value, float] = {}
    for row in rows:
        if _is_ok(row, system="redis", op="read") and row.get("median_us"):
            base[row["payload"]] = float(row["median_us"] or 0)
    for row in rows:
        median = row.get("median_us")
        if row.get("op") not in ("read", "write") or median is None or "error" in row:
            continue
        reference = base.get(row["payload"])
        row["ratio_vs_redis_get"] = float(median) / reference if reference else None


def _find(rows: Sequence[Row], **fields: Value) -> Row | None:
    return next((r for r in rows if _is_ok(r, **fields)), None)


def _target(name: str, value: float, goal: str, met: bool, replicas: int, spin: Value) -> Row:
    return {
        "system": "kvstore",
        "op": "target",
        "target": name,
        "payload": TARGET_PAYLOAD,
        "replicas": replicas,
        "spin_us": spin,
        "value": value,
        "goal": goal,
        "met": met,
    }


def target_rows(rows: Sequence[Row]) -> list[Row]:
    """The issue's goals, checked against the measured rows (one set per spin budget)."""
    out: list[Row] = []
    redis_get = _find(rows, system="redis", op="read", payload=TARGET_PAYLOAD)
    redis_pipe = _find(rows, system="redis", op="multi_write", payload=BATCH_PAYLOAD)
    spins = sorted(
        {r["spin_us"] for r in rows if r.get("system") == "kvstore"},
        key=lambda spin: float(spin) if isinstance(spin, int | float) else -1.0,
    )
    for spin in spins:
        kv = [r for r in rows if r.get("system") == "kvstore" and r.get("spin_us") == spin]
        buffered = [r for r in kv if r.get("durability") == "buffered"]
        read0 = _find(buffered, op="read", payload=TARGET_PAYLOAD, replicas=0)
        if read0 is not None and redis_get is not None:
            value = float(redis_get["median_us"] or 0) / float(read0["median_us"] or 1)
            out.append(
                _target(
                    "read_speedup_vs_redis_get",
                    value,
                    f">= {READ_SPEEDUP_GOAL:g}",
                    value >= READ_SPEEDUP_GOAL,
                    0,
                    spin,
                )
            )
        replica_counts = [r["replicas"] for r in buffered if isinstance(r.get("replicas"), int)]
        # the goal is for a durable write, R = 3: without that cluster there is nothing to check
        if DURABLE_REPLICAS in replica_counts:
            top = DURABLE_REPLICAS
            read = _find(buffered, op="read", payload=TARGET_PAYLOAD, replicas=top)
            write = _find(buffered, op="write", payload=TARGET_PAYLOAD, replicas=top)
            if read is not None and write is not None:
                value = float(write["median_us"] or 0) / float(read["median_us"] or 1)
                out.append(
                    _target(
                        "durable_write_over_read",
                        value,
                        f"<= {WRITE_OVER_READ_GOAL:g}",
                        value <= WRITE_OVER_READ_GOAL,
                        top,
                        spin,
                    )
                )
        for row in buffered:
            if not _is_ok(row, op="multi_write") or redis_pipe is None:
                continue
            value = float(row["ops_per_s"] or 0) / float(redis_pipe["ops_per_s"] or 1)
            out.append(
                _target(
                    "multi_write_vs_redis_pipeline",
                    value,
                    ">= 1",
                    value >= 1.0,
                    int(row["replicas"] or 0),
                    spin,
                )
            )
    return out


# -- recording ---------------------------------------------------------------------------------
class Recorder:
    """Collects rows; a measurement that raises becomes an error row and the run goes on."""

    def __init__(self, log: Log = _quiet) -> None:
        self.rows: list[Row] = []
        self.log = log

    def measure(
        self, system: str, op: str, payload: int, ctx: dict[str, Value], body: Callable[[], Row]
    ) -> None:
        self.log(f"  {system} {op} {payload} B via {ctx.get('via')}")
        try:
            self.rows.append(body())
        except Exception as exc:  # one failed measurement must not end the run
            self.rows.append(failed_row(system, op, payload, exc, ctx))

    async def measure_async(
        self,
        system: str,
        op: str,
        payload: int,
        ctx: dict[str, Value],
        body: Callable[[], Awaitable[Row]],
    ) -> None:
        self.log(f"  {system} {op} {payload} B via {ctx.get('via')}")
        try:
            self.rows.append(await body())
        except Exception as exc:  # one failed measurement must not end the run
            self.rows.append(failed_row(system, op, payload, exc, ctx))

    async def measure_many_async(
        self,
        op: str,
        payload: int,
        who: Sequence[tuple[str, dict[str, Value]]],
        body: Callable[[], Awaitable[list[Row]]],
    ) -> None:
        """One measurement that yields a row per ``(system, context)`` of ``who``."""
        self.log(f"  {' vs '.join(str(ctx.get('via')) for _, ctx in who)}: {op} {payload} B")
        try:
            self.rows.extend(await body())
        except Exception as exc:  # one failed measurement must not end the run
            self.rows.extend(failed_row(system, op, payload, exc, ctx) for system, ctx in who)

    def fail_all(
        self, system: str, planned: Sequence[tuple[str, int]], ctx: dict[str, Value], exc: Exception
    ) -> None:
        """Error rows for measurements that never ran (a server that did not start)."""
        self.rows.extend(failed_row(system, op, payload, exc, ctx) for op, payload in planned)


def _keys(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}-{i:06d}".encode() for i in range(count)]


def _value(payload: int) -> bytes:
    return bytes(i % 251 for i in range(payload))


def _batches(config: Config) -> list[list[bytes]]:
    """Disjoint full batches of the multi-op keys (one short batch if there are too few keys)."""
    keys = _keys("multi", config.keys)
    full = [keys[i : i + config.batch] for i in range(0, len(keys), config.batch)]
    return [b for b in full if len(b) == config.batch] or [keys]


def _check_read(value: bytes, payload: int, what: str) -> None:
    if len(value) != payload:
        raise AssertionError(f"{what} returned {len(value)} bytes, wrote {payload}")


# -- kvstore -----------------------------------------------------------------------------------
def cluster_plan(config: Config) -> list[ClusterSpec]:
    """Buffered clusters for every R, then fsync at the largest R; multi at the extreme Rs."""
    replicas = sorted(set(config.replicas))
    multi_at = {replicas[0], replicas[-1]}
    plan: list[ClusterSpec] = []
    for spin in config.spin_us:
        plan += [ClusterSpec(r, "buffered", spin, r in multi_at) for r in replicas]
        if config.fsync:
            plan.append(ClusterSpec(replicas[-1], "fsync", spin, False))
    return plan


def _kv_context(spec: ClusterSpec, via: str = "KvClient") -> dict[str, Value]:
    return _context(via, spec.replicas, spec.durability, spec.spin_us, spec.servers)


def client_dispatch_config(
    client_spin_us: float | None, park_when_busy: bool = False, share_cpu: bool = False
) -> Any:
    """The client's ``DispatchConfig``: rpcfast's defaults, or both spins set to the value;
    ``park_when_busy`` and ``share_cpu`` as given."""
    import rpcfast

    if client_spin_us is None:
        return rpcfast.DispatchConfig(park_when_busy=park_when_busy, share_cpu=share_cpu)
    spin = client_spin_us / 1e6
    return rpcfast.DispatchConfig(
        spin_budget=spin, call_spin=spin, park_when_busy=park_when_busy, share_cpu=share_cpu
    )


def planned_kv_ops(spec: ClusterSpec, config: Config) -> list[tuple[str, str, int]]:
    """(system, op, payload) of every row one cluster yields."""
    ops = [
        (system, op, p)
        for p in config.payloads
        for system, op in (("kvstore", "read"), ("kvstore-rpc", "read"), ("kvstore", "write"))
    ]
    if spec.multi:
        ops += [
            (system, op, BATCH_PAYLOAD)
            for op in ("multi_write", "multi_read")
            for system in ("kvstore", "kvstore-rpc")
        ]
    return ops


async def _owning_master(coordinator: str, table: int) -> str:
    """The one master holding ``table`` (created with ``server_span=1``), from the coordinator."""
    import rpcfast

    cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")
    async with rpcfast.connect(coordinator, timeout=KV_RPC_TIMEOUT_S) as conn:
        reply = await conn.stub(cluster_capnp.Coordinator).getTabletMap(tableId=table)
        addresses = {str(t.address) for t in reply.tablets if int(t.tableId) == table}
    if len(addresses) != 1:
        raise RuntimeError(f"table {table} is on {len(addresses)} masters, expected one")
    return addresses.pop()


def _raise_first_error(results: Sequence[object]) -> None:
    from services.kvstore import KvError

    for result in results:
        if isinstance(result, KvError):
            raise result


async def _preload(kv: KvClient, table: int, keys: list[bytes], value: bytes, batch: int) -> None:
    for start in range(0, len(keys), batch):
        chunk = keys[start : start + batch]
        _raise_first_error(await kv.multi_write([(table, k, value) for k in chunk]))


async def _kv_payload(
    rec: Recorder,
    kv: KvClient,
    stub: Any,
    table: int,
    payload: int,
    spec: ClusterSpec,
    config: Config,
) -> None:
    """KvClient read and write, and a raw ``Master.read``, of ``payload``-byte objects."""
    n, seconds = config.iterations, config.seconds
    keys = _keys(f"p{payload}", config.keys)
    value = _value(payload)
    await _preload(kv, table, keys, value, config.batch)
    read_keys = itertools.cycle(keys)
    write_keys = itertools.cycle(keys)
    context = _kv_context(spec)
    rpc_context = _kv_context(spec, "Master stub")

    async def reads() -> list[Row]:
        _check_read((await kv.read(table, keys[0]))[0], payload, "KvClient.read")
        first = await stub.read(tableId=table, key=keys[0])
        _check_read(bytes(first.value), payload, "Master.read")

        async def kv_read() -> object:
            return await kv.read(table, next(read_keys))

        async def rpc_read() -> object:
            return await stub.read(tableId=table, key=next(read_keys))

        kv_samples, rpc_samples = await time_interleaved_async([kv_read, rpc_read], n, seconds)
        return [
            op_row("kvstore", "read", payload, kv_samples, context),
            op_row("kvstore-rpc", "read", payload, rpc_samples, rpc_context),
        ]

    async def kv_write() -> Row:
        async def call() -> object:
            return await kv.write(table, next(write_keys), value)

        samples = await time_calls_async(call, n, seconds)
        return op_row("kvstore", "write", payload, samples, context)

    await rec.measure_many_async(
        "read", payload, [("kvstore", context), ("kvstore-rpc", rpc_context)], reads
    )
    await rec.measure_async("kvstore", "write", payload, context, kv_write)


async def _kv_multi(
    rec: Recorder, kv: KvClient, stub: Any, table: int, spec: ClusterSpec, config: Config
) -> None:
    """``multi_write``/``multi_read`` batches to the table's one master, one batch at a time,
    through KvClient and through the raw ``Master`` stub."""
    ctx = _kv_context(spec, "KvClient.multi_*")
    rpc_ctx = _kv_context(spec, "Master.multi*")
    value = _value(BATCH_PAYLOAD)
    batches = _batches(config)
    batch = len(batches[0])
    writes = itertools.cycle([[(table, k, value) for k in b] for b in batches])
    reads = itertools.cycle([[(table, k) for k in b] for b in batches])
    rpc_writes = itertools.cycle(
        [[{"tableId": table, "key": k, "value": value} for k in b] for b in batches]
    )
    rpc_reads = itertools.cycle([[{"tableId": table, "key": k} for k in b] for b in batches])

    def check_outcomes(reply: Any, what: str) -> Any:
        failed = [o for o in reply.outcomes if o.status != 0]
        if failed:
            raise AssertionError(f"{what}: {len(failed)} item(s) failed, status {failed[0].status}")
        return reply

    async def kv_multi_write() -> object:
        results = await kv.multi_write(next(writes))
        _raise_first_error(results)
        return results

    async def rpc_multi_write() -> object:
        return check_outcomes(await stub.multiWrite(items=next(rpc_writes)), "multiWrite")

    async def kv_multi_read() -> object:
        results = await kv.multi_read(next(reads))
        _raise_first_error(results)
        return results

    async def rpc_multi_read() -> object:
        return check_outcomes(await stub.multiRead(items=next(rpc_reads)), "multiRead")

    def pair(
        op: str, kv_call: Callable[[], Awaitable[object]], rpc_call: Callable[[], Awaitable[object]]
    ) -> Callable[[], Awaitable[list[Row]]]:
        async def body() -> list[Row]:
            kv_samples, rpc_samples = await time_interleaved_async(
                [kv_call, rpc_call], config.iterations, config.seconds
            )
            return [
                op_row("kvstore", op, BATCH_PAYLOAD, kv_samples, ctx, batch),
                op_row("kvstore-rpc", op, BATCH_PAYLOAD, rpc_samples, rpc_ctx, batch),
            ]

        return body

    who = [("kvstore", ctx), ("kvstore-rpc", rpc_ctx)]
    write_pair = pair("multi_write", kv_multi_write, rpc_multi_write)
    await rec.measure_many_async("multi_write", BATCH_PAYLOAD, who, write_pair)
    read_pair = pair("multi_read", kv_multi_read, rpc_multi_read)
    await rec.measure_many_async("multi_read", BATCH_PAYLOAD, who, read_pair)


async def _measure_cluster(
    rec: Recorder, coordinator: str, spec: ClusterSpec, config: Config
) -> None:
    import rpcfast
    import rpcfast.dispatch
    from services.kvstore import KvClient

    kv_capnp: Any = rpcfast.load_schema("kvstore.capnp")
    # The first use in this trio run creates the dispatcher, with this configuration.
    rpcfast.dispatch.current(
        client_dispatch_config(config.client_spin_us, config.parks_when_busy, config.share_cpu)
    )
    async with await KvClient.open(
        coordinator=coordinator, timeout=KV_TIMEOUT_S, rpc_timeout=KV_RPC_TIMEOUT_S
    ) as kv:
        table = await kv.create_table("bench", server_span=1)
        master = await _owning_master(coordinator, table)
        async with rpcfast.connect(master, timeout=KV_RPC_TIMEOUT_S) as conn:
            stub = conn.stub(kv_capnp.Master)
            for payload in config.payloads:
                await _kv_payload(rec, kv, stub, table, payload, spec, config)
            if spec.multi:
                await _kv_multi(rec, kv, stub, table, spec, config)


def run_kvstore(config: Config, log: Log = _quiet) -> list[Row]:
    """Measure every planned cluster; a cluster that fails becomes error rows."""
    import trio

    from services.kvstore.cli import LocalCluster

    rec = Recorder(log)
    for spec in cluster_plan(config):
        log(
            f"kvstore: {spec.servers} server(s), R={spec.replicas}, {spec.durability}, "
            f"spin {spec.spin_us:g} us"
        )
        done = len(rec.rows)
        with tempfile.TemporaryDirectory(prefix="rpcfast-kv-bench-", dir=config.directory) as d:
            cluster = LocalCluster(
                d,
                spec.servers,
                spec.replicas,
                config.memory_mb,
                spec.durability,
                spin_us=spec.spin_us,
                segment_kb=config.segment_kb,
                park_when_busy=config.parks_when_busy,
                share_cpu=config.share_cpu,
            )
            try:
                cluster.start(progress=lambda line: log(f"  {line}"))
                trio.run(_measure_cluster, rec, cluster.coordinator, spec, config)
            except Exception as exc:  # the cluster itself failed: its missing rows say why
                measured = {(r["system"], r["op"], r["payload"]) for r in rec.rows[done:]}
                for system, op, payload in planned_kv_ops(spec, config):
                    if (system, op, payload) not in measured:
                        rec.rows.append(failed_row(system, op, payload, exc, _kv_context(spec)))
            finally:
                cluster.stop()
    return rec.rows


# -- redis -------------------------------------------------------------------------------------
REDIS_MODES: dict[str, tuple[str, int]] = {
    "plain": ("none", 0),
    "aof": ("fsync", 0),
    "wait": ("replica-ack", 1),
}
"""Redis setups measured: mode -> (durability, replicas waited for)."""


def _wait_until(what: str, ready: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:g} s")
        time.sleep(0.05)


def _aof_ready(client: redis.Redis) -> bool:
    info: dict[str, Any] = client.info("persistence")
    return (
        int(info.get("aof_enabled", 0)) == 1
        and int(info.get("aof_rewrite_in_progress", 1)) == 0
        and int(info.get("aof_rewrite_scheduled", 1)) == 0
    )


def _replica_online(client: redis.Redis) -> bool:
    info: dict[str, Any] = client.info("replication")
    replica = info.get("slave0")
    return (
        int(info.get("connected_slaves", 0)) >= 1
        and isinstance(replica, dict)
        and replica.get("state") == "online"
    )


def _redis_context(mode: str) -> dict[str, Value]:
    durability, replicas = REDIS_MODES[mode]
    via = {
        "plain": "SET",
        "aof": "SET (appendfsync always)",
        "wait": f"SET+WAIT {replicas} (pipelined)",
    }[mode]
    return _context(via, replicas, durability, None, 2 if replicas else 1)


def _redis_payload(
    rec: Recorder, client: redis.Redis, payload: int, mode: str, config: Config
) -> None:
    """GET and SET of ``payload`` bytes (``plain``), or the SET of one durable ``mode``."""
    n, seconds = config.iterations, config.seconds
    keys = _keys(f"p{payload}", config.keys)
    value = _value(payload)
    read_keys = itertools.cycle(keys)
    write_keys = itertools.cycle(keys)
    get_ctx = _context("GET", 0, "none", None, 1)
    set_ctx = _redis_context(mode)
    replicas = REDIS_MODES[mode][1]

    def get() -> Row:
        for start in range(0, len(keys), config.batch):
            pipe = client.pipeline(transaction=False)
            for key in keys[start : start + config.batch]:
                pipe.set(key, value)
            pipe.execute()
        got = client.get(keys[0])
        _check_read(got if isinstance(got, bytes) else b"", payload, "GET")
        samples = time_calls(lambda: client.get(next(read_keys)), n, seconds)
        return op_row("redis", "read", payload, samples, get_ctx)

    def set_() -> Row:
        samples = time_calls(lambda: client.set(next(write_keys), value), n, seconds)
        return op_row("redis", "write", payload, samples, set_ctx)

    def set_wait() -> Row:
        def call() -> object:
            pipe = client.pipeline(transaction=False)
            pipe.set(next(write_keys), value)
            pipe.wait(replicas, WAIT_TIMEOUT_MS)
            _, acked = pipe.execute()
            if int(acked) < replicas:
                raise AssertionError(f"WAIT {replicas}: only {acked} replica(s) acked")
            return acked

        samples = time_calls(call, n, seconds)
        return op_row("redis", "write", payload, samples, set_ctx)

    if mode == "plain":
        rec.measure("redis", "read", payload, get_ctx, get)
    rec.measure("redis", "write", payload, set_ctx, set_wait if replicas else set_)


def _redis_pipelines(rec: Recorder, client: redis.Redis, config: Config) -> None:
    """Pipelines of ``batch`` SETs / GETs (no transaction), one pipeline at a time."""
    value = _value(BATCH_PAYLOAD)
    batches = _batches(config)
    batch = len(batches[0])
    write_batches = itertools.cycle(batches)
    read_batches = itertools.cycle(batches)
    ctx = _context("pipeline", 0, "none", None, 1)

    def pipeline_set() -> Row:
        def call() -> object:
            pipe = client.pipeline(transaction=False)
            for key in next(write_batches):
                pipe.set(key, value)
            return pipe.execute()

        samples = time_calls(call, config.iterations, config.seconds)
        return op_row("redis", "multi_write", BATCH_PAYLOAD, samples, ctx, batch)

    def pipeline_get() -> Row:
        def call() -> object:
            pipe = client.pipeline(transaction=False)
            for key in next(read_batches):
                pipe.get(key)
            results: list[bytes | None] = pipe.execute()
            if any(r is None for r in results):
                raise AssertionError("pipelined GET missed a key")
            return results

        samples = time_calls(call, config.iterations, config.seconds)
        return op_row("redis", "multi_read", BATCH_PAYLOAD, samples, ctx, batch)

    rec.measure("redis", "multi_write", BATCH_PAYLOAD, ctx, pipeline_set)
    rec.measure("redis", "multi_read", BATCH_PAYLOAD, ctx, pipeline_get)


def _redis_aof(rec: Recorder, client: redis.Redis, config: Config) -> None:
    """SETs with the AOF on and ``appendfsync always`` (set at run time), then the AOF off."""
    client.config_set("appendfsync", "always")
    client.config_set("appendonly", "yes")
    try:
        _wait_until("redis AOF", lambda: _aof_ready(client))
        for payload in config.payloads:
            _redis_payload(rec, client, payload, "aof", config)
    finally:
        client.config_set("appendonly", "no")


def _redis_wait(rec: Recorder, master: Any, client: redis.Redis, config: Config) -> None:
    """SET + ``WAIT 1`` with a second redis-server replicating this one."""
    from perf._redis import RedisServer

    with RedisServer() as replica:
        replica_client = replica.client()
        try:
            replica_client.replicaof("127.0.0.1", master.port)
            _wait_until("redis replica", lambda: _replica_online(client))
            for payload in config.payloads:
                _redis_payload(rec, client, payload, "wait", config)
        finally:
            replica_client.close()


def run_redis(config: Config, log: Log = _quiet) -> list[Row]:
    """redis-server via redis-py: plain, ``appendfsync always``, and ``WAIT 1`` with a replica."""
    from perf._redis import RedisServer

    rec = Recorder(log)
    payloads = config.payloads
    log("redis: GET, SET, pipelines (no persistence)")
    with RedisServer() as master:
        client = master.client()
        try:
            for payload in payloads:
                _redis_payload(rec, client, payload, "plain", config)
            _redis_pipelines(rec, client, config)
            log("redis: SET with appendfsync always")
            try:
                _redis_aof(rec, client, config)
            except Exception as exc:  # AOF could not be switched on: say so per payload
                rec.fail_all("redis", [("write", p) for p in payloads], _redis_context("aof"), exc)
            log("redis: SET + WAIT 1 with a replica")
            try:
                _redis_wait(rec, master, client, config)
            except Exception as exc:  # the replica did not start or sync
                rec.fail_all("redis", [("write", p) for p in payloads], _redis_context("wait"), exc)
        finally:
            client.close()
    return rec.rows


# -- memcached ---------------------------------------------------------------------------------
def _memcached_payload(rec: Recorder, client: Any, payload: int, config: Config) -> None:
    """get and set of ``payload`` bytes, replies awaited."""
    n, seconds = config.iterations, config.seconds
    keys = _keys(f"p{payload}", config.keys)
    value = _value(payload)
    read_keys = itertools.cycle(keys)
    write_keys = itertools.cycle(keys)
    get_ctx = _context("get", 0, "none", None, 1)
    set_ctx = _context("set", 0, "none", None, 1)

    def get() -> Row:
        for start in range(0, len(keys), config.batch):
            failed = client.set_many(dict.fromkeys(keys[start : start + config.batch], value))
            if failed:
                raise AssertionError(f"set_many failed for {len(failed)} keys")
        _check_read(bytes(client.get(keys[0]) or b""), payload, "get")
        samples = time_calls(lambda: client.get(next(read_keys)), n, seconds)
        return op_row("memcached", "read", payload, samples, get_ctx)

    def set_() -> Row:
        samples = time_calls(lambda: client.set(next(write_keys), value), n, seconds)
        return op_row("memcached", "write", payload, samples, set_ctx)

    rec.measure("memcached", "read", payload, get_ctx, get)
    rec.measure("memcached", "write", payload, set_ctx, set_)


def _memcached_many(rec: Recorder, client: Any, config: Config) -> None:
    """set_many / get_many of ``batch`` objects, one batch at a time."""
    value = _value(BATCH_PAYLOAD)
    batches = _batches(config)
    batch = len(batches[0])
    write_batches = itertools.cycle([dict.fromkeys(b, value) for b in batches])
    read_batches = itertools.cycle(batches)
    ctx = _context("get_many/set_many", 0, "none", None, 1)

    def set_many() -> Row:
        def call() -> object:
            failed = client.set_many(next(write_batches))
            if failed:
                raise AssertionError(f"set_many failed for {len(failed)} keys")
            return failed

        samples = time_calls(call, config.iterations, config.seconds)
        return op_row("memcached", "multi_write", BATCH_PAYLOAD, samples, ctx, batch)

    def get_many() -> Row:
        def call() -> object:
            wanted = next(read_batches)
            found = client.get_many(wanted)
            if len(found) != len(wanted):
                raise AssertionError("get_many missed a key")
            return found

        samples = time_calls(call, config.iterations, config.seconds)
        return op_row("memcached", "multi_read", BATCH_PAYLOAD, samples, ctx, batch)

    rec.measure("memcached", "multi_write", BATCH_PAYLOAD, ctx, set_many)
    rec.measure("memcached", "multi_read", BATCH_PAYLOAD, ctx, get_many)


def run_memcached(config: Config, log: Log = _quiet) -> list[Row]:
    """memcached via pymemcache: get/set per payload, get_many/set_many batches."""
    from perf._memcached import MemcachedServer

    rec = Recorder(log)
    log("memcached: get, set, get_many, set_many")
    with MemcachedServer() as server:
        client = server.client()
        try:
            for payload in config.payloads:
                _memcached_payload(rec, client, payload, config)
            _memcached_many(rec, client, config)
        finally:
            client.close()
    return rec.rows


# -- the run -----------------------------------------------------------------------------------
def _guarded(
    system: str, runner: Callable[[Config, Log], list[Row]], config: Config, log: Log
) -> list[Row]:
    """Run one system; if its server cannot even start, one error row says why."""
    try:
        return runner(config, log)
    except Exception as exc:
        return [failed_row(system, "read", config.payloads[0], exc, {})]


def run_benchmarks(config: Config, log: Log = _quiet) -> list[Row]:
    """redis and memcached first (the baselines), then the kvstore clusters; ratios, targets."""
    runners: dict[str, Callable[[Config, Log], list[Row]]] = {
        "redis": run_redis,
        "memcached": run_memcached,
        "kvstore": run_kvstore,
    }
    rows: list[Row] = []
    for system in ("redis", "memcached", "kvstore"):
        if system in config.systems:
            rows += _guarded(system, runners[system], config, log)
    add_ratios(rows)
    rows += target_rows(rows)
    return rows


def _sort_key(row: Row) -> tuple[int, int, int, float, int, int, str]:
    def index(order: Sequence[str], value: Value) -> int:
        return order.index(str(value)) if value in order else len(order)

    payload = row.get("payload")
    spin = row.get("spin_us")
    replicas = row.get("replicas")
    return (
        index(OPS_ORDER, row.get("op")),
        payload if isinstance(payload, int) else -1,
        index(ROW_SYSTEMS, row.get("system")),
        float(spin) if isinstance(spin, int | float) else -1.0,
        index(DURABILITY_ORDER, row.get("durability")),
        replicas if isinstance(replicas, int) else -1,
        str(row.get("via")),
    )


def render(rows: Sequence[Row]) -> str:
    """Latency table, batch throughput table, the issue's targets, and errors."""
    ok = sorted((r for r in rows if "error" not in r and r.get("op") != "target"), key=_sort_key)
    latency = [r for r in ok if "batch" not in r]
    throughput = [r for r in ok if "batch" in r]
    targets = [r for r in rows if r.get("op") == "target"]
    errors = sorted((r for r in rows if "error" in r), key=_sort_key)
    parts = [
        "Latency (us), one operation at a time; x_redis_get = median / redis GET median, "
        "same payload",
        _stats.format_table(latency, LATENCY_COLUMNS),
    ]
    if throughput:
        parts += [
            "",
            "Batches (one batch at a time): objects/s",
            _stats.format_table(throughput, THROUGHPUT_COLUMNS),
        ]
    if targets:
        parts += ["", "Issue targets (100 B)", _stats.format_table(targets, TARGET_COLUMNS)]
    if errors:
        parts += ["", "Errors"]
        parts += [
            f"  {r['system']} {r['op']} {r['payload']} B R={r.get('replicas', '-')} "
            f"{r.get('durability', '')}: {r['error']}"
            for r in errors
        ]
    return "\n".join(parts)


def filesystem_of(path: str) -> str | None:
    """The filesystem type holding ``path`` (fsync on tmpfs costs nothing), from /proc/mounts."""
    try:
        with open("/proc/mounts", encoding="utf-8") as mounts:
            entries = [line.split() for line in mounts]
    except OSError:
        return None
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for entry in entries:
        if len(entry) < 3:
            continue
        mount = entry[1]
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and (best is None or len(mount) > best[0]):
            best = (len(mount), entry[2])
    return best[1] if best else None


def _binary_version(name: str, flag: str) -> str | None:
    path = shutil.which(name)
    if path is None:
        return None
    try:
        done = subprocess.run([path, flag], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


# -- arguments ---------------------------------------------------------------------------------
def _payload_list(text: str) -> tuple[int, ...]:
    values = _args.int_list(text)
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"payloads must be >= 1 byte: {text}")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text}") from exc
    if not values or any(not v >= 0 or math.isinf(v) for v in values):
        raise argparse.ArgumentTypeError(f"need one or more finite numbers >= 0: {text}")
    return values


def _system_list(text: str) -> tuple[str, ...]:
    values = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [v for v in values if v not in SYSTEMS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown systems {', '.join(unknown) or '(none)'}; known: {', '.join(SYSTEMS)}"
        )
    return values


def _nonnegative_float(text: str) -> float:
    (value,) = _float_list(text)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    parser.add_argument(
        "--replicas",
        type=_args.int_list,
        default=DEFAULT_REPLICAS,
        metavar="R,R,...",
        help="kvstore replica counts, R+1 servers each (default: 0,1,2,3)",
    )
    parser.add_argument(
        "--payloads",
        type=_payload_list,
        default=DEFAULT_PAYLOADS,
        metavar="N,N,...",
        help="object sizes in bytes for single-object ops (default: 100,1000)",
    )
    parser.add_argument(
        "--systems",
        type=_system_list,
        default=SYSTEMS,
        metavar="NAME,...",
        help=f"only these of {', '.join(SYSTEMS)} (default: all)",
    )
    parser.add_argument(
        "--spin-us",
        type=_float_list,
        default=DEFAULT_SPIN_US,
        metavar="US,US,...",
        help="kvstore servers' dispatcher spin budget; a list runs every cluster per value "
        "(default: 200)",
    )
    parser.add_argument(
        "--client-spin-us",
        type=_nonnegative_float,
        metavar="US",
        help="the benchmark client's call spin and idle spin (default: rpcfast's, 500 and 2000 us)",
    )
    parser.add_argument(
        "--park-when-busy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kvstore servers and the client stop spinning after 50 us idle while more "
        "threads are runnable than cores (default: on)",
    )
    parser.add_argument(
        "--share-cpu",
        action="store_true",
        help="kvstore servers and the client hand their core to any runnable process on every "
        "idle spin (sched_yield) instead of parking while busy; pair with a long --spin-us "
        "and --client-spin-us (e.g. 5000)",
    )
    parser.add_argument(
        "--iterations",
        type=_args.positive_int,
        help=f"at most this many timed operations per measurement (default {DEFAULT_ITERATIONS})",
    )
    parser.add_argument(
        "--seconds",
        type=_args.positive_float,
        help=f"at most about this long per measurement (default {DEFAULT_SECONDS})",
    )
    parser.add_argument(
        "--batch",
        type=_args.positive_int,
        default=DEFAULT_BATCH,
        help=f"objects per multi-op / pipeline (default {DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--keys",
        type=_args.positive_int,
        help=f"distinct keys per payload, cycled through (default {DEFAULT_KEYS})",
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip the fsync-mode kvstore cluster (at the largest R)",
    )
    parser.add_argument(
        "--memory-mb",
        type=_args.positive_int,
        default=DEFAULT_MEMORY_MB,
        help=f"log memory per kvstore server (default {DEFAULT_MEMORY_MB})",
    )
    parser.add_argument(
        "--dir",
        metavar="DIR",
        help="parent of the clusters' temporary data directories (default: the system temp dir)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_ITERATIONS} iterations, {QUICK_SECONDS} s, {QUICK_KEYS} keys "
        "unless given",
    )


def run(args: argparse.Namespace) -> int:
    config = Config(
        payloads=tuple(args.payloads),
        replicas=tuple(sorted(set(args.replicas))),
        spin_us=tuple(args.spin_us),
        systems=tuple(s for s in SYSTEMS if s in args.systems),
        iterations=args.iterations or (QUICK_ITERATIONS if args.quick else DEFAULT_ITERATIONS),
        seconds=args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS),
        batch=args.batch,
        keys=max(args.keys or (QUICK_KEYS if args.quick else DEFAULT_KEYS), args.batch),
        memory_mb=args.memory_mb,
        fsync=not args.no_fsync,
        directory=args.dir,
        client_spin_us=args.client_spin_us,
        park_when_busy=args.park_when_busy,
        share_cpu=args.share_cpu,
    )

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = run_benchmarks(config, log)
    print(render(rows))
    if args.json:
        client = client_dispatch_config(
            config.client_spin_us, config.parks_when_busy, config.share_cpu
        )
        data_dir = config.directory or tempfile.gettempdir()
        _stats.write_json(
            args.json,
            rows,
            _stats.machine_info(("rpcfast", "redis", "pymemcache", "trio", "pycapnp")),
            {
                "payloads": list(config.payloads),
                "replicas": list(config.replicas),
                "spin_us": list(config.spin_us),
                "systems": list(config.systems),
                "iterations": config.iterations,
                "seconds": config.seconds,
                "batch": config.batch,
                "batch_payload": BATCH_PAYLOAD,
                "keys": config.keys,
                "memory_mb": config.memory_mb,
                "segment_kb": config.segment_kb,
                "fsync_cluster": config.fsync,
                "client_call_spin_us": client.call_spin * 1e6,
                "client_idle_spin_us": client.spin_budget * 1e6,
                "park_when_busy": config.parks_when_busy,
                "share_cpu": config.share_cpu,
                "data_dir_filesystem": filesystem_of(data_dir),
                "redis_server": _binary_version("redis-server", "--version"),
                "memcached": _binary_version("memcached", "-V"),
                "argv": sys.argv,
            },
        )
    return 1 if any("error" in r for r in rows) else 0
