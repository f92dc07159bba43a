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
from services.kvstore import (
    KvError,
    ObjectDoesntExist,
    ObjectManager,
    RejectRules,
    StorageConfig,
    WrongVersion,
)
from services.kvstore._client import _DELTAS, _KEYS, _VALUES, KvClient, _encode_items, _params
from services.kvstore._master import MasterService, kv_capnp

WRITE = interface_spec(kv_capnp.Master).by_name["multiWrite"]
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
