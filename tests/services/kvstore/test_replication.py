"""Master-side replication against real backups over UDP loopback.

A fake log (segment id -> bytearray) feeds the manager the way the storage engine does and
serves ``read_segment``; the backups are BackupStores served in this process (so tests can look
inside them at any moment) and, for the SIGKILL test, a backup process.
"""

from __future__ import annotations

import functools
import itertools
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import rpcfast
from services.kvstore._backup import (
    BackupConfig,
    BackupService,
    BackupStore,
    FsyncBackupService,
    ReplicaInfo,
    cluster_capnp,
    open_backup_store,
)
from services.kvstore._replication import (
    RandomBackupSelector,
    ReplicaManager,
    ReplicasUnavailable,
)
from services.kvstore.errors import Retry, Status

M = 0x100  # the master's server id
SEGMENT = 256 * 1024
Event = tuple[Any, ...]


# -- a fake log ------------------------------------------------------------------------------
class FakeLog:
    """Segments as bytearrays, fed to the manager in log order (new head open, then old close)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.segments: dict[int, bytearray] = {}
        self.closed: set[int] = set()
        self.head: int | None = None
        self.next_id = 1
        self.mgr: ReplicaManager | None = None

    def read_segment(self, segment_id: int) -> Sequence[memoryview] | None:
        """Two views into the live bytearray: the manager must copy and let go of them."""
        buf = self.segments.get(segment_id)
        if buf is None:
            return None
        half = len(buf) // 2
        view = memoryview(buf)
        return [view[:half], view[half:]]

    def roll(self, header: int = 64) -> int:
        assert self.mgr is not None
        sid, self.next_id = self.next_id, self.next_id + 1
        self.segments[sid] = bytearray(self.rng.randbytes(header))
        self.mgr.open(sid, memoryview(bytes(self.segments[sid])))
        old, self.head = self.head, sid
        if old is not None:
            self.closed.add(old)
            self.mgr.close(old)
        return sid

    def write(self, n: int) -> None:
        assert self.mgr is not None and self.head is not None
        buf = self.segments[self.head]
        scratch = bytearray(self.rng.randbytes(n))
        offset = len(buf)
        buf += scratch
        self.mgr.append(self.head, offset, memoryview(scratch))
        scratch[:] = bytes(n)  # the view was valid only during the call

    def free(self, segment_id: int) -> None:
        assert self.mgr is not None
        del self.segments[segment_id]
        self.mgr.free(segment_id)


# -- backups ---------------------------------------------------------------------------------
class RecordingBackup(BackupService):
    """Notes every accepted write and every free, in order across all backups."""

    def __init__(self, store: BackupStore, server_id: int, events: list[Event]) -> None:
        super().__init__(store)
        self.server_id = server_id
        self.events = events

    @rpcfast.fast
    def writeSegment(self, request: rpcfast.Body) -> None:
        super().writeSegment(request)
        self.events.append(
            (
                "write",
                self.server_id,
                request.segmentId,
                request.offset,
                len(request.data),
                request.open,
                request.close,
            )
        )

    async def freeSegment(self, request: rpcfast.Body) -> None:
        self.events.append(("free", self.server_id, request.segmentId))  # (as it arrives)
        await super().freeSegment(request)


class HangingBackup(FsyncBackupService):
    """Never answers a write."""

    async def writeSegment(self, request: rpcfast.Body) -> None:
        await trio.sleep_forever()


class Node:
    def __init__(self, server_id: int, address: str, store: BackupStore) -> None:
        self.server_id = server_id
        self.address = address
        self.store = store

    def replicas(self) -> dict[int, ReplicaInfo]:
        return {r.segment_id: r for r in self.store.list_replicas(M)}


@asynccontextmanager
async def serve_backups(
    tmp: Path,
    ids: Sequence[int],
    events: list[Event] | None = None,
    make: Callable[[int, BackupStore], BackupService | FsyncBackupService] | None = None,
    **config: Any,
) -> AsyncIterator[list[Node]]:
    events = events if events is not None else []
    nodes: list[Node] = []
    async with trio.open_nursery() as nursery:

        async def one(sid: int, task_status: trio.TaskStatus[Node]) -> None:
            cfg = BackupConfig(directory=str(tmp / f"b{sid}"), segment_size=SEGMENT, **config)
            async with open_backup_store(cfg) as store:
                service = make(sid, store) if make else RecordingBackup(store, sid, events)
                async with rpcfast.serve([service], ["udp://127.0.0.1:0"]) as server:
                    task_status.started(Node(sid, server.addresses[0], store))
                    await trio.sleep_forever()

        for sid in ids:
            nodes.append(await nursery.start(one, sid))
        yield nodes
        nursery.cancel_scope.cancel()


def listing(nodes: Sequence[Node]) -> list[tuple[int, str]]:
    return [(n.server_id, n.address) for n in nodes]


def prefer(*order: int) -> Callable[..., int]:
    """A deterministic selector: the first of ``order`` that is a candidate, else the lowest."""

    def select(candidates: Sequence[int], *, primary: bool) -> int:
        for sid in order:
            if sid in candidates:
                return sid
        return min(candidates)

    return select


@asynccontextmanager
async def manager(fake: FakeLog, replicas: int, **kwargs: Any) -> AsyncIterator[ReplicaManager]:
    kwargs.setdefault("rpc_timeout", 2.0)  # tests of failures set a short one
    kwargs.setdefault("durability_timeout", 10.0)
    mgr = ReplicaManager(M, replicas, read_segment=fake.read_segment, **kwargs)
    fake.mgr = mgr
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mgr.run)
        yield mgr
        nursery.cancel_scope.cancel()


async def sync(mgr: ReplicaManager, timeout: float = 15.0) -> Exception | None:
    done = trio.Event()
    out: list[Exception | None] = []

    def callback(error: Exception | None) -> None:
        out.append(error)
        done.set()

    mgr.sync(callback)
    with trio.fail_after(timeout):
        await done.wait()
    assert len(out) == 1
    return out[0]


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.01)


def holders(nodes: Sequence[Node], segment_id: int) -> list[Node]:
    return [n for n in nodes if segment_id in n.replicas()]


async def assert_exact(node: Node, fake: FakeLog, segment_id: int) -> None:
    # (BackupStore.read can race with the flusher for a replica closed just now)
    await node.store.wait_flushed()
    data, closed = await node.store.read(M, segment_id)
    assert data == bytes(fake.segments[segment_id])
    assert closed == (segment_id in fake.closed)


# -- placement, durability, exact bytes ------------------------------------------------------
async def test_sync_waits_for_r_replicas_on_distinct_backups_with_the_exact_bytes(
    tmp_path: Path,
) -> None:
    fake = FakeLog(random.Random(1))
    async with serve_backups(tmp_path, [1, 2, 3, 4, M]) as nodes:
        own = nodes[-1]  # a backup that is the master's own server
        async with manager(fake, 3, select_backups=RandomBackupSelector(random.Random(2))) as mgr:
            mgr.set_backups(listing(nodes))
            checked = 0

            def check_on_ack(expected: dict[int, int], error: Exception | None) -> None:
                nonlocal checked
                assert error is None
                for sid, length in expected.items():
                    have = [
                        n
                        for n in nodes
                        if n.replicas().get(sid, ReplicaInfo(0, -1, False, False)).length >= length
                    ]
                    assert len(have) >= 3, (sid, length)
                checked += 1

            syncs = 0
            for _ in range(4):
                fake.roll()
                for _ in range(12):
                    fake.write(fake.rng.randrange(1, 3000))
                    if fake.rng.random() < 0.5:
                        expected = {sid: len(b) for sid, b in fake.segments.items()}
                        mgr.sync(functools.partial(check_on_ack, expected))
                        syncs += 1
                        await trio.lowlevel.checkpoint()
            assert await sync(mgr) is None
            await eventually(lambda: checked == syncs)
            # nothing outstanding now: a sync answers at once
            immediate: list[Exception | None] = []
            mgr.sync(immediate.append)
            assert immediate == [None]

            for sid in fake.segments:
                held = holders(nodes, sid)
                assert len({n.server_id for n in held}) == len(held) == 3
                assert own not in held
                assert sum(n.replicas()[sid].primary for n in held) == 1
                for node in held:
                    await assert_exact(node, fake, sid)
            stats = mgr.stats()
            assert stats.segments == 4 and stats.replicas == 12
            assert stats.buffered_bytes == 0  # everything acknowledged everywhere
            assert stats.failures == 0 and stats.replacements == 0
            assert stats.bytes_sent == 3 * sum(len(b) for b in fake.segments.values())


async def test_new_head_is_open_everywhere_before_the_old_head_closes_and_frees_wait(
    tmp_path: Path,
) -> None:
    fake = FakeLog(random.Random(3))
    events: list[Event] = []
    async with serve_backups(tmp_path, [1, 2, 3, 4], events) as nodes:
        async with manager(fake, 3, select_backups=RandomBackupSelector(random.Random(4))) as mgr:
            mgr.set_backups(listing(nodes))
            heads = [fake.roll()]
            for _ in range(5):
                for _ in range(3):
                    fake.write(500)
                heads.append(fake.roll())  # no waiting in between: the ordering is the manager's
            fake.free(heads[1])
            fake.free(heads[2])
            assert await sync(mgr) is None
            await eventually(lambda: not any(holders(nodes, s) for s in heads[1:3]))

    def index(kind: str, segment_id: int, flag: int | None = None) -> list[int]:
        """Positions of ``kind`` events for a segment (``flag``: 5 open, 6 close)."""
        return [
            i
            for i, e in enumerate(events)
            if e[0] == kind and e[2] == segment_id and (flag is None or e[flag])
        ]

    for old, new in itertools.pairwise(heads):
        opens, closes = index("write", new, 5), index("write", old, 6)
        assert len(opens) == 3 and len(closes) == 3
        assert max(opens) < min(closes), (old, new)
    # a free goes out after the head holding the new digest is open, and after the close
    last_open = max(index("write", heads[-1], 5))
    for sid in heads[1:3]:
        frees, closes = index("free", sid), index("write", sid, 6)
        assert len(frees) == 3
        assert min(frees) > max(last_open, *closes)
    assert not any(e[0] == "free" and e[2] not in heads[1:3] for e in events)


async def test_appends_while_a_write_is_in_flight_share_the_next_rpc(tmp_path: Path) -> None:
    fake = FakeLog(random.Random(5))
    async with serve_backups(tmp_path, [1, 2]) as nodes:
        async with manager(fake, 2) as mgr:
            mgr.set_backups(listing(nodes))
            fake.roll()
            order: list[int] = []
            results: list[Exception | None] = []

            def done(i: int, error: Exception | None) -> None:
                order.append(i)
                results.append(error)

            appends = 200
            for i in range(appends):  # no checkpoint: no answer can arrive in between
                fake.write(100)
                mgr.sync(functools.partial(done, i))
            assert mgr.stats().writes_in_flight == 2  # the first append's, one per replica
            await eventually(lambda: len(order) == appends)
            assert order == list(range(appends)) and results == [None] * appends
            assert mgr.stats().writes_sent < appends
            assert mgr.stats().buffered_bytes == 0
            head = fake.head
            assert head is not None
            for node in nodes:
                await assert_exact(node, fake, head)


# -- failures --------------------------------------------------------------------------------
def spawn_backup(directory: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m services.kvstore._backup``; return it and the address it prints."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.kvstore._backup",
            "--dir",
            str(directory),
            "--segment-size",
            str(SEGMENT),
            "udp://127.0.0.1:0",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if proc.stdin is not None:
            proc.stdin.close()
        raise RuntimeError("the backup process exited before reporting its address")
    return proc, line.split()[0]


async def test_replicas_on_a_killed_backup_process_are_replaced_with_the_whole_segment(
    tmp_path: Path,
) -> None:
    fake = FakeLog(random.Random(6))
    proc, address = await trio.to_thread.run_sync(spawn_backup, tmp_path / "proc")
    try:
        async with serve_backups(tmp_path, [1, 2, 3]) as nodes:
            backups = [(9, address), *listing(nodes)]
            async with manager(
                fake, 3, select_backups=prefer(9, 1, 2), max_write_bytes=8192, rpc_timeout=1.0
            ) as mgr:
                mgr.set_backups(backups)
                closed = fake.roll()
                for _ in range(10):
                    fake.write(3000)
                head = fake.roll()
                for _ in range(5):
                    fake.write(2000)
                assert await sync(mgr) is None
                async with rpcfast.connect(address, timeout=5) as conn:
                    listed = await conn.stub(cluster_capnp.Backup).listReplicas(masterId=M)
                    assert listed is not None
                    assert {r.segmentId for r in listed.replicas} == {closed, head}

                waiting: list[Exception | None] = []
                for i in range(40):
                    fake.write(1500)
                    mgr.sync(waiting.append)
                    if i == 10:
                        proc.kill()  # SIGKILL, mid-stream
                    await trio.sleep(0.005)
                await eventually(lambda: len(waiting) == 40)
                assert waiting == [None] * 40
                spare = nodes[2]
                assert [n.server_id for n in holders(nodes, head)] == [1, 2, 3]
                for node in nodes:
                    await assert_exact(node, fake, head)

                # the closed segment's lost replica is replaced once the server list says so
                assert closed not in spare.replicas()
                mgr.set_backups(listing(nodes))
                await eventually(
                    lambda: closed in spare.replicas() and spare.replicas()[closed].closed
                )
                await assert_exact(spare, fake, closed)
                stats = mgr.stats()
                assert stats.replacements >= 2 and stats.failures >= 1
                assert stats.replicas == 6
                assert sum(n.replicas()[closed].primary for n in nodes) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


@pytest.mark.parametrize("trouble", ["full", "not_in_cluster", "hangs"])
async def test_a_backup_that_refuses_or_hangs_is_replaced_by_another(
    tmp_path: Path, trouble: str
) -> None:
    fake = FakeLog(random.Random(7))
    bad = 1

    def make(sid: int, store: BackupStore) -> BackupService | FsyncBackupService:
        if sid == bad and trouble == "full":
            store.write_nowait(M + 1, 1, 0, b"another master's replica", open=True)
        if sid == bad and trouble == "not_in_cluster":
            store.set_server_list(1, [M + 1])
        if sid == bad and trouble == "hangs":
            return HangingBackup(store)
        return BackupService(store)

    async with serve_backups(tmp_path, [1, 2, 3], make=make, max_buffers=1) as nodes:
        async with manager(fake, 2, select_backups=prefer(bad, 2, 3), rpc_timeout=0.5) as mgr:
            mgr.set_backups(listing(nodes))
            sid = fake.roll()
            for _ in range(5):
                fake.write(700)
            assert await sync(mgr) is None
            assert [n.server_id for n in holders(nodes, sid)] == [2, 3]
            for node in nodes[1:]:
                await assert_exact(node, fake, sid)
            assert mgr.stats().failures >= 1 and mgr.stats().replacements >= 1
            if trouble == "full":
                assert nodes[0].store.stats().rejected_opens >= 1
            assert sid not in nodes[0].replicas()


async def test_a_replica_fenced_off_midway_is_replaced_and_freed_there(tmp_path: Path) -> None:
    fake = FakeLog(random.Random(12))
    async with serve_backups(tmp_path, [1, 2, 3]) as nodes:
        async with manager(fake, 2, select_backups=prefer(1, 2, 3)) as mgr:
            mgr.set_backups(listing(nodes))
            sid = fake.roll()
            fake.write(4000)
            assert await sync(mgr) is None
            assert [n.server_id for n in holders(nodes, sid)] == [1, 2]
            nodes[0].store.set_server_list(1, [M + 1])  # backup 1 no longer takes our writes
            for _ in range(3):
                fake.write(1000)
                assert await sync(mgr) is None
            # the abandoned replica is freed on the backup that still answers
            await eventually(lambda: [n.server_id for n in holders(nodes, sid)] == [2, 3])
            for node in nodes[1:]:
                await assert_exact(node, fake, sid)
            stats = mgr.stats()
            assert stats.failures == 1 and stats.replacements == 1
            assert nodes[0].store.stats().rejected_writes == 1


async def test_too_few_backups_fail_sync_with_retry_then_recover(tmp_path: Path) -> None:
    fake = FakeLog(random.Random(8))
    async with serve_backups(tmp_path, [1, 2, 3]) as nodes:
        async with manager(fake, 3, durability_timeout=0.3) as mgr:
            mgr.set_backups(listing(nodes[:2]))
            old = fake.roll()
            fake.write(1000)
            error = await sync(mgr)
            assert isinstance(error, ReplicasUnavailable) and isinstance(error, Retry)
            assert error.status is Status.RETRY
            assert mgr.stats().sync_timeouts == 1
            head = fake.roll()
            fake.write(1000)
            await trio.sleep(0.05)
            # the new head is not open on R backups, so the old head is not closed anywhere
            assert [n.server_id for n in holders(nodes, head)] == [1, 2]
            assert not any(n.replicas()[old].closed for n in holders(nodes, old))

            mgr.set_backups(listing(nodes))
            assert await sync(mgr) is None
            for sid in (old, head):
                assert len(holders(nodes, sid)) == 3
                for node in nodes:
                    await assert_exact(node, fake, sid)


async def test_the_timer_sleeps_while_nothing_can_time_out_and_wakes_for_work(
    tmp_path: Path,
) -> None:
    fake = FakeLog(random.Random(10))
    async with serve_backups(tmp_path, [1, 2]) as nodes:
        async with manager(fake, 2, durability_timeout=0.3) as mgr:
            await eventually(lambda: mgr._wake is not None)  # quiet: no 10 ms tick
            fake.roll()
            fake.write(100)
            # no backups listed yet: only the timer can end this sync (with Retry)
            assert isinstance(await sync(mgr), ReplicasUnavailable)
            mgr.set_backups(listing(nodes))
            assert await sync(mgr) is None
            assert all(len(holders(nodes, sid)) == 2 for sid in fake.segments)
            await eventually(lambda: mgr._wake is not None)  # quiet again


async def test_free_after_close_removes_the_replicas(tmp_path: Path) -> None:
    fake = FakeLog(random.Random(9))
    async with serve_backups(tmp_path, [1, 2, 3]) as nodes:
        async with manager(fake, 2) as mgr:
            mgr.set_backups(listing(nodes))
            first = fake.roll()
            fake.write(5000)
            head = fake.roll()
            assert await sync(mgr) is None
            assert len(holders(nodes, first)) == 2
            fake.free(first)
            await eventually(lambda: not holders(nodes, first))
            assert len(holders(nodes, head)) == 2
            await eventually(lambda: mgr.stats().segments == 1)
            assert mgr.stats().frees_sent == 2
            mgr.free(first)  # again: nothing to do


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_churn_converges_to_r_exact_replicas(tmp_path: Path, seed: int) -> None:
    """Writes, syncs, roll-overs, frees and backups leaving and coming back, in random order."""
    rng = random.Random(seed)
    fake = FakeLog(random.Random(seed + 100))
    async with serve_backups(tmp_path, [1, 2, 3, 4, 5]) as nodes:
        async with manager(
            fake, 3, select_backups=RandomBackupSelector(rng), max_write_bytes=4096
        ) as mgr:
            listed = list(nodes)
            mgr.set_backups(listing(listed))
            fake.roll()
            for _ in range(100):
                action = rng.random()
                if action < 0.5:
                    fake.write(rng.randrange(1, 2500))
                elif action < 0.65:
                    assert await sync(mgr) is None
                elif action < 0.75:
                    fake.roll()
                elif action < 0.82 and len(fake.closed & fake.segments.keys()) > 1:
                    fake.roll()  # like the cleaner: a new digest, then the free
                    fake.free(rng.choice(sorted(fake.closed & fake.segments.keys())))
                elif action < 0.91 and len(listed) > 3:
                    listed.remove(rng.choice(listed))
                    mgr.set_backups(listing(listed))
                else:
                    listed = list(nodes)
                    mgr.set_backups(listing(listed))
                await trio.sleep(rng.choice([0, 0, 0.002]))
            mgr.set_backups(listing(nodes))
            assert await sync(mgr) is None
            live = sorted(fake.segments)

            def settled() -> bool:
                s = mgr.stats()
                return s.replicas == 3 * len(live) and s.segments == len(live)

            await eventually(settled)
            assert await sync(mgr) is None
            for sid in live:
                exact = 0
                for node in holders(nodes, sid):
                    await node.store.wait_flushed()
                    if await node.store.read(M, sid) == (
                        bytes(fake.segments[sid]),
                        sid in fake.closed,
                    ):
                        exact += 1
                assert exact >= 3, sid
            assert mgr.stats().buffered_bytes == 0


async def test_no_replicas_means_every_sync_is_immediate() -> None:
    fake = FakeLog(random.Random(10))
    async with manager(fake, 0) as mgr:
        fake.roll()
        fake.write(100)
        fake.roll()
        got: list[Exception | None] = []
        mgr.sync(got.append)
        assert got == [None]
        fake.free(1)
        assert mgr.stats().segments == 0 and mgr.stats().writes_sent == 0


async def test_impossible_sink_calls_are_refused() -> None:
    fake = FakeLog(random.Random(11))
    async with manager(fake, 1) as mgr:
        mgr.open(1, b"abc")
        with pytest.raises(ValueError):
            mgr.open(1, b"abc")
        with pytest.raises(ValueError):
            mgr.append(1, 7, b"gap")
        with pytest.raises(ValueError):
            mgr.append(2, 0, b"unknown")
        mgr.close(1)
        with pytest.raises(ValueError):
            mgr.append(1, 3, b"late")
        with pytest.raises(ValueError):
            ReplicaManager(M, -1, read_segment=fake.read_segment)
