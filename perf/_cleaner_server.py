"""The ``server`` section of ``rpcfast-perf cleaner``: Figures 6 and 9 end to end.

The other sections drive an :class:`~services.kvstore.ObjectManager` in this process. This one
measures what a client sees: a real one-server cluster (``rpcfast-kv``'s coordinator and a
storage server as child processes, R = 0, loopback UDP), loaded through :class:`KvClient`,
whose server runs the cleaner as it always does, in cooperative slices between requests.

For each object size and utilisation, a fresh server with a log of ``SERVER_SCALE.memory_mb``
(32 MB; 8 MB with ``--quick``; small segments and seglets, two survivor segments reserved and
a 98% write limit, so that 90% of the log can hold live objects) is filled with sequential keys
to the utilisation (live log bytes over log memory), then overwritten with uniform keys until
the log has turned over (``warm_factor`` times its memory, bounded in time). Then, each bounded
in count and time:

* ``heavy`` (the paper's stress load): ``HEAVY_OUTSTANDING`` multi-writes of ``HEAVY_BATCH``
  objects in flight at once; objects written per second.
* ``sequential`` (the paper's "Sequential"): one client, one write per request, back to back;
  writes per second and the latency quantiles.

``vs30%`` is the throughput over the same size and mode at 30%. The latency rows (Figure 9)
compare sequential 100-byte writes at 90%, on a server with whole cleaner slices and on one whose
slices yield to waiting requests, with the same writes against a server whose log is so large
that its cleaner never runs (``cleaner_ran`` says whether it did): all three are up at once and
take the writes in interleaved blocks, so the host's drift lands on each alike. ``copied/new`` is
what the server's cleaner relocated per new object byte in the window, read from its
statistics.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from attrs import frozen

from perf import _stats
from perf._stats import Row

MiB = 1 << 20
KEY_BYTES = 8
HEAVY_BATCH = 75
HEAVY_OUTSTANDING = 10
FILL_BATCH = 500
RESERVE_SEGMENTS = 2
WRITE_LIMIT = 0.98
NO_CLEANER_FACTOR = 8  # the idle-cleaner server's log, as a multiple of the measured one's
LATENCY_SIZE = 100
LATENCY_UTILIZATION = 90
KV_TIMEOUT_S = 30.0
SETTLE_S = 0.05  # after an interleaved block, until the server's cleaner stops for this long
SETTLE_MAX_S = 5.0


@frozen
class ServerScale:
    """Sizes and bounds of the server section."""

    memory_mb: int
    segment_kb: int
    seglet_kb: int
    warm_factor: float  # log memory overwritten before measuring
    warm_s: float
    heavy_objects: int
    heavy_s: float
    sequential_writes: int
    sequential_s: float


SERVER_SCALE = ServerScale(32, 256, 8, 1.5, 40.0, 400_000, 6.0, 40_000, 6.0)
QUICK_SERVER_SCALE = ServerScale(8, 64, 4, 0.3, 5.0, 5_000, 1.0, 1_000, 1.0)


def entry_bytes(size: int) -> int:
    """Log bytes of one object of ``size`` key+value bytes (8-byte keys)."""
    from services.kvstore.log import object_entry_size

    return object_entry_size(KEY_BYTES, size - KEY_BYTES)


def seglet_kb_for(scale: ServerScale, memory_mb: int) -> int:
    """The scale's seglet size, doubled until the log digest's room (8 bytes a seglet) is at most a
    quarter of a segment: a larger log needs larger seglets."""
    seglet = scale.seglet_kb
    while seglet < scale.segment_kb and 8 * (memory_mb * 1024 // seglet) > scale.segment_kb * 256:
        seglet *= 2
    return seglet


def objects_at(utilization: float, size: int, memory_bytes: int) -> int:
    return max(1, int(utilization / 100 * memory_bytes / entry_bytes(size)))


class _Keys:
    """Uniform key ids over ``[0, n)`` as 8-byte keys, drawn in chunks."""

    def __init__(self, n: int, seed: int) -> None:
        from perf._workloads import KeyChooser

        self._chooser = KeyChooser(n, "uniform", seed=seed)
        self._buffer: list[int] = []

    def next(self) -> bytes:
        if not self._buffer:
            self._buffer = self._chooser.draw(4096)
        return self._buffer.pop().to_bytes(KEY_BYTES, "big")

    def batch(self, count: int) -> list[bytes]:
        return [self.next() for _ in range(count)]


async def _server_stats(address: str) -> dict[str, Any]:
    import json

    import rpcfast

    cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")
    async with rpcfast.connect(address, timeout=5.0) as conn:
        admin = conn.stub(cluster_capnp.ServerAdmin)
        stats: dict[str, Any] = json.loads(str((await admin.getStatistics()).json))
    return stats


def _raise_first(outcomes: Sequence[object]) -> None:
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


@frozen
class _Window:
    objects: int
    seconds: float
    samples: list[float]
    truncated: bool


async def _heavy(
    kv: Any, table: int, keys: _Keys, value: bytes, count: int, seconds: float
) -> _Window:
    """``HEAVY_OUTSTANDING`` writers of ``HEAVY_BATCH``-object multi-writes until ``count``
    objects or ``seconds``."""
    import trio

    state = {"objects": 0, "truncated": False}
    start = time.perf_counter()
    deadline = start + seconds

    async def writer() -> None:
        while state["objects"] < count:
            if time.perf_counter() > deadline:
                state["truncated"] = True
                return
            state["objects"] += HEAVY_BATCH
            items = [(table, k, value) for k in keys.batch(HEAVY_BATCH)]
            _raise_first(await kv.multi_write(items))

    async with trio.open_nursery() as nursery:
        for _ in range(HEAVY_OUTSTANDING):
            nursery.start_soon(writer)
    return _Window(int(state["objects"]), time.perf_counter() - start, [], bool(state["truncated"]))


async def _sequential(
    kv: Any, table: int, keys: _Keys, value: bytes, count: int, seconds: float
) -> _Window:
    samples: list[float] = []
    perf = time.perf_counter
    start = perf()
    deadline = start + seconds
    truncated = False
    for _ in range(count):
        key = keys.next()
        t0 = perf()
        await kv.write(table, key, value)
        t1 = perf()
        samples.append(t1 - t0)
        if t1 > deadline:
            truncated = True
            break
    return _Window(len(samples), perf() - start, samples, truncated)


async def _settle(address: str, last: tuple[int, int]) -> None:
    """Wait (up to ``SETTLE_MAX_S``) until the server's cleaner has relocated nothing and
    finished no pass for ``SETTLE_S``: after a block of writes it may still be catching up.
    ``last`` is its :func:`_cleaner_totals` as the block ended."""
    import trio

    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        await trio.sleep(SETTLE_S)
        now = _cleaner_totals(await _server_stats(address))
        if now == last:
            return
        last = now


def _cleaner_totals(stats: dict[str, Any]) -> tuple[int, int]:
    """Bytes the server's cleaner has relocated and the passes it has finished, so far."""
    c = stats["memory"]["cleaner"]
    return int(c["bytes_relocated"]), int(c["compactions"]) + int(c["cleanings"])


def _cleaner_delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int]:
    (b_bytes, b_passes), (a_bytes, a_passes) = _cleaner_totals(before), _cleaner_totals(after)
    return a_bytes - b_bytes, a_passes - b_passes


@frozen
class ServerSpec:
    """One server to measure: its log size and how its cleaner's slices run."""

    size: int
    utilization: int
    log_mb: int
    interruptible: bool
    label: str
    reference: bool = False  # the idle-cleaner server the latency rows are compared with

    def fields(self) -> Row:
        """What every row about this server says of it."""
        return {
            "object_bytes": self.size,
            "utilization_target": self.utilization,
            "log": self.label,
            "slices": "yield" if self.interruptible else "whole",
        }


class _Loaded:
    """A filled and warmed server, through a KvClient: what a measurement writes to."""

    def __init__(
        self, spec: ServerSpec, kv: Any, address: str, table: int, objects: int, seed: int
    ) -> None:
        import os

        self.spec = spec
        self.kv = kv
        self.address = address
        self.table = table
        self.objects = objects
        self.keys = _Keys(objects, seed)
        self.value = os.urandom(spec.size - KEY_BYTES)
        self.warm = _Window(0, 0.0, [], False)

    @classmethod
    async def prepare(
        cls, spec: ServerSpec, kv: Any, address: str, scale: ServerScale, seed: int
    ) -> _Loaded:
        """Fill with sequential keys to the spec's utilisation of ``scale.memory_mb``, then
        overwrite ``warm_factor`` times that memory (the same writes whatever the log's size,
        so that an idle-cleaner reference never fills its larger log)."""
        objects = objects_at(spec.utilization, spec.size, scale.memory_mb * MiB)
        table = await kv.create_table("cleaner", server_span=1)
        loaded = cls(spec, kv, address, table, objects, seed)
        for first in range(0, objects, FILL_BATCH):
            ids = range(first, min(objects, first + FILL_BATCH))
            items = [(table, i.to_bytes(KEY_BYTES, "big"), loaded.value) for i in ids]
            _raise_first(await kv.multi_write(items))
        warm_objects = int(scale.warm_factor * scale.memory_mb * MiB / entry_bytes(spec.size))
        loaded.warm = await _heavy(kv, table, loaded.keys, loaded.value, warm_objects, scale.warm_s)
        return loaded

    async def run(self, mode: str, count: int, seconds: float) -> _Window:
        if mode == "heavy":
            return await _heavy(self.kv, self.table, self.keys, self.value, count, seconds)
        return await _sequential(self.kv, self.table, self.keys, self.value, count, seconds)

    def row(self, mode: str, win: _Window, s0: dict[str, Any], s1: dict[str, Any]) -> Row:
        spec = self.spec
        relocated, passes = _cleaner_delta(s0, s1)
        memory = s1["memory"]
        return {
            "section": "server",
            "mode": mode,
            **spec.fields(),
            "reference": int(spec.reference),
            "objects": self.objects,
            "utilization": memory["live_bytes"] / memory["total_bytes"],
            "writes": win.objects,
            "seconds": win.seconds,
            "objects_per_s": win.objects / win.seconds if win.seconds else None,
            "relocated_per_new_byte": relocated / max(1, win.objects * entry_bytes(spec.size)),
            "cleaner_passes": passes,
            "cleaner_ran": int(relocated > 0 or passes > 0),
            "stalls": int(memory["retries"]) - int(s0["memory"]["retries"]),
            "warm_writes": self.warm.objects,
            "truncated": int(self.warm.truncated or win.truncated),
            **(_stats.quantiles_us(win.samples) if win.samples else {}),
        }


class _Clusters:
    """One single-server cluster (R = 0) per spec, all up at once; stops them all on exit."""

    def __init__(self, specs: Sequence[ServerSpec], scale: ServerScale) -> None:
        self.specs = list(specs)
        self.scale = scale
        self.clusters: list[Any] = []
        self._dirs: list[tempfile.TemporaryDirectory[str]] = []

    def __enter__(self) -> _Clusters:
        from services.kvstore.cli import LocalCluster

        try:
            for spec in self.specs:
                d = tempfile.TemporaryDirectory(prefix="rpcfast-cleaner-bench-")
                self._dirs.append(d)
                cluster = LocalCluster(
                    d.name,
                    servers=1,
                    replicas=0,
                    memory_mb=spec.log_mb,
                    durability="buffered",
                    segment_kb=self.scale.segment_kb,
                    seglet_kb=seglet_kb_for(self.scale, spec.log_mb),
                    cleaner_reserve=RESERVE_SEGMENTS,
                    write_limit=WRITE_LIMIT,
                    prefault=True,
                    cleaner_interruptible=spec.interruptible,
                )
                self.clusters.append(cluster)
                cluster.start(progress=lambda line: None)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for cluster in self.clusters:
            cluster.stop()
        for d in self._dirs:
            d.cleanup()


async def _throughput(clusters: _Clusters, seed: int, modes: Sequence[str]) -> list[Row]:
    import rpcfast
    import rpcfast.dispatch
    from services.kvstore import KvClient

    rpcfast.dispatch.current(rpcfast.DispatchConfig())
    scale = clusters.scale
    rows: list[Row] = []
    for spec, cluster in zip(clusters.specs, clusters.clusters, strict=True):
        async with await KvClient.open(coordinator=cluster.coordinator, timeout=KV_TIMEOUT_S) as kv:
            target = await _Loaded.prepare(spec, kv, cluster.server_addresses[0], scale, seed)
            for mode in modes:
                s0 = await _server_stats(target.address)
                if mode == "heavy":
                    win = await target.run(mode, scale.heavy_objects, scale.heavy_s)
                else:
                    win = await target.run(mode, scale.sequential_writes, scale.sequential_s)
                rows.append(target.row(mode, win, s0, await _server_stats(target.address)))
    return rows


async def _interleaved(clusters: _Clusters, seed: int, blocks: int) -> list[Row]:
    """Sequential writes to every server in turn, ``blocks`` blocks each: the machine's drift
    (this host is shared) lands on all of them alike."""
    import contextlib

    import rpcfast
    import rpcfast.dispatch
    from services.kvstore import KvClient

    rpcfast.dispatch.current(rpcfast.DispatchConfig())
    scale = clusters.scale
    per_block = max(1, scale.sequential_writes // blocks)
    block_s = scale.sequential_s / blocks
    async with contextlib.AsyncExitStack() as stack:
        targets: list[_Loaded] = []
        for spec, cluster in zip(clusters.specs, clusters.clusters, strict=True):
            kv = await stack.enter_async_context(
                await KvClient.open(coordinator=cluster.coordinator, timeout=KV_TIMEOUT_S)
            )
            address = cluster.server_addresses[0]
            targets.append(await _Loaded.prepare(spec, kv, address, scale, seed))
        before = [await _server_stats(t.address) for t in targets]
        windows = [_Window(0, 0.0, [], False) for _ in targets]
        in_window = [0 for _ in targets]  # bytes relocated while a block's writes ran
        for _ in range(blocks):
            for i, target in enumerate(targets):
                start = _cleaner_totals(await _server_stats(target.address))[0]
                win = await target.run("sequential", per_block, block_s)
                ended = _cleaner_totals(await _server_stats(target.address))
                in_window[i] += ended[0] - start
                old = windows[i]
                windows[i] = _Window(
                    old.objects + win.objects,
                    old.seconds + win.seconds,
                    old.samples + win.samples,
                    old.truncated or win.truncated,
                )
                # a cleaner catching up must not run beside the next server's block
                await _settle(target.address, ended)
        rows = []
        for t, w, s0, moved in zip(targets, windows, before, in_window, strict=True):
            row = t.row("sequential", w, s0, await _server_stats(t.address))
            # The settles after each block let a cleaner finish its backlog unmeasured: this is
            # the share of the copying the measured writes ran beside.
            row["relocated_in_window_per_new_byte"] = moved / max(
                1, w.objects * entry_bytes(t.spec.size)
            )
            rows.append(row)
        return rows


def _error_rows(specs: Sequence[ServerSpec], modes: Sequence[str], exc: Exception) -> list[Row]:
    return [
        {
            "section": "server",
            "mode": mode,
            **spec.fields(),
            "error": f"{type(exc).__name__}: {exc}",
        }
        for spec in specs
        for mode in modes
    ]


def server_section(
    sizes: Sequence[int],
    utilizations: Sequence[int],
    scale: ServerScale,
    seed: int,
    log: Callable[[str], None],
    *,
    blocks: int = 5,
) -> list[Row]:
    """Throughput at every (size, utilisation), each on a fresh server with its cleaner as
    configured by default; then Figure 9: sequential 100-byte writes at 90% on a server with
    whole slices and one whose slices yield to requests, against an idle-cleaner server, all
    three up at once and driven in interleaved blocks."""
    import trio

    rows: list[Row] = []
    modes = ("heavy", "sequential")
    from services.kvstore._server import ServerConfig

    default = ServerConfig("").cleaner_interruptible
    for size in sizes:
        for util in utilizations:
            log(f"server: {size} B at {util}%, one server, R = 0")
            spec = ServerSpec(size, util, scale.memory_mb, default, f"{scale.memory_mb} MB")
            try:
                with _Clusters([spec], scale) as clusters:
                    rows.extend(trio.run(_throughput, clusters, seed, modes))
            except Exception as exc:
                rows.extend(_error_rows([spec], modes, exc))
    if LATENCY_SIZE in sizes and LATENCY_UTILIZATION in utilizations:
        big = NO_CLEANER_FACTOR * scale.memory_mb
        size, util = LATENCY_SIZE, LATENCY_UTILIZATION
        specs = [
            ServerSpec(size, util, big, default, f"{big} MB (cleaner idle)", reference=True),
            ServerSpec(size, util, scale.memory_mb, False, f"{scale.memory_mb} MB"),
            ServerSpec(size, util, scale.memory_mb, True, f"{scale.memory_mb} MB"),
        ]
        log(
            f"server: latency, {LATENCY_SIZE} B at {LATENCY_UTILIZATION}%: whole and yielding "
            f"slices against a {big} MB log whose cleaner stays idle, interleaved"
        )
        try:
            with _Clusters(specs, scale) as clusters:
                latency = trio.run(_interleaved, clusters, seed, blocks)
            for r in latency:
                r["mode"] = "latency"
            rows.extend(latency)
        except Exception as exc:
            rows.extend(_error_rows(specs, ("latency",), exc))
    add_server_ratios(rows)
    return rows


def add_server_ratios(rows: list[Row]) -> None:
    """``vs_30``: throughput over the same size and mode at 30%; ``median_ratio`` and
    ``p99_ratio`` of each latency row over the idle-cleaner one."""
    ok = [r for r in rows if r.get("section") == "server" and "error" not in r]
    base = {
        (r["object_bytes"], r["mode"]): float(r["objects_per_s"] or 0.0)
        for r in ok
        if r.get("utilization_target") == 30 and r["mode"] != "latency"
    }
    for r in ok:
        if r["mode"] != "latency":
            ref = base.get((r["object_bytes"], r["mode"]))
            r["vs_30"] = float(r["objects_per_s"] or 0.0) / ref if ref else None
    idle = [r for r in ok if r["mode"] == "latency" and r.get("reference")]
    if not idle:
        return
    for r in ok:
        if r["mode"] == "latency":
            for key in ("median_us", "p99_us"):
                mine, theirs = r.get(key), idle[0].get(key)
                if isinstance(mine, float) and isinstance(theirs, float) and theirs > 0:
                    r[key.replace("_us", "_ratio")] = mine / theirs


SERVER_COLUMNS = (
    _stats.Column("object_bytes", "size"),
    _stats.Column("utilization_target", "util%"),
    _stats.Column("log", "log"),
    _stats.Column("slices", "slices"),
    _stats.Column("mode", "mode"),
    _stats.Column("utilization", "live", "{:.2f}"),
    _stats.Column("objects_per_s", "writes/s", "{:.0f}"),
    _stats.Column("vs_30", "vs30%", "{:.2f}"),
    _stats.Column("median_us", "median_us", "{:.1f}"),
    _stats.Column("p99_us", "p99_us", "{:.1f}"),
    _stats.Column("p999_us", "p99.9_us", "{:.1f}"),
    _stats.Column("median_ratio", "median_x", "{:.2f}"),
    _stats.Column("p99_ratio", "p99_x", "{:.2f}"),
    _stats.Column("relocated_per_new_byte", "copied/new", "{:.2f}"),
    _stats.Column("relocated_in_window_per_new_byte", "in_window", "{:.2f}"),
    _stats.Column("cleaner_ran", "cleaned"),
    _stats.Column("stalls", "stalls"),
    _stats.Column("truncated", "cut"),
)
