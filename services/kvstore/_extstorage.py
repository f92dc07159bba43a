"""Where the coordinator keeps its state: a snapshot plus the records applied since.

The coordinator turns every mutation into a small JSON-able record, stores it here, and only then
applies it and replies; a restarted coordinator loads the snapshot, replays the records and carries
on. Now and then it replaces the whole history with one snapshot (``compact``).

Two implementations of :class:`ExternalStorage`:

* :class:`EmbeddedStorage` (the default): one append-only file in a data directory. Why a file of
  our own instead of sqlite3: a mutation costs exactly one ``write`` and one ``fdatasync`` (sqlite's
  rollback journal costs two to three syncs per transaction), the format is a few lines that tests
  can corrupt at will, and the reader's rule is explicit: each record is
  ``[u32 length][u32 crc32c][payload]``; a bad or short record with nothing but zeros or end of file
  after it is a torn tail (the write that was in flight at a crash, never acknowledged) and is cut
  off; a bad record followed by data is corruption and refuses to load. Compaction writes a new file
  that starts with the snapshot and renames it over the old one, so a crash leaves either history.
  An exclusive ``flock`` on the directory makes a second coordinator on the same directory wait.
* :class:`ZooKeeperStorage` (kazoo): the snapshot and the records live under a znode tree, and
  coordinators elect a leader with ephemeral sequential znodes; every write is a ZooKeeper
  transaction that also checks the leader's own election znode, so a coordinator whose session
  expired (and whose successor may already be active) cannot write anything (fencing).

All methods block (file or network I/O): the coordinator calls them from a worker thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import time
import zlib
from typing import Any, Protocol

import attrs
import crc32c
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NodeExistsError, RolledBackError
from kazoo.handlers.threading import KazooTimeoutError

JsonDict = dict[str, Any]


class StorageError(Exception):
    """The external storage cannot be used: I/O failure, corrupt history, lost connection."""


class LeadershipLost(StorageError):
    """This coordinator is no longer the leader (another one may be active): it must stop."""


@attrs.frozen
class Loaded:
    """What :meth:`ExternalStorage.load` found: the last snapshot (if any) and the later records."""

    snapshot: JsonDict | None
    records: list[JsonDict]


class ExternalStorage(Protocol):
    """Durable, leader-exclusive storage of the coordinator's history."""

    @property
    def is_leader(self) -> bool:
        """Whether this coordinator still holds leadership (cheap; no I/O)."""
        ...

    def acquire(self, timeout: float) -> bool:
        """Try to become the leader for up to ``timeout`` seconds; True once leader."""
        ...

    def advertise(self, address: str) -> None:
        """Publish the address clients and servers should use to reach the leader."""
        ...

    def load(self) -> Loaded:
        """The snapshot and the records after it, in order. Leader only."""
        ...

    def append(self, record: JsonDict) -> None:
        """Store one record durably before returning. Leader only."""
        ...

    def compact(self, snapshot: JsonDict) -> None:
        """Replace the whole history with ``snapshot``. Leader only."""
        ...

    def close(self) -> None:
        """Release leadership and every resource; the object is unusable afterwards."""
        ...


# -- embedded: one append-only file -------------------------------------------------------------

MAGIC = b"RKVCLOG1"
_HEAD = struct.Struct("<II")  # payload length, crc32c(payload)
_KIND_SNAPSHOT = 1
_KIND_RECORD = 2
MAX_RECORD = 256 << 20
LOG_NAME = "coordinator.log"
LOCK_NAME = "coordinator.lock"
ADDRESS_NAME = "coordinator.address"


def encode_entry(kind: int, body: JsonDict) -> bytes:
    """One framed entry of the embedded log (exposed for tests that forge files)."""
    payload = bytes([kind]) + json.dumps(body, separators=(",", ":")).encode()
    return _HEAD.pack(len(payload), crc32c.crc32c(payload)) + payload


def _all_zero(data: bytes | memoryview) -> bool:
    return not any(data)


def scan_log(data: bytes) -> tuple[Loaded, int]:
    """Parse a whole embedded log; return its content and where the good part ends.

    Raises :class:`StorageError` for a file that is not ours or is corrupt before its tail.
    """
    if len(data) < len(MAGIC):
        if MAGIC.startswith(data) or _all_zero(data):
            return Loaded(None, []), 0  # creation was torn: start over
        raise StorageError("not a coordinator log (bad magic)")
    if data[: len(MAGIC)] != MAGIC:
        raise StorageError("not a coordinator log (bad magic)")
    snapshot: JsonDict | None = None
    records: list[JsonDict] = []
    offset = len(MAGIC)
    size = len(data)
    view = memoryview(data)
    while offset < size:
        if _all_zero(view[offset:]) or size - offset < _HEAD.size:
            break  # torn tail
        length, crc = _HEAD.unpack_from(data, offset)
        end = offset + _HEAD.size + length
        if end > size:
            break  # the last write did not finish
        payload = view[offset + _HEAD.size : end]
        if not 0 < length <= MAX_RECORD or crc32c.crc32c(payload) != crc:
            if _all_zero(view[end:]):
                break  # torn tail whose length made it to disk
            raise StorageError(f"corrupt coordinator log record at offset {offset}")
        kind = payload[0]
        try:
            body = json.loads(bytes(payload[1:]))
        except ValueError as exc:
            raise StorageError(f"undecodable record at offset {offset}") from exc
        if kind == _KIND_SNAPSHOT and offset == len(MAGIC):
            snapshot = body
        elif kind == _KIND_RECORD:
            records.append(body)
        else:
            raise StorageError(f"unexpected entry kind {kind} at offset {offset}")
        offset = end
    return Loaded(snapshot, records), offset


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class EmbeddedStorage:
    """The coordinator's history in ``data_dir/coordinator.log``, fsynced per record."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = os.fspath(data_dir)
        self.path = os.path.join(self.data_dir, LOG_NAME)
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._broken: str | None = None
        self._closed = False

    @property
    def is_leader(self) -> bool:
        return self._lock_fd is not None and self._broken is None

    def acquire(self, timeout: float) -> bool:
        if self._closed:
            raise StorageError("storage is closed")
        if self._lock_fd is not None:
            return True
        os.makedirs(self.data_dir, exist_ok=True)
        fd = os.open(os.path.join(self.data_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
                continue
            self._lock_fd = fd
            return True

    def advertise(self, address: str) -> None:
        self._check()
        tmp = os.path.join(self.data_dir, ADDRESS_NAME + ".tmp")
        with open(tmp, "w") as f:
            f.write(address + "\n")
        os.replace(tmp, os.path.join(self.data_dir, ADDRESS_NAME))

    def leader_address(self) -> str | None:
        """The address last advertised in this directory (it may belong to a dead coordinator)."""
        try:
            with open(os.path.join(self.data_dir, ADDRESS_NAME)) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def load(self) -> Loaded:
        self._check()
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        loaded, good_end = scan_log(data)
        try:
            if good_end < len(MAGIC):
                self._rewrite(MAGIC)
            else:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                if good_end < len(data):  # cut the torn tail so appends follow good records
                    os.ftruncate(fd, good_end)
                    os.fsync(fd)
                self._set_fd(fd)
        except OSError as exc:
            raise StorageError(f"cannot open {self.path}: {exc}") from exc
        return loaded

    def append(self, record: JsonDict) -> None:
        self._check()
        if self._fd is None:
            raise StorageError("load() must come before append()")
        entry = encode_entry(_KIND_RECORD, record)
        try:
            _write_all(self._fd, entry)
            os.fdatasync(self._fd)
        except OSError as exc:
            # a partial record may be on disk now: refuse further appends, a restart cuts it off
            self._broken = f"append failed: {exc}"
            raise StorageError(self._broken) from exc

    def compact(self, snapshot: JsonDict) -> None:
        self._check()
        try:
            self._rewrite(MAGIC + encode_entry(_KIND_SNAPSHOT, snapshot))
        except OSError as exc:
            self._broken = f"compaction failed: {exc}"
            raise StorageError(self._broken) from exc

    def close(self) -> None:
        self._closed = True
        self._set_fd(None)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _check(self) -> None:
        if self._broken is not None:
            raise StorageError(self._broken)
        if self._lock_fd is None:
            raise LeadershipLost("this coordinator does not hold the data directory")

    def _rewrite(self, content: bytes) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.data_dir)
        self._set_fd(os.open(self.path, os.O_WRONLY | os.O_APPEND))

    def _set_fd(self, fd: int | None) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd


# -- ZooKeeper ---------------------------------------------------------------------------------

# ZooKeeper refuses requests over jute.maxbuffer (1 MiB by default); stay clearly below it.
MAX_ZNODE_DATA = 900_000


class ZooKeeperStorage:
    """The coordinator's history under ``root_path`` in ZooKeeper, with leader election.

    Layout: ``election/n_<seq>`` (ephemeral, data = advertised address; the lowest is the leader),
    ``snapshot`` (zlib-compressed JSON, empty if none), ``log/r_<seq>`` (one record each).
    A coordinator whose session is lost stays deposed: make a new storage object (new process).
    """

    def __init__(
        self,
        hosts: str,
        root_path: str = "/rpcfast/main",
        *,
        session_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.hosts = hosts
        self.root = root_path.rstrip("/") or "/rpcfast"
        self.session_timeout = session_timeout
        self.connect_timeout = connect_timeout
        self._client: Any = None
        self._node: str | None = None
        self._leader = False
        self._lost = False
        self._closed = False
        self._wake = threading.Event()

    # paths
    @property
    def _election(self) -> str:
        return f"{self.root}/election"

    @property
    def _log(self) -> str:
        return f"{self.root}/log"

    @property
    def _snapshot(self) -> str:
        return f"{self.root}/snapshot"

    @property
    def is_leader(self) -> bool:
        return self._leader and not self._lost

    @property
    def client_id(self) -> tuple[int, bytes] | None:
        """The ZooKeeper session (id, password) of this coordinator, once connected."""
        if self._client is None:
            return None
        session: tuple[int, bytes] | None = self._client.client_id
        return session

    def _connect(self) -> Any:
        if self._closed:
            raise StorageError("storage is closed")
        if self._client is None:
            client = KazooClient(hosts=self.hosts, timeout=self.session_timeout)
            client.add_listener(self._on_state)
            try:
                client.start(timeout=self.connect_timeout)
            except KazooTimeoutError as exc:
                client.close()
                raise StorageError(f"cannot reach ZooKeeper at {self.hosts}") from exc
            self._client = client
        return self._client

    def _on_state(self, state: str) -> None:
        # called on kazoo's thread: set flags only
        if state == KazooState.LOST:
            self._lost = True
            self._wake.set()

    def _on_predecessor(self, event: object) -> None:
        self._wake.set()

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            client = self._connect()
            if self._node is None:
                for path in (self._election, self._log):
                    client.ensure_path(path)
                try:
                    client.create(self._snapshot, b"")
                except NodeExistsError:
                    pass
                self._node = client.create(
                    f"{self._election}/n_", b"", ephemeral=True, sequence=True
                )
            mine = self._node.rsplit("/", 1)[1]
            while True:
                if self._lost:
                    raise LeadershipLost("ZooKeeper session expired")
                self._wake.clear()
                children = sorted(client.get_children(self._election))
                if mine not in children:
                    raise LeadershipLost("our election znode is gone")
                position = children.index(mine)
                if position == 0:
                    self._leader = True
                    return True
                predecessor = f"{self._election}/{children[position - 1]}"
                if client.exists(predecessor, watch=self._on_predecessor) is None:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._wake.wait(remaining):
                    return False
        except KazooException as exc:
            raise StorageError(f"ZooKeeper election failed: {exc!r}") from exc

    def advertise(self, address: str) -> None:
        client = self._leader_client()
        try:
            client.set(self._node, address.encode())
        except KazooException as exc:
            raise StorageError(f"cannot advertise: {exc!r}") from exc

    def leader_address(self) -> str | None:
        """The address advertised by the current leader (None if none advertised yet)."""
        client = self._connect()
        try:
            for child in sorted(client.get_children(self._election)):
                data, _stat = client.get(f"{self._election}/{child}")
                return bytes(data).decode() or None
        except KazooException as exc:
            raise StorageError(f"cannot read the leader: {exc!r}") from exc
        return None

    def load(self) -> Loaded:
        client = self._leader_client()
        try:
            raw, _stat = client.get(self._snapshot)
            names = sorted(client.get_children(self._log))
            pending = [client.get_async(f"{self._log}/{name}") for name in names]
            records = [json.loads(result.get()[0]) for result in pending]
        except KazooException as exc:
            raise StorageError(f"cannot load from ZooKeeper: {exc!r}") from exc
        snapshot = json.loads(zlib.decompress(raw)) if raw else None
        return Loaded(snapshot, records)

    def append(self, record: JsonDict) -> None:
        client = self._leader_client()
        data = json.dumps(record, separators=(",", ":")).encode()
        self._commit(client, [("create", f"{self._log}/r_", data)])

    def compact(self, snapshot: JsonDict) -> None:
        client = self._leader_client()
        data = zlib.compress(json.dumps(snapshot, separators=(",", ":")).encode())
        if len(data) > MAX_ZNODE_DATA:
            raise StorageError(f"snapshot of {len(data)} bytes is too large for one znode")
        try:
            names = client.get_children(self._log)
        except KazooException as exc:
            raise StorageError(f"cannot list the log: {exc!r}") from exc
        ops: list[tuple[str, str, bytes]] = [("set", self._snapshot, data)]
        ops.extend(("delete", f"{self._log}/{name}", b"") for name in names)
        self._commit(client, ops)

    def close(self) -> None:
        self._closed = True
        self._leader = False
        client, self._client = self._client, None
        if client is not None:
            try:
                client.stop()  # closes the session: our election znode goes, a standby takes over
            finally:
                client.close()

    def _leader_client(self) -> Any:
        if not self.is_leader or self._client is None or self._node is None:
            raise LeadershipLost("this coordinator is not the leader")
        return self._client

    def _commit(self, client: Any, ops: list[tuple[str, str, bytes]]) -> None:
        """Run ``ops`` in one transaction that fails unless our election znode still exists."""
        assert self._node is not None
        transaction = client.transaction()
        transaction.check(self._node, -1)
        for op, path, data in ops:
            if op == "create":
                transaction.create(path, data, sequence=True)
            elif op == "set":
                transaction.set_data(path, data)
            else:
                transaction.delete(path)
        try:
            results = transaction.commit()
        except KazooException as exc:
            raise StorageError(f"ZooKeeper write failed: {exc!r}") from exc
        if (
            results
            and isinstance(results[0], Exception)
            and not isinstance(results[0], RolledBackError)
        ):
            self._leader = False
            raise LeadershipLost(f"fenced off: {results[0]!r}")
        for result in results:
            if isinstance(result, Exception):
                raise StorageError(f"ZooKeeper write failed: {result!r}")
