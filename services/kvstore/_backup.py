"""The backup service: masters' segment replicas, buffered in memory, kept in files.

A master replicates each log segment to R backups with ``writeSegment``: the first write opens
the replica, later writes append to it, the last one closes it. Two durability modes:

* ``buffered`` (RAMCloud's default): a write is acknowledged once it is copied into the
  replica's in-memory buffer, before any disk I/O. The buffers are assumed non-volatile (battery
  backed: on power loss the machine runs long enough to flush them). When a replica closes, a
  background task writes it whole to its file and releases the buffer. A crash of the backup
  *process* loses its open replicas (masters re-replicate whatever a crashed backup held), and a
  closed replica only while its file is still being written.
* ``fsync``: for machines without such buffers. A write is acknowledged only once its bytes are
  on disk: open replicas are appended to their file as written and made durable with fdatasync by
  group commit (writes that arrive while a sync runs share the next one).

Files under the data directory (``<dir>/<master_id>/``, ids in decimal):

* ``<segment_id>.replica``: a closed replica, its exact bytes.
* ``<segment_id>.open``: an open replica in fsync mode (every acknowledged byte is in it).
* ``<segment_id>.primary``: an empty marker: the replica is its segment's primary.
* ``*.tmp``: a file being written; a store opened on the directory deletes them.

A store opened on an existing directory lists the replicas found there (for crash recovery and
whole-cluster restart); they are read-only. Writes from a master that the latest server list does
not name are refused (zombie fencing). Errors are :class:`rpcfast.ServiceError` whose ``code``
is a kvstore :class:`~services.kvstore.errors.Status`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import mmap
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Literal, TypeAlias

import attrs
import trio

import rpcfast
from rpcfast._schema import interface_spec
from services.kvstore._direct import DirectStruct
from services.kvstore.errors import KvError, Status

log = logging.getLogger("kvstore.backup")

Buffer: TypeAlias = bytes | bytearray | memoryview
Durability: TypeAlias = Literal["buffered", "fsync"]

cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

_REPLICA = ".replica"
_OPEN = ".open"
_PRIMARY = ".primary"
_TMP = ".tmp"


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen(kw_only=True)
class BackupConfig:
    """Where and how a backup keeps replicas.

    ``max_buffers`` bounds the replicas held in memory (open ones, and closed ones whose file is
    not written yet; RAMCloud's maxNonVolatileBuffers); ``max_segments`` bounds all replicas held
    (memory and disk). An open beyond either is rejected so the master picks another backup.
    """

    directory: str
    segment_size: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    max_buffers: int = attrs.field(default=64, validator=_positive)
    max_segments: int = attrs.field(default=4096, validator=_positive)
    durability: Durability = attrs.field(
        default="buffered", validator=attrs.validators.in_(("buffered", "fsync"))
    )


@attrs.frozen
class ReplicaInfo:
    """One replica as ``listReplicas`` reports it."""

    segment_id: int
    length: int
    closed: bool
    primary: bool


@attrs.frozen(kw_only=True)
class BackupStats:
    """Counters of a :class:`BackupStore`.

    ``syncs`` counts group-commit rounds and ``file_syncs`` the fdatasync calls in them (one per
    file with new bytes); either below ``writes`` shows writes sharing syncs.
    """

    open_replicas: int
    closed_replicas: int
    buffers_in_use: int
    buffered_bytes: int
    disk_bytes: int
    writes: int
    duplicate_writes: int
    syncs: int
    file_syncs: int
    flushes: int
    flush_errors: int
    rejected_opens: int
    rejected_writes: int


def backup_error(status: Status, message: str) -> KvError:
    """The error a backup raises: it travels as APPLICATION_ERROR with ``code`` = ``status``."""
    return KvError(message, status=status)


@attrs.define(eq=False)
class _Replica:
    """A replica and where its bytes are: ``buffer`` while in memory, else the file ``path``."""

    master_id: int
    segment_id: int
    primary: bool
    closed: bool
    length: int
    path: str
    buffer: memoryview | None
    freed: bool = False
    # a background flush (buffered) or a sync (fsync) that involves this replica is running
    busy: trio.Event | None = None
    flush_queued: bool = False
    # fsync mode: what is already durable, and the open file
    fd: int | None = None
    synced_created: bool = False
    synced_length: int = 0
    synced_closed: bool = False


@attrs.define(eq=False)
class _SyncItem:
    """One replica's share of a group-commit job, snapshotted on the event loop."""

    replica: _Replica
    create: bool
    start: int
    end: int
    view: memoryview | None
    close: bool
    fd: int | None = None


@attrs.define(eq=False)
class _Batch:
    """The writers that the next sync will cover."""

    done: trio.Event = attrs.Factory(trio.Event)
    error: OSError | None = None


def _new_buffer(size: int) -> memoryview:
    """An anonymous mapping: O(1) to make (a bytearray is zeroed up front: ms for 8 MB)."""
    return memoryview(mmap.mmap(-1, size))


def _master_dir(directory: str, master_id: int) -> str:
    return os.path.join(directory, str(master_id))


def _file(directory: str, master_id: int, segment_id: int, suffix: str) -> str:
    return os.path.join(directory, str(master_id), f"{segment_id}{suffix}")


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_master_dir(directory: str, master_id: int) -> bool:
    """Create the master's directory; True if it is new (its parent then needs a sync)."""
    path = _master_dir(directory, master_id)
    if os.path.isdir(path):
        return False
    os.makedirs(path, exist_ok=True)
    return True


def _scan(directory: str) -> list[_Replica]:
    """Find the replicas kept in ``directory``; delete unfinished files and orphan markers."""
    os.makedirs(directory, exist_ok=True)
    found: list[_Replica] = []
    for entry in os.scandir(directory):
        if not entry.is_dir() or not entry.name.isdigit():
            continue
        master_id = int(entry.name)
        names = os.listdir(entry.path)
        by_suffix: dict[str, set[int]] = {_REPLICA: set(), _OPEN: set(), _PRIMARY: set()}
        for name in names:
            stem, dot, suffix = name.partition(".")
            if name.endswith(_TMP):
                _remove_quietly(os.path.join(entry.path, name))
            elif dot and stem.isdigit() and "." + suffix in by_suffix:
                by_suffix["." + suffix].add(int(stem))
        primaries = by_suffix[_PRIMARY]
        for segment_id in sorted(by_suffix[_REPLICA] | by_suffix[_OPEN]):
            closed = segment_id in by_suffix[_REPLICA]
            if closed and segment_id in by_suffix[_OPEN]:
                # the rename to .replica happened after the .open file was complete
                _remove_quietly(_file(directory, master_id, segment_id, _OPEN))
            path = _file(directory, master_id, segment_id, _REPLICA if closed else _OPEN)
            length = os.stat(path).st_size
            found.append(
                _Replica(
                    master_id=master_id,
                    segment_id=segment_id,
                    primary=segment_id in primaries,
                    closed=closed,
                    length=length,
                    path=path,
                    buffer=None,
                    synced_created=True,
                    synced_length=length,
                    synced_closed=closed,
                )
            )
        for segment_id in primaries - by_suffix[_REPLICA] - by_suffix[_OPEN]:
            _remove_quietly(_file(directory, master_id, segment_id, _PRIMARY))
    return found


def _write_closed_file(directory: str, replica: _Replica, data: memoryview) -> None:
    """Buffered mode: write a closed replica whole (temp name, flush, rename)."""
    _make_master_dir(directory, replica.master_id)
    tmp = replica.path + _TMP
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
    if replica.primary:
        # the marker exists before the replica is visible under its final name
        open(_file(directory, replica.master_id, replica.segment_id, _PRIMARY), "wb").close()
    os.replace(tmp, replica.path)


def _remove_replica_files(directory: str, master_id: int, segment_id: int, fd: int | None) -> None:
    if fd is not None:
        os.close(fd)
    for suffix in (_REPLICA, _OPEN, _PRIMARY, _REPLICA + _TMP):
        _remove_quietly(_file(directory, master_id, segment_id, suffix))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _sync_job(directory: str, items: Sequence[_SyncItem], sync_file: Callable[[int], None]) -> int:
    """Fsync mode, in a worker thread: make every item's bytes (and closes) durable.

    Returns how many files it synced.
    """
    synced = 0
    dirs: set[str] = set()
    for item in items:
        replica = item.replica
        if item.create:
            if _make_master_dir(directory, replica.master_id):
                dirs.add(directory)
            item.fd = os.open(replica.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            if replica.primary:
                open(
                    _file(directory, replica.master_id, replica.segment_id, _PRIMARY), "wb"
                ).close()
            dirs.add(_master_dir(directory, replica.master_id))
        if item.end > item.start:
            assert item.fd is not None and item.view is not None
            _pwrite_all(item.fd, item.view[item.start : item.end], item.start)
    for item in items:
        if item.fd is not None and (item.end > item.start or item.create):
            sync_file(item.fd)
            synced += 1
    for item in items:
        # (a retry after a failed sync may find the rename done)
        if item.close and os.path.exists(item.replica.path):
            replica = item.replica
            os.replace(
                replica.path, _file(directory, replica.master_id, replica.segment_id, _REPLICA)
            )
            dirs.add(_master_dir(directory, replica.master_id))
    for path in sorted(dirs, key=len, reverse=True):
        _fsync_dir(path)
    return synced


class BackupStore:
    """Replicas keyed by (master id, segment id), in memory buffers and files.

    Make one with :func:`open_backup_store`, which also runs the background flusher. All methods
    run on the trio thread; file I/O happens in worker threads, except that nothing in a buffered
    write touches the disk.
    """

    def __init__(
        self,
        config: BackupConfig,
        found: Iterable[_Replica] = (),
        *,
        sync_file: Callable[[int], None] = os.fdatasync,
    ) -> None:
        self._sync_file = sync_file
        self.config = config
        self._replicas: dict[tuple[int, int], _Replica] = {
            (r.master_id, r.segment_id): r for r in found
        }
        self._fsync = config.durability == "fsync"
        self._buffers = 0
        self._spare: list[memoryview] = []  # released buffers, kept for reuse
        self._members: frozenset[int] | None = None
        self._list_version = -1
        self._writes = 0
        self._duplicates = 0
        self._syncs = 0
        self._file_syncs = 0
        self._flushes = 0
        self._flush_errors = 0
        self._rejected_opens = 0
        self._rejected_writes = 0
        # buffered mode: closed replicas waiting for their file
        self._flush_send, self._flush_receive = trio.open_memory_channel[_Replica](math.inf)
        self._flush_pending = 0
        self._flush_progress = trio.Event()
        # fsync mode: group commit
        self._dirty: dict[tuple[int, int], _Replica] = {}
        self._batch = _Batch()
        self._sync_running: trio.Event | None = None

    # -- membership ----------------------------------------------------------------------------
    def set_server_list(self, version: int, up_server_ids: Iterable[int]) -> None:
        """Adopt the cluster's server list; later writes from ids not in it are refused.

        A list older than (or as old as) the one held is ignored. Until the first list arrives
        every master is accepted.
        """
        if version <= self._list_version:
            return
        self._list_version = version
        self._members = frozenset(up_server_ids)

    # -- writes --------------------------------------------------------------------------------
    def write_nowait(
        self,
        master_id: int,
        segment_id: int,
        offset: int,
        data: Buffer,
        *,
        open: bool = False,
        close: bool = False,
        primary: bool = False,
    ) -> None:
        """Buffered mode: apply a write; once this returns the write may be acknowledged.

        Raises ``ServiceError`` with code BACKUP_BAD_SEGMENT_ID (no such open replica),
        BACKUP_OPEN_REJECTED (out of buffers or space), BACKUP_SEGMENT_OVERFLOW (past the
        segment size), BACKUP_MALFORMED_SEGMENT (not at the replica's end, and not a duplicate of
        bytes it holds) or CALLER_NOT_IN_CLUSTER. In fsync mode use :meth:`write`.
        """
        if self._fsync:
            raise RuntimeError("an fsync-mode store acknowledges writes only through write()")
        self._apply(master_id, segment_id, offset, data, open, close, primary)

    async def write(
        self,
        master_id: int,
        segment_id: int,
        offset: int,
        data: Buffer,
        *,
        open: bool = False,
        close: bool = False,
        primary: bool = False,
    ) -> None:
        """Apply a write and return when it may be acknowledged (fsync mode: once on disk).

        Errors as :meth:`write_nowait`; in fsync mode also INTERNAL_ERROR if the sync failed
        (the bytes stay buffered and the next sync retries them). Cancelled while waiting for
        the sync, the write is still applied and becomes durable with the next sync.
        """
        replica = self._apply(master_id, segment_id, offset, data, open, close, primary)
        end = offset + len(data)
        if not self._fsync or self._is_durable(replica, end, close):
            await trio.lowlevel.checkpoint()
            return
        await self._group_commit()

    def append_nowait(self, master_id: int, segment_id: int, offset: int, data: Buffer) -> bool:
        """Buffered mode's common write, cheaply: bytes right at the end of an open replica in
        memory, from a listed master, within the segment. Returns False, changing nothing, for
        anything else (then :meth:`write_nowait` applies it or says what is wrong).

        Every durable write of a master waits for R of these, so this path is kept short.
        """
        replica = self._replicas.get((master_id, segment_id))
        if replica is None or replica.closed or replica.length != offset or self._fsync:
            return False
        buffer = replica.buffer
        members = self._members
        if buffer is None or (members is not None and master_id not in members):
            return False
        end = offset + len(data)
        if end <= offset or end > len(buffer):
            return False
        try:
            buffer[offset:end] = data
        except (TypeError, ValueError):  # not a flat byte buffer: the general path casts it
            return False
        replica.length = end
        self._writes += 1
        return True

    def _reject(self, status: Status, message: str) -> rpcfast.ServiceError:
        self._rejected_writes += 1
        return backup_error(status, message)

    def _apply(
        self,
        master_id: int,
        segment_id: int,
        offset: int,
        data: Buffer,
        open_: bool,
        close: bool,
        primary: bool,
    ) -> _Replica:
        members = self._members
        if members is not None and master_id not in members:
            raise self._reject(
                Status.CALLER_NOT_IN_CLUSTER,
                f"server {master_id:#x} is not in server list version {self._list_version}",
            )
        data = memoryview(data).cast("B")
        end = offset + len(data)
        size = self.config.segment_size
        key = (master_id, segment_id)
        replica = self._replicas.get(key)
        if replica is None:
            if not open_:
                raise self._reject(
                    Status.BACKUP_BAD_SEGMENT_ID,
                    f"segment {segment_id} of master {master_id:#x} is not open here",
                )
            if offset != 0:
                raise self._reject(Status.BACKUP_MALFORMED_SEGMENT, "an open writes at offset 0")
            if end > size:
                raise self._reject(Status.BACKUP_SEGMENT_OVERFLOW, f"{end} > {size} bytes")
            replica = self._open_replica(master_id, segment_id, primary)
        buffer = replica.buffer
        if buffer is None:
            if replica.closed and end <= replica.length:
                self._duplicates += 1  # a retry of a write to a replica already on disk
                self._writes += 1
                return replica
            if replica.closed:
                raise self._reject(
                    Status.BACKUP_MALFORMED_SEGMENT,
                    f"write past the end of closed segment {segment_id} ({replica.length} bytes)",
                )
            raise self._reject(
                Status.BACKUP_BAD_SEGMENT_ID,
                f"segment {segment_id} of master {master_id:#x} was found on disk: read-only",
            )
        if end > size:
            raise self._reject(Status.BACKUP_SEGMENT_OVERFLOW, f"{end} > {size} bytes")
        length = replica.length
        if offset > length:
            raise self._reject(
                Status.BACKUP_MALFORMED_SEGMENT,
                f"write at {offset} leaves a gap after the replica's {length} bytes",
            )
        if offset < length:
            held = min(end, length)
            # bytes compare with memcmp; memoryviews compare element by element
            if buffer[offset:held].tobytes() != data[: held - offset].tobytes():
                raise self._reject(
                    Status.BACKUP_MALFORMED_SEGMENT,
                    f"write at {offset} differs from the bytes held (replica has {length})",
                )
        if end > length:
            if replica.closed:
                raise self._reject(
                    Status.BACKUP_MALFORMED_SEGMENT,
                    f"write past the end of closed segment {segment_id} ({length} bytes)",
                )
            buffer[length:end] = data[length - offset :]
            replica.length = end
        else:
            self._duplicates += 1
        self._writes += 1
        if close:
            replica.closed = True
        if self._fsync:
            if not self._is_durable(replica, end, close):
                self._dirty[key] = replica
        elif replica.closed and not replica.flush_queued:
            self._queue_flush(replica)  # (again, if an earlier flush failed)
        return replica

    def _open_replica(self, master_id: int, segment_id: int, primary: bool) -> _Replica:
        if self._buffers >= self.config.max_buffers:
            self._rejected_opens += 1
            raise self._reject(
                Status.BACKUP_OPEN_REJECTED, f"all {self.config.max_buffers} buffers in use"
            )
        if len(self._replicas) >= self.config.max_segments:
            self._rejected_opens += 1
            raise self._reject(
                Status.BACKUP_OPEN_REJECTED, f"full: {self.config.max_segments} replicas held"
            )
        suffix = _OPEN if self._fsync else _REPLICA
        replica = _Replica(
            master_id=master_id,
            segment_id=segment_id,
            primary=primary,
            closed=False,
            length=0,
            path=_file(self.config.directory, master_id, segment_id, suffix),
            buffer=self._spare.pop() if self._spare else _new_buffer(self.config.segment_size),
        )
        self._replicas[(master_id, segment_id)] = replica
        self._buffers += 1
        return replica

    def _release_buffer(self, replica: _Replica) -> None:
        """Give the replica's buffer back; call only once no worker thread reads it."""
        buffer, replica.buffer = replica.buffer, None
        if buffer is not None:
            self._buffers -= 1
            self._recycle(buffer)

    def _recycle(self, buffer: memoryview) -> None:
        # a recycled buffer has its pages in memory already: no page faults on the write path
        if len(self._spare) + self._buffers < self.config.max_buffers:
            self._spare.append(buffer)

    # -- buffered mode: writing closed replicas to their files --------------------------------
    def _queue_flush(self, replica: _Replica) -> None:
        replica.flush_queued = True
        self._flush_pending += 1
        self._flush_send.send_nowait(replica)

    async def _run_flusher(self) -> None:
        async with self._flush_receive:
            async for replica in self._flush_receive:
                try:
                    if not replica.freed:
                        await self._flush(replica)
                finally:
                    replica.flush_queued = False
                    self._flush_pending -= 1
                    self._flush_progress.set()
                    self._flush_progress = trio.Event()

    async def _flush(self, replica: _Replica) -> None:
        assert replica.buffer is not None
        busy = replica.busy = trio.Event()
        try:
            await trio.to_thread.run_sync(
                _write_closed_file, self.config.directory, replica, replica.buffer[: replica.length]
            )
        except OSError:
            self._flush_errors += 1
            log.exception("writing %s failed; the replica stays in memory", replica.path)
            return
        finally:
            replica.busy = None
            busy.set()
        self._flushes += 1
        if not replica.freed:
            self._release_buffer(replica)

    async def wait_flushed(self) -> None:
        """Wait until every replica closed so far has been written to its file (or failed to)."""
        while self._flush_pending:
            await self._flush_progress.wait()
        await trio.lowlevel.checkpoint()

    # -- fsync mode: group commit --------------------------------------------------------------
    @staticmethod
    def _is_durable(replica: _Replica, end: int, close: bool) -> bool:
        return (
            replica.synced_created
            and end <= replica.synced_length
            and (replica.synced_closed or not close)
        )

    async def _group_commit(self) -> None:
        """Wait for a sync that starts after now: it covers everything written so far."""
        batch = self._batch
        while not batch.done.is_set():
            running = self._sync_running
            if running is None:
                await self._sync()  # lead the sync for the open batch
            else:
                await running.wait()
        if batch.error is not None:
            raise backup_error(
                Status.INTERNAL_ERROR, f"the sync failed: {batch.error}"
            ) from batch.error

    async def _sync(self) -> None:
        batch, self._batch = self._batch, _Batch()
        running = self._sync_running = trio.Event()
        dirty, self._dirty = self._dirty, {}
        items = [
            _SyncItem(
                replica=r,
                create=r.fd is None,
                start=r.synced_length,
                end=r.length,
                view=r.buffer,
                close=r.closed and not r.synced_closed,
                fd=r.fd,
            )
            for r in dirty.values()
            if not r.freed
        ]
        for item in items:
            item.replica.busy = running
        ok = False
        try:
            if items:
                # the job runs to the end even if its leader is cancelled: others wait on it
                with trio.CancelScope(shield=True):
                    self._file_syncs += await trio.to_thread.run_sync(
                        _sync_job, self.config.directory, items, self._sync_file
                    )
                self._syncs += 1
            ok = True
        except OSError as exc:
            batch.error = exc
            log.exception("sync of %d replicas failed", len(items))
        finally:
            if not ok and batch.error is None:
                batch.error = OSError("sync did not finish")
            self._finish_sync(items, ok=ok)
            self._sync_running = None
            batch.done.set()
            running.set()

    def _finish_sync(self, items: Sequence[_SyncItem], *, ok: bool) -> None:
        for item in items:
            replica = item.replica
            replica.busy = None
            replica.fd = item.fd
            if replica.freed:
                continue  # free() closes the file once we are done
            if not ok:
                self._dirty[(replica.master_id, replica.segment_id)] = replica
                continue
            replica.synced_created = True
            replica.synced_length = item.end
            if item.close:
                replica.synced_closed = True
                replica.path = _file(
                    self.config.directory, replica.master_id, replica.segment_id, _REPLICA
                )
                if replica.fd is not None:
                    os.close(replica.fd)
                    replica.fd = None
                self._release_buffer(replica)

    # -- free, list, read ----------------------------------------------------------------------
    async def free(self, master_id: int, segment_id: int) -> None:
        """Drop a replica and delete its files; freeing an unknown replica does nothing."""
        replica = self._replicas.pop((master_id, segment_id), None)
        if replica is None:
            await trio.lowlevel.checkpoint()
            return
        replica.freed = True
        self._dirty.pop((master_id, segment_id), None)
        buffer, replica.buffer = replica.buffer, None
        if buffer is not None:
            self._buffers -= 1  # room for an open at once; the memory once no thread reads it
        busy = replica.busy
        if busy is not None:
            await busy.wait()
        if buffer is not None:
            self._recycle(buffer)
        fd, replica.fd = replica.fd, None
        await trio.to_thread.run_sync(
            _remove_replica_files, self.config.directory, master_id, segment_id, fd
        )

    def list_replicas(self, master_id: int) -> list[ReplicaInfo]:
        """The replicas of ``master_id`` held here, by segment id."""
        return sorted(
            (
                ReplicaInfo(r.segment_id, r.length, r.closed, r.primary)
                for (m, _s), r in self._replicas.items()
                if m == master_id
            ),
            key=lambda info: info.segment_id,
        )

    async def read(self, master_id: int, segment_id: int) -> tuple[bytes, bool]:
        """A replica's bytes and whether it is closed (BACKUP_BAD_SEGMENT_ID if absent)."""
        replica = self._replicas.get((master_id, segment_id))
        if replica is not None and replica.buffer is not None:
            # copy before the checkpoint: the flusher may release the buffer meanwhile
            data, closed = bytes(replica.buffer[: replica.length]), replica.closed
            await trio.lowlevel.checkpoint()
            return data, closed
        if replica is not None:
            closed, length = replica.closed, replica.length
            with contextlib.suppress(FileNotFoundError):  # freed meanwhile
                data = await trio.to_thread.run_sync(_read_file, replica.path)
                return data[:length], closed
        raise backup_error(
            Status.BACKUP_BAD_SEGMENT_ID,
            f"no replica of segment {segment_id} of master {master_id:#x} here",
        )

    def stats(self) -> BackupStats:
        replicas = self._replicas.values()
        return BackupStats(
            open_replicas=sum(not r.closed for r in replicas),
            closed_replicas=sum(r.closed for r in replicas),
            buffers_in_use=self._buffers,
            buffered_bytes=sum(r.length for r in replicas if r.buffer is not None),
            disk_bytes=sum(
                r.length if r.buffer is None else r.synced_length if self._fsync else 0
                for r in replicas
            ),
            writes=self._writes,
            duplicate_writes=self._duplicates,
            syncs=self._syncs,
            file_syncs=self._file_syncs,
            flushes=self._flushes,
            flush_errors=self._flush_errors,
            rejected_opens=self._rejected_opens,
            rejected_writes=self._rejected_writes,
        )

    def _close_files(self) -> None:
        for replica in self._replicas.values():
            if replica.fd is not None:
                os.close(replica.fd)
                replica.fd = None


@contextlib.asynccontextmanager
async def open_backup_store(
    config: BackupConfig, *, sync_file: Callable[[int], None] = os.fdatasync
) -> AsyncIterator[BackupStore]:
    """Open (creating if needed) the data directory and run a store on it.

    The replicas already in the directory are listed. On a normal exit the replicas closed so far
    are written to their files first; on cancellation a file being written is left as ``*.tmp``.
    ``sync_file`` makes a file's data durable (fsync mode; tests pass a gated one).
    """
    found = await trio.to_thread.run_sync(_scan, config.directory)
    store = BackupStore(config, found, sync_file=sync_file)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run_flusher)
            try:
                yield store
                await store.wait_flushed()
            finally:
                store._flush_send.close()
    finally:
        store._close_files()


# -- the RPC service ---------------------------------------------------------------------------
_WRITE_SEGMENT = DirectStruct(
    cluster_capnp.Backup.schema.methods["writeSegment"].param_type,
    ("masterId", "segmentId", "offset", "data", "open", "close", "primary"),
)
_GENERIC_WRITE_PARAMS = interface_spec(cluster_capnp.Backup).by_name["writeSegment"].params


def _decode_write(body: memoryview) -> Any:
    """``writeSegment``'s params as ``(masterId, segmentId, offset, data, open, close,
    primary)`` when in the layout masters send (data a view of the receive buffer), else the
    generic body."""
    fields = _WRITE_SEGMENT.read(body)
    if fields is not None:
        return fields
    return _GENERIC_WRITE_PARAMS.decode(body)


class _BackupHandlers(rpcfast.Service):
    """The handlers that do not depend on the durability mode."""

    def __init__(self, store: BackupStore) -> None:
        self.store = store

    async def freeSegment(self, request: rpcfast.Body) -> None:
        await self.store.free(request.masterId, request.segmentId)

    @rpcfast.fast
    def listReplicas(self, request: rpcfast.Body) -> dict[str, Any]:
        return {
            "replicas": [
                {
                    "segmentId": r.segment_id,
                    "length": r.length,
                    "closed": r.closed,
                    "primary": r.primary,
                }
                for r in self.store.list_replicas(request.masterId)
            ]
        }

    async def getReplica(self, request: rpcfast.Body) -> dict[str, Any]:
        data, closed = await self.store.read(request.masterId, request.segmentId)
        return {"data": data, "closed": closed}


class BackupService(_BackupHandlers, interface=cluster_capnp.Backup):
    """The backup service over a buffered store: ``writeSegment`` runs inline (no I/O, no task).

    This is the durable-write latency path: a master waits for R backups' acks on every write.
    Use :func:`backup_service` to get the right class for a store.
    """

    def __init__(self, store: BackupStore) -> None:
        if store.config.durability != "buffered":
            raise ValueError("an fsync store needs FsyncBackupService")
        super().__init__(store)

    @rpcfast.fast
    @rpcfast.decode_with(_decode_write)
    def writeSegment(self, request: Any) -> None:
        store = self.store
        if request.__class__ is tuple:  # in place (_decode_write)
            master_id, segment_id, offset, data, opening, closing, primary = request
        else:
            master_id, segment_id, offset = request.masterId, request.segmentId, request.offset
            data, opening, closing = request.data, request.open, request.close
            primary = request.primary
        if not opening and not closing and store.append_nowait(master_id, segment_id, offset, data):
            return
        store.write_nowait(
            master_id,
            segment_id,
            offset,
            data,
            open=opening,
            close=closing,
            primary=primary,
        )


class FsyncBackupService(_BackupHandlers, interface=cluster_capnp.Backup):
    """The backup service over an fsync store: ``writeSegment`` answers after group commit."""

    async def writeSegment(self, request: rpcfast.Body) -> None:
        await self.store.write(
            request.masterId,
            request.segmentId,
            request.offset,
            request.data,
            open=request.open,
            close=request.close,
            primary=request.primary,
        )


def backup_service(store: BackupStore) -> BackupService | FsyncBackupService:
    """The service class that fits the store's durability mode."""
    if store.config.durability == "fsync":
        return FsyncBackupService(store)
    return BackupService(store)


# -- a backup process: ``python -m services.kvstore._backup --dir DIR [ADDRESS...]`` ---------------
async def _serve_main(config: BackupConfig, addresses: Sequence[str]) -> None:
    async with open_backup_store(config) as store:
        async with rpcfast.serve([backup_service(store)], addresses) as server:
            print(" ".join(server.addresses), flush=True)
            # serve until our parent closes stdin (or kills us)
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a backup on the given addresses; print them on one line once bound."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", required=True, help="data directory")
    parser.add_argument("--durability", choices=("buffered", "fsync"), default="buffered")
    parser.add_argument("--segment-size", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-buffers", type=int, default=64)
    parser.add_argument("--max-segments", type=int, default=4096)
    parser.add_argument("addresses", nargs="*", default=["udp://127.0.0.1:0"])
    args = parser.parse_args(argv)
    config = BackupConfig(
        directory=args.dir,
        durability=args.durability,
        segment_size=args.segment_size,
        max_buffers=args.max_buffers,
        max_segments=args.max_segments,
    )
    trio.run(_serve_main, config, args.addresses)


if __name__ == "__main__":
    main()
