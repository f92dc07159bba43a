"""The master's directly encoded results (read, all-successful multi-writes): the same bytes as
rpcfast's generic encoder, read back by both decoders; batches with failures as per-item dicts."""

from __future__ import annotations

from typing import Any

import pytest

from rpcfast._schema import MethodSpec, interface_spec
from services.kvstore import ObjectManager, Status, StorageConfig
from services.kvstore._master import (
    MasterService,
    _ReadResult,
    _VersionResult,
    _Versions,
    _versions_outcomes,
    kv_capnp,
)
from services.kvstore.errors import ObjectExists

METHODS = interface_spec(kv_capnp.Master).by_name


def _decode(method: MethodSpec, data: bytes) -> Any:
    body = method.results.decode(memoryview(data))
    assert body is not None
    return body


def _bytes(method: MethodSpec, value: Any, results: bool = True) -> bytes:
    codec = method.results if results else method.params
    return b"".join(bytes(part) for part in codec.encode_parts(value))


@pytest.mark.parametrize("versions", [[], [1], [1, 2**64 - 1, 77], list(range(1, 300))])
def test_versions_encode_like_the_generic_encoder(versions: list[int]) -> None:
    method = METHODS["multiWrite"]
    direct = _bytes(method, _Versions(versions))
    assert direct == _bytes(method, {"outcomes": [{"version": v} for v in versions]})
    for body in (_decode(method, direct), method.results.decode_capnp(memoryview(direct))):
        assert [(o.status, o.version, o.counter, bytes(o.value)) for o in body.outcomes] == [
            (0, v, 0, b"") for v in versions
        ]


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 100, 4095, 4096, 5000])
def test_read_result_encodes_like_the_generic_encoder(size: int) -> None:
    method = METHODS["read"]
    value = memoryview(bytearray(i % 251 for i in range(size)))
    direct = _bytes(method, _ReadResult(value, 2**64 - 3))
    assert direct == _bytes(method, {"value": value, "version": 2**64 - 3})
    body = method.results.decode_capnp(memoryview(direct))
    assert (bytes(body.value), body.version) == (bytes(value), 2**64 - 3)


@pytest.mark.parametrize("version", [0, 1, 2**32, 2**64 - 1])
def test_version_result_encodes_like_the_generic_encoder(version: int) -> None:
    for name in ("write", "remove"):  # (the same struct shape)
        method = METHODS[name]
        direct = _bytes(method, _VersionResult(version))
        assert direct == _bytes(method, {"version": version})
        assert method.results.decode_capnp(memoryview(direct)).version == version


def test_failures_go_out_as_per_item_outcomes() -> None:
    outcomes = _versions_outcomes([5, ObjectExists("object exists"), 6])
    assert isinstance(outcomes, dict)
    assert outcomes["outcomes"][0] == {"version": 5}
    assert outcomes["outcomes"][1]["status"] == Status.OBJECT_EXISTS
    assert isinstance(_versions_outcomes([5, 6]), _Versions)


def test_multi_write_handler_reports_each_item() -> None:
    objects = ObjectManager(StorageConfig(total_bytes=4 << 20, segment_size=64 << 10))
    objects.add_tablet(1)
    master = MasterService(objects)
    method = METHODS["multiWrite"]
    items = [
        {"tableId": 1, "key": b"a", "value": b"1"},
        {"tableId": 9, "key": b"b", "value": b"2"},
        {
            "tableId": 1,
            "key": b"a",
            "value": b"3",
            "hasRules": True,
            "rejectRules": {"exists": True},
        },
        {"tableId": 1, "key": b"c", "value": b"4"},
    ]
    request = method.params.decode(memoryview(_bytes(method, {"items": items}, results=False)))
    reply = _decode(method, _bytes(method, master.multiWrite(request)))
    statuses = [o.status for o in reply.outcomes]
    assert statuses == [0, Status.UNKNOWN_TABLET, Status.OBJECT_EXISTS, 0]
    assert [o.version for o in reply.outcomes if o.status == 0] == [1, 2]
    assert master.counters.multi_items == 4
    request = method.params.decode(memoryview(_bytes(method, {"items": items[:1]}, results=False)))
    assert isinstance(master.multiWrite(request), _Versions)
    assert bytes(objects.read(1, b"a")[0]) == b"1"
