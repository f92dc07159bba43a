"""KvClient's own encoding of multi-op items (the same bytes as rpcfast's generic encoder, or a
fallback to it), and its single-object fast path against a real standalone master."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import rpcfast
from rpcfast._schema import interface_spec
from rpcfast._wire import MalformedMessage
from services.kvstore import (
    KvError,
    ObjectDoesntExist,
    ObjectManager,
    RejectRules,
    StorageConfig,
    WrongVersion,
)
from services.kvstore._client import (
    _DELTAS,
    _KEYS,
    _VALUES,
    KvClient,
    _decode_read,
    _decode_version,
    _encode_items,
    _encode_read,
    _encode_write,
    _params,
)
from services.kvstore._master import (
    MasterService,
    _decode_read_params,
    _decode_write_params,
    _ReadResult,
    _VersionResult,
    kv_capnp,
)

WRITE = interface_spec(kv_capnp.Master).by_name["multiWrite"]
READ = interface_spec(kv_capnp.Master).by_name["read"]
WRITE_ONE = interface_spec(kv_capnp.Master).by_name["write"]
U64 = st.integers(min_value=0, max_value=2**64 - 1)


def _generic(items: list[tuple[Any, ...]], fields: tuple[str, ...]) -> bytes:
    dicts = [dict(zip(fields, item, strict=True)) for item in items]
    return b"".join(bytes(p) for p in WRITE.params.encode_parts({"items": dicts}))


def _direct(items: list[tuple[Any, ...]], values: bool) -> bytes:
    encoded = _encode_items(items, values)
    assert encoded is not None
    return b"".join(bytes(p) for p in WRITE.params.encode_parts(encoded))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(U64, st.binary(max_size=40), st.binary(max_size=300)), max_size=40))
def test_items_encode_like_the_generic_encoder(items: list[tuple[int, bytes, bytes]]) -> None:
    if not items:
        assert _encode_items(items, True) is None  # rpcfast encodes the empty list
        return
    assert _direct(items, True) == _generic(items, _VALUES)
    keys_only = [(t, k) for t, k, _v in items]
    assert _direct(keys_only, False) == _generic(keys_only, _KEYS)
    body = WRITE.params.decode_capnp(memoryview(_direct(items, True)))
    assert [(i.tableId, bytes(i.key), bytes(i.value), i.hasRules) for i in body.items] == [
        (t, k, v, False) for t, k, v in items
    ]


@pytest.mark.parametrize(
    "item",
    [
        (-1, b"k", b"v"),
        (2**64, b"k", b"v"),
        (1.0, b"k", b"v"),
        (True, b"k", b"v"),
        (1, "k", b"v"),
        (1, bytearray(b"k"), b"v"),
        (1, b"k", memoryview(b"v")),
        (1, b"k", bytes(4096)),  # big values go out without a copy, through rpcfast
    ],
)
def test_items_it_does_not_take_fall_back_to_dicts(item: tuple[Any, ...]) -> None:
    items = [(1, b"plain", b"v"), item]
    assert _encode_items(items, True) is None
    assert _params(items, _VALUES) == {"items": [dict(zip(_VALUES, i, strict=True)) for i in items]}
    assert isinstance(_params([(1, b"k", 5)], _DELTAS), dict)


def _joined(parts: list[Any]) -> memoryview:
    return memoryview(b"".join(bytes(p) for p in parts))


@settings(max_examples=200, deadline=None)
@given(U64, st.binary(max_size=100), st.binary(max_size=300), U64)
def test_read_codecs_agree_with_the_generic_ones(
    table_id: int, key: bytes, value: bytes, version: int
) -> None:
    # the client's params are the generic encoder's bytes; the master reads them in place
    params = _joined(_encode_read((table_id, key)))
    assert bytes(params) == bytes(
        _joined(READ.params.encode_parts({"tableId": table_id, "key": key}))
    )
    for buffer in (bytearray(key), memoryview(key)):
        assert bytes(_joined(_encode_read((table_id, buffer)))) == bytes(params)
    got = _decode_read_params(params)
    assert type(got) is tuple and got[0] == table_id and bytes(got[1]) == key
    # the client reads the master's direct reply and the generic encoder's alike
    direct = _joined(READ.results.encode_parts(_ReadResult(memoryview(value), version)))
    reply = _joined(READ.results.encode_parts({"value": value, "version": version}))
    assert _decode_read(direct) == _decode_read(reply) == (value, version)


def test_read_codecs_fall_back_for_what_they_do_not_expect() -> None:
    # params with reject rules: the generic body, which the handler reads as before
    ruled = _joined(
        READ.params.encode_parts(
            {"tableId": 3, "key": b"k", "hasRules": True, "rejectRules": {"doesntExist": True}}
        )
    )
    body = _decode_read_params(ruled)
    assert type(body) is not tuple and body.hasRules and bytes(body.key) == b"k"
    # values the direct encoder does not take raise what the generic encoder raises
    for bad in ((-1, b"k"), (2**64, b"k"), (1.5, b"k"), (1, "k")):
        with pytest.raises(Exception) as direct_error:
            _encode_read(bad)
        with pytest.raises(Exception) as generic_error:
            READ.params.encode_parts({"tableId": bad[0], "key": bad[1]})
        assert direct_error.type is generic_error.type
    # garbage, truncation, a second segment: the generic decoders' MalformedMessage
    reply = bytes(_joined(READ.results.encode_parts(_ReadResult(memoryview(b"value"), 7))))
    params = bytes(_joined(_encode_read((1, b"key"))))
    for bad_bytes in (b"\xff" * 40, reply[:-8], b"\x01" + reply[1:]):
        with pytest.raises(MalformedMessage):
            _decode_read(memoryview(bad_bytes))
    for bad_bytes in (b"\xff" * 56, params[:-8], b"\x01" + params[1:]):
        with pytest.raises(MalformedMessage):
            _decode_read_params(memoryview(bad_bytes))


@settings(max_examples=100, deadline=None)
@given(U64, st.binary(max_size=100), st.binary(max_size=5000), U64)
def test_write_codecs_agree_with_the_generic_ones(
    table_id: int, key: bytes, value: bytes, version: int
) -> None:
    fields = {"tableId": table_id, "key": key, "value": value}
    params = _joined(_encode_write((table_id, key, value)))
    assert bytes(params) == bytes(_joined(WRITE_ONE.params.encode_parts(fields)))
    got = _decode_write_params(params)
    assert type(got) is tuple
    assert got[0] == table_id and bytes(got[1]) == key and bytes(got[2]) == value
    direct = _joined(WRITE_ONE.results.encode_parts(_VersionResult(version)))
    reply = _joined(WRITE_ONE.results.encode_parts({"version": version}))
    assert bytes(direct) == bytes(reply)
    assert _decode_version(direct) == version


def test_write_codecs_leave_big_values_and_rules_to_the_generic_codec() -> None:
    big = bytes(8192)
    parts = _encode_write((1, b"k", big))
    assert len(parts) > 1 and any(p is big for p in parts)  # sent without a copy
    ruled = _joined(
        WRITE_ONE.params.encode_parts(
            {"tableId": 1, "key": b"k", "value": b"v", "hasRules": True, "rejectRules": {}}
        )
    )
    body = _decode_write_params(ruled)
    assert type(body) is not tuple and body.hasRules
    with pytest.raises(MalformedMessage):
        _decode_version(memoryview(b"\xff" * 24))


@pytest.fixture
async def kv() -> AsyncIterator[KvClient]:
    objects = ObjectManager(StorageConfig(total_bytes=8 << 20, segment_size=256 << 10))
    async with rpcfast.serve([MasterService(objects)], ["udp://127.0.0.1:0"]) as server:
        async with await KvClient.open(master=server.addresses[0], timeout=2) as client:
            yield client


async def test_multi_ops_take_any_buffer_and_big_values(kv: KvClient) -> None:
    table = await kv.create_table("t")
    other = await kv.create_table("u")
    big = bytes(range(256)) * 40
    items: list[tuple[int, Any, Any]] = [
        (table, b"a", b"1"),
        (table, bytearray(b"b"), memoryview(b"2")),
        (other, b"a", big),  # a second table: grouped by hash, not the whole-table path
        (table, b"c", big),
    ]
    assert await kv.multi_write(items) == [1, 2, 3, 4]
    got = await kv.multi_read([(table, b"a"), (table, b"b"), (other, b"a"), (table, b"zz")])
    assert got[:3] == [(b"1", 1), (b"2", 2), (big, 3)]
    assert isinstance(got[3], ObjectDoesntExist)
    assert await kv.multi_remove([(table, b"a"), (other, b"a")]) == [1, 3]
    assert await kv.multi_write([]) == []


async def test_fast_single_object_path_keeps_typed_errors_and_rules(kv: KvClient) -> None:
    table = await kv.create_table("t")
    with pytest.raises(ObjectDoesntExist):
        await kv.read(table, b"k")  # before the route is cached: the general path
    version = await kv.write(table, b"k", b"v")
    assert table in kv._whole  # now the fast path serves the table
    assert await kv.read(table, b"k") == (b"v", version)
    assert await kv.write(table, b"k", b"w") == version + 1
    with pytest.raises(ObjectDoesntExist):
        await kv.read(table, b"missing")
    with pytest.raises(WrongVersion):
        await kv.write(table, b"k", b"x", RejectRules(given_version=1, version_ne_given=True))
    assert kv.retries == 0


async def test_fast_path_retries_through_a_dropped_table(kv: KvClient) -> None:
    table = await kv.create_table("t")
    await kv.write(table, b"k", b"v")
    await kv.drop_table("t")
    with trio.fail_after(10):
        with pytest.raises(KvError):  # the table is gone: retried, then reported
            await kv.read(table, b"k")
    assert kv.retries > 0
