"""KvClient: the user-facing async client of the key-value store.

    async with await KvClient.open(coordinator="udp://127.0.0.1:4100") as kv:  # a cluster
    async with await KvClient.open(master="udp://127.0.0.1:4101") as kv:  # a standalone master
        table = await kv.create_table("users")
        version = await kv.write(table, b"alice", b"...")
        value, version = await kv.read(table, b"alice")

Errors are the store's typed exceptions (``ObjectDoesntExist``, ``WrongVersion``, ...). The client
masks what a user should not see: a stale tablet map (``UnknownTablet``: refetch and retry), a full
master (``Retry``: back off as the server asks and retry), a tablet being recovered. Every retry
loop is bounded by the client's ``timeout``.
"""

from __future__ import annotations

import bisect
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from itertools import chain
from types import TracebackType
from typing import Any, TypeVar

import attrs
import numpy as np
import trio

import rpcfast
from rpcfast._client import Decoder, Encoder
from rpcfast._schema import interface_spec
from rpcfast._types import Buffer
from services.kvstore._direct import DirectStruct, VersionList
from services.kvstore._objects import MAX_HASH, RejectRules, key_hash
from services.kvstore.errors import (
    KvError,
    Retry,
    Status,
    TableDoesntExist,
    UnknownTablet,
    error_for_status,
)

kv_capnp: Any = rpcfast.load_schema("kvstore.capnp")
cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

T = TypeVar("T")
_RETRYABLE = (Status.UNKNOWN_TABLET, Status.RETRY, Status.TABLET_DOESNT_EXIST)


def _kv_error(exc: rpcfast.RemoteError) -> Exception:
    if exc.status is rpcfast.Status.APPLICATION_ERROR:
        return error_for_status(exc.code, exc.message)
    return exc


def _retryable(exc: rpcfast.RemoteError) -> KvError:
    """The store's error for ``exc`` when the client retries it; raises it otherwise."""
    error = _kv_error(exc)
    if not isinstance(error, KvError) or error.status not in _RETRYABLE:
        raise error from None
    return error


def _rules(rules: RejectRules | None) -> dict[str, Any]:
    if rules is None:
        return {}
    return {
        "hasRules": True,
        "rejectRules": {
            "givenVersion": rules.given_version,
            "doesntExist": rules.doesnt_exist,
            "exists": rules.exists,
            "versionLeGiven": rules.version_le_given,
            "versionNeGiven": rules.version_ne_given,
        },
    }


def _item_layout() -> tuple[int, int, int, int]:
    """Words per ``Item`` struct, and the words of its tableId, key and value slots."""
    schema = kv_capnp.Item.schema
    node = schema.node.struct
    slots = {f.proto.name: f.proto.slot.offset for f in schema.fields_list}
    data = node.dataWordCount
    return data + node.pointerCount, slots["tableId"], data + slots["key"], data + slots["value"]


_ITEM_WORDS, _ITEM_TABLE, _ITEM_KEY, _ITEM_VALUE = _item_layout()
_ITEMS_ROOT = 1 << 48  # the params struct: offset 0, no data, one pointer (items)
_ITEM_TAG_HIGH = (
    kv_capnp.Item.schema.node.struct.dataWordCount
    | kv_capnp.Item.schema.node.struct.pointerCount << 16
) << 32
_PAD = [b"", *(bytes(8 - r) for r in range(1, 8))]
_PADS = np.array(_PAD, dtype=object)  # indexed by length & 7: one numpy call for all items
_INT = {int}
_BYTES = {bytes}
_BIG = 4096  # values this long go through rpcfast's encoder, which sends them without a copy


_READ_PARAMS = DirectStruct(kv_capnp.Master.schema.methods["read"].param_type, ["tableId", "key"])
_READ_RESULTS = DirectStruct(
    kv_capnp.Master.schema.methods["read"].result_type, ["version", "value"]
)


def _encode_read(params: tuple[Any, Any]) -> list[Buffer]:
    """``Master.read``'s params (table id, key) built in place (the generic encoder's bytes,
    tests/services/kvstore/test_client.py checks); anything unusual goes through it."""
    table_id, key = params
    if table_id.__class__ is int and 0 <= table_id < 1 << 64:
        if key.__class__ is not bytes and isinstance(key, bytearray | memoryview):
            key = bytes(key)
        if key.__class__ is bytes:
            return [_READ_PARAMS.encode(table_id, key)]
    return _READ.params.encode_parts({"tableId": table_id, "key": key})  # (and its errors)


def _decode_read(body: memoryview) -> tuple[bytes, int]:
    """``Master.read``'s results as ``(value, version)``: read in place when the message has
    the layout every master sends, else through the generic decoder."""
    fields = _READ_RESULTS.read(body)
    if fields is not None:
        return fields[1].tobytes(), fields[0]
    reply = _READ.results.decode(body)
    assert reply is not None
    return bytes(reply.value), int(reply.version)


_READ = interface_spec(kv_capnp.Master).by_name["read"]
_WRITE = interface_spec(kv_capnp.Master).by_name["write"]
_WRITE_PARAMS = DirectStruct(
    kv_capnp.Master.schema.methods["write"].param_type, ["tableId", "key", "value"]
)
_VERSION_RESULTS = DirectStruct(kv_capnp.Master.schema.methods["write"].result_type, ["version"])


def _encode_write(params: tuple[Any, Any, Any]) -> list[Buffer]:
    """``Master.write``'s params (table id, key, value) built in place (the generic encoder's
    bytes); big values, which the generic encoder sends without a copy, and anything unusual
    go through it."""
    table_id, key, value = params
    if (
        table_id.__class__ is int
        and 0 <= table_id < 1 << 64
        and key.__class__ is bytes
        and value.__class__ is bytes
        and len(value) < _BIG
    ):
        return [_WRITE_PARAMS.encode(table_id, key, value)]
    return _WRITE.params.encode_parts({"tableId": table_id, "key": key, "value": value})


def _decode_version(body: memoryview) -> int:
    """A ``(version :UInt64)`` result (write, remove) as the version."""
    fields = _VERSION_RESULTS.read(body)
    if fields is not None:
        version: int = fields[0]
        return version
    reply = _WRITE.results.decode(body)
    assert reply is not None
    return int(reply.version)


_MULTI_WRITE = interface_spec(kv_capnp.Master).by_name["multiWrite"]
_VERSION_LIST = VersionList(kv_capnp.Outcome.schema, "version")


def _decode_outcomes(body: memoryview) -> Any:
    """A multi-op's outcomes: ``(versions,)`` when every item succeeded with a version (read in
    place: the master's layout for that case), else the generic results (``.outcomes``)."""
    versions = _VERSION_LIST.read(body)
    if versions is not None:
        return (versions,)
    return _MULTI_WRITE.results.decode(body)


_FAST_CODECS: dict[str, tuple[Encoder | None, Decoder | None]] = {
    "read": (_encode_read, _decode_read),
    "write": (_encode_write, _decode_version),
    # (their params encoders stay generic: _params hands them a ready builder or dicts)
    "multiWrite": (None, _decode_outcomes),
    "multiRemove": (None, _decode_outcomes),
}


class _Segment:
    """An encoded message body: rpcfast takes it as a params builder (``to_segments``)."""

    __slots__ = ("segment",)

    def __init__(self, segment: bytes) -> None:
        self.segment = segment

    def to_segments(self) -> list[bytes]:
        return [self.segment]


def _encode_items(items: Sequence[tuple[Any, ...]], values: bool) -> _Segment | None:
    """The params of a multi-op (``items :List(Item)``) of ``(table, key)`` or
    ``(table, key, value)`` tuples as one Cap'n Proto segment, or None for a batch this does
    not take (not bytes, a big value, a table id out of range): the caller sends dicts then.

    rpcfast's generic encoder checks and fills every ``Item`` field from a dict (~14,000
    instructions an item, with the dict built for it; ~6,000 here). Here the per-item work is
    C loops (transpose, type checks, lengths), numpy operations on whole columns lay out the
    struct words, and one join appends the keys and values with their padding."""
    n = len(items)
    if not n:
        return None
    columns = list(zip(*items, strict=True))
    tables, keys = columns[0], columns[1]
    if set(map(type, tables)) != _INT or set(map(type, keys)) != _BYTES:
        return None
    key_len = np.fromiter(map(len, keys), np.int64, n)
    key_words = (key_len + 7) >> 3
    if values:
        datas = columns[2]
        if set(map(type, datas)) != _BYTES:
            return None
        value_len = np.fromiter(map(len, datas), np.int64, n)
        if int(value_len.max()) >= _BIG:
            return None
        sizes = key_words + ((value_len + 7) >> 3)
    else:
        sizes = key_words
    head = 3 + n * _ITEM_WORDS  # root, list pointer, tag word, then the structs (in words)
    key_at = np.cumsum(sizes) - sizes + head  # each item's key, its value right after
    words = np.zeros(head, np.uint64)
    words[0] = _ITEMS_ROOT
    words[1] = (n * _ITEM_WORDS << 3 | 7) << 32 | 1  # a composite list right after it
    words[2] = _ITEM_TAG_HIGH | n << 2  # its tag word: element count and struct size
    structs = words[3:].reshape(n, _ITEM_WORDS)
    try:
        structs[:, _ITEM_TABLE] = np.array(tables, np.uint64)
    except OverflowError:  # a table id that is no 64-bit unsigned int
        return None
    slot = np.arange(3 + _ITEM_KEY, head, _ITEM_WORDS, dtype=np.int64)
    structs[:, _ITEM_KEY] = (key_len << 3 | 2) << 32 | (key_at - slot - 1) << 2 | 1
    pads = _PADS[key_len & 7].tolist()
    if values:
        slot += _ITEM_VALUE - _ITEM_KEY
        value_at = key_at + key_words
        structs[:, _ITEM_VALUE] = (value_len << 3 | 2) << 32 | (value_at - slot - 1) << 2 | 1
        value_pads = _PADS[value_len & 7].tolist()
        data = chain.from_iterable(zip(keys, pads, datas, value_pads, strict=True))
    else:
        data = chain.from_iterable(zip(keys, pads, strict=True))
    if sys.byteorder != "little":
        words.byteswap(inplace=True)
    return _Segment(words.tobytes() + b"".join(data))


_KEYS = ("tableId", "key")
_VALUES = ("tableId", "key", "value")
_DELTAS = ("tableId", "key", "delta")


def _params(batch: Sequence[tuple[Any, ...]], fields: tuple[str, ...]) -> Any:
    """A multi-op's params: encoded here when the batch is plain bytes, else as dicts."""
    if fields is not _DELTAS:
        encoded = _encode_items(batch, fields is _VALUES)
        if encoded is not None:
            return encoded
    return {"items": [dict(zip(fields, item, strict=True)) for item in batch]}


def _version(outcome: Any) -> int:
    return int(outcome.version)


@attrs.frozen
class TabletLocation:
    table_id: int
    start_hash: int
    end_hash: int
    address: str


class _Directory:
    """Where tables live: one master (standalone) or the coordinator's tablet map."""

    async def create_table(self, name: str, server_span: int) -> int:
        raise NotImplementedError

    async def get_table_id(self, name: str) -> int:
        raise NotImplementedError

    async def drop_table(self, name: str) -> None:
        raise NotImplementedError

    async def tablets(self, table_id: int, refresh: bool = False) -> list[TabletLocation]:
        raise NotImplementedError


class _Standalone(_Directory):
    def __init__(self, client: KvClient, address: str) -> None:
        self.client = client
        self.address = address

    async def create_table(self, name: str, server_span: int) -> int:
        reply = await self.client._master(self.address).createTable(
            name=name, serverSpan=server_span
        )
        return int(reply.tableId)

    async def get_table_id(self, name: str) -> int:
        return int((await self.client._master(self.address).getTableId(name=name)).tableId)

    async def drop_table(self, name: str) -> None:
        await self.client._master(self.address).dropTable(name=name)

    async def tablets(self, table_id: int, refresh: bool = False) -> list[TabletLocation]:
        return [TabletLocation(table_id, 0, MAX_HASH, self.address)]


class _Coordinated(_Directory):
    """Caches the coordinator's tablet map per table; refetched when a master disowns a key."""

    def __init__(self, client: KvClient, address: str) -> None:
        self.client = client
        self.conn = client._connection(address)
        self.stub = self.conn.stub(cluster_capnp.Coordinator)
        self._maps: dict[int, list[TabletLocation]] = {}

    async def create_table(self, name: str, server_span: int) -> int:
        return int((await self.stub.createTable(name=name, serverSpan=server_span)).tableId)

    async def get_table_id(self, name: str) -> int:
        return int((await self.stub.getTableId(name=name)).tableId)

    async def drop_table(self, name: str) -> None:
        table_id = await self.get_table_id(name)
        await self.stub.dropTable(name=name)
        self._maps.pop(table_id, None)

    async def tablets(self, table_id: int, refresh: bool = False) -> list[TabletLocation]:
        cached = self._maps.get(table_id)
        if cached is not None and not refresh:
            return cached
        reply = await self.stub.getTabletMap(tableId=table_id)
        tablets = sorted(
            (
                TabletLocation(t.tableId, t.startHash, t.endHash, t.address)
                for t in reply.tablets
                if t.tableId == table_id and t.status == 0
            ),
            key=lambda t: t.start_hash,
        )
        if not tablets and not any(t.tableId == table_id for t in reply.tablets):
            raise TableDoesntExist(f"table {table_id} does not exist")
        self._maps[table_id] = tablets
        return tablets


class KvClient:
    """An async client of one store (cluster or standalone master). Not shared across trio runs."""

    def __init__(self, *, timeout: float = 5.0, rpc_timeout: float = 1.0) -> None:
        self.timeout = timeout
        self.rpc_timeout = rpc_timeout
        self._connections: dict[str, rpcfast.Connection] = {}
        self._stubs: dict[str, rpcfast.Stub] = {}
        self._fast_stubs: dict[str, rpcfast.Stub] = {}
        self._directory: _Directory | None = None
        self._routes: dict[int, tuple[list[int], list[TabletLocation]]] = {}
        # The master's stub of each table one tablet serves whole: the single-object fast path.
        self._whole: dict[int, rpcfast.Stub] = {}
        self.retries = 0

    @classmethod
    async def open(
        cls,
        *,
        coordinator: str | None = None,
        master: str | None = None,
        timeout: float = 5.0,
        rpc_timeout: float = 1.0,
    ) -> KvClient:
        if (coordinator is None) == (master is None):
            raise ValueError("give exactly one of coordinator= or master=")
        client = cls(timeout=timeout, rpc_timeout=rpc_timeout)
        if coordinator is not None:
            client._directory = _Coordinated(client, coordinator)
        else:
            assert master is not None
            client._directory = _Standalone(client, master)
        await trio.lowlevel.checkpoint()
        return client

    async def __aenter__(self) -> KvClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
        self._stubs.clear()
        self._fast_stubs.clear()
        self._whole.clear()
        await trio.lowlevel.checkpoint()

    # -- plumbing ---------------------------------------------------------------------------------
    def _connection(self, address: str) -> rpcfast.Connection:
        conn = self._connections.get(address)
        if conn is None:
            conn = rpcfast.connect(address, timeout=self.rpc_timeout)
            self._connections[address] = conn
        return conn

    def _master(self, address: str) -> rpcfast.Stub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._connection(address).stub(kv_capnp.Master)
            self._stubs[address] = stub
        return stub

    def _fast_master(self, address: str) -> rpcfast.Stub:
        """A stub whose ``read((table_id, key))`` returns ``(value, version)`` and whose
        ``write((table_id, key, value))`` returns the version, through hand-written codecs
        (the single-object fast path's)."""
        stub = self._fast_stubs.get(address)
        if stub is None:
            stub = self._connection(address).stub(kv_capnp.Master, codecs=_FAST_CODECS)
            self._fast_stubs[address] = stub
        return stub

    @property
    def directory(self) -> _Directory:
        assert self._directory is not None, "use KvClient.open()"
        return self._directory

    async def _locate(self, table_id: int, h: int, refresh: bool = False) -> str:
        if not refresh:
            address = self._route_cached(table_id, h)
            if address is not None:
                return address
        tablets = await self.directory.tablets(table_id, refresh)
        self._routes[table_id] = ([t.start_hash for t in tablets], tablets)
        owner = self._whole_table_owner(table_id)
        if owner is None:
            self._whole.pop(table_id, None)
        else:
            self._whole[table_id] = self._fast_master(owner)
        address = self._route_cached(table_id, h)
        if address is not None:
            return address
        if not refresh:
            return await self._locate(table_id, h, refresh=True)
        raise UnknownTablet(f"no tablet of table {table_id} covers hash {h:#x} (recovering?)")

    def _route_cached(self, table_id: int, h: int) -> str | None:
        """The owner of ``h`` from the cached map, without a task switch (the common case)."""
        route = self._routes.get(table_id)
        if route is None:
            return None
        starts, tablets = route
        i = bisect.bisect_right(starts, h) - 1
        if i >= 0 and h <= tablets[i].end_hash:
            return tablets[i].address
        return None

    async def _with_retries(
        self,
        table_id: int,
        key: bytes,
        op: Callable[[rpcfast.Stub], Awaitable[T]],
        retry: KvError | None = None,
    ) -> T:
        """``op`` on the key's master, retried (bounded by the client's timeout) while the
        tablet map is stale, the master is full or down. ``retry``: the first try failed so."""
        h = key_hash(table_id, key)
        deadline: float | None = None
        refresh = retry is not None
        address = None if refresh else self._route_cached(table_id, h)
        if retry is not None:
            deadline = trio.current_time() + self.timeout
            await self._back_off(retry)
        while True:
            try:
                if address is None:
                    address = await self._locate(table_id, h, refresh)
                return await op(self._master(address))
            except rpcfast.RemoteError as exc:
                retry = _retryable(exc)
            except UnknownTablet as exc:  # no tablet in the map right now (recovery)
                retry = exc
            except (rpcfast.PeerDead, rpcfast.RpcTimeout) as exc:
                retry = KvError(str(exc), status=Status.SERVER_NOT_UP)
            # the slow path: bounded by the client's timeout from the first failure
            now = trio.current_time()
            if deadline is None:
                deadline = now + self.timeout
            elif now >= deadline:
                raise retry
            refresh = True
            address = None
            await self._back_off(retry)

    async def _back_off(self, retry: KvError) -> None:
        self.retries += 1
        if isinstance(retry, Retry):
            await trio.sleep(random.uniform(retry.min_delay, retry.max_delay))
        elif retry.status is not Status.UNKNOWN_TABLET:
            await trio.sleep(random.uniform(0.005, 0.02))

    # -- tables -----------------------------------------------------------------------------------
    async def create_table(self, name: str, server_span: int = 1) -> int:
        return await self._directory_call(self.directory.create_table(name, server_span))

    async def get_table_id(self, name: str) -> int:
        return await self._directory_call(self.directory.get_table_id(name))

    async def drop_table(self, name: str) -> None:
        await self._directory_call(self.directory.drop_table(name))

    async def _directory_call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except rpcfast.RemoteError as exc:
            raise _kv_error(exc) from None

    # -- objects ----------------------------------------------------------------------------------
    async def read(
        self, table_id: int, key: bytes, reject_rules: RejectRules | None = None
    ) -> tuple[bytes, int]:
        retry = None
        stub = self._whole.get(table_id)
        if stub is not None and reject_rules is None:
            # the fast path: one dict lookup for the route, no closure, no hashing
            try:
                result: tuple[bytes, int] = await stub.read((table_id, key))
                return result
            except rpcfast.RemoteError as exc:
                retry = _retryable(exc)
            except (rpcfast.PeerDead, rpcfast.RpcTimeout) as exc:
                retry = KvError(str(exc), status=Status.SERVER_NOT_UP)
        fields = {"tableId": table_id, "key": key, **_rules(reject_rules)}

        async def op(stub: rpcfast.Stub) -> tuple[bytes, int]:
            reply = await stub.read(fields)
            return bytes(reply.value), int(reply.version)

        return await self._with_retries(table_id, key, op, retry)

    async def write(
        self, table_id: int, key: bytes, value: bytes, reject_rules: RejectRules | None = None
    ) -> int:
        retry = None
        stub = self._whole.get(table_id)
        if stub is not None and reject_rules is None:
            try:
                version: int = await stub.write((table_id, key, value))
                return version
            except rpcfast.RemoteError as exc:
                retry = _retryable(exc)
            except (rpcfast.PeerDead, rpcfast.RpcTimeout) as exc:
                retry = KvError(str(exc), status=Status.SERVER_NOT_UP)
        fields = {"tableId": table_id, "key": key, "value": value, **_rules(reject_rules)}

        async def op(stub: rpcfast.Stub) -> int:
            return int((await stub.write(fields)).version)

        return await self._with_retries(table_id, key, op, retry)

    async def remove(
        self, table_id: int, key: bytes, reject_rules: RejectRules | None = None
    ) -> int:
        fields = {"tableId": table_id, "key": key, **_rules(reject_rules)}

        async def op(stub: rpcfast.Stub) -> int:
            return int((await stub.remove(fields)).version)

        return await self._with_retries(table_id, key, op)

    async def increment(
        self, table_id: int, key: bytes, delta: int, reject_rules: RejectRules | None = None
    ) -> int:
        fields = {"tableId": table_id, "key": key, "delta": delta, **_rules(reject_rules)}

        async def op(stub: rpcfast.Stub) -> int:
            return int((await stub.increment(fields)).value)

        return await self._with_retries(table_id, key, op)

    # -- batches: grouped by master, one RPC per master, per-item results --------------------------
    async def multi_read(
        self, items: Sequence[tuple[int, bytes]]
    ) -> list[tuple[bytes, int] | KvError]:
        def parse(o: Any) -> tuple[bytes, int]:
            return bytes(o.value), int(o.version)

        return await self._multi("multiRead", items, _KEYS, parse)

    async def multi_write(self, items: Sequence[tuple[int, bytes, bytes]]) -> list[int | KvError]:
        return await self._multi("multiWrite", items, _VALUES, _version)

    async def multi_remove(self, items: Sequence[tuple[int, bytes]]) -> list[int | KvError]:
        return await self._multi("multiRemove", items, _KEYS, _version)

    async def multi_increment(self, items: Sequence[tuple[int, bytes, int]]) -> list[int | KvError]:
        return await self._multi("multiIncrement", items, _DELTAS, lambda o: int(o.counter))

    def _whole_table_owner(self, table_id: int) -> str | None:
        """The master of a table served by one tablet over every hash (standalone, or a
        table of server span 1), from the cached map: its keys need not be hashed."""
        route = self._routes.get(table_id)
        if route is None or len(route[1]) != 1:
            return None
        tablet = route[1][0]
        return tablet.address if tablet.start_hash == 0 and tablet.end_hash == MAX_HASH else None

    async def _group(
        self, items: Sequence[tuple[Any, ...]], pending: list[int] | None, refresh: bool
    ) -> dict[str, list[int] | None]:
        """Indexes of ``pending`` items (None: all) by the master that owns them (None: all)."""
        if pending is None and items:
            table_id = items[0][0]
            owner = self._whole_table_owner(table_id)
            if owner is not None and all(item[0] == table_id for item in items):
                return {owner: None}
        groups: dict[str, list[int] | None] = {}
        for i in range(len(items)) if pending is None else pending:
            table_id, key = items[i][0], items[i][1]
            h = key_hash(table_id, key)
            address = None if refresh else self._route_cached(table_id, h)
            if address is None:
                address = await self._locate(table_id, h, refresh)
            group = groups.get(address)
            if group is None:
                groups[address] = [i]
            else:
                group.append(i)
        return groups

    async def _multi(
        self,
        method: str,
        items: Sequence[tuple[Any, ...]],
        fields: tuple[str, ...],
        parse: Callable[[Any], T],
    ) -> list[T | KvError]:
        """Batches grouped by master, one RPC per master (concurrently), per-item results;
        items a master disowns or could not take now are retried until the timeout."""
        results: list[T | KvError | None] = [None] * len(items)
        pending: list[int] | None = None  # None: every item (no index list built)
        deadline = trio.current_time() + self.timeout
        refresh = False
        while True:
            groups = await self._group(items, pending, refresh)
            again: list[int] = []

            async def send(
                address: str, indexes: list[int] | None, again: list[int] = again
            ) -> None:
                batch = items if indexes is None else [items[i] for i in indexes]
                stub = self._fast_master(address)
                try:
                    reply = await getattr(stub, method)(_params(batch, fields))
                except (rpcfast.PeerDead, rpcfast.RpcTimeout):
                    again.extend(range(len(items)) if indexes is None else indexes)
                    return
                except rpcfast.RemoteError as exc:
                    error = _kv_error(exc)
                    if not isinstance(error, KvError):
                        error = KvError(str(error))
                    for i in range(len(items)) if indexes is None else indexes:
                        results[i] = error
                    return
                if type(reply) is tuple:  # every item succeeded: its versions (multiWrite,
                    (versions,) = reply  # multiRemove, whose parse is _version)
                    if len(versions) != len(batch):
                        raise KvError(f"{method}: {len(versions)} outcomes for {len(batch)} items")
                    if indexes is None:
                        results[: len(versions)] = versions
                    else:
                        for i, version in zip(indexes, versions, strict=True):
                            results[i] = version
                    return
                outcomes = reply.outcomes
                if len(outcomes) != len(batch):
                    raise KvError(f"{method}: {len(outcomes)} outcomes for {len(batch)} items")
                for i, outcome in (
                    enumerate(outcomes) if indexes is None else zip(indexes, outcomes, strict=True)
                ):
                    if outcome.status == 0:
                        results[i] = parse(outcome)
                    else:
                        error = error_for_status(outcome.status, outcome.message)
                        if error.status in _RETRYABLE:
                            again.append(i)
                        results[i] = error

            if len(groups) == 1:  # one master (the common case): no task to start
                [(address, indexes)] = groups.items()
                await send(address, indexes)
            else:
                async with trio.open_nursery() as nursery:
                    for address, indexes in groups.items():
                        nursery.start_soon(send, address, indexes)
            if not again:
                break
            pending = sorted(again)
            if trio.current_time() >= deadline:
                break
            self.retries += 1
            refresh = True
            await trio.sleep(random.uniform(0.001, 0.002))
        return [
            r if r is not None else KvError("no answer", status=Status.TIMEOUT) for r in results
        ]

    async def enumerate(
        self, table_id: int, *, page_bytes: int = 256 * 1024
    ) -> AsyncIterator[tuple[bytes, bytes, int]]:
        """Every object of the table as ``(key, value, version)``, tablet by tablet."""
        for tablet in await self.directory.tablets(table_id, refresh=True):
            stub = self._master(tablet.address)
            cursor = b""
            while True:
                try:
                    reply = await stub.enumerate(
                        tableId=table_id,
                        startHash=tablet.start_hash,
                        endHash=tablet.end_hash,
                        cursor=cursor,
                        maxBytes=page_bytes,
                    )
                except rpcfast.RemoteError as exc:
                    raise _kv_error(exc) from None
                for obj in reply.objects:
                    yield bytes(obj.key), bytes(obj.value), int(obj.version)
                if reply.done:
                    break
                cursor = bytes(reply.cursor)
