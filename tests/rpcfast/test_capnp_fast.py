"""The fast codec agrees with pycapnp both ways, honours defaults and schema evolution, and reads
untrusted bytes raising only MalformedMessage, with bounded work."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from capnp.lib import capnp as capnp_lib  # type: ignore[import-untyped,unused-ignore]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpcfast
from rpcfast import _capnp_fast as fast
from rpcfast._wire import MalformedMessage

test_capnp: Any = rpcfast.load_schema(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "capnp_fast_test.capnp")
)
echo_capnp: Any = rpcfast.load_schema("echo.capnp")
kv_capnp: Any = rpcfast.load_schema("kvstore.capnp")
cluster_capnp: Any = rpcfast.load_schema("cluster.capnp")

_RANGES = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
_ONE = struct.Struct("<II")


def _real_structs() -> Iterator[Any]:
    """Every struct of the real schemas: method params and results, and the named structs."""
    for interface in (
        echo_capnp.Echo,
        kv_capnp.Master,
        cluster_capnp.Coordinator,
        cluster_capnp.ServerAdmin,
        cluster_capnp.Backup,
    ):
        for method in interface.schema.methods.values():
            yield method.param_type
            yield method.result_type
    for module, names in (
        (kv_capnp, ("RejectRules", "Item", "Outcome", "Object")),
        (cluster_capnp, ("ServerEntry", "Tablet", "TableInfo", "ReplicaInfo")),
    ):
        for name in names:
            yield getattr(module, name).schema


REAL = list(_real_structs())
TEST = [
    getattr(test_capnp, name).schema
    for name in ("Inner", "Everything", "Defaults", "InnerOld", "HoldsOld", "HoldsNew")
]
SUPPORTED = REAL + TEST


def compiled(schema: Any) -> fast.StructType:
    result = fast.compile_struct(schema)
    assert result is not None, schema.node.displayName
    return result


def module(schema: Any) -> Any:
    return capnp_lib._StructModule(schema, str(schema.node.displayName))


def element_values(type_proto: Any, schema: Any, depth: int) -> st.SearchStrategy[Any]:
    kind = str(type_proto.which())
    if kind in _RANGES:
        return st.integers(*_RANGES[kind])
    if kind == "bool":
        return st.booleans()
    if kind == "float32":
        return st.floats(width=32, allow_nan=False)
    if kind == "float64":
        return st.floats(allow_nan=False)
    if kind == "enum":
        names = [e.name for e in schema.node.enum.enumerants]
        return st.sampled_from(names) | st.integers(0, len(names) - 1)
    if kind == "data":
        big = st.integers(4096, 4200).map(lambda n: b"z" * n)
        return st.binary(max_size=40) | big
    if kind == "text":
        return st.text(max_size=20)
    if kind == "void":
        return st.none()
    if kind == "struct":
        return struct_values(schema, depth + 1)
    assert kind == "list", kind
    element = type_proto.list.elementType
    sub: Any = schema.elementType if str(element.which()) in ("struct", "enum") else None
    elements = element_values(element, sub, depth + 1)
    if str(element.which()) == "enum":  # pycapnp takes only names in a list
        elements = st.sampled_from([e.name for e in sub.node.enum.enumerants])
    return st.lists(elements, max_size=4 if depth < 2 else 1)


def struct_values(schema: Any, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Mappings of a random subset of a struct's fields (the structs here have no unions)."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in schema.fields.items():
        kind = str(field.proto.slot.type.which())
        if kind == "void" or (kind in ("struct", "list") and depth >= 3):
            continue
        sub = field.schema if kind in ("struct", "list", "enum") else None
        fields[name] = element_values(field.proto.slot.type, sub, depth)
    return st.fixed_dictionaries({}, optional=fields)


def plain_pycapnp(schema: Any, value: Any) -> Any:
    """pycapnp's ``to_dict()`` in the fast body's terms: null Data/Text/lists read as empty."""
    out = {}
    for name, field in schema.fields.items():
        kind = str(field.proto.slot.type.which())
        if name in value:
            out[name] = plain_value(field.proto.slot.type, field, value[name])
        elif kind == "data":
            out[name] = b""
        elif kind == "text":
            out[name] = ""
        elif kind == "list":
            out[name] = []
        elif kind == "void":
            out[name] = None
    return out


def plain_value(type_proto: Any, field: Any, value: Any) -> Any:
    kind = str(type_proto.which())
    if kind == "struct":
        return plain_pycapnp(field.schema, value)
    if kind == "list" and str(type_proto.list.elementType.which()) == "struct":
        return [plain_pycapnp(field.schema.elementType, v) for v in value]
    if kind == "list" and str(type_proto.list.elementType.which()) == "enum":
        return [str(v) for v in value]
    if kind == "enum":
        return str(value)
    return value


def framed(builder: Any) -> bytes:
    (segment,) = builder.to_segments()
    return _ONE.pack(0, len(segment) >> 3) + bytes(segment)


def pycapnp_dict(schema: Any, message: bytes) -> dict[str, Any]:
    with module(schema).from_bytes(message) as reader:
        return dict(reader.to_dict())


schemas_and_values = st.sampled_from(SUPPORTED).flatmap(
    lambda schema: st.tuples(st.just(schema), struct_values(schema))
)


def test_every_real_struct_and_the_supported_test_structs_compile() -> None:
    for schema in SUPPORTED:
        compiled(schema)


@pytest.mark.parametrize(
    "name", ["WithUnion", "WithGroup", "WithAny", "WithPointerDefault", "HoldsUnion", "Nested"]
)
def test_unsupported_structs_are_left_to_pycapnp(name: str) -> None:
    assert fast.compile_struct(getattr(test_capnp, name).schema) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_values)
def test_pycapnp_reads_what_we_encode(case: tuple[Any, dict[str, Any]]) -> None:
    schema, value = case
    ours = b"".join(compiled(schema).encode(value))
    assert pycapnp_dict(schema, ours) == dict(module(schema).new_message(**value).to_dict())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schemas_and_values)
def test_we_read_what_pycapnp_encodes(case: tuple[Any, dict[str, Any]]) -> None:
    schema, value = case
    builder = module(schema).new_message(num_first_segment_words=1 << 16, **value)  # one segment
    expected = plain_pycapnp(schema, builder.to_dict())
    st_ = compiled(schema)
    packed = builder.to_bytes()
    builder.clear_write_flag()
    for message in (packed, framed(builder)):
        body = st_.decode(memoryview(message))
        assert body._to_dict() == expected
        # and what we read encodes back to the same values
        again = pycapnp_dict(schema, b"".join(st_.encode(body)))
        assert plain_pycapnp(schema, again) == expected


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=5000))
def test_data_as_bytes_bytearray_or_memoryview_encodes_the_same(data: bytes) -> None:
    st_ = compiled(test_capnp.Everything.schema)
    expected = b"".join(st_.encode({"data": data, "datas": [data]}))
    for form in (bytearray(data), memoryview(data), memoryview(bytearray(data))):
        assert b"".join(st_.encode({"data": form, "datas": [form]})) == expected


def test_data_fields_are_views_of_the_message() -> None:
    message = memoryview(bytearray(framed(module(kv_capnp.Object.schema).new_message(key=b"k"))))
    body = compiled(kv_capnp.Object.schema).decode(message)
    assert isinstance(body.key, memoryview) and body.key.obj is message.obj
    assert isinstance(body.value, memoryview) and len(body.value) == 0


def test_big_immutable_data_is_sent_as_its_own_buffer() -> None:
    st_ = compiled(echo_capnp.Echo.schema.methods["echo"].param_type)
    data = bytes(range(256)) * 4096 + b"odd"
    parts = st_.encode({"data": data})
    assert parts[1] is data and len(parts) == 3 and len(parts[2]) == 5  # padding to a word
    assert bytes(st_.decode(memoryview(b"".join(parts))).data) == data
    view = memoryview(data)[1:]
    assert st_.encode({"data": view})[1] is view
    mutable = bytearray(data)
    (joined,) = st_.encode({"data": mutable})  # copied: its owner may change it
    assert bytes(st_.decode(memoryview(bytes(joined))).data) == data


def test_defaults_are_honoured_both_ways() -> None:
    schema = test_capnp.Defaults.schema
    st_ = compiled(schema)
    declared = {
        "b": True,
        "i8": -5,
        "i32": 123456,
        "i64": -9000000000,
        "u16": 65535,
        "u64": 0xFEDCBA9876543210,
        "f32": 1.5,
        "f64": -2.25,
        "color": "blue",
        "b2": False,
        "b3": True,
        "name": "",
    }
    assert st_.decode(memoryview(framed(module(schema).new_message())))._to_dict() == declared
    assert st_.decode(memoryview(b""))._to_dict() == declared
    primitives = {k: v for k, v in declared.items() if k != "name"}
    assert pycapnp_dict(schema, b"".join(st_.encode({}))) == primitives
    # a default value is all zero bits on the wire
    assert b"".join(st_.encode(primitives)) == b"".join(st_.encode({}))
    flipped = {"b": False, "i8": 5, "f32": -1.5, "color": "red", "b3": False}
    assert pycapnp_dict(schema, b"".join(st_.encode(flipped))).items() >= flipped.items()


def test_null_struct_pointers_read_as_default_structs() -> None:
    st_ = compiled(test_capnp.Everything.schema)
    body = st_.decode(memoryview(b""))
    assert body.inner.n == 0 and body.inner.label == "" and bytes(body.inner.blob) == b""
    assert body.next.next.i8 == 0  # a struct that contains itself
    assert "inner" not in body._to_dict() and "next" not in body._to_dict()
    assert body.inners == [] and body.texts == [] and body.v is None


def test_smaller_and_larger_sections_decode() -> None:
    new = module(test_capnp.HoldsNew.schema)
    inner = {"n": -7, "label": "x", "blob": b"y"}
    message = framed(new.new_message(one=inner, many=[inner, inner], extra=5))
    old = compiled(test_capnp.HoldsOld.schema).decode(memoryview(message))
    assert old._to_dict() == {"one": {"n": -7}, "many": [{"n": -7}, {"n": -7}]}
    message = framed(module(test_capnp.HoldsOld.schema).new_message(one={"n": 3}, many=[{}]))
    blank = {"n": 0, "label": "", "blob": b""}
    assert compiled(test_capnp.HoldsNew.schema).decode(memoryview(message))._to_dict() == {
        "one": {"n": 3, "label": "", "blob": b""},
        "many": [blank],
        "extra": 0,
    }
    # a root written by an older writer (smaller data section, no pointers)
    message = framed(module(test_capnp.InnerOld.schema).new_message(n=0))
    defaults = compiled(test_capnp.Defaults.schema).decode(memoryview(message))
    assert defaults.i8 == -5 and defaults.b is True and defaults.name == ""


def test_root_anywhere_in_the_segment() -> None:
    schema = kv_capnp.Item.schema
    value = {"tableId": 9, "key": b"k", "rejectRules": {"givenVersion": 4}}
    message = framed(module(schema).new_message(**value))
    words = _ONE.unpack_from(message)[1]
    moved = bytearray(_ONE.pack(0, words + 1))
    moved += struct.pack("<iI", 1 << 2, struct.unpack_from("<iI", message, 8)[1])
    moved += b"\xee" * 8 + message[16:]  # everything else keeps its relative offsets
    body = compiled(schema).decode(memoryview(bytes(moved)))
    assert body._to_dict() == compiled(schema).decode(memoryview(message))._to_dict()
    assert body.rejectRules.givenVersion == 4


def test_values_the_fast_encoder_does_not_take_are_refused() -> None:
    st_ = compiled(test_capnp.Everything.schema)
    value: dict[str, Any]
    for value in (
        {"nope": 1},
        {"b": 1},
        {"u8": 256},
        {"u8": -1},
        {"i32": 2.0},
        {"text": b"bytes"},
        {"data": "text"},
        {"inner": 5},
        {"inners": iter([])},
        {"color": "purple"},
        {"f32": 1e300},
    ):
        with pytest.raises(fast.Unsupported):
            st_.encode(value)


def test_nesting_is_bounded() -> None:
    schema = test_capnp.Everything.schema
    value: dict[str, Any] = {"i8": 1}
    for _ in range(fast.MAX_DEPTH + 5):
        value = {"next": value}
    with pytest.raises(fast.Unsupported):
        compiled(schema).encode(value)
    deep = module(schema).new_message(num_first_segment_words=1 << 16, **value).to_bytes()
    with pytest.raises(MalformedMessage, match="nested too deeply"):
        compiled(schema).decode(memoryview(deep))


def _pointer_slot(schema: Any, field: str) -> int:
    """Byte position of a root field's pointer in a message we encoded (root at offset 0)."""
    st_ = compiled(schema)
    return 16 + st_.data_words * 8 + 8 * int(schema.fields[field].proto.slot.offset)


def test_lists_of_empty_elements_cannot_amplify() -> None:
    schema = test_capnp.Everything.schema
    st_ = compiled(schema)
    message = bytearray(b"".join(st_.encode({"voids": [None] * 3})))
    slot = _pointer_slot(schema, "voids")
    w0, _ = struct.unpack_from("<iI", message, slot)
    struct.pack_into("<iI", message, slot, w0, ((2**29 - 1) << 3) | 0)
    with pytest.raises(MalformedMessage, match="too many words"):
        st_.decode(memoryview(bytes(message)))
    # a struct list whose tag claims 2**29 - 1 elements of zero words
    message = bytearray(b"".join(st_.encode({"inners": []})))
    w0, _ = struct.unpack_from("<iI", message, _pointer_slot(schema, "inners"))
    tag = _pointer_slot(schema, "inners") + 8 + (w0 >> 2) * 8
    struct.pack_into("<iI", message, tag, (2**29 - 1) << 2, 0)
    with pytest.raises(MalformedMessage, match="too many words"):
        st_.decode(memoryview(bytes(message)))


@pytest.mark.parametrize("field", ["texts", "datas", "inners"])
def test_aliased_pointers_cannot_amplify(field: str) -> None:
    """Every element's pointer aimed at the first one's 64 KiB: small on the wire, much to read."""
    schema = test_capnp.Everything.schema
    st_ = compiled(schema)
    count = 2000
    big: Any = {"texts": "x" * 65536, "datas": b"x" * 65536, "inners": {"blob": b"x" * 65536}}
    blank: Any = {"texts": "", "datas": b"", "inners": {}}
    message = bytearray(b"".join(st_.encode({field: [big[field]] + [blank[field]] * (count - 1)})))
    w0, _ = struct.unpack_from("<iI", message, _pointer_slot(schema, field))
    first = _pointer_slot(schema, field) + 8 + (w0 >> 2) * 8
    if field == "inners":  # a struct list: the tag word, then Inner's sections
        inner = compiled(test_capnp.Inner.schema)
        step = (inner.data_words + inner.pointers) * 8
        blob = test_capnp.Inner.schema.fields["blob"].proto.slot.offset
        first += 8 + inner.data_words * 8 + 8 * blob
    else:
        step = 8
    e0, e1 = struct.unpack_from("<iI", message, first)
    target = first + 8 + (e0 >> 2) * 8
    for i in range(1, count):
        q = first + step * i
        struct.pack_into("<iI", message, q, ((target - q - 8) >> 3) << 2 | 1, e1)
    with pytest.raises(MalformedMessage, match="too many words"):
        st_.decode(memoryview(bytes(message)))


def test_far_pointers_and_several_segments_need_pycapnp() -> None:
    st_ = compiled(echo_capnp.Echo.schema.methods["echo"].param_type)
    builder = module(echo_capnp.Echo.schema.methods["echo"].param_type).new_message(
        data=b"x" * 100_000
    )
    with pytest.raises(fast.NeedsFallback):
        st_.decode(memoryview(builder.to_bytes()))
    message = bytearray(b"".join(st_.encode({"data": b"abc"})))
    struct.pack_into("<iI", message, 16, 2, 0)  # a far pointer where the data pointer was
    with pytest.raises(fast.NeedsFallback):
        st_.decode(memoryview(bytes(message)))


def test_garbage_text_is_malformed() -> None:
    schema = kv_capnp.Master.schema.methods["createTable"].param_type
    st_ = compiled(schema)
    message = bytearray(b"".join(st_.encode({"name": "ab"})))
    text = message.index(b"ab\x00")
    for patch, error in ((b"\xff\xfe", "UnicodeDecodeError"), (b"abc", "NUL")):
        broken = bytearray(message)
        broken[text : text + len(patch)] = patch
        with pytest.raises(MalformedMessage, match=error):
            st_.decode(memoryview(bytes(broken)))


def _decode_untrusted(schema: Any, message: bytes) -> None:
    """Decode and read every field; only MalformedMessage (or a pycapnp fallback) may result."""
    try:
        body = compiled(schema).decode(memoryview(message))
    except (MalformedMessage, fast.NeedsFallback):
        return
    try:
        body._to_dict()
    except MalformedMessage:
        raise AssertionError("a returned body must read without errors") from None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SUPPORTED), st.binary(max_size=300))
def test_random_bytes_raise_only_malformed(schema: Any, data: bytes) -> None:
    _decode_untrusted(schema, data)
    _decode_untrusted(schema, _ONE.pack(0, len(data) >> 3) + data)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(schemas_and_values, st.data())
def test_mutated_messages_raise_only_malformed(
    case: tuple[Any, dict[str, Any]], data: st.DataObject
) -> None:
    schema, value = case
    message = bytearray(b"".join(compiled(schema).encode(value)))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(message)))
    _decode_untrusted(schema, bytes(message))
    _decode_untrusted(schema, bytes(message[:cut]))
