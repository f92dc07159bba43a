"""The session core's datagram header and the RPC header in C (``rpcfast._header``) and in pure
Python (``rpcfast._header_py``): both agree with the ``struct`` layouts they replace."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpcfast import _header_py, _session, _wire

try:
    from rpcfast import _header
except ImportError:  # a pure-Python install
    _header = None  # type: ignore[assignment]

IMPLS = [
    pytest.param(_header_py, id="python"),
    pytest.param(
        _header,
        id="c",
        marks=pytest.mark.skipif(_header is None, reason="C extension not built"),
    ),
]

U32 = st.integers(0, (1 << 32) - 1)
U64 = st.integers(0, (1 << 64) - 1)


def test_the_session_core_and_the_wire_module_use_the_built_module() -> None:
    expected = _header if _header is not None else _header_py
    assert _wire.header is expected
    assert _session._pack_whole is expected.pack_whole
    assert expected.HEADER_SIZE == _session.HEADER_SIZE


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=200, deadline=None)
@given(head=U32, cid=U64, seq=U64, tail=U64, payload=st.binary(max_size=300))
def test_datagram_header_matches_struct(
    impl: Any, head: int, cid: int, seq: int, tail: int, payload: bytes
) -> None:
    datagram = impl.pack_whole(head, cid, seq, tail, payload)
    assert datagram == _session._FAST.pack(head, len(payload), cid, seq, tail) + payload
    assert impl.unpack_head(datagram) == (head, len(payload), cid, seq, tail)
    for view in (bytearray(payload), memoryview(payload)):
        assert impl.pack_whole(head, cid, seq, tail, view) == datagram


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=200, deadline=None)
@given(a=U32, b=st.integers(0, 0xFFFF), c=st.integers(0, 0xFFFF), tail=st.binary(max_size=20))
def test_rpc_headers_match_struct(impl: Any, a: int, b: int, c: int, tail: bytes) -> None:
    request = _wire.REQUEST.pack(a, b, c) + tail
    response = _wire.RESPONSE.pack(b, c, a) + tail
    for make in (bytes, bytearray, memoryview):
        assert impl.unpack_request(make(request)) == (a, b, c)
        assert impl.unpack_response(make(response)) == (b, c, a)
    assert impl.unpack_request(memoryview(b"xx" + request)[2:]) == (a, b, c)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arguments_raise_instead_of_reading_or_writing_garbage(impl: Any) -> None:
    with pytest.raises(ValueError):
        impl.unpack_head(bytes(31))
    with pytest.raises(TypeError):
        impl.unpack_head(bytearray(32))  # the session core hands it bytes only
    for unpack in (impl.unpack_request, impl.unpack_response):
        with pytest.raises(ValueError):
            unpack(b"1234567")
        with pytest.raises(ValueError):
            unpack(memoryview(bytes(16))[10:])
        released = memoryview(bytes(16))
        released.release()
        with pytest.raises(ValueError):
            unpack(released)
    for words in ((-1, 0, 0, 0), (0, 1 << 64, 0, 0), (0, 0, -5, 0), (0, 0, 0, 1 << 64)):
        with pytest.raises((OverflowError, ValueError, struct_error())):
            impl.pack_whole(*words, b"")
    with pytest.raises((OverflowError, struct_error())):
        impl.pack_whole(1 << 32, 0, 0, 0, b"")
    with pytest.raises(TypeError):
        impl.pack_whole(0, 0, 0, 0, "not bytes")


def struct_error() -> type[Exception]:
    import struct

    return struct.error


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=2000))
def test_payload_view_is_the_datagram_after_its_header(impl: Any, payload: bytes) -> None:
    datagram = bytes(range(32)) + payload
    view = impl.payload_view(datagram)
    expected = memoryview(datagram)[32:]
    assert view == expected and view.tobytes() == payload and len(view) == len(payload)
    assert view.readonly and view.obj is datagram and view.format == "B"
    assert view.nbytes == len(payload) and view.shape == (len(payload),)
    assert bytes(view[1:5]) == payload[1:5] and bytes(view[::-1]) == payload[::-1]
    if len(payload) >= 8:
        assert view[:8].cast("Q")[0] == int.from_bytes(payload[:8], "little")
    del datagram  # the view keeps it alive
    assert view.tobytes() == payload


@pytest.mark.parametrize("impl", IMPLS)
def test_payload_view_refuses_what_it_cannot_view(impl: Any) -> None:
    with pytest.raises(ValueError):
        impl.payload_view(bytes(31))
    for other in (bytearray(40), memoryview(bytes(40))):
        with pytest.raises(TypeError):
            impl.payload_view(other)
    assert impl.payload_view(bytes(32)) == b""
