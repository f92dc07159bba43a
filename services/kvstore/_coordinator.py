"""The coordinator: cluster membership, tables and tablets, kept in external storage.

Three layers:

* :class:`CoordinatorState` is pure (no I/O, no clock). It *plans* a mutation into small records
  and *applies* records; the same records are what external storage keeps, so a restarted
  coordinator replays them into the same state (RAMCloud keeps ``servers/<n>`` and
  ``tables/<name>`` objects in ZooKeeper for the same purpose).
* :class:`CoordinatorService` serves ``Coordinator`` (``schemas/cluster.capnp``). A mutation runs
  under one lock: plan, append to storage, apply, reply. Reads see only applied, hence persisted,
  state.
* Servers are told about changes by one worker per up server that compares what the server should
  know (server list version, tablets it owns, tablets of dropped tables it must let go) with what it
  acknowledged, and keeps working toward it with retries and backoff, instead of trusting a single
  call (RAMCloud's ``ServerListUpdater`` plus its "convergence" style of fault handling). A worker
  ends when its server stops being up.

A server suspected dead (``hintServerCrashed``) is pinged for ``dead_server_timeout`` (250 ms, as
RAMCloud's ``--deadServerTimeout``) before it is declared crashed; its tablets then turn
RECOVERING and the ``on_crash`` hook (crash recovery) is called.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar

import attrs
import trio

import rpcfast
from services.kvstore._extstorage import ExternalStorage, JsonDict, LeadershipLost
from services.kvstore._ids import format_server_id, make_server_id, server_generation, server_index
from services.kvstore.errors import InvalidParameter, Retry, Status, TableDoesntExist

log = logging.getLogger("kvstore.coordinator")

cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

HASH_SPACE = 1 << 64
MAX_SERVER_SPAN = 1 << 16
TabletKey = tuple[int, int, int]  # table id, start hash, end hash


class ServerStatus(enum.IntEnum):
    UP = 0
    CRASHED = 1  # being recovered; its index is not reused yet
    REMOVED = 2  # gone for good; its index may be reused with a higher generation


class TabletStatus(enum.IntEnum):
    NORMAL = 0
    RECOVERING = 1


class ServiceMask(enum.IntFlag):
    MASTER = 1
    BACKUP = 2


@attrs.frozen
class ServerInfo:
    server_id: int
    address: str
    services: int
    status: ServerStatus

    @property
    def is_master(self) -> bool:
        return bool(self.services & ServiceMask.MASTER)

    @property
    def is_up(self) -> bool:
        return self.status is ServerStatus.UP


@attrs.frozen
class TableInfo:
    table_id: int
    name: str
    server_span: int


@attrs.frozen
class TabletInfo:
    table_id: int
    start_hash: int  # inclusive
    end_hash: int  # inclusive
    server_id: int
    status: TabletStatus

    @property
    def key(self) -> TabletKey:
        return (self.table_id, self.start_hash, self.end_hash)


def tablet_ranges(server_span: int) -> list[tuple[int, int]]:
    """``server_span`` equal, inclusive hash ranges covering the 64-bit space (RAMCloud's split)."""
    size = HASH_SPACE // server_span
    ranges = [(i * size, (i + 1) * size - 1) for i in range(server_span)]
    ranges[-1] = (ranges[-1][0], HASH_SPACE - 1)
    return ranges


# -- records: every mutation of the state ------------------------------------------------------


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@attrs.frozen
class EnlistServer:
    KIND: ClassVar[str] = "enlist"
    server_id: int
    address: str
    services: int


@attrs.frozen
class CrashServer:
    """The server is dead: its tablets turn RECOVERING until recovery reassigns them."""

    KIND: ClassVar[str] = "crash"
    server_id: int


@attrs.frozen
class RemoveServer:
    """The server is gone and owns nothing; its index may be reused."""

    KIND: ClassVar[str] = "remove"
    server_id: int


@attrs.frozen
class CreateTable:
    """``owners[i]`` owns the i-th of ``server_span`` equal hash ranges."""

    KIND: ClassVar[str] = "create_table"
    table_id: int
    name: str
    server_span: int
    owners: tuple[int, ...] = attrs.field(converter=_int_tuple)


@attrs.frozen
class DropTable:
    KIND: ClassVar[str] = "drop_table"
    table_id: int


@attrs.frozen
class AssignTablet:
    """A tablet gets a new owner and is NORMAL again (the end of a tablet's recovery)."""

    KIND: ClassVar[str] = "assign_tablet"
    table_id: int
    start_hash: int
    end_hash: int
    server_id: int


@attrs.frozen
class DropAcknowledged:
    """The master confirmed it let go of a tablet of a dropped table."""

    KIND: ClassVar[str] = "drop_acked"
    server_id: int
    table_id: int
    start_hash: int
    end_hash: int


Record = (
    EnlistServer
    | CrashServer
    | RemoveServer
    | CreateTable
    | DropTable
    | AssignTablet
    | DropAcknowledged
)
_RECORD_TYPES: dict[str, type[Record]] = {
    cls.KIND: cls
    for cls in (
        EnlistServer,
        CrashServer,
        RemoveServer,
        CreateTable,
        DropTable,
        AssignTablet,
        DropAcknowledged,
    )
}


def record_to_json(record: Record) -> JsonDict:
    return {"kind": record.KIND, **attrs.asdict(record)}


def record_from_json(data: JsonDict) -> Record:
    fields = dict(data)
    kind = fields.pop("kind", None)
    cls = _RECORD_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"unknown coordinator record kind {kind!r}")
    return cls(**fields)


class StateError(Exception):
    """A record does not fit the state it is applied to (a bug, or a history that is not ours)."""


# -- the state core ----------------------------------------------------------------------------


class CoordinatorState:
    """Servers, tables and tablets. ``plan_*`` build records; :meth:`apply` is the only mutator."""

    def __init__(self) -> None:
        self.version = 0  # server list version: bumped by every membership change
        self.servers: dict[int, ServerInfo] = {}  # by index; the latest server of each slot
        self.tables: dict[int, TableInfo] = {}
        self.table_ids: dict[str, int] = {}
        self.tablets: dict[int, list[TabletInfo]] = {}  # by table id, in hash order
        self.next_table_id = 1
        self.next_master_index = 0  # round-robin cursor: a server index
        self.pending_drops: dict[int, set[TabletKey]] = {}  # server id -> tablets to let go
        self.applied = 0

    # -- queries
    def server(self, server_id: int) -> ServerInfo | None:
        """The server with exactly this id (None if unknown or its slot was reused)."""
        info = self.servers.get(server_index(server_id))
        return info if info is not None and info.server_id == server_id else None

    def server_list(self) -> list[ServerInfo]:
        return [self.servers[i] for i in sorted(self.servers)]

    def up_servers(self) -> list[ServerInfo]:
        return [s for s in self.server_list() if s.is_up]

    def up_masters(self) -> list[ServerInfo]:
        return [s for s in self.server_list() if s.is_up and s.is_master]

    def table_by_name(self, name: str) -> TableInfo | None:
        table_id = self.table_ids.get(name)
        return None if table_id is None else self.tables[table_id]

    def tablets_of(self, table_id: int) -> list[TabletInfo]:
        return list(self.tablets.get(table_id, ()))

    def all_tablets(self) -> list[TabletInfo]:
        return [t for table_id in sorted(self.tablets) for t in self.tablets[table_id]]

    def tablets_owned_by(
        self, server_id: int, status: TabletStatus | None = None
    ) -> list[TabletInfo]:
        return [
            t
            for t in self.all_tablets()
            if t.server_id == server_id and (status is None or t.status is status)
        ]

    # -- planning (pure)
    def plan_enlist(self, address: str, services: int, replaces_id: int = 0) -> list[Record]:
        """Records that enlist a server; an up server it replaces (by id or address) crashes."""
        if not address:
            raise InvalidParameter("a server must enlist with an address")
        records: list[Record] = []
        for info in self.up_servers():
            if info.server_id == replaces_id or info.address == address:
                records.append(CrashServer(info.server_id))
        free = [i for i, s in self.servers.items() if s.status is ServerStatus.REMOVED]
        if free:
            index = min(free)
            generation = server_generation(self.servers[index].server_id) + 1
        else:
            index, generation = max(self.servers, default=0) + 1, 0
        records.append(EnlistServer(make_server_id(index, generation), address, services))
        return records

    def plan_create_table(self, name: str, server_span: int) -> CreateTable | None:
        """None if the table exists (creating it again returns its id)."""
        if not name:
            raise InvalidParameter("a table needs a name")
        if name in self.table_ids:
            return None
        span = server_span or 1
        if span > MAX_SERVER_SPAN:
            raise InvalidParameter(f"server span {server_span} exceeds {MAX_SERVER_SPAN}")
        masters = self.up_masters()
        if not masters:
            raise Retry("no master is up", min_delay=0.1, max_delay=0.5)
        start = next(
            (
                pos
                for pos, m in enumerate(masters)
                if server_index(m.server_id) >= self.next_master_index
            ),
            0,
        )
        owners = [masters[(start + i) % len(masters)].server_id for i in range(span)]
        return CreateTable(self.next_table_id, name, span, owners)

    def plan_drop_table(self, name: str) -> DropTable | None:
        """None if there is no such table (dropping is idempotent, as in RAMCloud)."""
        table_id = self.table_ids.get(name)
        return None if table_id is None else DropTable(table_id)

    def plan_crash(self, server_id: int) -> CrashServer | None:
        info = self.server(server_id)
        return CrashServer(server_id) if info is not None and info.is_up else None

    def plan_remove(self, server_id: int) -> Record | None:
        """A server that leaves: removed if it owns nothing; else crashed (recovery moves its
        tablets from the backups, then removes it)."""
        info = self.server(server_id)
        if info is None or info.status is ServerStatus.REMOVED:
            return None
        if self.tablets_owned_by(server_id):
            return CrashServer(server_id) if info.is_up else None
        return RemoveServer(server_id)

    # -- the only mutator
    def check(self, record: Record) -> None:
        """Raise :class:`StateError` unless ``record`` fits the current state (changes nothing)."""
        self._dispatch(record, dry_run=True)

    def apply(self, record: Record) -> None:
        """Apply one record; raise :class:`StateError` if it does not fit (state unchanged)."""
        self._dispatch(record, dry_run=False)
        self.applied += 1

    def _dispatch(self, record: Record, dry_run: bool) -> None:
        if isinstance(record, EnlistServer):
            self._apply_enlist(record, dry_run)
        elif isinstance(record, CrashServer):
            self._apply_crash(record, dry_run)
        elif isinstance(record, RemoveServer):
            self._apply_remove(record, dry_run)
        elif isinstance(record, CreateTable):
            self._apply_create(record, dry_run)
        elif isinstance(record, DropTable):
            self._apply_drop(record, dry_run)
        elif isinstance(record, AssignTablet):
            self._apply_assign(record, dry_run)
        elif not dry_run:
            self._apply_drop_acked(record)

    def _apply_enlist(self, r: EnlistServer, dry_run: bool) -> None:
        index = server_index(r.server_id)
        old = self.servers.get(index)
        if old is not None and (
            old.status is not ServerStatus.REMOVED
            or server_generation(old.server_id) >= server_generation(r.server_id)
        ):
            raise StateError(f"slot {index} is not free for {format_server_id(r.server_id)}")
        if dry_run:
            return
        self.servers[index] = ServerInfo(r.server_id, r.address, r.services, ServerStatus.UP)
        self.version += 1

    def _apply_crash(self, r: CrashServer, dry_run: bool) -> None:
        info = self.server(r.server_id)
        if info is None or not info.is_up:
            raise StateError(f"server {format_server_id(r.server_id)} is not up")
        if dry_run:
            return
        self.servers[server_index(r.server_id)] = attrs.evolve(info, status=ServerStatus.CRASHED)
        for table_id, tablets in self.tablets.items():
            self.tablets[table_id] = [
                attrs.evolve(t, status=TabletStatus.RECOVERING) if t.server_id == r.server_id else t
                for t in tablets
            ]
        self.pending_drops.pop(r.server_id, None)
        self.version += 1

    def _apply_remove(self, r: RemoveServer, dry_run: bool) -> None:
        info = self.server(r.server_id)
        if info is None or info.status is ServerStatus.REMOVED:
            raise StateError(f"server {format_server_id(r.server_id)} is not in the list")
        if self.tablets_owned_by(r.server_id):
            raise StateError(f"server {format_server_id(r.server_id)} still owns tablets")
        if dry_run:
            return
        self.servers[server_index(r.server_id)] = attrs.evolve(info, status=ServerStatus.REMOVED)
        self.pending_drops.pop(r.server_id, None)
        self.version += 1

    def _apply_create(self, r: CreateTable, dry_run: bool) -> None:
        if r.name in self.table_ids or r.table_id < self.next_table_id:
            raise StateError(f"table {r.name!r} (id {r.table_id}) exists or reuses an id")
        if not 0 < r.server_span <= MAX_SERVER_SPAN or len(r.owners) != r.server_span:
            raise StateError(f"table {r.name!r}: {len(r.owners)} owners for span {r.server_span}")
        if dry_run:
            return
        self.tables[r.table_id] = TableInfo(r.table_id, r.name, r.server_span)
        self.table_ids[r.name] = r.table_id
        self.tablets[r.table_id] = [
            TabletInfo(r.table_id, start, end, owner, TabletStatus.NORMAL)
            for (start, end), owner in zip(tablet_ranges(r.server_span), r.owners, strict=True)
        ]
        self.next_table_id = r.table_id + 1
        self.next_master_index = server_index(r.owners[-1]) + 1

    def _apply_drop(self, r: DropTable, dry_run: bool) -> None:
        table = self.tables.get(r.table_id)
        if table is None:
            raise StateError(f"no table {r.table_id}")
        if dry_run:
            return
        del self.tables[r.table_id]
        del self.table_ids[table.name]
        for tablet in self.tablets.pop(r.table_id):
            owner = self.server(tablet.server_id)
            if tablet.status is TabletStatus.NORMAL and owner is not None and owner.is_up:
                self.pending_drops.setdefault(tablet.server_id, set()).add(tablet.key)

    def _apply_assign(self, r: AssignTablet, dry_run: bool) -> None:
        owner = self.server(r.server_id)
        if owner is None or not owner.is_up or not owner.is_master:
            raise StateError(f"server {format_server_id(r.server_id)} is not an up master")
        tablets = self.tablets.get(r.table_id, [])
        for i, t in enumerate(tablets):
            if (t.start_hash, t.end_hash) == (r.start_hash, r.end_hash):
                if not dry_run:
                    tablets[i] = attrs.evolve(t, server_id=r.server_id, status=TabletStatus.NORMAL)
                return
        raise StateError(f"no tablet {r.table_id}:[{r.start_hash:#x}, {r.end_hash:#x}]")

    def _apply_drop_acked(self, r: DropAcknowledged) -> None:
        drops = self.pending_drops.get(r.server_id)
        if drops is not None:
            drops.discard((r.table_id, r.start_hash, r.end_hash))
            if not drops:
                del self.pending_drops[r.server_id]

    # -- snapshots
    def to_snapshot(self) -> JsonDict:
        return {
            "version": self.version,
            "servers": [attrs.asdict(s) for s in self.server_list()],
            "tables": [attrs.asdict(t) for t in self.tables.values()],
            "tablets": [attrs.asdict(t) for t in self.all_tablets()],
            "next_table_id": self.next_table_id,
            "next_master_index": self.next_master_index,
            "pending_drops": [
                [server_id, *key]
                for server_id, keys in sorted(self.pending_drops.items())
                for key in sorted(keys)
            ],
            "applied": self.applied,
        }

    @classmethod
    def from_snapshot(cls, data: JsonDict) -> CoordinatorState:
        state = cls()
        state.version = int(data["version"])
        for s in data["servers"]:
            info = ServerInfo(
                s["server_id"], s["address"], s["services"], ServerStatus(s["status"])
            )
            state.servers[server_index(info.server_id)] = info
        for t in data["tables"]:
            table = TableInfo(t["table_id"], t["name"], t["server_span"])
            state.tables[table.table_id] = table
            state.table_ids[table.name] = table.table_id
            state.tablets[table.table_id] = []
        for t in data["tablets"]:
            state.tablets[t["table_id"]].append(
                TabletInfo(
                    t["table_id"],
                    t["start_hash"],
                    t["end_hash"],
                    t["server_id"],
                    TabletStatus(t["status"]),
                )
            )
        state.next_table_id = int(data["next_table_id"])
        state.next_master_index = int(data["next_master_index"])
        for server_id, table_id, start, end in data["pending_drops"]:
            state.pending_drops.setdefault(server_id, set()).add((table_id, start, end))
        state.applied = int(data["applied"])
        return state

    @classmethod
    def restore(cls, snapshot: JsonDict | None, records: Iterable[JsonDict]) -> CoordinatorState:
        """The state a snapshot plus the records after it describe."""
        state = cls() if snapshot is None else cls.from_snapshot(snapshot)
        for record in records:
            state.apply(record_from_json(record))
        return state


# -- wire shapes --------------------------------------------------------------------------------


def _server_entry(info: ServerInfo) -> dict[str, Any]:
    return {
        "serverId": info.server_id,
        "address": info.address,
        "services": info.services,
        "status": int(info.status),
    }


def _tablet_entry(tablet: TabletInfo, state: CoordinatorState) -> dict[str, Any]:
    owner = state.server(tablet.server_id)
    return {
        "tableId": tablet.table_id,
        "startHash": tablet.start_hash,
        "endHash": tablet.end_hash,
        "serverId": tablet.server_id,
        "address": owner.address if owner is not None else "",
        "status": int(tablet.status),
    }


# -- the service -------------------------------------------------------------------------------


@attrs.frozen
class CoordinatorConfig:
    """Timeouts and policies of the coordinator (seconds)."""

    rpc_timeout: float = 0.5  # one call to a server
    dead_server_timeout: float = 0.25  # how long a suspect gets to answer pings
    verify_tries: int = 3
    retry_min: float = 0.05  # backoff toward an unresponsive server
    retry_max: float = 1.0
    sync_wait: float = 1.0  # createTable waits this long for masters to take ownership
    compact_every: int = 1000  # records between snapshots
    leader_check: float = 0.1  # how often leadership is checked


CrashHook = Callable[[int], Awaitable[None]]


class _ServerSync:
    """What one up server has acknowledged; its worker moves it toward the desired state."""

    def __init__(self, info: ServerInfo) -> None:
        self.server_id = info.server_id
        self.address = info.address
        self.acked_version = 0
        self.acked_tablets: set[TabletKey] = set()


class CoordinatorService(rpcfast.Service, interface=cluster_capnp.Coordinator):
    """``Coordinator`` over a :class:`CoordinatorState` persisted in an :class:`ExternalStorage`.

    Needs :meth:`run` running (server workers, leadership checks); :func:`run_coordinator`
    arranges it. ``on_crash(server_id)`` is called after a crash is persisted, and at start for
    every crashed server that still owns tablets.
    """

    def __init__(
        self,
        state: CoordinatorState,
        storage: ExternalStorage,
        *,
        config: CoordinatorConfig | None = None,
        on_crash: CrashHook | None = None,
    ) -> None:
        self.state = state
        self.storage = storage
        self.config = config or CoordinatorConfig()
        self.on_crash = on_crash
        self.addresses: list[str] = []
        self._lock = trio.Lock()
        self._changed = trio.Event()
        self._progress = trio.Event()
        self._syncs: dict[int, _ServerSync] = {}
        self._verifying: dict[int, trio.Event] = {}
        self._since_compact = 0
        self._fatal: BaseException | None = None
        self._fatal_event = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- handlers
    async def enlistServer(self, request: rpcfast.Body) -> dict[str, Any]:
        async with self._lock:
            records = self.state.plan_enlist(request.address, request.services, request.replacesId)
            await self._commit(records)
        enlisted = records[-1]
        assert isinstance(enlisted, EnlistServer)
        log.info("enlisted %s at %s", format_server_id(enlisted.server_id), enlisted.address)
        return {"serverId": enlisted.server_id}

    @rpcfast.fast
    def getServerList(self, request: None) -> dict[str, Any]:
        return {
            "version": self.state.version,
            "servers": [_server_entry(s) for s in self.state.server_list()],
        }

    async def createTable(self, request: rpcfast.Body) -> dict[str, Any]:
        name: str = request.name
        async with self._lock:
            record = self.state.plan_create_table(name, request.serverSpan)
            if record is not None:
                await self._commit([record])
                log.info("created table %r (id %d)", name, record.table_id)
        table = self.state.table_by_name(name)
        if table is None:  # dropped meanwhile
            raise TableDoesntExist(f"table {name!r} was dropped")
        if record is not None:
            await self._wait_tablets_acked(table.table_id)
        return {"tableId": table.table_id}

    @rpcfast.fast
    def getTableId(self, request: rpcfast.Body) -> dict[str, Any]:
        table = self.state.table_by_name(request.name)
        if table is None:
            raise TableDoesntExist(f"no table named {request.name!r}")
        return {"tableId": table.table_id}

    async def dropTable(self, request: rpcfast.Body) -> None:
        async with self._lock:
            record = self.state.plan_drop_table(request.name)
            if record is not None:
                await self._commit([record])
                log.info("dropped table %r (id %d)", request.name, record.table_id)

    @rpcfast.fast
    def getTabletMap(self, request: rpcfast.Body) -> dict[str, Any]:
        table_id: int = request.tableId
        if table_id == 0:
            tablets = self.state.all_tablets()
        elif table_id in self.state.tables:
            tablets = self.state.tablets_of(table_id)
        else:
            raise TableDoesntExist(f"no table with id {table_id}")
        return {"tablets": [_tablet_entry(t, self.state) for t in tablets]}

    @rpcfast.fast
    def listTables(self, request: None) -> dict[str, Any]:
        return {
            "tables": [
                {"tableId": t.table_id, "name": t.name, "serverSpan": t.server_span}
                for t in sorted(self.state.tables.values(), key=lambda t: t.table_id)
            ]
        }

    async def hintServerCrashed(self, request: rpcfast.Body) -> None:
        server_id: int = request.serverId
        running = self._verifying.get(server_id)
        if running is not None:  # someone else is verifying this server: share the outcome
            await running.wait()
            return
        info = self.state.server(server_id)
        if info is None or not info.is_up:
            return
        done = self._verifying[server_id] = trio.Event()
        try:
            if not await self._verify_dead(info):
                log.info("hint about %s: it answers pings", format_server_id(server_id))
                return
            async with self._lock:
                record = self.state.plan_crash(server_id)
                if record is not None:
                    await self._commit([record])
        finally:
            del self._verifying[server_id]
            done.set()

    async def removeServer(self, request: rpcfast.Body) -> None:
        async with self._lock:
            record = self.state.plan_remove(request.serverId)
            if record is not None:
                await self._commit([record])

    # -- mutations
    async def record(self, records: Sequence[Record]) -> None:
        """Persist and apply ``records`` (for other coordinator modules, e.g. crash recovery).

        Raises :class:`StateError`, storing nothing more, at the first record that does not fit
        the state (say, a tablet of a table dropped meanwhile).
        """
        async with self._lock:
            await self._commit(records)

    async def _commit(self, records: Sequence[Record]) -> None:
        """Check, append to storage, then apply each record. Caller holds the lock.

        Shielded: a record that reached storage is always applied, even if the caller is cancelled.
        A storage failure is fatal: the coordinator stops (its history may now be ahead of memory).
        """
        if self._fatal is not None:
            raise rpcfast.ServiceError("coordinator is stopping", code=Status.SERVICE_NOT_AVAILABLE)
        with trio.CancelScope(shield=True):
            try:
                for record in records:
                    self.state.check(record)
                    try:
                        await trio.to_thread.run_sync(self.storage.append, record_to_json(record))
                        self.state.apply(record)
                    except Exception as exc:  # storage failed, or memory disagrees with history
                        self._fail(exc)
                        raise
                    self._since_compact += 1
                    if isinstance(record, CrashServer):
                        log.warning("server %s crashed", format_server_id(record.server_id))
                        self._spawn_crash_hook(record.server_id)
                if self._since_compact >= self.config.compact_every:
                    try:
                        snapshot = self.state.to_snapshot()
                        await trio.to_thread.run_sync(self.storage.compact, snapshot)
                    except Exception as exc:
                        self._fail(exc)
                        raise
                    self._since_compact = 0
            finally:
                self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _notify_progress(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            log.error("coordinator stopping: %r", exc)
            self._fatal = exc
            self._fatal_event.set()

    def _spawn_crash_hook(self, server_id: int) -> None:
        if self.on_crash is not None and self._nursery is not None:
            self._nursery.start_soon(self._run_crash_hook, server_id)

    async def _run_crash_hook(self, server_id: int) -> None:
        assert self.on_crash is not None
        try:
            await self.on_crash(server_id)
        except Exception as exc:
            self._fail(exc)

    async def _wait_tablets_acked(self, table_id: int) -> None:
        """Give masters ``sync_wait`` to take a new table's tablets (clients then rarely see
        UNKNOWN_TABLET); the workers keep trying after that."""
        with trio.move_on_after(self.config.sync_wait):
            while True:
                progress = self._progress
                if all(self._acked(t) for t in self.state.tablets_of(table_id)):
                    return
                await progress.wait()

    def _acked(self, tablet: TabletInfo) -> bool:
        owner = self.state.server(tablet.server_id)
        if owner is None or not owner.is_up or tablet.status is not TabletStatus.NORMAL:
            return True
        sync = self._syncs.get(tablet.server_id)
        return sync is not None and tablet.key in sync.acked_tablets

    # -- failure verification
    async def _verify_dead(self, info: ServerInfo) -> bool:
        """Ping ``info`` a few times within ``dead_server_timeout``; True if it never answered as
        itself (silence, an error, or another server at its address)."""
        tries = max(1, self.config.verify_tries)
        slot = self.config.dead_server_timeout / tries
        async with rpcfast.connect(info.address) as conn:
            stub = conn.stub(cluster_capnp.ServerAdmin)
            for _ in range(tries):
                deadline = trio.current_time() + slot
                try:
                    reply = await stub.ping(callerId=0, timeout=slot)
                except (rpcfast.RpcTimeout, rpcfast.PeerDead):
                    await trio.sleep_until(deadline)
                    continue
                except rpcfast.RemoteError:
                    return True
                return reply is None or reply.serverId != info.server_id
        return True

    # -- background work
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run server workers and watch leadership until cancelled; never raises (a fatal
        problem is reported by :meth:`wait_fatal`)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for info in self.state.server_list():
                if info.status is ServerStatus.CRASHED and self.state.tablets_owned_by(
                    info.server_id
                ):
                    self._spawn_crash_hook(info.server_id)
            task_status.started()
            while True:
                changed = self._changed
                for info in self.state.up_servers():
                    if info.server_id not in self._syncs:
                        sync = self._syncs[info.server_id] = _ServerSync(info)
                        nursery.start_soon(self._run_sync, sync)
                if not self.storage.is_leader:
                    self._fail(LeadershipLost("leadership lost"))
                with trio.move_on_after(self.config.leader_check):
                    await changed.wait()

    async def wait_fatal(self) -> BaseException:
        """Wait until the coordinator must stop; return why."""
        await self._fatal_event.wait()
        assert self._fatal is not None
        return self._fatal

    async def _run_sync(self, sync: _ServerSync) -> None:
        try:
            async with rpcfast.connect(sync.address, timeout=self.config.rpc_timeout) as conn:
                stub = conn.stub(cluster_capnp.ServerAdmin)
                failures = 0
                while True:
                    changed = self._changed
                    info = self.state.server(sync.server_id)
                    if info is None or not info.is_up:
                        return
                    try:
                        did_work = await self._sync_step(sync, info, stub)
                    except (rpcfast.RpcError, rpcfast.ServiceError) as exc:
                        failures += 1
                        delay = min(
                            self.config.retry_max, self.config.retry_min * 2 ** (failures - 1)
                        )
                        log.debug(
                            "server %s: %r; retry in %.2f s",
                            format_server_id(sync.server_id),
                            exc,
                            delay,
                        )
                        await trio.sleep(delay)
                        continue
                    failures = 0
                    if not did_work:
                        await changed.wait()
        except Exception as exc:
            self._fail(exc)
        finally:
            self._syncs.pop(sync.server_id, None)

    async def _sync_step(self, sync: _ServerSync, info: ServerInfo, stub: rpcfast.Stub) -> bool:
        """Make one call that moves the server toward the desired state; False if it is there."""
        state = self.state
        if sync.acked_version < state.version:
            version = state.version
            servers = [_server_entry(s) for s in state.server_list()]
            await stub.updateServerList(version=version, servers=servers)
            sync.acked_version = version
            self._notify_progress()
            return True
        if not info.is_master:
            return False
        desired = {t.key for t in state.tablets_owned_by(sync.server_id, TabletStatus.NORMAL)}
        sync.acked_tablets &= desired
        missing = sorted(desired - sync.acked_tablets)
        if missing:
            table_id, start, end = missing[0]
            await stub.takeTabletOwnership(tableId=table_id, startHash=start, endHash=end)
            sync.acked_tablets.add(missing[0])
            self._notify_progress()
            return True
        drops = sorted(state.pending_drops.get(sync.server_id, ()))
        if drops:
            table_id, start, end = drops[0]
            await stub.dropTabletOwnership(tableId=table_id, startHash=start, endHash=end)
            await self.record([DropAcknowledged(sync.server_id, table_id, start, end)])
            return True
        return False


# -- running it ---------------------------------------------------------------------------------


async def run_coordinator(
    addresses: str | Sequence[str],
    storage: ExternalStorage,
    *,
    config: CoordinatorConfig | None = None,
    on_crash: CrashHook | None = None,
    task_status: trio.TaskStatus[CoordinatorService] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Become the leader (waiting while another coordinator is), load the state, serve it.

    Serves until cancelled; raises :class:`~services.kvstore._extstorage.StorageError` (or
    :class:`LeadershipLost`) when storage fails or leadership is lost, since another coordinator
    may be active then. ``task_status.started`` gets the service once it is serving. Takes
    ownership of ``storage`` and closes it on the way out.
    """
    if isinstance(addresses, str):
        addresses = [addresses]
    fatal: BaseException | None = None
    try:
        while not await trio.to_thread.run_sync(storage.acquire, 0.25):
            pass
        loaded = await trio.to_thread.run_sync(storage.load)
        state = CoordinatorState.restore(loaded.snapshot, loaded.records)
        if loaded.records:
            await trio.to_thread.run_sync(storage.compact, state.to_snapshot())
        log.info(
            "coordinator loaded %d servers, %d tables (server list version %d)",
            len(state.servers),
            len(state.tables),
            state.version,
        )
        service = CoordinatorService(state, storage, config=config, on_crash=on_crash)
        async with rpcfast.serve([service], addresses) as server:
            service.addresses = server.addresses
            await trio.to_thread.run_sync(storage.advertise, server.addresses[0])
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                task_status.started(service)
                fatal = await service.wait_fatal()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(storage.close)
    assert fatal is not None
    raise fatal
