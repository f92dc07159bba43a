"""The C entry encoders (``_encode.c``) against their pure-Python twins in ``_entries.py``."""

from __future__ import annotations

import crc32c as crc32c_package
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kvstore.log import _entries

_encode = pytest.importorskip(
    "services.kvstore.log._encode", reason="C encoders not built (pure-Python install)"
)

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)
SMALL = st.binary(max_size=300)


def _pair(size: int) -> tuple[memoryview, memoryview]:
    return memoryview(bytearray(b"\xee" * size)), memoryview(bytearray(b"\xee" * size))


@given(st.binary(max_size=5000), st.sampled_from([0, _entries.TOMBSTONE_CRC_SEED, 2**32 - 1]))
def test_crc32c_matches_the_package(data: bytes, seed: int) -> None:
    assert _encode.crc32c(data, seed) == crc32c_package.crc32c(data, seed)
    assert _encode.crc32c(memoryview(data)) == crc32c_package.crc32c(data)


def test_crc32c_continues_like_the_package() -> None:
    a, b = b"the first part, ", b"and the rest of it"
    assert _encode.crc32c(b, _encode.crc32c(a)) == _encode.crc32c(a + b)
    assert _encode.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


@given(
    key=SMALL,
    value=st.binary(max_size=2000),
    table_id=U64,
    version=U64,
    timestamp=U32,
    dead=st.one_of(st.none(), st.tuples(U64, U64)),
    pos=st.integers(0, 40),
    views=st.booleans(),
)
def test_write_object_into_writes_the_bytes_of_the_python_encoder(
    key: bytes,
    value: bytes,
    table_id: int,
    version: int,
    timestamp: int,
    dead: tuple[int, int] | None,
    pos: int,
    views: bool,
) -> None:
    c_buf, py_buf = _pair(pos + len(value) + 2 * len(key) + 100)
    k = memoryview(bytearray(key)) if views else key
    v = memoryview(bytearray(value)) if views else value
    if dead is None:
        _encode.write_object_into(c_buf, pos, table_id, k, v, version, timestamp)
        _entries.write_object_into(py_buf, pos, table_id, key, value, version, timestamp)
    else:
        args = (table_id, k, v, version, timestamp, *dead)
        _encode.write_object_into(c_buf, pos, *args)
        _entries.write_object_into(py_buf, pos, table_id, key, value, version, timestamp, *dead)
    assert c_buf.tobytes() == py_buf.tobytes()


def test_a_negative_dead_segment_means_no_tombstone() -> None:
    c_buf, py_buf = _pair(300)
    _encode.write_object_into(c_buf, 1, 7, b"key", b"value", 3, 9, -1, 0)
    _entries.write_object_into(py_buf, 1, 7, b"key", b"value", 3, 9)
    assert c_buf.tobytes() == py_buf.tobytes()


@pytest.mark.parametrize(("klen", "vlen"), [(0, 0), (10, 300), (5, 70_000), (0xFFFF, 1 << 20)])
def test_every_length_field_size_round_trips(klen: int, vlen: int) -> None:
    key, value = bytes(range(256)) * (klen // 256) + bytes(klen % 256), b"v" * vlen
    c_buf, py_buf = _pair(2 * klen + vlen + 200)
    _encode.write_object_into(c_buf, 0, 1, key, value, 2, 3, 4, 5)
    _entries.write_object_into(py_buf, 0, 1, key, value, 2, 3, 4, 5)
    assert c_buf.tobytes() == py_buf.tobytes()
    size = _entries.tombstone_entry_size(klen) + _entries.object_entry_size(klen, vlen)
    (_, tomb), (_, obj) = _entries.iter_entries_untrusted(c_buf[:size].tobytes())
    assert tomb == _entries.TombstoneEntry(1, key, 4, 5, 3)
    assert isinstance(obj, _entries.ObjectEntry) and (obj.key, obj.value) == (key, value)


@given(key=SMALL, table_id=U64, segment_id=U64, version=U64, timestamp=U32, pos=st.integers(0, 9))
def test_write_tombstone_into_writes_the_bytes_of_the_python_encoder(
    key: bytes, table_id: int, segment_id: int, version: int, timestamp: int, pos: int
) -> None:
    c_buf, py_buf = _pair(pos + len(key) + 60)
    args = (table_id, memoryview(key), segment_id, version, timestamp)
    _encode.write_tombstone_into(c_buf, pos, *args)
    _entries.write_tombstone_into(py_buf, pos, *args)
    assert c_buf.tobytes() == py_buf.tobytes()


def test_bad_arguments_raise_and_write_nothing() -> None:
    buf = memoryview(bytearray(200))
    wo, wt = _encode.write_object_into, _encode.write_tombstone_into
    cases: list[tuple[type[Exception], object]] = [
        (ValueError, lambda: wo(buf, 100, 1, b"k", b"v" * 80, 1, 1)),  # does not fit
        (ValueError, lambda: wo(buf, 150, 1, b"k", b"v" * 10, 1, 1, 2, 3)),  # nor with its tomb
        (ValueError, lambda: wo(buf, -1, 1, b"k", b"v", 1, 1)),
        (ValueError, lambda: wo(buf, 201, 1, b"", b"", 1, 1)),
        (ValueError, lambda: wt(buf, 190, 1, b"k", 1, 1, 1)),
        (ValueError, lambda: wo(memoryview(bytearray(1 << 17)), 0, 1, b"k" * 65536, b"", 1, 1)),
        (OverflowError, lambda: wo(buf, 0, -1, b"k", b"v", 1, 1)),
        (OverflowError, lambda: wo(buf, 0, 2**64, b"k", b"v", 1, 1)),
        (OverflowError, lambda: wo(buf, 0, 1, b"k", b"v", 1, 2**32)),
        (OverflowError, lambda: wo(buf, 0, 1, b"k", b"v", 1, 1, 2, -3)),
        (OverflowError, lambda: wt(buf, 0, 1, b"k", -2, 1, 1)),
        (TypeError, lambda: wo(buf, 0, 1, "key", b"v", 1, 1)),  # str is no buffer
        (TypeError, lambda: wo(buf, 0, 1.0, b"k", b"v", 1, 1)),
        (BufferError, lambda: wo(bytes(200), 0, 1, b"k", b"v", 1, 1)),  # read-only
        (TypeError, lambda: wo(buf, 0, 1, b"k", b"v", 1)),
        (TypeError, lambda: wt(buf, 0, 1, b"k", 1, 1)),
        (TypeError, lambda: _encode.crc32c()),
        (OverflowError, lambda: _encode.crc32c(b"", 2**32)),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()  # type: ignore[operator]
    assert buf.tobytes() == bytes(200)
