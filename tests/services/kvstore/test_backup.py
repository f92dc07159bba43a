"""The backup: append rules, files, restart, capacity, fencing, group commit, and the service.

Core tests drive a :class:`BackupStore` directly on a temporary directory; the end-to-end tests
serve it with rpcfast over UDP loopback, in this process and in a process killed with SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpcfast
from rpcfast._schema import interface_spec
from services.kvstore._backup import (
    BackupConfig,
    BackupService,
    BackupStore,
    FsyncBackupService,
    ReplicaInfo,
    backup_service,
    cluster_capnp,
    open_backup_store,
)
from services.kvstore.errors import Status

SEGMENT = 64 * 1024
M = 7  # a master id


def config(tmp: Path, **overrides: Any) -> BackupConfig:
    return BackupConfig(directory=str(tmp / "backup"), **{"segment_size": SEGMENT, **overrides})


def replica_path(tmp: Path, master: int, segment: int, suffix: str = ".replica") -> Path:
    return tmp / "backup" / str(master) / f"{segment}{suffix}"


def status_of(info: pytest.ExceptionInfo[rpcfast.ServiceError]) -> Status:
    return Status(info.value.code)


@asynccontextmanager
async def store_at(tmp: Path, **overrides: Any) -> AsyncIterator[BackupStore]:
    async with open_backup_store(config(tmp, **overrides)) as store:
        yield store


# -- append rules ------------------------------------------------------------------------------
async def test_writes_append_at_the_replica_end(tmp_path: Path) -> None:
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 1, 0, b"head", open=True, primary=True)
        store.write_nowait(M, 1, 4, b"-more")
        assert store.list_replicas(M) == [ReplicaInfo(1, 9, closed=False, primary=True)]
        assert await store.read(M, 1) == (b"head-more", False)
        assert store.list_replicas(M + 1) == []

        cases: list[tuple[Callable[[], None], Status]] = [
            (lambda: store.write_nowait(M, 1, 20, b"gap"), Status.BACKUP_MALFORMED_SEGMENT),
            (lambda: store.write_nowait(M, 1, 2, b"XXXX"), Status.BACKUP_MALFORMED_SEGMENT),
            (lambda: store.write_nowait(M, 2, 0, b"x"), Status.BACKUP_BAD_SEGMENT_ID),
            (lambda: store.write_nowait(M, 2, 5, b"x", open=True), Status.BACKUP_MALFORMED_SEGMENT),
            (
                lambda: store.write_nowait(M, 1, 9, bytes(SEGMENT)),
                Status.BACKUP_SEGMENT_OVERFLOW,
            ),
            (
                lambda: store.write_nowait(M, 3, 0, bytes(SEGMENT + 1), open=True),
                Status.BACKUP_SEGMENT_OVERFLOW,
            ),
        ]
        for write, status in cases:
            with pytest.raises(rpcfast.ServiceError) as info:
                write()
            assert status_of(info) is status
        # nothing the rejected writes carried was kept
        assert await store.read(M, 1) == (b"head-more", False)
        assert [r.segment_id for r in store.list_replicas(M)] == [1]
        # a segment filled exactly to its size is fine
        store.write_nowait(M, 1, 9, bytes(SEGMENT - 9))
        stats = store.stats()
        assert stats.rejected_writes == len(cases) and stats.writes == 3


async def test_duplicate_writes_are_idempotent(tmp_path: Path) -> None:
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 1, 0, b"abc", open=True)
        store.write_nowait(M, 1, 3, b"defgh")
        store.write_nowait(M, 1, 0, b"abc", open=True)  # the open, retried
        store.write_nowait(M, 1, 3, b"defgh")  # the append, retried
        store.write_nowait(M, 1, 5, b"fg")  # a part of it
        store.write_nowait(M, 1, 6, b"ghij")  # overlapping held bytes, then new ones
        assert await store.read(M, 1) == (b"abcdefghij", False)
        assert store.stats().duplicate_writes == 3
        with pytest.raises(rpcfast.ServiceError) as info:
            store.write_nowait(M, 1, 8, b"iJk")  # overlap that disagrees
        assert status_of(info) is Status.BACKUP_MALFORMED_SEGMENT
        assert await store.read(M, 1) == (b"abcdefghij", False)


# -- files -------------------------------------------------------------------------------------
async def test_close_writes_the_exact_bytes_to_a_file(tmp_path: Path) -> None:
    data = os.urandom(SEGMENT - 100)
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 5, 0, data[:1000], open=True, primary=True)
        store.write_nowait(M, 5, 1000, data[1000:], close=True)
        store.write_nowait(M, 6, 0, b"secondary", open=True, close=True)
        await store.wait_flushed()
        assert replica_path(tmp_path, M, 5).read_bytes() == data
        assert replica_path(tmp_path, M, 5, ".primary").exists()
        assert replica_path(tmp_path, M, 6).read_bytes() == b"secondary"
        assert not replica_path(tmp_path, M, 6, ".primary").exists()
        assert not list((tmp_path / "backup" / str(M)).glob("*.tmp"))
        stats = store.stats()
        assert (stats.closed_replicas, stats.open_replicas, stats.buffers_in_use) == (2, 0, 0)
        assert stats.disk_bytes == len(data) + 9 and stats.buffered_bytes == 0
        assert stats.flushes == 2
        # read back from the file; a retried close is a no-op, a write past the end is refused
        assert await store.read(M, 5) == (data, True)
        store.write_nowait(M, 5, 1000, data[1000:], close=True)
        with pytest.raises(rpcfast.ServiceError) as info:
            store.write_nowait(M, 5, len(data), b"more")
        assert status_of(info) is Status.BACKUP_MALFORMED_SEGMENT
        assert store.list_replicas(M) == [
            ReplicaInfo(5, len(data), closed=True, primary=True),
            ReplicaInfo(6, 9, closed=True, primary=False),
        ]


async def test_free_deletes_the_replica_and_its_files(tmp_path: Path) -> None:
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 1, 0, b"closed", open=True, close=True, primary=True)
        store.write_nowait(M, 2, 0, b"open", open=True)
        await store.wait_flushed()
        await store.free(M, 1)
        await store.free(M, 2)
        await store.free(M, 3)  # unknown: nothing to do (a retried free)
        assert store.list_replicas(M) == []
        assert list((tmp_path / "backup" / str(M)).iterdir()) == []
        with pytest.raises(rpcfast.ServiceError) as info:
            await store.read(M, 1)
        assert status_of(info) is Status.BACKUP_BAD_SEGMENT_ID
        assert store.stats().buffers_in_use == 0


async def test_free_while_the_file_is_being_written(tmp_path: Path) -> None:
    async with store_at(tmp_path) as store:
        for segment in range(5):
            store.write_nowait(M, segment, 0, os.urandom(SEGMENT), open=True, close=True)
        for segment in range(5):  # some are queued, one is being written
            await store.free(M, segment)
        await store.wait_flushed()
        assert store.list_replicas(M) == []
        master_dir = tmp_path / "backup" / str(M)
        assert not master_dir.exists() or list(master_dir.iterdir()) == []


async def test_reopened_store_finds_the_closed_replicas(tmp_path: Path) -> None:
    data = os.urandom(5000)
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 1, 0, data, open=True, close=True, primary=True)
        store.write_nowait(M, 2, 0, b"x", open=True, close=True)
        store.write_nowait(M + 1, 9, 0, b"other master", open=True, close=True)
        store.write_nowait(M, 3, 0, b"open: lost with the buffers", open=True)
    # junk a crash leaves behind, and files that are not ours
    replica_path(tmp_path, M, 4, ".replica.tmp").write_bytes(b"half")
    replica_path(tmp_path, M, 6, ".primary").write_bytes(b"")
    (tmp_path / "backup" / "notes.txt").write_text("keep")
    async with store_at(tmp_path) as store:
        assert store.list_replicas(M) == [
            ReplicaInfo(1, len(data), closed=True, primary=True),
            ReplicaInfo(2, 1, closed=True, primary=False),
        ]
        assert store.list_replicas(M + 1) == [ReplicaInfo(9, 12, closed=True, primary=False)]
        assert await store.read(M, 1) == (data, True)
        assert not replica_path(tmp_path, M, 4, ".replica.tmp").exists()
        assert not replica_path(tmp_path, M, 6, ".primary").exists()
        assert (tmp_path / "backup" / "notes.txt").exists()
        stats = store.stats()
        assert stats.closed_replicas == 3 and stats.disk_bytes == len(data) + 13
        store.write_nowait(M, 1, 0, data[:10])  # a retry into a closed replica
        await store.free(M, 2)
    async with store_at(tmp_path) as store:
        assert [r.segment_id for r in store.list_replicas(M)] == [1]


# -- capacity and fencing ----------------------------------------------------------------------
async def test_opens_beyond_the_buffers_or_the_space_are_rejected(tmp_path: Path) -> None:
    async with store_at(tmp_path, max_buffers=2, max_segments=3) as store:
        store.write_nowait(M, 1, 0, b"a", open=True)
        store.write_nowait(M, 2, 0, b"b", open=True)
        with pytest.raises(rpcfast.ServiceError) as info:
            store.write_nowait(M, 3, 0, b"c", open=True)
        assert status_of(info) is Status.BACKUP_OPEN_REJECTED
        # writes to replicas already open still go in
        store.write_nowait(M, 1, 1, b"a")
        # a closed replica's buffer is free once its file is written
        store.write_nowait(M, 1, 2, b"", close=True)
        await store.wait_flushed()
        store.write_nowait(M, 3, 0, b"c", open=True)
        # three replicas held: no more, in memory or not
        store.write_nowait(M, 3, 1, b"", close=True)
        await store.wait_flushed()
        with pytest.raises(rpcfast.ServiceError) as info:
            store.write_nowait(M, 4, 0, b"d", open=True)
        assert status_of(info) is Status.BACKUP_OPEN_REJECTED
        await store.free(M, 1)
        store.write_nowait(M, 4, 0, b"d", open=True)
        assert store.stats().rejected_opens == 2


async def test_writes_from_a_master_not_in_the_cluster_are_refused(tmp_path: Path) -> None:
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 1, 0, b"before any list", open=True)  # accepted
        store.set_server_list(3, [M + 1, M + 2])
        for segment, offset, is_open in ((1, 15, False), (2, 0, True)):
            with pytest.raises(rpcfast.ServiceError) as info:
                store.write_nowait(M, segment, offset, b"more", open=is_open)
            assert status_of(info) is Status.CALLER_NOT_IN_CLUSTER
        store.write_nowait(M + 1, 1, 0, b"member", open=True)
        store.set_server_list(2, [M])  # older than the list held: ignored
        with pytest.raises(rpcfast.ServiceError):
            store.write_nowait(M, 1, 15, b"more")
        store.set_server_list(4, [M, M + 1])
        store.write_nowait(M, 1, 15, b"more")
        assert await store.read(M, 1) == (b"before any listmore", False)


# -- a model of the append rules ---------------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 12), st.booleans(), st.booleans()),
        max_size=25,
    ),
)
async def test_append_rules_match_a_model(ops: list[tuple[int, int, bool, bool]]) -> None:
    """Whatever offsets a (buggy) master sends, the replica is what the append rules say."""
    stream = bytes(range(256))
    store = BackupStore(BackupConfig(directory="/nonexistent", segment_size=48))
    content: bytes | None = None
    for offset, size, corrupt, open_ in ops:
        data = bytearray(stream[offset : offset + size])
        if corrupt and data:
            data[0] ^= 0xFF
        end = offset + size
        if content is None:
            expect_ok = open_ and offset == 0 and end <= 48
        else:
            overlap = content[offset:end]
            expect_ok = offset <= len(content) and end <= 48 and data[: len(overlap)] == overlap
        try:
            store.write_nowait(M, 1, offset, data, open=open_)
        except rpcfast.ServiceError:
            assert not expect_ok
        else:
            assert expect_ok
            held = content or b""
            content = held[:offset] + data if end > len(held) else held
        if content is not None:
            assert store.list_replicas(M)[0].length == len(content)
            assert await store.read(M, 1) == (content, False)


# -- the append fast path ----------------------------------------------------------------------
async def test_append_nowait_takes_only_the_plain_append(tmp_path: Path) -> None:
    async with store_at(tmp_path) as store:
        store.write_nowait(M, 1, 0, b"head", open=True)
        assert store.append_nowait(M, 1, 4, memoryview(b"-tail"))
        assert store.append_nowait(M, 1, 9, b"!")
        assert await store.read(M, 1) == (b"head-tail!", False)
        assert store.stats().writes == 3
        store.write_nowait(M, 2, 0, b"x", open=True)
        store.write_nowait(M, 2, 1, b"", close=True)
        before = store.stats()
        # everything else is left to write_nowait, untouched: it decides or raises
        refused: list[tuple[int, int, int, Any]] = [
            (M, 9, 0, b"unknown segment"),
            (M, 1, 20, b"gap"),
            (M, 1, 2, b"ad-"),  # a duplicate of held bytes
            (M, 1, 10, b""),  # nothing to append
            (M, 1, 10, bytes(SEGMENT)),  # past the segment's end
            (M, 1, 10, memoryview(b"\0\0\0\0").cast("I")),  # not bytes
            (M, 2, 1, b"after the close"),
        ]
        for master, segment, offset, data in refused:
            assert not store.append_nowait(master, segment, offset, data)
        store.set_server_list(1, [M + 1])
        assert not store.append_nowait(M, 1, 10, b"fenced")
        assert store.stats() == before
        assert await store.read(M, 1) == (b"head-tail!", False)
    async with store_at(tmp_path / "fsync", durability="fsync") as fsync_store:
        await fsync_store.write(M, 1, 0, b"head", open=True)
        assert not fsync_store.append_nowait(M, 1, 4, b"more")  # acks wait for a sync there


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 40), st.integers(0, 12), st.booleans(), st.booleans(), st.booleans()
        ),
        max_size=25,
    ),
)
async def test_service_fast_path_matches_write_nowait(
    ops: list[tuple[int, int, bool, bool, bool]],
) -> None:
    """The buffered service's handler (fast path first) leaves the store exactly as
    write_nowait alone does, and raises the same errors."""
    stream = bytes(range(256))
    plain = BackupStore(BackupConfig(directory="/nonexistent", segment_size=48))
    served = BackupStore(BackupConfig(directory="/nonexistent", segment_size=48))
    service = BackupService(served)
    for offset, size, corrupt, open_, close in ops:
        data = bytearray(stream[offset : offset + size])
        if corrupt and data:
            data[0] ^= 0xFF
        fields = {"masterId": M, "segmentId": 1, "offset": offset, "data": bytes(data)}
        expected = _outcome(plain.write_nowait, M, 1, offset, bytes(data), open=open_, close=close)
        request = _request(**fields, open=open_, close=close)
        assert _outcome(service.writeSegment, request) == expected
        assert plain.list_replicas(M) == served.list_replicas(M)
        if plain.list_replicas(M):
            assert await plain.read(M, 1) == await served.read(M, 1)
        assert plain.stats() == served.stats()


def _outcome(write: Callable[..., None], *args: Any, **kwargs: Any) -> int | None:
    """The error code a write raises, None if it is accepted."""
    try:
        write(*args, **kwargs)
    except rpcfast.ServiceError as exc:
        return exc.code
    return None


def _request(**fields: Any) -> rpcfast.Body:
    """A writeSegment request as the server hands it to the handler (decoded from the wire)."""
    params = interface_spec(cluster_capnp.Backup).by_name["writeSegment"].params
    body = params.decode(memoryview(b"".join(params.encode_parts(fields))))
    assert body is not None
    return body


# -- fsync mode --------------------------------------------------------------------------------
async def test_fsync_group_commit_shares_syncs(tmp_path: Path) -> None:
    chunks = {segment: [os.urandom(100 + i) for i in range(8)] for segment in range(6)}
    async with store_at(tmp_path, durability="fsync") as store:
        with pytest.raises(RuntimeError):
            store.write_nowait(M, 0, 0, b"x", open=True)

        async def writer(segment: int) -> None:
            offset = 0
            for i, chunk in enumerate(chunks[segment]):
                await store.write(
                    M, segment, offset, chunk, open=i == 0, close=i == 7 and segment % 2 == 0
                )
                offset += len(chunk)

        async with trio.open_nursery() as nursery:
            for segment in chunks:
                nursery.start_soon(writer, segment)
        stats = store.stats()
        assert stats.writes == 48
        assert 0 < stats.syncs < stats.writes  # concurrent writers shared fdatasyncs
        assert stats.buffers_in_use == 3 and stats.closed_replicas == 3
        for segment, parts in chunks.items():
            closed = segment % 2 == 0
            suffix = ".replica" if closed else ".open"
            assert replica_path(tmp_path, M, segment, suffix).read_bytes() == b"".join(parts)
            assert await store.read(M, segment) == (b"".join(parts), closed)
        # a retry of durable bytes needs no sync
        await store.write(M, 1, 0, chunks[1][0], open=True)
        await store.write(M, 0, 0, chunks[0][0])
        assert store.stats().syncs == stats.syncs
        assert store.stats().disk_bytes == sum(len(b"".join(p)) for p in chunks.values())
    async with store_at(tmp_path, durability="fsync") as store:
        assert store.list_replicas(M) == [
            ReplicaInfo(s, len(b"".join(p)), closed=s % 2 == 0, primary=False)
            for s, p in chunks.items()
        ]
        for segment, parts in chunks.items():
            assert await store.read(M, segment) == (b"".join(parts), segment % 2 == 0)
        # open replicas found on disk are read-only
        with pytest.raises(rpcfast.ServiceError) as info:
            await store.write(M, 1, store.list_replicas(M)[1].length, b"more")
        assert status_of(info) is Status.BACKUP_BAD_SEGMENT_ID


async def test_fsync_writes_during_a_sync_wait_for_the_next_which_covers_them(
    tmp_path: Path,
) -> None:
    gate = threading.Event()  # holds the first sync in its worker thread

    def gated_fdatasync(fd: int) -> None:
        gate.wait(10)
        os.fdatasync(fd)

    cfg = config(tmp_path, durability="fsync")
    acked: list[tuple[int, int]] = []

    async def write(segment: int, offset: int, data: bytes) -> None:
        await store.write(M, segment, offset, data, open=offset == 0)
        acked.append((segment, offset))

    async with open_backup_store(cfg, sync_file=gated_fdatasync) as store:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write, 1, 0, b"first")
                await trio.testing.wait_all_tasks_blocked()  # its sync is running
                for i in range(10):  # a master pipelining appends to one replica
                    nursery.start_soon(write, 1, 5 + i, bytes([i]))
                    await trio.testing.wait_all_tasks_blocked()
                for segment in (2, 3, 4):  # and other replicas
                    nursery.start_soon(write, segment, 0, b"other")
                await trio.testing.wait_all_tasks_blocked()
                assert acked == [] and store.stats().syncs == 0
                gate.set()
        finally:
            gate.set()
        stats = store.stats()
        assert stats.writes == 14 and len(acked) == 14
        # the first sync, then one that covered the 13 writes made while it ran
        assert (stats.syncs, stats.file_syncs) == (2, 1 + 4)
        expected = b"first" + bytes(range(10))
        assert await store.read(M, 1) == (expected, False)
        assert replica_path(tmp_path, M, 1, ".open").read_bytes() == expected


async def test_fsync_free_during_writes_leaves_no_files(tmp_path: Path) -> None:
    async with store_at(tmp_path, durability="fsync") as store:

        async def writer(segment: int) -> None:
            await store.write(M, segment, 0, b"a" * 500, open=True, primary=True)
            try:
                await store.write(M, segment, 500, b"b" * 500)
            except rpcfast.ServiceError as exc:  # freed in between
                assert exc.code == Status.BACKUP_BAD_SEGMENT_ID

        async with trio.open_nursery() as nursery:
            for segment in range(4):
                nursery.start_soon(writer, segment)
            for segment in range(4):
                nursery.start_soon(store.free, M, segment)
        for segment in range(4):
            await store.free(M, segment)  # whatever a write re-created in between
        assert store.list_replicas(M) == []
        master_dir = tmp_path / "backup" / str(M)
        assert not master_dir.exists() or list(master_dir.iterdir()) == []
        assert store.stats().buffers_in_use == 0


# -- the service over UDP loopback --------------------------------------------------------------
@pytest.mark.parametrize("durability", ["buffered", "fsync"])
async def test_service_end_to_end(tmp_path: Path, durability: str) -> None:
    data = os.urandom(200_000)
    async with store_at(tmp_path, durability=durability, segment_size=256 * 1024) as store:
        service = backup_service(store)
        expected = FsyncBackupService if durability == "fsync" else BackupService
        assert type(service) is expected
        async with rpcfast.serve([service], ["udp://127.0.0.1:0"]) as server:
            async with rpcfast.connect(server.addresses[0], timeout=5.0) as conn:
                backup = conn.stub(cluster_capnp.Backup)
                common = {"masterId": M, "segmentId": 1}
                await backup.writeSegment(
                    **common, offset=0, data=data[:100_000], open=True, primary=True
                )
                await backup.writeSegment(**common, offset=100_000, data=data[100_000:])
                await backup.writeSegment(**common, offset=0, data=data[:10])  # a duplicate
                reply = await backup.getReplica(**common)
                assert reply is not None and bytes(reply.data) == data and not reply.closed
                await backup.writeSegment(**common, offset=len(data), data=b"", close=True)
                await backup.writeSegment(masterId=M, segmentId=2, data=b"two", open=True)
                reply = await backup.listReplicas(masterId=M)
                assert reply is not None
                listed = [(r.segmentId, r.length, r.closed, r.primary) for r in reply.replicas]
                assert listed == [(1, len(data), True, True), (2, 3, False, False)]
                await store.wait_flushed()
                reply = await backup.getReplica(**common)
                assert reply is not None and bytes(reply.data) == data and reply.closed

                with pytest.raises(rpcfast.RemoteError) as info:
                    await backup.writeSegment(masterId=M, segmentId=2, offset=9, data=b"gap")
                assert info.value.status is rpcfast.Status.APPLICATION_ERROR
                assert info.value.code == Status.BACKUP_MALFORMED_SEGMENT
                store.set_server_list(1, [M + 1])
                with pytest.raises(rpcfast.RemoteError) as info:
                    await backup.writeSegment(masterId=M, segmentId=2, offset=3, data=b"x")
                assert info.value.code == Status.CALLER_NOT_IN_CLUSTER

                await backup.freeSegment(**common)
                with pytest.raises(rpcfast.RemoteError) as info:
                    await backup.getReplica(**common)
                assert info.value.code == Status.BACKUP_BAD_SEGMENT_ID
                reply = await backup.listReplicas(masterId=M)
                assert reply is not None and [r.segmentId for r in reply.replicas] == [2]
    assert not replica_path(tmp_path, M, 1).exists()


def test_service_class_must_fit_the_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BackupService(BackupStore(config(tmp_path, durability="fsync")))


# -- a backup process killed with SIGKILL -------------------------------------------------------
def spawn_backup(directory: Path, durability: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``python -m services.kvstore._backup``; return it and the address it serves on."""
    args = ["--dir", str(directory), "--durability", durability, "--segment-size", str(SEGMENT)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore._backup", *args, "udp://127.0.0.1:0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("the backup process exited before reporting its address")
    return proc, line.split()[0]


@pytest.mark.parametrize("durability", ["buffered", "fsync"])
async def test_acknowledged_replicas_survive_sigkill(tmp_path: Path, durability: str) -> None:
    proc, address = spawn_backup(tmp_path / "backup", durability)
    closed = os.urandom(SEGMENT)
    still_open = os.urandom(3000)
    try:
        async with rpcfast.connect(address, timeout=5.0) as conn:
            backup = conn.stub(cluster_capnp.Backup)
            for i in range(4):
                part = closed[i * SEGMENT // 4 : (i + 1) * SEGMENT // 4]
                await backup.writeSegment(
                    masterId=M,
                    segmentId=10,
                    offset=i * SEGMENT // 4,
                    data=part,
                    open=i == 0,
                    close=i == 3,
                    primary=True,
                )
            await backup.writeSegment(masterId=M, segmentId=11, data=still_open, open=True)
        if durability == "buffered":
            # the close was acknowledged from memory; its file follows in the background
            with trio.fail_after(10):
                while not replica_path(tmp_path, M, 10).exists():
                    await trio.sleep(0.01)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
    async with store_at(tmp_path, durability=durability) as store:
        listed = store.list_replicas(M)
        assert listed[0] == ReplicaInfo(10, SEGMENT, closed=True, primary=True)
        assert await store.read(M, 10) == (closed, True)
        if durability == "fsync":  # every acknowledged byte is on disk, open or not
            assert listed[1:] == [ReplicaInfo(11, len(still_open), closed=False, primary=False)]
            assert await store.read(M, 11) == (still_open, False)
        else:  # an open replica lived only in the (lost) buffer
            assert listed[1:] == []
