"""StructCodec: the fast codec where it applies, pycapnp for structs, values and messages it does
not take, and one error type for garbage either way."""

from __future__ import annotations

import os
from typing import Any

import capnp  # type: ignore[import-untyped,unused-ignore]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rpcfast
from rpcfast._schema import CapnpBody, StructCodec, interface_spec
from rpcfast._wire import MalformedMessage

test_capnp: Any = rpcfast.load_schema(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "capnp_fast_test.capnp")
)
echo_capnp: Any = rpcfast.load_schema("echo.capnp")
kv_capnp: Any = rpcfast.load_schema("kvstore.capnp")
cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

echo = interface_spec(echo_capnp.Echo)


def codec(name: str, *, fast: bool = True) -> StructCodec:
    return StructCodec.from_schema(getattr(test_capnp, name).schema, name, fast=fast)


def test_every_method_of_the_real_services_uses_the_fast_codec() -> None:
    for interface in (
        echo_capnp.Echo,
        kv_capnp.Master,
        cluster_capnp.Coordinator,
        cluster_capnp.ServerAdmin,
        cluster_capnp.Backup,
    ):
        for method in interface_spec(interface).methods:
            assert method.params.fast is not None and method.results.fast is not None


def test_fast_bodies_are_bodies_with_views_of_the_message() -> None:
    params = echo.by_name["echo"].params
    message = memoryview(params.encode({"data": b"abc"}))
    body = params.decode(message)
    assert isinstance(body, rpcfast.Body) and not isinstance(body, CapnpBody)
    assert isinstance(body.data, memoryview) and body.data.obj is message.obj
    assert body._to_dict() == {"data": b"abc"}
    body._release()


def test_empty_structs_are_empty_bodies() -> None:
    ping = echo.by_name["ping"]
    assert ping.params.encode(None) == b"" and ping.params.encode_parts({}) == []
    assert ping.params.decode(memoryview(b"")) is None


def test_an_empty_body_of_a_struct_with_fields_reads_as_defaults() -> None:
    body = echo.by_name["fail"].params.decode(memoryview(b""))
    assert body is not None and body.code == 0 and body.message == ""


def test_a_decoded_body_encodes_again() -> None:
    params = interface_spec(kv_capnp.Master).by_name["multiWrite"].params
    items = [{"tableId": 1, "key": b"k", "value": b"v", "rejectRules": {"exists": True}}, {}]
    body = params.decode(memoryview(params.encode({"items": items})))
    again = params.decode(memoryview(params.encode(body)))
    assert body is not None and again is not None and again._to_dict() == body._to_dict()
    assert again.items[0].rejectRules.exists and bytes(again.items[0].value) == b"v"


def test_builders_still_work() -> None:
    params = echo.by_name["echo"].params
    builder = params.module.new_message(data=b"built")
    body = params.decode(memoryview(params.encode(builder)))
    assert body is not None and bytes(body.data) == b"built"


def test_several_segments_are_read_by_pycapnp() -> None:
    params = echo.by_name["echo"].params
    data = bytes(range(256)) * 4000
    builder = params.module.new_message(data=data)
    parts = params.encode_parts(builder)
    assert len(parts) > 2  # segment table, then the segments
    body = params.decode(memoryview(b"".join(parts)))
    assert isinstance(body, CapnpBody) and bytes(body.data) == data
    body._release()


def test_values_the_fast_encoder_does_not_take_go_to_pycapnp() -> None:
    fail = echo.by_name["fail"].params
    body = fail.decode(memoryview(fail.encode({"code": 2.0, "message": b"bytes"})))
    assert body is not None and body.code == 2 and body.message == "bytes"
    with pytest.raises(capnp.KjException):
        fail.encode({"nope": 1})  # pycapnp's error, as before


def test_unsupported_structs_use_pycapnp_both_ways() -> None:
    unions = codec("WithUnion")
    assert unions.fast is None
    body = unions.decode(memoryview(unions.encode({"a": 3, "u": {"y": "why"}})))
    assert isinstance(body, CapnpBody)
    assert body.a == 3 and body.u.which() == "y" and body.u.y == "why"
    assert body._to_dict() == {"a": 3, "u": {"y": "why"}}
    body._release()


def test_the_fast_codec_can_be_turned_off() -> None:
    slow = StructCodec.from_schema(kv_capnp.Item.schema, "Item", fast=False)
    assert slow.fast is None
    body = slow.decode(memoryview(slow.encode({"tableId": 5, "key": b"key"})))
    assert isinstance(body, CapnpBody) and body.tableId == 5 and bytes(body.key) == b"key"
    body._release()


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "garbage",
    [b"\xff" * 24, b"abc", b"\x00" * 8, b"\x00\x00\x00\x00\x01\x00\x00\x00" + b"\xff" * 8],
)
def test_garbage_raises_malformed_message(fast: bool, garbage: bytes) -> None:
    item = StructCodec.from_schema(kv_capnp.Item.schema, "Item", fast=fast)
    with pytest.raises(MalformedMessage):
        item.decode(memoryview(garbage))


def test_big_data_is_not_joined() -> None:
    results = echo.by_name["echo"].results
    data = b"x" * 1_000_000
    parts = results.encode_parts({"data": data})
    assert any(part is data for part in parts)
    assert results.encode({"data": data}) == b"".join(parts)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=8, max_size=200), st.integers(0, 2), st.booleans())
def test_untrusted_bodies_raise_only_malformed_message(
    data: bytes, segments: int, fast: bool
) -> None:
    """Random segment tables send some messages to pycapnp: the error is the same there."""
    results = StructCodec.from_schema(
        interface_spec(kv_capnp.Master).by_name["multiRead"].results.module.schema,
        "Outcomes",
        fast=fast,
    )
    message = segments.to_bytes(4, "little") + data
    try:
        body = results.decode(memoryview(message))
    except MalformedMessage:
        return
    assert body is not None
    try:
        body._to_dict()
    except MalformedMessage:
        assert isinstance(body, CapnpBody)  # pycapnp reads lazily; the fast codec checked it all
    finally:
        body._release()
