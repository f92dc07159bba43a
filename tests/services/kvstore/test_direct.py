"""In-place messages: the generic encoder's bytes, read back field for field, and None for
every layout they do not take (the callers then use the generic decoder)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpcfast._schema import interface_spec
from rpcfast._wire import MalformedMessage
from services.kvstore._backup import _decode_write as decode_write_segment
from services.kvstore._direct import DirectStruct, VersionList
from services.kvstore._master import kv_capnp
from services.kvstore._replication import _GENERIC_WRITE as GENERIC_WRITE_SEGMENT
from services.kvstore._replication import _encode_write as encode_write_segment

WRITE = interface_spec(kv_capnp.Master).by_name["write"]
WRITE_SCHEMA = kv_capnp.Master.schema.methods["write"]
PARAMS = DirectStruct(WRITE_SCHEMA.param_type, ["tableId", "key", "value"], flag="hasRules")
RESULTS = DirectStruct(WRITE_SCHEMA.result_type, ["version"])
U64 = st.integers(min_value=0, max_value=2**64 - 1)


def _generic(fields: dict[str, Any]) -> bytes:
    return b"".join(bytes(p) for p in WRITE.params.encode_parts(fields))


@settings(max_examples=200, deadline=None)
@given(U64, st.binary(max_size=70), st.binary(max_size=3000))
def test_encodes_like_the_generic_encoder_and_reads_it_back(
    table_id: int, key: bytes, value: bytes
) -> None:
    message = PARAMS.encode(table_id, key, value)
    assert message == _generic({"tableId": table_id, "key": key, "value": value})
    got = PARAMS.read(memoryview(message))
    assert got is not None
    assert got[0] == table_id and bytes(got[1]) == key and bytes(got[2]) == value
    result = RESULTS.encode(table_id)
    assert result == b"".join(bytes(p) for p in WRITE.results.encode_parts({"version": table_id}))
    assert RESULTS.read(memoryview(result)) == (table_id,)


def test_leaves_other_layouts_to_the_generic_decoder() -> None:
    ruled = _generic(
        {"tableId": 1, "key": b"k", "value": b"v", "hasRules": True, "rejectRules": {}}
    )
    assert PARAMS.read(memoryview(ruled)) is None  # the flag: reject rules to read
    good = PARAMS.encode(1, b"key", b"value")
    assert PARAMS.read(memoryview(good)) is not None
    bad = [
        good[:-8],  # truncated: the segment is longer than the message
        good[:20],  # shorter than the struct
        b"\x01" + good[1:],  # a second segment
        good[:8] + b"\x04" + good[9:],  # the root is not at offset 0
        good[:12] + b"\x03" + good[13:],  # another struct shape
        good[:32] + b"\x08" + good[33:],  # the key's pointer is no list pointer
        good[:44] + b"\x1b" + good[45:],  # the value is a list of 16-bit elements
        good[:44] + b"\xfa\xff\xff\x00" + good[48:],  # the value runs past the segment
        good[:40] + b"\xfd\xff\xff\xff" + good[44:],  # a negative offset (the value's)
    ]
    for message in bad:
        assert PARAMS.read(memoryview(message)) is None, message.hex()


@settings(max_examples=200, deadline=None)
@given(
    U64,
    U64,
    st.integers(min_value=0, max_value=2**32 - 1),
    st.binary(max_size=300),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_replication_writes_are_the_generic_bytes_and_read_back_on_backups(
    master: int, segment: int, offset: int, data: bytes, opening: bool, closing: bool, primary: bool
) -> None:
    params = {
        "masterId": master,
        "segmentId": segment,
        "offset": offset,
        "data": data,
        "open": opening,
        "close": closing,
        "primary": primary,
    }
    message = b"".join(bytes(p) for p in encode_write_segment(params))
    assert message == b"".join(bytes(p) for p in GENERIC_WRITE_SEGMENT.params.encode_parts(params))
    got = decode_write_segment(memoryview(message))
    assert type(got) is tuple
    assert got[:3] == (master, segment, offset) and bytes(got[3]) == data
    assert got[4:] == (opening, closing, primary)


def test_replication_writes_of_big_or_viewed_data_take_the_generic_codec() -> None:
    params: dict[str, Any] = {
        "masterId": 1,
        "segmentId": 2,
        "offset": 0,
        "data": bytes(8192),
        "open": False,
        "close": False,
        "primary": True,
    }
    parts = encode_write_segment(params)
    assert any(p is params["data"] for p in parts)  # sent without a copy
    params["data"] = memoryview(b"view")
    message = b"".join(bytes(p) for p in encode_write_segment(params))
    assert decode_write_segment(memoryview(message))[3] == b"view"  # (same layout)
    with pytest.raises(MalformedMessage):  # truncated: not in place, and the generic decoder
        decode_write_segment(memoryview(message[:-8]))  # refuses it


MULTI_WRITE = interface_spec(kv_capnp.Master).by_name["multiWrite"]
VERSIONS = VersionList(kv_capnp.Outcome.schema, "version")
OUTCOMES = st.lists(
    st.one_of(
        U64.map(lambda v: {"version": v}),
        st.fixed_dictionaries(
            {"status": st.integers(1, 20), "message": st.text(max_size=20)},
            optional={"version": U64},
        ),
        st.fixed_dictionaries({"version": U64, "counter": st.integers(-5, 5)}),
        st.fixed_dictionaries({"version": U64, "value": st.binary(min_size=1, max_size=9)}),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OUTCOMES)
def test_version_lists_are_read_in_place_only_when_every_outcome_is_a_bare_version(
    outcomes: list[dict[str, Any]],
) -> None:
    message = b"".join(bytes(p) for p in MULTI_WRITE.results.encode_parts({"outcomes": outcomes}))
    got = VERSIONS.read(memoryview(message))
    if all(set(o) == {"version"} or o.get("counter") == 0 for o in outcomes):
        assert got == [o["version"] for o in outcomes]  # the generic encoder's layout too
    else:
        assert got is None  # a status, message, value or counter: the generic decoder's
    versions = [o.get("version", 0) for o in outcomes]
    bare = [{"version": v} for v in versions]
    whole = b"".join(bytes(p) for p in MULTI_WRITE.results.encode_parts({"outcomes": bare}))
    assert whole[8:] == VERSIONS.encode(versions)  # after the segment table: the same bytes
    assert VERSIONS.read(memoryview(whole)) == versions


def test_version_lists_of_other_shapes_go_to_the_generic_decoder() -> None:
    good = b"".join(
        bytes(p)
        for p in MULTI_WRITE.results.encode_parts({"outcomes": [{"version": 7}, {"version": 9}]})
    )
    assert VERSIONS.read(memoryview(good)) == [7, 9]
    bad = [
        good[:-8],  # truncated
        good[:16],  # too short for the list
        b"\x01" + good[1:],  # a second segment
        good[:8] + b"\x04" + good[9:],  # the root is not at offset 0
        good[:16] + b"\x0d" + good[17:],  # the list pointer's offset
        good[:24] + b"\x0c" + good[25:],  # the tag's element count
        good[:30] + b"\x03" + good[31:],  # the tag's pointer count
        good + bytes(8),  # a segment longer than the list
    ]
    for message in bad:
        assert VERSIONS.read(memoryview(message)) is None, message.hex()
