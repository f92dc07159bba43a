"""Server ids: ``(generation << 32) | index``.

The coordinator reuses the index of a server that left, with a higher generation, so a stale id
held by a peer never names the server that took its slot. Index 0 is never handed out: id 0 means
"no server" on the wire (``replacesId``, ``callerId``).
"""

from __future__ import annotations

INDEX_BITS = 32
INDEX_MASK = (1 << INDEX_BITS) - 1
INVALID_SERVER_ID = 0


def make_server_id(index: int, generation: int) -> int:
    """Pack ``index`` (1 .. 2**32-1) and ``generation`` (0 .. 2**32-1) into a server id."""
    if not 0 < index <= INDEX_MASK:
        raise ValueError(f"server index {index} out of range")
    if not 0 <= generation <= INDEX_MASK:
        raise ValueError(f"server generation {generation} out of range")
    return (generation << INDEX_BITS) | index


def server_index(server_id: int) -> int:
    """The slot of ``server_id`` in the server list."""
    return server_id & INDEX_MASK


def server_generation(server_id: int) -> int:
    """How many times the slot of ``server_id`` had been reused when it was assigned."""
    return server_id >> INDEX_BITS


def format_server_id(server_id: int) -> str:
    """``index.generation``, the way logs name a server."""
    return f"{server_index(server_id)}.{server_generation(server_id)}"
