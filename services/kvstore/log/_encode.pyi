"""Entries encoded in place, in C (``_encode.c``); ``_entries.py`` has the pure-Python twins."""

from services.kvstore.log._entries import Buffer

def write_object_into(
    buf: memoryview,
    pos: int,
    table_id: int,
    key: Buffer,
    value: Buffer,
    version: int,
    timestamp: int,
    dead_segment_id: int = -1,
    dead_version: int = 0,
    /,
) -> None: ...
def write_tombstone_into(
    buf: memoryview,
    pos: int,
    table_id: int,
    key: Buffer,
    segment_id: int,
    object_version: int,
    timestamp: int,
    /,
) -> None: ...
def crc32c(data: Buffer, value: int = 0, /) -> int: ...
def hardware_crc() -> bool: ...
def bucket_scan(area: Buffer, entry: int, tag: int, /) -> int: ...
