"""The coordinator: the pure state core, then the service end to end over UDP loopback.

Storage servers are small ServerAdmin services in this process that record what the coordinator
tells them; the coordinator runs with the real embedded storage (and ZooKeeper for failover).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient

import rpcfast
from services.kvstore._coordinator import (
    HASH_SPACE,
    AssignTablet,
    CoordinatorConfig,
    CoordinatorService,
    CoordinatorState,
    CrashServer,
    CreateTable,
    DropAcknowledged,
    EnlistServer,
    Record,
    RemoveServer,
    ServerStatus,
    StateError,
    TabletStatus,
    cluster_capnp,
    record_from_json,
    record_to_json,
    run_coordinator,
    tablet_ranges,
)
from services.kvstore._extstorage import (
    EmbeddedStorage,
    ExternalStorage,
    LeadershipLost,
    ZooKeeperStorage,
)
from services.kvstore._ids import format_server_id, make_server_id, server_generation, server_index
from services.kvstore.errors import InvalidParameter, Retry, Status

MASTER, BACKUP = 1, 2


# -- the state core ------------------------------------------------------------------------------


def _apply(state: CoordinatorState, records: list[Record] | Record | None) -> None:
    assert records is not None
    for record in records if isinstance(records, list) else [records]:
        state.apply(record)


def _cluster(*services: int) -> CoordinatorState:
    state = CoordinatorState()
    for i, mask in enumerate(services):
        _apply(state, state.plan_enlist(f"udp://127.0.0.1:{4100 + i}", mask))
    return state


def test_server_ids_pack_index_and_generation() -> None:
    server_id = make_server_id(7, 3)
    assert server_id == (3 << 32) | 7
    assert (server_index(server_id), server_generation(server_id)) == (7, 3)
    assert format_server_id(server_id) == "7.3"
    with pytest.raises(ValueError):
        make_server_id(0, 0)


def test_enlist_hands_out_indexes_from_one_and_reuses_removed_slots() -> None:
    state = _cluster(MASTER | BACKUP, BACKUP, MASTER)
    assert [s.server_id for s in state.server_list()] == [1, 2, 3]
    assert state.version == 3
    _apply(state, state.plan_remove(2))
    assert state.version == 4
    assert state.servers[2].status is ServerStatus.REMOVED
    (record,) = state.plan_enlist("udp://127.0.0.1:5000", BACKUP)
    assert isinstance(record, EnlistServer)
    assert record.server_id == make_server_id(2, 1)
    _apply(state, record)
    assert state.server(2) is None  # the stale id names nobody
    assert state.server(make_server_id(2, 1)) is not None
    assert state.version == 5


def test_enlist_replacing_a_server_crashes_the_old_one() -> None:
    state = _cluster(MASTER, MASTER)
    records = state.plan_enlist("udp://127.0.0.1:9999", MASTER, replaces_id=1)
    assert records == [CrashServer(1), EnlistServer(3, "udp://127.0.0.1:9999", MASTER)]
    records = state.plan_enlist("udp://127.0.0.1:4101", MASTER)  # same address as server 2
    assert records[0] == CrashServer(2)


def test_create_table_splits_the_hash_space_and_goes_round_robin() -> None:
    state = _cluster(MASTER, BACKUP, MASTER, MASTER)
    first = state.plan_create_table("a", 2)
    assert first is not None and first.table_id == 1
    _apply(state, first)
    second = state.plan_create_table("b", 3)
    assert second is not None and second.table_id == 2
    _apply(state, second)
    assert [t.server_id for t in state.tablets_of(1)] == [1, 3]
    assert [t.server_id for t in state.tablets_of(2)] == [4, 1, 3]  # backups get no tablets
    assert state.plan_create_table("a", 7) is None  # exists: its id is returned
    assert state.version == 4  # tables do not change the server list

    tablets = state.tablets_of(2)
    assert tablets[0].start_hash == 0 and tablets[-1].end_hash == HASH_SPACE - 1
    for left, right in itertools.pairwise(tablets):
        assert right.start_hash == left.end_hash + 1
    assert tablet_ranges(2) == [(0, (1 << 63) - 1), (1 << 63, HASH_SPACE - 1)]


def test_create_table_needs_a_master_and_sane_arguments() -> None:
    state = _cluster(BACKUP)
    with pytest.raises(Retry):
        state.plan_create_table("t", 1)
    state = _cluster(MASTER)
    with pytest.raises(InvalidParameter):
        state.plan_create_table("", 1)
    with pytest.raises(InvalidParameter):
        state.plan_create_table("t", 1 << 20)
    record = state.plan_create_table("t", 0)
    assert record is not None and record.server_span == 1


def test_drop_table_leaves_tablets_to_let_go_and_never_reuses_ids() -> None:
    state = _cluster(MASTER, MASTER)
    _apply(state, state.plan_create_table("t", 2))
    _apply(state, state.plan_drop_table("t"))
    assert state.table_by_name("t") is None and state.all_tablets() == []
    half = 1 << 63
    assert state.pending_drops == {1: {(1, 0, half - 1)}, 2: {(1, half, HASH_SPACE - 1)}}
    _apply(state, DropAcknowledged(1, 1, 0, half - 1))
    assert state.pending_drops == {2: {(1, half, HASH_SPACE - 1)}}
    assert state.plan_drop_table("t") is None
    again = state.plan_create_table("t", 1)
    assert again is not None and again.table_id == 2


def test_crash_marks_the_server_and_its_tablets() -> None:
    state = _cluster(MASTER, MASTER)
    _apply(state, state.plan_create_table("t", 4))
    version = state.version
    _apply(state, state.plan_crash(1))
    assert state.version == version + 1
    assert state.servers[1].status is ServerStatus.CRASHED
    assert [(t.server_id, t.status) for t in state.tablets_of(1)] == [
        (1, TabletStatus.RECOVERING),
        (2, TabletStatus.NORMAL),
        (1, TabletStatus.RECOVERING),
        (2, TabletStatus.NORMAL),
    ]
    assert state.plan_crash(1) is None
    # new tables avoid the crashed master; removing it waits until recovery moved its tablets
    record = state.plan_create_table("u", 2)
    assert record is not None and record.owners == (2, 2)
    assert state.plan_remove(1) is None
    for tablet in state.tablets_owned_by(1):
        _apply(state, AssignTablet(tablet.table_id, tablet.start_hash, tablet.end_hash, 2))
    assert {t.status for t in state.tablets_of(1)} == {TabletStatus.NORMAL}
    assert state.plan_remove(1) == RemoveServer(1)


def test_a_master_that_leaves_with_tablets_is_recovered_like_a_crash() -> None:
    state = _cluster(MASTER, BACKUP)
    _apply(state, state.plan_create_table("t", 1))
    assert state.plan_remove(1) == CrashServer(1)
    assert state.plan_remove(2) == RemoveServer(2)


def test_records_that_do_not_fit_are_refused() -> None:
    state = _cluster(MASTER)
    for record in (
        EnlistServer(1, "udp://127.0.0.1:1", MASTER),  # slot taken
        CrashServer(99),
        RemoveServer(make_server_id(1, 5)),
        CreateTable(1, "t", 2, (1,)),
        AssignTablet(1, 0, 5, 1),
    ):
        with pytest.raises(StateError):
            state.apply(record)
    assert state.applied == 1 and state.version == 1


OPS = st.lists(
    st.tuples(
        st.sampled_from(["enlist", "create", "drop", "crash", "remove", "assign", "ack"]),
        st.integers(0, 5),
        st.integers(0, 3),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_replaying_records_or_a_snapshot_rebuilds_the_same_state(
    ops: list[tuple[str, int, int]],
) -> None:
    """Whatever happened, the JSON records (and the snapshot) give back the same state."""
    state = CoordinatorState()
    log: list[dict[str, Any]] = []
    for op, a, b in ops:
        ids = [s.server_id for s in state.server_list()] or [1]
        server_id = ids[a % len(ids)]
        records: list[Record] = []
        try:
            if op == "enlist":
                records = state.plan_enlist(f"udp://h:{a}", 1 + b % 3)
            elif op == "create":
                plan = state.plan_create_table(f"t{a}", b)
                records = [plan] if plan else []
            elif op == "drop":
                drop = state.plan_drop_table(f"t{a}")
                records = [drop] if drop else []
            elif op in ("crash", "remove"):
                plan_one = (state.plan_crash if op == "crash" else state.plan_remove)(server_id)
                records = [plan_one] if plan_one else []
            elif op == "assign":
                masters = state.up_masters()
                recovering = [t for t in state.all_tablets() if t.status is TabletStatus.RECOVERING]
                if masters and recovering:
                    t = recovering[a % len(recovering)]
                    owner = masters[b % len(masters)].server_id
                    records = [AssignTablet(t.table_id, t.start_hash, t.end_hash, owner)]
            else:
                for drop_server, keys in sorted(state.pending_drops.items()):
                    records = [DropAcknowledged(drop_server, *min(keys))]
                    break
        except Retry:
            continue
        for record in records:
            log.append(json.loads(json.dumps(record_to_json(record))))
            state.apply(record)
    replayed = CoordinatorState.restore(None, log)
    snapshot = json.loads(json.dumps(state.to_snapshot()))
    from_snapshot = CoordinatorState.restore(snapshot, [])
    for other in (replayed, from_snapshot):
        assert other.to_snapshot() == state.to_snapshot()
        assert vars(other) == vars(state)
    assert [record_from_json(r) for r in log] == [
        record_from_json(json.loads(json.dumps(r))) for r in log
    ]


# -- the service end to end ------------------------------------------------------------------------

# compact_every is small so that restarts load a snapshot plus records, not just records
CONFIG = CoordinatorConfig(
    rpc_timeout=0.3, retry_min=0.02, retry_max=0.2, sync_wait=3.0, compact_every=5
)


class FakeServer(rpcfast.Service, interface=cluster_capnp.ServerAdmin):
    """A storage server as the coordinator sees it; remembers what it was told."""

    def __init__(self, failures_before_take: int = 0) -> None:
        self.server_id = 0
        self.lists: list[tuple[int, list[tuple[int, str, int, int]]]] = []
        self.owned: set[tuple[int, int, int]] = set()
        self.takes = 0
        self.failures_before_take = failures_before_take

    @rpcfast.fast
    def ping(self, request: rpcfast.Body) -> dict[str, Any]:
        return {"serverId": self.server_id, "serverListVersion": self.version}

    @property
    def version(self) -> int:
        return self.lists[-1][0] if self.lists else 0

    @property
    def statuses(self) -> dict[int, int]:
        return {sid: status for sid, _addr, _svc, status in self.lists[-1][1]} if self.lists else {}

    @rpcfast.fast
    def updateServerList(self, request: rpcfast.Body) -> None:
        servers = [(s.serverId, s.address, s.services, s.status) for s in request.servers]
        self.lists.append((request.version, servers))

    @rpcfast.fast
    def takeTabletOwnership(self, request: rpcfast.Body) -> None:
        if self.failures_before_take > 0:
            self.failures_before_take -= 1
            raise rpcfast.ServiceError("not ready yet", code=Status.RETRY)
        self.takes += 1
        self.owned.add((request.tableId, request.startHash, request.endHash))

    @rpcfast.fast
    def dropTabletOwnership(self, request: rpcfast.Body) -> None:
        self.owned.discard((request.tableId, request.startHash, request.endHash))

    @rpcfast.fast
    def getStatistics(self, request: None) -> dict[str, Any]:
        return {"json": "{}"}


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``check()`` holds."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


@asynccontextmanager
async def coordinator(
    storage: ExternalStorage, **kwargs: Any
) -> AsyncIterator[tuple[CoordinatorService, rpcfast.Stub]]:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service: CoordinatorService = await nursery.start(
                lambda task_status: run_coordinator(
                    "udp://127.0.0.1:0", storage, config=CONFIG, task_status=task_status, **kwargs
                )
            )
            async with rpcfast.connect(service.addresses[0], timeout=5.0) as conn:
                yield service, conn.stub(cluster_capnp.Coordinator)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def fake_server(
    coord: rpcfast.Stub | None = None, services: int = MASTER | BACKUP, **kwargs: Any
) -> AsyncIterator[tuple[FakeServer, str]]:
    """A fake storage server on UDP loopback, enlisted with ``coord`` if given."""
    fake = FakeServer(**kwargs)
    async with rpcfast.serve([fake], ["udp://127.0.0.1:0"], grace=0.1) as server:
        if coord is not None:
            await enlist(coord, fake, server.addresses[0], services)
        yield fake, server.addresses[0]


async def enlist(coord: rpcfast.Stub, fake: FakeServer, address: str, services: int) -> None:
    reply = await coord.enlistServer(address=address, services=services, replacesId=0)
    assert reply is not None
    fake.server_id = reply.serverId


def _status(service: CoordinatorService, index: int) -> ServerStatus:
    return service.state.servers[index].status


def _tablets(reply: Any) -> list[tuple[int, int, int, int, str, int]]:
    return [
        (t.tableId, t.startHash, t.endHash, t.serverId, t.address, t.status) for t in reply.tablets
    ]


async def test_enlist_create_table_push_and_restart_on_the_same_directory(tmp_path: Path) -> None:
    half = 1 << 63
    with trio.fail_after(30):
        async with fake_server() as (one, one_addr), fake_server() as (two, two_addr):
            async with coordinator(EmbeddedStorage(tmp_path)) as (service, coord):
                await enlist(coord, one, one_addr, MASTER | BACKUP)
                await enlist(coord, two, two_addr, MASTER | BACKUP)
                assert (one.server_id, two.server_id) == (1, 2)
                reply = await coord.createTable(name="t", serverSpan=2)
                assert reply is not None and reply.tableId == 1
                tablets = _tablets(await coord.getTabletMap(tableId=1))
                assert tablets == [
                    (1, 0, half - 1, 1, one_addr, 0),
                    (1, half, HASH_SPACE - 1, 2, two_addr, 0),
                ]
                await eventually(lambda: (1, 0, half - 1) in one.owned)
                await eventually(lambda: (1, half, HASH_SPACE - 1) in two.owned)
                await eventually(lambda: one.version == two.version == 2)
                assert one.lists[-1][1] == [
                    (1, one_addr, MASTER | BACKUP, 0),
                    (2, two_addr, MASTER | BACKUP, 0),
                ]
                listed = await coord.getServerList()
                assert listed is not None and listed.version == 2 and len(listed.servers) == 2

                again = await coord.createTable(name="t", serverSpan=9)
                assert again is not None and again.tableId == 1
                found = await coord.getTableId(name="t")
                assert found is not None and found.tableId == 1
                await coord.dropTable(name="t")
                await eventually(lambda: not one.owned and not two.owned)
                await eventually(lambda: not service.state.pending_drops)
                created = await coord.createTable(name="u", serverSpan=3)
                assert created is not None and created.tableId == 2
                tables = await coord.listTables()
                assert tables is not None
                assert [(t.tableId, t.name, t.serverSpan) for t in tables.tables] == [(2, "u", 3)]
                await eventually(lambda: len(one.owned) == 2 and len(two.owned) == 1)
                before = service.state.to_snapshot()
                map_before = _tablets(await coord.getTabletMap(tableId=0))
            pushes_before = len(one.lists)
            one.owned.clear()  # as if it had restarted too: the coordinator must tell it again

            # a new coordinator on the same directory: the same state, and it tells servers again
            async with coordinator(EmbeddedStorage(tmp_path)) as (restarted, coord2):
                assert restarted.state.to_snapshot() == before
                assert _tablets(await coord2.getTabletMap(tableId=0)) == map_before
                found = await coord2.getTableId(name="u")
                assert found is not None and found.tableId == 2
                await eventually(lambda: len(one.lists) > pushes_before and len(one.owned) == 2)
                assert one.version == 2


async def test_a_silent_master_gets_its_tablets_once_it_answers(tmp_path: Path) -> None:
    async with coordinator(EmbeddedStorage(tmp_path)) as (_service, coord):
        async with fake_server(coord, failures_before_take=4) as (slow, _addr):
            reply = await coord.createTable(name="t", serverSpan=1)
            assert reply is not None
            await eventually(lambda: slow.owned == {(1, 0, HASH_SPACE - 1)})
            assert slow.takes == 1 and slow.failures_before_take == 0


async def test_hint_server_crashed_verifies_before_declaring(tmp_path: Path) -> None:
    crashed: list[int] = []

    async def on_crash(server_id: int) -> None:
        crashed.append(server_id)

    async with coordinator(EmbeddedStorage(tmp_path), on_crash=on_crash) as (service, coord):
        async with fake_server(coord) as (alive, _addr):
            async with fake_server(coord) as (doomed, _addr2):
                await coord.createTable(name="t", serverSpan=2)
                await coord.hintServerCrashed(serverId=doomed.server_id)  # it answers: no crash
                assert _status(service, 2) is ServerStatus.UP
            # doomed's endpoint is closed now
            version = service.state.version
            await coord.hintServerCrashed(serverId=doomed.server_id)
            assert _status(service, 2) is ServerStatus.CRASHED
            assert service.state.version == version + 1
            tablets = _tablets(await coord.getTabletMap(tableId=1))
            assert [(t[3], t[5]) for t in tablets] == [
                (1, TabletStatus.NORMAL),
                (2, TabletStatus.RECOVERING),
            ]
            await eventually(lambda: alive.statuses.get(2) == ServerStatus.CRASHED)
            await eventually(lambda: crashed == [2])
            await coord.hintServerCrashed(serverId=12345)  # unknown ids are ignored

            # what crash recovery does at its end: the tablet moves, then the dead server goes
            half = 1 << 63
            await service.record([AssignTablet(1, half, HASH_SPACE - 1, alive.server_id)])
            await eventually(lambda: (1, half, HASH_SPACE - 1) in alive.owned)
            with pytest.raises(StateError):  # a tablet that does not exist: refused, not fatal
                await service.record([AssignTablet(7, 0, 5, alive.server_id)])
            await coord.removeServer(serverId=doomed.server_id)
            assert _status(service, 2) is ServerStatus.REMOVED
            listed = await coord.getServerList()
            assert listed is not None
            assert [(s.serverId, s.status) for s in listed.servers] == [(1, 0), (2, 2)]


async def test_remove_server_and_typed_errors(tmp_path: Path) -> None:
    async with coordinator(EmbeddedStorage(tmp_path)) as (service, coord):
        with pytest.raises(rpcfast.RemoteError) as info:
            await coord.createTable(name="t", serverSpan=1)
        assert info.value.code == Status.RETRY  # no master yet
        with pytest.raises(rpcfast.RemoteError) as info:
            await coord.getTableId(name="missing")
        assert info.value.code == Status.TABLE_DOESNT_EXIST
        with pytest.raises(rpcfast.RemoteError) as info:
            await coord.getTabletMap(tableId=42)
        assert info.value.code == Status.TABLE_DOESNT_EXIST
        await coord.dropTable(name="missing")  # idempotent

        async with fake_server(coord, services=BACKUP) as (backup, _addr):
            await coord.removeServer(serverId=backup.server_id)
            assert _status(service, 1) is ServerStatus.REMOVED
            async with fake_server(coord, services=MASTER) as (master, _addr2):
                assert master.server_id == make_server_id(1, 1)


# -- ZooKeeper: a standby coordinator takes over -------------------------------------------------


async def test_standby_coordinator_takes_over_with_the_same_state(
    zookeeper: str, zk_root: str
) -> None:
    def zk() -> ZooKeeperStorage:
        return ZooKeeperStorage(zookeeper, zk_root, session_timeout=5.0)

    first, second = zk(), zk()
    outcome: list[BaseException] = []
    standby: list[CoordinatorService] = []

    async def run_first(task_status: trio.TaskStatus[CoordinatorService]) -> None:
        try:
            await run_coordinator(
                "udp://127.0.0.1:0", first, config=CONFIG, task_status=task_status
            )
        except LeadershipLost as exc:
            outcome.append(exc)

    async def run_second() -> None:
        async def started(task_status: trio.TaskStatus[CoordinatorService]) -> None:
            await run_coordinator(
                "udp://127.0.0.1:0", second, config=CONFIG, task_status=task_status
            )

        async with trio.open_nursery() as inner:
            standby.append(await inner.start(started))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            leader: CoordinatorService = await nursery.start(run_first)
            nursery.start_soon(run_second)
            async with rpcfast.connect(leader.addresses[0], timeout=5.0) as conn:
                coord = conn.stub(cluster_capnp.Coordinator)
                async with fake_server(coord) as (fake, _addr):
                    await coord.createTable(name="t", serverSpan=2)
                    state = leader.state.to_snapshot()
                    assert not standby  # still waiting for leadership

                    session = first.client_id
                    assert session is not None

                    def expire() -> None:
                        thief = KazooClient(hosts=zookeeper, client_id=session)
                        thief.start(timeout=10)
                        thief.stop()
                        thief.close()

                    await eventually(lambda: fake.version == 1)
                    pushes = len(fake.lists)
                    await trio.to_thread.run_sync(expire)
                    await eventually(lambda: bool(standby) and bool(outcome), timeout=20)
                    new = standby[0]
                    assert new.state.to_snapshot() == state
                    assert await trio.to_thread.run_sync(second.leader_address) == new.addresses[0]
                    async with rpcfast.connect(new.addresses[0], timeout=5.0) as conn2:
                        found = await conn2.stub(cluster_capnp.Coordinator).getTableId(name="t")
                        assert found is not None and found.tableId == 1
                    await eventually(lambda: len(fake.lists) > pushes)  # the new leader pushes
            nursery.cancel_scope.cancel()
