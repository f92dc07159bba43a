"""The RPC header that precedes every message body.

A fixed binary struct, not Cap'n Proto: it is read on every message (a struct unpack costs
~0.2 us, a capnp read ~3 us). Both headers are 8 bytes so Cap'n Proto bodies stay 8-byte aligned.

Request:  service id (u32), method ordinal (u16), flags (u16)
Response: status (u16), flags (u16), code (u32: the service's own error code, 0 when OK)
A traced response carries four u64 server timestamps after the header (``TRACE``).
"""

from __future__ import annotations

import struct
from typing import Final

try:  # the headers read in C (built with the compiled hot path), else through struct
    from rpcfast import _header as header  # (re-exported: the compiled modules read it)
except ImportError:  # pragma: no cover - pure Python installs
    from rpcfast import _header_py as header  # type: ignore[no-redef]

__all__ = [
    "FLAG_TRACE",
    "HEADER_SIZE",
    "REQUEST",
    "RESPONSE",
    "TRACE",
    "MalformedMessage",
    "header",
    "parse_request_untrusted",
    "parse_response_untrusted",
]

REQUEST: Final = struct.Struct("<IHH")
RESPONSE: Final = struct.Struct("<HHI")
TRACE: Final = struct.Struct("<QQQQ")
HEADER_SIZE: Final = 8

FLAG_TRACE: Final = 0x1


class MalformedMessage(Exception):
    """The only error the ``*_untrusted`` parsers raise."""


def parse_request_untrusted(message: memoryview) -> tuple[int, int, int]:
    if len(message) < HEADER_SIZE:
        raise MalformedMessage(f"request of {len(message)} bytes is shorter than its header")
    return REQUEST.unpack_from(message)


def parse_response_untrusted(message: memoryview) -> tuple[int, int, int]:
    if len(message) < HEADER_SIZE:
        raise MalformedMessage(f"response of {len(message)} bytes is shorter than its header")
    return RESPONSE.unpack_from(message)
