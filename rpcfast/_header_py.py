"""Pure-Python :mod:`rpcfast._header` (the C extension ``rpcfast/_header.c``), for installs where
it was not compiled: the session core's datagram header and the RPC header through ``struct``."""

from __future__ import annotations

import struct
from typing import Final

from rpcfast._types import Buffer

HEADER_SIZE: Final = 32
_WORDS: Final = struct.Struct("<IIQQQ")
_REQUEST: Final = struct.Struct("<IHH")  # rpcfast._wire's headers (it imports this module)
_RESPONSE: Final = struct.Struct("<HHI")


def pack_whole(head: int, client_id: int, sequence: int, tail: int, payload: Buffer) -> bytes:
    """A whole message's datagram: the header (length = len(payload)), then the payload."""
    return _WORDS.pack(head, len(memoryview(payload)), client_id, sequence, tail) + payload


def payload_view(datagram: bytes) -> memoryview:
    """``memoryview(datagram)[32:]``: the payload after the header, uncopied."""
    if type(datagram) is not bytes:
        raise TypeError("payload_view: datagram must be bytes")
    if len(datagram) < HEADER_SIZE:
        raise ValueError("payload_view: datagram shorter than a header")
    return memoryview(datagram)[HEADER_SIZE:]


def unpack_head(datagram: bytes) -> tuple[int, int, int, int, int]:
    """The header's five words (head, length, client id, sequence, tail)."""
    if type(datagram) is not bytes:
        raise TypeError("unpack_head: datagram must be bytes")
    if len(datagram) < HEADER_SIZE:
        raise ValueError("unpack_head: datagram shorter than a header")
    head, length, cid, seq, tail = _WORDS.unpack_from(datagram)
    return head, length, cid, seq, tail


def unpack_request(message: Buffer) -> tuple[int, int, int]:
    """The RPC request header (``rpcfast._wire.REQUEST``): (service id, ordinal, flags)."""
    _check(message, "unpack_request")
    service, ordinal, flags = _REQUEST.unpack_from(message)
    return service, ordinal, flags


def unpack_response(message: Buffer) -> tuple[int, int, int]:
    """The RPC response header (``rpcfast._wire.RESPONSE``): (status, flags, code)."""
    _check(message, "unpack_response")
    status, flags, code = _RESPONSE.unpack_from(message)
    return status, flags, code


def _check(message: Buffer, what: str) -> None:
    if len(memoryview(message)) < 8:
        raise ValueError(f"{what}: message shorter than its 8-byte header")
