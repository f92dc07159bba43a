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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import attrs
import trio

import rpcfast
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
        self._directory: _Directory | None = None
        self._routes: dict[int, tuple[list[int], list[TabletLocation]]] = {}
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
        self, table_id: int, key: bytes, op: Callable[[rpcfast.Stub], Awaitable[T]]
    ) -> T:
        h = key_hash(table_id, key)
        address = self._route_cached(table_id, h)
        deadline: float | None = None
        refresh = False
        while True:
            try:
                if address is None:
                    address = await self._locate(table_id, h, refresh)
                return await op(self._master(address))
            except rpcfast.RemoteError as exc:
                error = _kv_error(exc)
                if not isinstance(error, KvError) or error.status not in _RETRYABLE:
                    raise error from None
                retry = error
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
            self.retries += 1
            refresh = True
            address = None
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
        fields = {"tableId": table_id, "key": key, **_rules(reject_rules)}

        async def op(stub: rpcfast.Stub) -> tuple[bytes, int]:
            reply = await stub.read(fields)
            return bytes(reply.value), int(reply.version)

        return await self._with_retries(table_id, key, op)

    async def write(
        self, table_id: int, key: bytes, value: bytes, reject_rules: RejectRules | None = None
    ) -> int:
        fields = {"tableId": table_id, "key": key, "value": value, **_rules(reject_rules)}

        async def op(stub: rpcfast.Stub) -> int:
            return int((await stub.write(fields)).version)

        return await self._with_retries(table_id, key, op)

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

        return await self._multi("multiRead", [{"tableId": t, "key": k} for t, k in items], parse)

    async def multi_write(self, items: Sequence[tuple[int, bytes, bytes]]) -> list[int | KvError]:
        return await self._multi(
            "multiWrite",
            [{"tableId": t, "key": k, "value": v} for t, k, v in items],
            lambda o: int(o.version),
        )

    async def multi_remove(self, items: Sequence[tuple[int, bytes]]) -> list[int | KvError]:
        return await self._multi(
            "multiRemove", [{"tableId": t, "key": k} for t, k in items], lambda o: int(o.version)
        )

    async def multi_increment(self, items: Sequence[tuple[int, bytes, int]]) -> list[int | KvError]:
        return await self._multi(
            "multiIncrement",
            [{"tableId": t, "key": k, "delta": d} for t, k, d in items],
            lambda o: int(o.counter),
        )

    async def _multi(
        self, method: str, items: list[dict[str, Any]], parse: Callable[[Any], T]
    ) -> list[T | KvError]:
        results: list[T | KvError | None] = [None] * len(items)
        pending = list(range(len(items)))
        deadline = trio.current_time() + self.timeout
        refresh = False
        while pending:
            groups: dict[str, list[int]] = {}
            for i in pending:
                item = items[i]
                table_id = item["tableId"]
                h = key_hash(table_id, item["key"])
                address = None if refresh else self._route_cached(table_id, h)
                if address is None:
                    address = await self._locate(table_id, h, refresh)
                groups.setdefault(address, []).append(i)
            again: list[int] = []

            async def send(address: str, indexes: list[int], again: list[int] = again) -> None:
                stub = self._master(address)
                try:
                    reply = await getattr(stub, method)(items=[items[i] for i in indexes])
                except (rpcfast.PeerDead, rpcfast.RpcTimeout):
                    again.extend(indexes)
                    return
                except rpcfast.RemoteError as exc:
                    error = _kv_error(exc)
                    for i in indexes:
                        results[i] = error if isinstance(error, KvError) else KvError(str(error))
                    return
                for i, outcome in zip(indexes, reply.outcomes, strict=True):
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
            pending = sorted(again)
            if pending:
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
