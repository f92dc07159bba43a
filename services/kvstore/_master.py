"""The master service: the storage engine behind rpcfast.

Single-object operations are ``@fast`` handlers: they run inline in the dispatcher, and because
nothing else runs between the handler and the encoding of its result, a value handed out as a view
of log memory is copied into the response before the cleaner can move it (no read epoch needed).

The cleaner runs as cooperative slices in the same event loop (``run_cleaner``): the engine's
``step(budget)`` does a bounded slice whenever the balancer wants work, between requests. That
choice, and the alternative measured against it, is in perf/cleaner.py.

A master started without a coordinator keeps its own table directory (``standalone``), so a single
process is a usable store; in a cluster the coordinator owns tables and assigns tablets through
``takeTabletOwnership`` on the server's admin service.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import attrs
import trio

if TYPE_CHECKING:
    from services.kvstore._replication import ReplicaManager

import rpcfast
import rpcfast.dispatch
from rpcfast._schema import interface_spec
from services.kvstore._direct import DirectStruct, VersionList
from services.kvstore._objects import ObjectManager, RejectRules
from services.kvstore.errors import InvalidParameter, KvError, Retry, Status, TableDoesntExist
from services.kvstore.log import StorageConfig

kv_capnp: Any = rpcfast.load_schema("kvstore.capnp")

CLEANER_SLICE = 0.0005
"""Seconds of cleaning per slice: short enough not to be seen in request latency."""
CLEANER_IDLE_CHECK = 0.005
"""Seconds between the cleaner's checks while the log changes."""
CLEANER_IDLE_CHECK_MAX = 0.1
"""Longest pause between checks while the log stays as it was."""


def rules_from(request: Any) -> RejectRules | None:
    if not request.hasRules:
        return None
    r = request.rejectRules
    return RejectRules(
        given_version=r.givenVersion,
        doesnt_exist=r.doesntExist,
        exists=r.exists,
        version_le_given=r.versionLeGiven,
        version_ne_given=r.versionNeGiven,
    )


def _outcome(error: KvError) -> dict[str, Any]:
    return {"status": int(error.status), "message": error.message}


_VERSION_LIST = VersionList(kv_capnp.Outcome.schema, "version")


class _Versions:
    """A multi-op's results when every item succeeded with a version (the common case),
    encoded straight into one Cap'n Proto segment: rpcfast takes it as a result builder.

    The generic encoder fills 100 outcome structs field by field (~5,800 instructions each);
    here the versions land in a zeroed word array with one strided slice assignment."""

    __slots__ = ("versions",)

    def __init__(self, versions: list[int]) -> None:
        self.versions = versions

    def to_segments(self) -> list[bytes]:
        return [_VERSION_LIST.encode(self.versions)]


_READ_RESULTS = DirectStruct(
    kv_capnp.Master.schema.methods["read"].result_type, ["version", "value"]
)
_VERSION_RESULTS = DirectStruct(kv_capnp.Master.schema.methods["write"].result_type, ["version"])


_READ_PARAMS = DirectStruct(
    kv_capnp.Master.schema.methods["read"].param_type, ["tableId", "key"], flag="hasRules"
)
_GENERIC_READ_PARAMS = interface_spec(kv_capnp.Master).by_name["read"].params


def _decode_read_params(body: memoryview) -> Any:
    """``read``'s params as ``(table id, key)`` when they carry no reject rules and have the
    layout every client sends; else the generic body (the handler takes either). The key is
    a view of the receive buffer, as the generic decoder's Data fields are."""
    fields = _READ_PARAMS.read(body)
    if fields is not None:
        return fields
    return _GENERIC_READ_PARAMS.decode(body)


_WRITE_PARAMS = DirectStruct(
    kv_capnp.Master.schema.methods["write"].param_type,
    ["tableId", "key", "value"],
    flag="hasRules",
)
_GENERIC_WRITE_PARAMS = interface_spec(kv_capnp.Master).by_name["write"].params


def _decode_write_params(body: memoryview) -> Any:
    """``write``'s params as ``(table id, key, value)`` (views of the receive buffer) when
    they carry no reject rules and have the usual layout; else the generic body."""
    fields = _WRITE_PARAMS.read(body)
    if fields is not None:
        return fields
    return _GENERIC_WRITE_PARAMS.decode(body)


class _VersionResult:
    """A ``(version :UInt64)`` result as its whole message in one step (rpcfast sends what
    ``rpcfast_message`` returns)."""

    __slots__ = ("version",)

    def __init__(self, version: int) -> None:
        self.version = version

    def rpcfast_message(self) -> list[bytes]:
        return [_VERSION_RESULTS.encode(self.version)]


class _ReadResult:
    """``read``'s results as their whole message in one step (rpcfast sends what
    ``rpcfast_message`` returns): a few hundred instructions where the generic encoder takes
    ~13,000. The value, a view of log memory, is copied into the message when rpcfast encodes
    the reply, right after the handler returns, as with a dict."""

    __slots__ = ("value", "version")

    def __init__(self, value: memoryview, version: int) -> None:
        self.value = value
        self.version = version

    def rpcfast_message(self) -> list[bytes]:
        return [_READ_RESULTS.encode(self.version, self.value)]


def _versions_outcomes(results: list[int | KvError]) -> Any:
    """Per-item outcomes of a batch whose successes carry a version."""
    for r in results:
        if r.__class__ is not int:
            break
    else:
        return _Versions(cast(list[int], results))
    return {
        "outcomes": [_outcome(r) if isinstance(r, KvError) else {"version": r} for r in results]
    }


@attrs.define
class MasterCounters:
    reads: int = 0
    writes: int = 0
    removes: int = 0
    increments: int = 0
    multi_items: int = 0
    enumerations: int = 0
    retries: int = 0


class MasterService(rpcfast.Service, interface=kv_capnp.Master):
    def __init__(
        self,
        objects: ObjectManager,
        *,
        standalone: bool = True,
        replicas: ReplicaManager | None = None,
    ) -> None:
        self.objects = objects
        self.standalone = standalone
        self.replicas = replicas
        self.counters = MasterCounters()
        self._tables: dict[str, int] = {}
        self._next_table = 1
        self.started = time.time()

    # -- single objects --------------------------------------------------------------------------
    @rpcfast.fast
    @rpcfast.decode_with(_decode_read_params)
    def read(self, request: Any) -> Any:
        self.counters.reads += 1
        if request.__class__ is tuple:  # (table id, key): no reject rules
            value, version = self.objects.read(request[0], request[1])
        else:
            value, version = self.objects.read(
                request.tableId, request.key, rules_from(request) if request.hasRules else None
            )
        return _ReadResult(value, version)

    @rpcfast.fast
    @rpcfast.decode_with(_decode_write_params)
    def write(self, request: Any) -> Any:
        self.counters.writes += 1
        if request.__class__ is tuple:  # (table id, key, value): no reject rules
            version = self._retrying(self.objects.write, request[0], request[1], request[2])
        else:
            version = self._retrying(
                self.objects.write,
                request.tableId,
                request.key,
                request.value,
                rules_from(request) if request.hasRules else None,
            )
        return self._durable(_VersionResult(version))

    @rpcfast.fast
    def remove(self, request: Any) -> Any:
        self.counters.removes += 1
        version = self._retrying(
            self.objects.remove, request.tableId, request.key, rules_from(request)
        )
        return self._durable(_VersionResult(version))

    @rpcfast.fast
    def increment(self, request: Any) -> Any:
        self.counters.increments += 1
        value, version = self._retrying(
            self.objects.increment,
            request.tableId,
            request.key,
            request.delta,
            rules_from(request),
        )
        return self._durable({"value": value, "version": version})

    def _durable(self, result: Any) -> Any:
        """The answer once every byte logged so far is on all R backups (RAMCloud's rule: a
        write returns only when it is durable). No task: the replica manager's RPC callbacks
        settle the Deferred."""
        replicas = self.replicas
        if replicas is None:
            return result
        deferred = rpcfast.Deferred()

        def synced(error: Exception | None) -> None:
            if error is None:
                deferred.resolve(result)
            else:
                deferred.fail(Retry(f"not durable yet: {error}", min_delay=0.005, max_delay=0.02))

        replicas.sync(synced)
        return deferred

    def _retrying(self, op: Callable[..., Any], *args: Any) -> Any:
        """Memory full: give the cleaner one slice right here, then try once more before the
        client is told to retry (it backs off 1-2 ms as RAMCloud's clients do)."""
        try:
            return op(*args)
        except KvError as exc:
            if exc.status is not Status.RETRY:
                raise
            self.counters.retries += 1
            self.objects.cleaner.step(CLEANER_SLICE, self.objects._clock())
            return op(*args)

    # -- batches ---------------------------------------------------------------------------------
    @rpcfast.fast
    def multiRead(self, request: Any) -> dict[str, Any]:
        items = request.items
        self.counters.multi_items += len(items)
        out = []
        for item in items:
            try:
                value, version = self.objects.read(item.tableId, item.key, rules_from(item))
                out.append({"version": version, "value": value})
            except KvError as exc:
                out.append(_outcome(exc))
        return {"outcomes": out}

    @rpcfast.fast
    def multiWrite(self, request: Any) -> Any:
        items = request.items
        self.counters.multi_items += len(items)
        batch = [
            (it.tableId, it.key, it.value, rules_from(it) if it.hasRules else None) for it in items
        ]
        return self._durable(_versions_outcomes(self.objects.multi_write(batch, self._clean)))

    def _clean(self) -> None:
        """Memory full in a batch: one cleaner slice before its item is tried again."""
        self.counters.retries += 1
        self.objects.cleaner.step(CLEANER_SLICE, self.objects._clock())

    @rpcfast.fast
    def multiRemove(self, request: Any) -> Any:
        return self._durable_batch(
            request.items,
            lambda it: {
                "version": self._retrying(self.objects.remove, it.tableId, it.key, rules_from(it))
            },
        )

    @rpcfast.fast
    def multiIncrement(self, request: Any) -> Any:
        def one(it: Any) -> dict[str, Any]:
            value, version = self._retrying(
                self.objects.increment, it.tableId, it.key, it.delta, rules_from(it)
            )
            return {"counter": value, "version": version}

        return self._durable_batch(request.items, one)

    def _durable_batch(self, items: Any, op: Callable[[Any], dict[str, Any]]) -> Any:
        return self._durable(self._batch(items, op))

    def _batch(self, items: Any, op: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        self.counters.multi_items += len(items)
        out = []
        for item in items:
            try:
                out.append(op(item))
            except KvError as exc:
                out.append(_outcome(exc))
        return {"outcomes": out}

    @rpcfast.fast
    def enumerate(self, request: Any) -> dict[str, Any]:
        self.counters.enumerations += 1
        cursor = bytes(request.cursor) if len(request.cursor) else None
        objects, nxt = self.objects.enumerate(
            request.tableId, request.startHash, request.endHash, cursor, max(1, request.maxBytes)
        )
        return {
            "objects": [{"key": k, "value": v, "version": ver} for k, v, ver in objects],
            "cursor": nxt or b"",
            "done": nxt is None,
        }

    # -- standalone table directory ----------------------------------------------------------------
    @rpcfast.fast
    def createTable(self, request: Any) -> dict[str, Any]:
        self._standalone_only()
        name = request.name
        if not name:
            raise InvalidParameter("a table needs a name")
        table_id = self._tables.get(name)
        if table_id is None:
            table_id = self._next_table
            self._next_table += 1
            self._tables[name] = table_id
            self.objects.add_tablet(table_id)
        return {"tableId": table_id}

    @rpcfast.fast
    def getTableId(self, request: Any) -> dict[str, Any]:
        self._standalone_only()
        table_id = self._tables.get(request.name)
        if table_id is None:
            raise TableDoesntExist(f"no table named {request.name!r}")
        return {"tableId": table_id}

    @rpcfast.fast
    def dropTable(self, request: Any) -> None:
        self._standalone_only()
        table_id = self._tables.pop(request.name, None)
        if table_id is None:
            raise TableDoesntExist(f"no table named {request.name!r}")
        self.objects.drop_table(table_id)

    def _standalone_only(self) -> None:
        if not self.standalone:
            raise KvError("tables are managed by the coordinator", status=Status.WRONG_SERVER)

    @rpcfast.fast
    def stats(self, request: None) -> dict[str, Any]:
        return {"json": json.dumps(self.snapshot())}

    def snapshot(self) -> dict[str, Any]:
        s = self.objects.stats()
        return {
            "memory": attrs.asdict(s, recurse=True),
            "operations": attrs.asdict(self.counters),
            "uptime_s": time.time() - self.started,
        }


async def run_cleaner(
    objects: ObjectManager,
    *,
    slice_seconds: float = CLEANER_SLICE,
    idle_check: float = CLEANER_IDLE_CHECK,
    idle_check_max: float = CLEANER_IDLE_CHECK_MAX,
    interruptible: bool = False,
) -> None:
    """Drive the cleaner in cooperative slices until cancelled.

    By default a slice runs its whole ``slice_seconds``: a request that arrives meanwhile
    waits for the rest of it, so few requests wait, but long. ``interruptible`` slices yield
    as soon as any input of this process's dispatcher is waiting, after the unit of cleaning
    work under way (tens of microseconds; units are smaller then): many requests wait a
    little. Measured end to end (``rpcfast-perf cleaner --sections server``, 100-byte writes
    at 90%, one client, seven runs): whole slices gave a median 1.01-1.23x an idle cleaner's
    (three runs within 2%) and p99 1.3-6x; yielding slices cut p99 in most runs (0.4-3.5x)
    but gave a median 1.02-1.24x, and under heavy load their one unit per loop let the
    cleaner fall behind (writes got Retry even at 30%).

    With nothing to do it looks again after ``idle_check``, and while the log does not change
    (no seglet allocated or freed, no segment added or retired) ever less often, up to
    ``idle_check_max``: an idle server wakes ~10 times a second, not 200 (each wake-up of a
    sleeping trio task costs tens of microseconds, taken from the requests of a busy machine).
    """
    cleaner = objects.cleaner
    clock = objects._clock
    delay = idle_check
    seen = cleaner.activity()
    interrupt = rpcfast.dispatch.current().input_waiting if interruptible else None
    while True:
        if cleaner.wants_to_run():
            cleaner.step(slice_seconds, clock(), interrupt)
            await trio.lowlevel.checkpoint()
            delay = idle_check
            continue
        now = cleaner.activity()
        if now != seen:
            seen = now
            delay = idle_check
        else:
            delay = min(delay * 2, idle_check_max)
        await trio.sleep(delay)


async def serve_standalone(
    addresses: list[str], config: StorageConfig | None = None, *, announce: bool = True
) -> None:
    """One standalone master (no coordinator, no backups) until cancelled."""
    objects = ObjectManager(config)
    async with rpcfast.serve([MasterService(objects)], addresses) as server:
        if announce:
            print(" ".join(server.addresses), flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_cleaner, objects)
            await trio.sleep_forever()


if __name__ == "__main__":
    import sys

    total = int(sys.argv[2]) if len(sys.argv) > 2 else 256 * 1024 * 1024
    try:
        trio.run(serve_standalone, [sys.argv[1]], StorageConfig(total_bytes=total))
    except KeyboardInterrupt:
        pass
