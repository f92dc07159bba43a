"""Entry encoding: round trips, the header format, and the untrusted parser under fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.kvstore.log import (
    EntryType,
    LogDigestEntry,
    MalformedEntry,
    ObjectEntry,
    SafeVersionEntry,
    SegmentHeaderEntry,
    TombstoneEntry,
    iter_entries_untrusted,
    object_entry_size,
    parse_entry_untrusted,
    tombstone_entry_size,
)
from services.kvstore.log._entries import (
    build_log_digest,
    build_object,
    build_safe_version,
    build_segment_header,
    build_tombstone,
    entry_header,
    length_bytes,
    write_object_into,
    write_tombstone_into,
)


def _join(parts: list[bytes | bytearray | memoryview]) -> bytes:
    return b"".join(bytes(p) for p in parts)


def test_object_round_trip_and_size() -> None:
    parts, size = build_object(7, b"key", b"value!", 42, 1234)
    data = _join(parts)
    assert len(data) == size == object_entry_size(3, 6)
    entry, end = parse_entry_untrusted(data)
    assert entry == ObjectEntry(table_id=7, key=b"key", value=b"value!", version=42, timestamp=1234)
    assert end == len(data)


def test_tombstone_round_trip_names_the_dead_objects_segment() -> None:
    parts, size = build_tombstone(7, b"key", 99, 42, 5)
    data = _join(parts)
    assert len(data) == size == tombstone_entry_size(3)
    entry, _ = parse_entry_untrusted(data)
    assert entry == TombstoneEntry(
        table_id=7, key=b"key", segment_id=99, object_version=42, timestamp=5
    )


def test_metadata_entries_round_trip() -> None:
    data = (
        build_segment_header(3, 11, 8 << 20) + build_log_digest([1, 5, 11]) + build_safe_version(77)
    )
    entries = [e for _, e in iter_entries_untrusted(data)]
    assert entries == [
        SegmentHeaderEntry(log_id=3, segment_id=11, capacity=8 << 20),
        LogDigestEntry(segment_ids=(1, 5, 11)),
        SafeVersionEntry(safe_version=77),
    ]


def test_header_byte_holds_type_and_length_width() -> None:
    assert length_bytes(255) == 1
    assert length_bytes(256) == 2
    assert length_bytes(65536) == 3
    assert length_bytes(1 << 24) == 4
    header = entry_header(EntryType.OBJ, 300)
    assert header[0] & 0x3F == EntryType.OBJ
    assert (header[0] >> 6) + 1 == 2
    assert int.from_bytes(header[1:], "little") == 300


def test_large_value_uses_three_length_bytes() -> None:
    value = bytes(range(256)) * 400
    parts, size = build_object(1, b"k", value, 1, 0)
    data = _join(parts)
    assert (data[0] >> 6) + 1 == 3
    entry, end = parse_entry_untrusted(data)
    assert isinstance(entry, ObjectEntry)
    assert entry.value == value
    assert end == size


def test_iteration_stops_at_zero_fill() -> None:
    data = build_segment_header(0, 1, 4096) + bytes(100)
    assert [o for o, _ in iter_entries_untrusted(data)] == [0]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x3f\x00",  # unknown type 63
        bytes([EntryType.OBJ, 200]) + bytes(10),  # overruns
        bytes([0xC0 | EntryType.OBJ, 1]),  # truncated 4-byte length
        bytes([EntryType.SAFEVERSION, 12]) + struct.pack("<QI", 5, 0),  # bad checksum
        bytes([EntryType.LOGDIGEST, 8]) + struct.pack("<II", 0, 3),  # count disagrees
    ],
)
def test_malformed_inputs_raise_malformed_entry(data: bytes) -> None:
    with pytest.raises(MalformedEntry):
        parse_entry_untrusted(data)


@pytest.mark.parametrize("kind", ["object", "tombstone"])
def test_every_single_bit_flip_is_detected(kind: str) -> None:
    # Includes the type byte: an object must not pass as a tombstone (or the reverse), which is
    # why a tombstone's checksum starts from its own seed.
    if kind == "object":
        data = bytearray(_join(build_object(3, b"abc", b"0123456789", 9, 1)[0]))
    else:
        data = bytearray(_join(build_tombstone(3, b"abc0123456789", 4, 9, 1)[0]))
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            try:
                entry, end = parse_entry_untrusted(bytes(data))
            except MalformedEntry:
                pass
            else:
                pytest.fail(f"flip of bit {bit} in byte {i} parsed as {entry!r} ending {end}")
            data[i] ^= 1 << bit


def test_non_byte_memoryview_is_accepted() -> None:
    data = build_safe_version(3) + bytes(2)
    view = memoryview(data).cast("I")
    entry, _ = parse_entry_untrusted(view)
    assert entry == SafeVersionEntry(3)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=-5, max_value=210))
def test_fuzz_random_bytes_raise_only_malformed_entry(data: bytes, offset: int) -> None:
    try:
        entry, end = parse_entry_untrusted(data, offset)
    except MalformedEntry:
        return
    assert offset < end <= len(data)
    assert entry is not None


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.binary(max_size=40),
    st.binary(max_size=300),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    st.data(),
)
def test_fuzz_mutated_valid_entries(
    table_id: int, key: bytes, value: bytes, version: int, data: st.DataObject
) -> None:
    encoded = bytearray(_join(build_object(table_id, key, value, version, 0)[0]))
    position = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[position] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    try:
        entry, _ = parse_entry_untrusted(bytes(encoded[:cut]))
    except MalformedEntry:
        return
    if isinstance(entry, ObjectEntry):
        assert (entry.table_id, entry.key, entry.value) == (table_id, key, value)


@pytest.mark.parametrize(
    ("klen", "vlen"),
    [(0, 0), (3, 10), (16, 100), (10, 300), (5, 70_000)],  # 1-, 2- and 3-byte lengths
)
@pytest.mark.parametrize("views", [False, True])
def test_in_place_encoders_write_exactly_what_the_builders_build(
    klen: int, vlen: int, views: bool
) -> None:
    key = bytes(range(klen))
    value = bytes(i % 251 for i in range(vlen))
    k: bytes | memoryview = memoryview(key) if views else key
    v: bytes | memoryview = memoryview(value) if views else value
    tomb = _join(build_tombstone(2**64 - 1, key, 17, 41, 0xFFFFFFFF)[0])
    obj = _join(build_object(2**64 - 1, key, value, 42, 0xFFFFFFFF)[0])
    buf = bytearray(b"\xee" * (len(tomb) + len(obj) + 10))
    mv = memoryview(buf)
    write_object_into(mv, 3, 2**64 - 1, k, v, 42, 0xFFFFFFFF)
    assert bytes(buf[3 : 3 + len(obj)]) == obj
    write_object_into(mv, 5, 2**64 - 1, k, v, 42, 0xFFFFFFFF, 17, 41)
    assert bytes(buf[5 : 5 + len(tomb) + len(obj)]) == tomb + obj
    assert buf[:5] == b"\xee" * 3 + obj[:2] and buf[5 + len(tomb) + len(obj) :] == b"\xee" * 5
    write_tombstone_into(mv, 1, 2**64 - 1, k, 17, 41, 0xFFFFFFFF)
    assert bytes(buf[1 : 1 + len(tomb)]) == tomb
