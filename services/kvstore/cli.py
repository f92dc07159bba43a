"""``rpcfast-kv``: run and use a kvstore cluster.

rpcfast-kv cluster --servers 4 --replicas 3 --dir kvdata   # a local cluster; Ctrl-C stops it
rpcfast-kv cluster ... --workload 10                      # ... a mixed workload, a report
rpcfast-kv coordinator --listen udp://127.0.0.1:4100 --dir kvdata/coordinator
rpcfast-kv server --coordinator udp://127.0.0.1:4100 --dir kvdata/server1 --replicas 3
rpcfast-kv status --coordinator udp://127.0.0.1:4100 [--json] [--watch]
rpcfast-kv put|get|rm --coordinator ADDR TABLE KEY [VALUE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

import rpcfast
from services.kvstore._client import KvClient
from services.kvstore.errors import KvError

cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

STATUS_NAMES = {0: "up", 1: "crashed", 2: "removed"}


# -- coordinator and server processes ----------------------------------------------------------
def _coordinator(args: argparse.Namespace) -> int:
    from services.kvstore._coordinator import run_coordinator
    from services.kvstore._extstorage import EmbeddedStorage, ZooKeeperStorage

    async def main() -> None:
        if args.zookeeper:
            storage: Any = ZooKeeperStorage(args.zookeeper, args.zk_root)
        else:
            storage = EmbeddedStorage(args.dir)
        async with trio.open_nursery() as nursery:
            service = await nursery.start(run_coordinator, [args.listen], storage)
            print(" ".join(service.addresses), flush=True)
            await trio.sleep_forever()

    return _run(main)


def _server(args: argparse.Namespace) -> int:
    from services.kvstore._server import ServerConfig, StorageServer

    config = ServerConfig(
        coordinator=args.coordinator,
        listen=args.listen,
        data_dir=args.dir,
        memory_bytes=args.memory * 1024 * 1024,
        segment_size=args.segment_kb * 1024,
        seglet_size=args.seglet_kb * 1024,
        cleaner_reserve_segments=args.cleaner_reserve,
        write_limit=args.write_limit,
        prefault_memory=args.prefault,
        cleaner_interruptible=args.cleaner_interruptible,
        replicas=args.replicas,
        durability=args.durability,
        spin_budget=args.spin_us / 1e6,
        park_when_busy=args.park_when_busy,
        busy_spin=args.busy_spin_us / 1e6,
        share_cpu=args.share_cpu,
    )
    try:
        config.storage_config()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(StorageServer(config).run)
            print(server.address, flush=True)
            await trio.sleep_forever()

    return _run(main)


def _run(main: Any) -> int:
    """Run ``main`` until it returns or SIGINT/SIGTERM arrives; then shut down cleanly."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    async def guarded() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            await main()
            nursery.cancel_scope.cancel()

    trio.run(guarded)
    return 0


# -- the local cluster -------------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn`` that has the kernel send SIGTERM to the child when the thread that
    spawned it dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``; elsewhere it does nothing):
    a cluster killed any way at all leaves no servers behind. The child stops cleanly on
    SIGTERM, as on SIGINT."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class LocalCluster:
    """A coordinator and N storage servers as child processes of this one."""

    def __init__(
        self,
        directory: str,
        servers: int,
        replicas: int,
        memory_mb: int,
        durability: str,
        spin_us: float = 200,
        segment_kb: int = 8192,
        park_when_busy: bool = True,
        busy_spin_us: float = 50,
        seglet_kb: int = 64,
        cleaner_reserve: int | None = None,
        write_limit: float = 0.95,
        prefault: bool = False,
        cleaner_interruptible: bool = False,
        share_cpu: bool = False,
    ):
        self.share_cpu = share_cpu
        self.cleaner_interruptible = cleaner_interruptible
        self.seglet_kb = seglet_kb
        self.cleaner_reserve = cleaner_reserve
        self.write_limit = write_limit
        self.prefault = prefault
        self.spin_us = spin_us
        self.park_when_busy = park_when_busy
        self.busy_spin_us = busy_spin_us
        self.segment_kb = segment_kb
        self.directory = directory
        self.servers = servers
        self.replicas = replicas
        self.memory_mb = memory_mb
        self.durability = durability
        self.procs: list[subprocess.Popen[str]] = []
        self.coordinator = ""
        self.server_addresses: list[str] = []

    def _spawn(self, argv: list[str]) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.kvstore.cli", *argv],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C goes to us; we stop the children in order
            preexec_fn=_die_with_parent(os.getpid()),
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"{' '.join(argv[:1])} exited before reporting its address")
        return proc, line.split()[0]

    def start(self, progress: Any = print) -> None:
        """Start everything, or nothing: a failure stops what did start."""
        try:
            self._start(progress)
        except BaseException:
            self.stop()
            raise

    def _start(self, progress: Any) -> None:
        os.makedirs(self.directory, exist_ok=True)
        progress(f"starting coordinator (data in {self.directory}/coordinator)")
        _, self.coordinator = self._spawn(
            [
                "coordinator",
                "--listen",
                "udp://127.0.0.1:0",
                "--dir",
                os.path.join(self.directory, "coordinator"),
            ]
        )
        for i in range(1, self.servers + 1):
            progress(f"starting server {i}/{self.servers}")
            _, address = self._spawn(
                [
                    "server",
                    "--coordinator",
                    self.coordinator,
                    "--dir",
                    os.path.join(self.directory, f"server{i}"),
                    "--replicas",
                    str(self.replicas),
                    "--memory",
                    str(self.memory_mb),
                    "--durability",
                    self.durability,
                    "--spin-us",
                    str(self.spin_us),
                    "--segment-kb",
                    str(self.segment_kb),
                    "--busy-spin-us",
                    str(self.busy_spin_us),
                    "--park-when-busy" if self.park_when_busy else "--no-park-when-busy",
                    "--share-cpu" if self.share_cpu else "--no-share-cpu",
                    *self._storage_args(),
                ]
            )
            self.server_addresses.append(address)

    def _storage_args(self) -> list[str]:
        argv = ["--seglet-kb", str(self.seglet_kb), "--write-limit", str(self.write_limit)]
        if self.cleaner_reserve is not None:
            argv += ["--cleaner-reserve", str(self.cleaner_reserve)]
        if self.prefault:
            argv.append("--prefault")
        if self.cleaner_interruptible:
            argv.append("--cleaner-interruptible")
        return argv

    def stop(self) -> None:
        for proc in reversed(self.procs):  # servers first, then the coordinator
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.procs.clear()


def _cluster(args: argparse.Namespace) -> int:
    if args.replicas >= args.servers and args.replicas > 0:
        print(
            f"note: {args.replicas} replicas need {args.replicas + 1} servers; "
            f"writes will wait for backups that do not exist",
            file=sys.stderr,
        )
    cluster = LocalCluster(
        args.dir,
        args.servers,
        args.replicas,
        args.memory,
        args.durability,
        args.spin_us,
        args.segment_kb,
        args.park_when_busy,
        args.busy_spin_us,
        args.seglet_kb,
        args.cleaner_reserve,
        args.write_limit,
        args.prefault,
        args.cleaner_interruptible,
        args.share_cpu,
    )
    # SIGTERM (kill, systemd, a terminal closing) stops the cluster as Ctrl-C does: the
    # servers, then the coordinator, then this process
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start()
        print(f"coordinator: {cluster.coordinator}")
        for i, address in enumerate(cluster.server_addresses, 1):
            print(f"server {i}: {address}")
        if args.workload:
            report = trio.run(run_workload, cluster.coordinator, args.workload, args.seed)
            print(report)
            print(trio.run(format_status, cluster.coordinator))
            return 0
        print("cluster is up; Ctrl-C stops it")
        while all(p.poll() is None for p in cluster.procs):
            time.sleep(0.2)
        print("a cluster process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping cluster")
        return 0
    finally:
        cluster.stop()


# -- workload ----------------------------------------------------------------------------------
async def run_workload(coordinator: str, seconds: float, seed: int = 1) -> str:
    """A mixed workload (YCSB-A like: 50% reads, 50% updates of 100 B objects over 10k keys,
    zipfian-ish popularity), bounded by count and time; returns a short report."""
    rng = random.Random(seed)
    keys = [f"user{i:06d}".encode() for i in range(10_000)]
    weights = list(itertools.accumulate(1.0 / (i + 1) ** 0.99 for i in range(len(keys))))
    latencies: dict[str, list[float]] = {"read": [], "write": []}
    errors = 0
    async with await KvClient.open(coordinator=coordinator, timeout=10) as kv:
        table = await kv.create_table("workload", server_span=2)
        print("loading 10000 objects of 100 B ...", flush=True)
        for start in range(0, len(keys), 500):
            batch = [(table, k, rng.randbytes(100)) for k in keys[start : start + 500]]
            await kv.multi_write(batch)
        print(f"running the mixed workload for {seconds:.0f} s ...", flush=True)
        stop = time.perf_counter() + seconds
        ops = 0
        while time.perf_counter() < stop and ops < 2_000_000:
            key = rng.choices(keys, cum_weights=weights)[0]  # (a bisection, not a sum)
            t0 = time.perf_counter()
            try:
                if rng.random() < 0.5:
                    await kv.read(table, key)
                    latencies["read"].append(time.perf_counter() - t0)
                else:
                    await kv.write(table, key, rng.randbytes(100))
                    latencies["write"].append(time.perf_counter() - t0)
            except KvError:
                errors += 1
            ops += 1
        elapsed = seconds - max(0.0, stop - time.perf_counter())
    lines = [f"\nworkload: {ops} operations in {elapsed:.1f} s = {ops / elapsed:,.0f} ops/s"]
    for op, values in latencies.items():
        if values:
            values.sort()
            med = values[len(values) // 2] * 1e6
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e6
            lines.append(f"  {op:<5} {len(values):>8} ops  median {med:8.1f} us  p99 {p99:8.1f} us")
    lines.append(f"  errors {errors}, client retries {kv.retries}")
    return "\n".join(lines)


# -- status ------------------------------------------------------------------------------------
async def gather_status(coordinator: str) -> dict[str, Any]:
    conn = rpcfast.connect(coordinator, timeout=1.0)
    coord = conn.stub(cluster_capnp.Coordinator)
    servers = await coord.getServerList()
    tables = await coord.listTables()
    tablets = await coord.getTabletMap(tableId=0)
    out: dict[str, Any] = {
        "coordinator": coordinator,
        "server_list_version": int(servers.version),
        "tables": [
            {"id": int(t.tableId), "name": str(t.name), "server_span": int(t.serverSpan)}
            for t in tables.tables
        ],
        "tablets": [
            {
                "table": int(t.tableId),
                "start": int(t.startHash),
                "end": int(t.endHash),
                "server": int(t.serverId),
                "status": "normal" if t.status == 0 else "recovering",
            }
            for t in tablets.tablets
        ],
        "servers": [],
    }
    for s in servers.servers:
        entry: dict[str, Any] = {
            "id": int(s.serverId),
            "address": str(s.address),
            "status": STATUS_NAMES.get(int(s.status), str(s.status)),
        }
        if s.status == 0:
            try:
                admin = rpcfast.connect(str(s.address), timeout=0.5).stub(cluster_capnp.ServerAdmin)
                entry["stats"] = json.loads(str((await admin.getStatistics()).json))
            except rpcfast.RpcError as exc:
                entry["error"] = str(exc)
        out["servers"].append(entry)
    return out


def render_status(status: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    lines = [
        f"coordinator {status['coordinator']}  server list v{status['server_list_version']}",
        f"{'server':>18} {'address':<24} {'status':<8} {'live MB':>8} {'mem %':>6} "
        f"{'disk MB':>8} {'cleaned MB':>10} {'ops/s':>9}",
    ]
    before = {s["id"]: s for s in (previous or {}).get("servers", [])}
    for s in status["servers"]:
        stats = s.get("stats", {})
        memory = stats.get("memory", {})
        ops = stats.get("operations", {})
        total_ops = sum(v for v in ops.values() if isinstance(v, int))
        rate = "-"
        old = before.get(s["id"], {}).get("stats")
        if old is not None:
            old_ops = sum(v for v in old.get("operations", {}).values() if isinstance(v, int))
            dt = stats.get("uptime_s", 0) - old.get("uptime_s", 0)
            if dt > 0:
                rate = f"{(total_ops - old_ops) / dt:,.0f}"
        cleaner = memory.get("cleaner", {})
        cleaned = cleaner.get("bytes_copied", cleaner.get("relocated_bytes", 0))
        disk = stats.get("backup", {}).get("disk_bytes", 0)
        lines.append(
            f"{s['id']:>#18x} {s['address']:<24} {s['status']:<8} "
            f"{memory.get('live_bytes', 0) / 2**20:>8.1f} "
            f"{100 * memory.get('memory_utilization', 0):>6.1f} {disk / 2**20:>8.1f} "
            f"{cleaned / 2**20:>10.1f} {rate:>9}"
        )
    lines.append(f"tables: {', '.join(t['name'] for t in status['tables']) or '(none)'}")
    for t in status["tablets"]:
        lines.append(
            f"  table {t['table']} [{t['start']:#018x}, {t['end']:#018x}] on "
            f"{t['server']:#x} ({t['status']})"
        )
    return "\n".join(lines)


async def format_status(coordinator: str) -> str:
    return render_status(await gather_status(coordinator))


def _status(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(trio.run(gather_status, args.coordinator), indent=2))
        return 0
    if not args.watch:
        print(trio.run(format_status, args.coordinator))
        return 0
    previous = None
    try:
        for _ in range(args.count):
            status = trio.run(gather_status, args.coordinator)
            print("\x1b[2J\x1b[H" + render_status(status, previous), flush=True)
            previous = status
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    return 0


# -- small data commands -----------------------------------------------------------------------
def _data(args: argparse.Namespace) -> int:
    async def main() -> int:
        async with await KvClient.open(coordinator=args.coordinator) as kv:
            try:
                table = await kv.get_table_id(args.table)
            except KvError:
                if args.command != "put":
                    raise
                table = await kv.create_table(args.table)
            key = args.key.encode()
            if args.command == "put":
                version = await kv.write(table, key, args.value.encode())
                print(f"version {version}")
            elif args.command == "get":
                value, version = await kv.read(table, key)
                sys.stdout.buffer.write(value + b"\n")
                print(f"(version {version})", file=sys.stderr)
            else:
                print(f"removed version {await kv.remove(table, key)}")
        return 0

    try:
        return trio.run(main)
    except KvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpcfast-kv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run a coordinator")
    p.add_argument("--listen", default="udp://127.0.0.1:4100")
    p.add_argument("--dir", default="kvdata/coordinator", help="embedded durable state")
    p.add_argument("--zookeeper", help="ZooKeeper hosts (host:port,...) instead of --dir")
    p.add_argument("--zk-root", default="/rpcfast-kv")
    p.set_defaults(func=_coordinator)

    p = sub.add_parser("server", help="run a storage server (master + backup)")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--listen", default="udp://127.0.0.1:0")
    p.add_argument("--dir", default="kvdata/server")
    p.add_argument("--memory", type=int, default=256, help="log memory in MB")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--durability", choices=["buffered", "fsync"], default="buffered")
    p.add_argument("--segment-kb", type=int, default=8192, help="segment size in KB")
    p.add_argument("--spin-us", type=float, default=200, help="dispatcher spin budget")
    _add_busy_flags(p)
    _add_storage_flags(p)
    p.set_defaults(func=_server)

    p = sub.add_parser("cluster", help="run a whole local cluster")
    p.add_argument("--servers", type=int, default=4)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--dir", default="kvdata")
    p.add_argument("--memory", type=int, default=256, help="log memory per server in MB")
    p.add_argument("--durability", choices=["buffered", "fsync"], default="buffered")
    p.add_argument("--segment-kb", type=int, default=8192, help="segment size in KB")
    p.add_argument("--spin-us", type=float, default=200, help="servers' dispatcher spin budget")
    _add_busy_flags(p)
    _add_storage_flags(p)
    p.add_argument(
        "--workload", type=float, default=0, help="run a mixed workload for S s, then stop"
    )
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=_cluster)

    p = sub.add_parser("status", help="servers, tablets, memory, disk, cleaner, ops/s")
    p.add_argument("--coordinator", default="udp://127.0.0.1:4100")
    p.add_argument("--json", action="store_true")
    p.add_argument("--watch", action="store_true", help="a live view")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--count", type=int, default=100_000, help="refreshes before --watch ends")
    p.set_defaults(func=_status)

    for name in ("get", "put", "rm"):
        p = sub.add_parser(name, help=f"{name} one object")
        p.add_argument("--coordinator", default="udp://127.0.0.1:4100")
        p.add_argument("table")
        p.add_argument("key")
        if name == "put":
            p.add_argument("value")
        p.set_defaults(func=_data)
    return parser


def _add_busy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--park-when-busy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="while more threads are runnable than cores, park after --busy-spin-us of idle "
        "spin instead of --spin-us (default: on)",
    )
    p.add_argument(
        "--busy-spin-us",
        type=float,
        default=50,
        help="idle spin before parking while oversubscribed",
    )
    p.add_argument(
        "--share-cpu",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="idle spins hand the core to any other runnable process (sched_yield); pair "
        "with a long --spin-us and --no-park-when-busy (default: off)",
    )


def _add_storage_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seglet-kb", type=int, default=64, help="seglet size in KB (divides the segment size)"
    )
    p.add_argument(
        "--cleaner-reserve",
        type=int,
        default=None,
        help="segments kept for the cleaner's survivors (default: min(15, an eighth of the log))",
    )
    p.add_argument(
        "--write-limit",
        type=float,
        default=0.95,
        help="fraction of the write pool live data may fill before writes get Retry",
    )
    p.add_argument(
        "--prefault",
        action="store_true",
        help="touch all log and hash-table memory at start-up (no page faults later)",
    )
    p.add_argument(
        "--cleaner-interruptible",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="cleaner slices yield as soon as a request waits: shorter tail latency, higher "
        "median, slower cleaning under load (default: off, whole slices)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
