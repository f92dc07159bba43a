"""The RPC header parsers take any bytes and raise only MalformedMessage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rpcfast import _wire


@given(st.binary(max_size=64))
def test_parsers_raise_only_malformed(data: bytes) -> None:
    for parse in (_wire.parse_request_untrusted, _wire.parse_response_untrusted):
        try:
            fields = parse(memoryview(data))
        except _wire.MalformedMessage:
            assert len(data) < _wire.HEADER_SIZE
        else:
            assert len(fields) == 3


def test_round_trip() -> None:
    header = _wire.REQUEST.pack(0xABCDEF, 7, _wire.FLAG_TRACE)
    assert _wire.parse_request_untrusted(memoryview(header)) == (0xABCDEF, 7, _wire.FLAG_TRACE)
    with pytest.raises(_wire.MalformedMessage):
        _wire.parse_response_untrusted(memoryview(b"1234"))
