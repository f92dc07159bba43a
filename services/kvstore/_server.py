"""The storage server: master + backup in one process, as in RAMCloud.

It serves three interfaces on one endpoint: ``Master`` (objects), ``Backup`` (replicas of other
masters' segments) and ``ServerAdmin`` (what the coordinator calls: server list pushes, tablet
ownership, pings, statistics). At start it enlists with the coordinator and gets its server id;
the coordinator then pushes the server list (which tells the replica manager which backups exist
and the backup store which masters may write) and assigns tablets.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

import rpcfast
import rpcfast.dispatch
from services.kvstore._backup import BackupConfig, backup_service, open_backup_store
from services.kvstore._master import MasterService, run_cleaner
from services.kvstore._objects import ObjectManager
from services.kvstore._replication import ReplicaManager
from services.kvstore.errors import Retry, UnknownTablet
from services.kvstore.log import StorageConfig

log = logging.getLogger("rpcfast.kvstore.server")

cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

MASTER = 1
BACKUP = 2
UP = 0


@attrs.frozen
class ServerConfig:
    coordinator: str
    listen: str = "udp://127.0.0.1:0"
    data_dir: str = "kvdata"
    memory_bytes: int = 256 * 1024 * 1024
    segment_size: int = 8 * 1024 * 1024
    seglet_size: int = 64 * 1024
    cleaner_reserve_segments: int | None = None
    """Survivor segments reserved for the cleaner; None: the engine's default."""
    write_limit: float = 0.95
    prefault_memory: bool = False
    cleaner_interruptible: bool = False
    """Cleaner slices yield as soon as a request waits (``run_cleaner``): a shorter tail, a
    higher median, and a cleaner that falls behind under heavy load. Off: whole slices."""
    replicas: int = 3
    durability: str = "buffered"
    disk_expansion_factor: float = 2.0
    rpc_timeout: float = 0.5
    spin_budget: float = 0.0002
    """Seconds the dispatcher spins after work before it parks. Short by default: a local
    cluster runs several servers per core, and a spinning idle server starves a busy one."""
    park_when_busy: bool = True
    """While more threads are runnable than there are cores, park after ``busy_spin`` instead
    of ``spin_budget`` (``DispatchConfig.park_when_busy``): on a 2-core machine a durable
    write needs the master and three backups to run in turn, and an idle spinner keeps them
    waiting (measured in perf/kv.py: R=3 writes about half as long)."""
    busy_spin: float = 0.00005
    share_cpu: bool = False
    """Idle spins call ``sched_yield`` (``DispatchConfig.share_cpu``): every process of a local
    cluster keeps spinning and hands its core to any other that is runnable, so no message
    waits for a sleeping process to be woken (~40 us on this VM when the wakee's core is
    halted). Use with a long ``spin_budget`` and ``park_when_busy`` off (perf/kv.py:
    ``--share-cpu``)."""

    def storage_config(self) -> StorageConfig:
        """The master's engine configuration; raises ValueError for sizes that do not fit."""
        return StorageConfig(
            total_bytes=self.memory_bytes,
            segment_size=self.segment_size,
            seglet_size=self.seglet_size,
            cleaner_reserve_segments=self.cleaner_reserve_segments,
            write_limit=self.write_limit,
            prefault_memory=self.prefault_memory,
            disk_expansion_factor=self.disk_expansion_factor,
        )


def segment_views(objects: ObjectManager, segment_id: int) -> list[memoryview] | None:
    """The bytes written so far in a live segment of the master's log, seglet by seglet."""
    segment = objects.log.segments.get(segment_id)
    if segment is None:
        return None
    views = []
    remaining = segment.length
    for base in segment._bases:
        if remaining <= 0:
            break
        n = min(segment.seglet_size, remaining)
        views.append(segment._mv[base : base + n])
        remaining -= n
    return views


class ServerAdmin(rpcfast.Service, interface=cluster_capnp.ServerAdmin):
    def __init__(self, server: StorageServer) -> None:
        self.server = server

    @rpcfast.fast
    def ping(self, request: Any) -> dict[str, Any]:
        return {"serverId": self.server.server_id, "serverListVersion": self.server.list_version}

    @rpcfast.fast
    def updateServerList(self, request: Any) -> None:
        servers = [
            (s.serverId, str(s.address), int(s.services), int(s.status)) for s in request.servers
        ]
        self.server.apply_server_list(int(request.version), servers)

    @rpcfast.fast
    def takeTabletOwnership(self, request: Any) -> None:
        objects = self.server.objects
        if objects is None:
            raise Retry("server is starting")
        if not self.server.owns(request.tableId, request.startHash, request.endHash):
            objects.add_tablet(request.tableId, request.startHash, request.endHash)

    @rpcfast.fast
    def dropTabletOwnership(self, request: Any) -> None:
        objects = self.server.objects
        if objects is None:
            return
        try:
            objects.remove_tablet(request.tableId, request.startHash, request.endHash)
        except UnknownTablet:
            pass  # already dropped: the coordinator may repeat itself

    @rpcfast.fast
    def getStatistics(self, request: None) -> dict[str, Any]:
        return {"json": json.dumps(self.server.statistics())}


class StorageServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.server_id = 0
        self.list_version = 0
        self.address = ""
        self.objects: ObjectManager | None = None
        self.master: MasterService | None = None
        self.replicas: ReplicaManager | None = None
        self.backup_store: Any = None
        self.started = time.time()
        self.ready = trio.Event()
        self._last_list: list[tuple[int, str, int, int]] = []

    def owns(self, table_id: int, start: int, end: int) -> bool:
        assert self.objects is not None
        return (start, end) in dict.fromkeys(
            (s, e) for t, s, e in self.objects.tablets() if t == table_id
        )

    def apply_server_list(self, version: int, servers: Sequence[tuple[int, str, int, int]]) -> None:
        if version < self.list_version:
            return
        self.list_version = version
        self._last_list = list(servers)
        up = [(sid, addr) for sid, addr, services, status in servers if status == UP]
        if self.backup_store is not None:
            self.backup_store.set_server_list(version, [sid for sid, _addr in up])
        if self.replicas is not None:
            backups = [
                (sid, addr)
                for sid, addr, services, status in servers
                if status == UP and services & BACKUP and sid != self.server_id
            ]
            self.replicas.set_backups(backups)

    def statistics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server_id": self.server_id,
            "address": self.address,
            "server_list_version": self.list_version,
            "uptime_s": time.time() - self.started,
        }
        if self.master is not None:
            out.update(self.master.snapshot())
        if self.replicas is not None:
            out["replication"] = attrs.asdict(self.replicas.stats())
        if self.backup_store is not None:
            out["backup"] = attrs.asdict(self.backup_store.stats())
        # parks, busy parks, inline waits: how the spin policy behaves on this machine
        dispatcher = rpcfast.dispatch.current()
        out["dispatch"] = attrs.asdict(dispatcher.stats)
        out["dispatch"]["policy"] = {
            "spin_us": dispatcher.config.spin_budget * 1e6,
            "park_when_busy": dispatcher.config.park_when_busy,
            "share_cpu": dispatcher.config.share_cpu,
        }
        return out

    async def run(
        self, *, task_status: trio.TaskStatus[StorageServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        rpcfast.dispatch.current(
            rpcfast.DispatchConfig(
                spin_budget=cfg.spin_budget,
                park_when_busy=cfg.park_when_busy,
                busy_spin=cfg.busy_spin,
                share_cpu=cfg.share_cpu,
            )
        )
        os.makedirs(cfg.data_dir, exist_ok=True)
        backup_cfg = BackupConfig(
            directory=os.path.join(cfg.data_dir, "backup"),
            segment_size=cfg.segment_size,
            durability=cfg.durability,  # type: ignore[arg-type]
        )
        async with open_backup_store(backup_cfg) as store:
            self.backup_store = store
            self.replicas = ReplicaManager(
                0,
                cfg.replicas,
                read_segment=lambda segment_id: segment_views(self._objects(), segment_id),
            )
            storage = cfg.storage_config()
            self.objects = ObjectManager(storage, replica_sink=self.replicas)
            self.master = MasterService(self.objects, standalone=False, replicas=self.replicas)
            services = [self.master, backup_service(store), ServerAdmin(self)]
            async with rpcfast.serve(services, [cfg.listen]) as server:
                self.address = server.addresses[0]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        functools.partial(
                            run_cleaner,
                            self.objects,
                            interruptible=cfg.cleaner_interruptible,
                        )
                    )
                    nursery.start_soon(self.replicas.run)
                    await self._enlist()
                    # everything allocated at start-up (the arena maps, the hash table, the
                    # schemas) lives forever: keep it out of the cyclic GC's generations so a
                    # collection never walks it on the request path
                    gc.collect()
                    gc.freeze()
                    self.ready.set()
                    task_status.started(self)
                    await trio.sleep_forever()

    def _objects(self) -> ObjectManager:
        assert self.objects is not None
        return self.objects

    async def _enlist(self) -> None:
        conn = rpcfast.connect(self.config.coordinator, timeout=self.config.rpc_timeout)
        stub = conn.stub(cluster_capnp.Coordinator)
        delay = 0.05
        while True:
            try:
                reply = await stub.enlistServer(
                    address=self.address, services=MASTER | BACKUP, replacesId=0
                )
                break
            except (rpcfast.PeerDead, rpcfast.RpcTimeout) as exc:
                log.info("coordinator not answering (%s); retrying", exc)
                await trio.sleep(delay)
                delay = min(1.0, delay * 2)
        self.server_id = int(reply.serverId)
        assert self.replicas is not None
        self.replicas.master_id = self.server_id
        if self._last_list:  # a push that beat our enlist reply: re-apply knowing our own id
            self.apply_server_list(self.list_version, self._last_list)
        log.info("enlisted as server %#x at %s", self.server_id, self.address)
