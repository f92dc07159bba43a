"""Self-identifying, checksummed log entries: their encoding, builders and parsers.

Every entry is ``[type byte][length, 1-4 bytes LE][content]``. The type byte holds the entry type in
its low 6 bits and (number of length bytes - 1) in its high 2 bits, as in RAMCloud's
``Segment::EntryHeader``. Each content carries its own CRC32C, so a replica read back from a backup
during recovery can be walked with :func:`iter_entries_untrusted` without trusting a single byte.

Content layouts (little-endian):

* segment header: ``u64 log_id, u64 segment_id, u32 capacity, u32 crc`` (crc over 20 bytes)
* object: ``u32 crc, u32 timestamp, u64 version, u64 table_id, u8 num_keys(=1), u16 key_length,
  key, value`` (crc over everything after itself)
* tombstone: ``u64 table_id, u64 segment_id, u64 object_version, u32 timestamp, u32 crc, key``
  (crc over everything but itself); ``segment_id`` names the segment that held the dead object
* log digest: ``u32 crc, u32 count, u64 segment_id * count`` (crc over everything after itself)
* safe version: ``u64 safe_version, u32 crc``
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import TypeAlias

import attrs
from crc32c import crc32c

Buffer: TypeAlias = bytes | bytearray | memoryview


class EntryType(enum.IntEnum):
    """Log entry types (RAMCloud ``LogEntryTypes.h`` numbering; at most 64 types)."""

    INVALID = 0
    SEGHEADER = 1
    OBJ = 2
    OBJTOMB = 3
    LOGDIGEST = 4
    SAFEVERSION = 5


class MalformedEntry(ValueError):
    """Bytes that do not form a valid entry: the only error the ``*_untrusted`` parsers raise."""


MAX_KEY_LENGTH = 0xFFFF
MAX_VALUE_LENGTH = 0x100000

SEGMENT_HEADER = struct.Struct("<QQII")
OBJECT_HEADER = struct.Struct("<IIQQBH")
TOMBSTONE_HEADER = struct.Struct("<QQQII")
DIGEST_HEADER = struct.Struct("<II")
SAFE_VERSION = struct.Struct("<QI")
_U64 = struct.Struct("<Q")

# Byte offsets of fields inside an object's content, used by the trusted fast paths.
OBJ_VERSION_OFFSET = 8
OBJ_TABLE_OFFSET = 16
OBJ_KEYLEN_OFFSET = 25
OBJ_KEY_OFFSET = OBJECT_HEADER.size
TOMB_KEY_OFFSET = TOMBSTONE_HEADER.size

_KNOWN_TYPES = frozenset(t.value for t in EntryType if t is not EntryType.INVALID)


def length_bytes(content_length: int) -> int:
    """How many bytes the length field of an entry with this content length takes."""
    if content_length < 0x100:
        return 1
    if content_length < 0x10000:
        return 2
    if content_length < 0x1000000:
        return 3
    return 4


def entry_header(entry_type: int, content_length: int) -> bytes:
    """The type byte and length field that precede an entry's content."""
    n = length_bytes(content_length)
    return bytes(((n - 1) << 6 | entry_type,)) + content_length.to_bytes(n, "little")


def entry_size(content_length: int) -> int:
    """Total bytes an entry with this content length occupies in a segment."""
    if content_length < 0x100:
        return content_length + 2
    if content_length < 0x10000:
        return content_length + 3
    if content_length < 0x1000000:
        return content_length + 4
    return content_length + 5


def object_entry_size(key_length: int, value_length: int) -> int:
    """Bytes an object entry occupies in the log (what ``live_bytes`` accounts per object)."""
    return entry_size(OBJECT_HEADER.size + key_length + value_length)


def tombstone_entry_size(key_length: int) -> int:
    """Bytes a tombstone entry occupies in the log."""
    return entry_size(TOMBSTONE_HEADER.size + key_length)


# Type byte, length field and fixed part of an object (crc left 0) or a tombstone (crc not
# included), one struct per width of the length field; a 3-byte length is a u16 plus a u8.
_OBJ_FIXED = "IIQQBH"
_TOMB_FIXED = "QQQI"
_OBJ_HEADS = (
    struct.Struct("<BB" + _OBJ_FIXED),
    struct.Struct("<BH" + _OBJ_FIXED),
    struct.Struct("<BHB" + _OBJ_FIXED),
    struct.Struct("<BI" + _OBJ_FIXED),
)
_TOMB_HEADS = (
    struct.Struct("<BB" + _TOMB_FIXED),
    struct.Struct("<BH" + _TOMB_FIXED),
    struct.Struct("<BHB" + _TOMB_FIXED),
    struct.Struct("<BI" + _TOMB_FIXED),
)
_U32 = struct.Struct("<I")


def write_object_into(
    buf: memoryview,
    pos: int,
    table_id: int,
    key: Buffer,
    value: Buffer,
    version: int,
    timestamp: int,
) -> int:
    """Encode an object entry straight into ``buf`` at ``pos``; return its size.

    The same bytes as :func:`build_object`, without building them first: the header is packed
    in place, key and value are copied once, and the checksum is one pass over the result.
    ``buf`` must be a byte buffer with room for :func:`object_entry_size` bytes at ``pos``.
    """
    klen = len(key)
    key_at = OBJECT_HEADER.size + klen
    content_length = key_at + len(value)
    if content_length < 0x100:
        _OBJ_HEADS[0].pack_into(buf, pos, 2, content_length, 0, timestamp, version, table_id, 1, klen)
        start = pos + 2
    elif content_length < 0x10000:
        _OBJ_HEADS[1].pack_into(
            buf, pos, 0x42, content_length, 0, timestamp, version, table_id, 1, klen
        )
        start = pos + 3
    elif content_length < 0x1000000:
        _OBJ_HEADS[2].pack_into(
            buf,
            pos,
            0x82,
            content_length & 0xFFFF,
            content_length >> 16,
            0,
            timestamp,
            version,
            table_id,
            1,
            klen,
        )
        start = pos + 4
    else:
        _OBJ_HEADS[3].pack_into(
            buf, pos, 0xC2, content_length, 0, timestamp, version, table_id, 1, klen
        )
        start = pos + 5
    k = start + OBJECT_HEADER.size
    buf[k : k + klen] = key
    end = start + content_length
    buf[start + key_at : end] = value
    _U32.pack_into(buf, start, crc32c(buf[start + 4 : end]))
    return end - pos


def write_tombstone_into(
    buf: memoryview,
    pos: int,
    table_id: int,
    key: Buffer,
    segment_id: int,
    object_version: int,
    timestamp: int,
) -> int:
    """Encode a tombstone straight into ``buf`` at ``pos`` (see :func:`write_object_into`)."""
    klen = len(key)
    content_length = TOMBSTONE_HEADER.size + klen
    if content_length < 0x100:
        _TOMB_HEADS[0].pack_into(
            buf, pos, 3, content_length, table_id, segment_id, object_version, timestamp
        )
        start = pos + 2
    elif content_length < 0x10000:
        _TOMB_HEADS[1].pack_into(
            buf, pos, 0x43, content_length, table_id, segment_id, object_version, timestamp
        )
        start = pos + 3
    else:
        _TOMB_HEADS[2].pack_into(
            buf,
            pos,
            0x83,
            content_length & 0xFFFF,
            content_length >> 16,
            table_id,
            segment_id,
            object_version,
            timestamp,
        )
        start = pos + 4
    crc_at = start + TOMBSTONE_HEADER.size - 4
    k = crc_at + 4
    buf[k : k + klen] = key
    _U32.pack_into(buf, crc_at, crc32c(key, crc32c(buf[start:crc_at])))
    return k + klen - pos


def build_object(
    table_id: int, key: Buffer, value: Buffer, version: int, timestamp: int
) -> tuple[list[Buffer], int]:
    """An object entry as a list of buffers (header, fixed part, key, value) and its total size.

    The key and value are not copied here: the log copies them once, straight into segment memory.
    """
    content_length = OBJECT_HEADER.size + len(key) + len(value)
    rest = OBJECT_HEADER.pack(0, timestamp, version, table_id, 1, len(key))[4:]
    crc = crc32c(value, crc32c(key, crc32c(rest)))
    head = entry_header(EntryType.OBJ, content_length) + crc.to_bytes(4, "little") + rest
    return [head, key, value], entry_size(content_length)


def build_tombstone(
    table_id: int, key: Buffer, segment_id: int, object_version: int, timestamp: int
) -> tuple[list[Buffer], int]:
    """A tombstone entry for an object version that lived in segment ``segment_id``."""
    content_length = TOMBSTONE_HEADER.size + len(key)
    fixed = TOMBSTONE_HEADER.pack(table_id, segment_id, object_version, timestamp, 0)[:-4]
    crc = crc32c(key, crc32c(fixed))
    head = entry_header(EntryType.OBJTOMB, content_length) + fixed + crc.to_bytes(4, "little")
    return [head, key], entry_size(content_length)


def build_segment_header(log_id: int, segment_id: int, capacity: int) -> bytes:
    """The first entry of every segment."""
    fixed = SEGMENT_HEADER.pack(log_id, segment_id, capacity, 0)[:-4]
    return (
        entry_header(EntryType.SEGHEADER, SEGMENT_HEADER.size)
        + fixed
        + crc32c(fixed).to_bytes(4, "little")
    )


def build_log_digest(segment_ids: list[int] | tuple[int, ...]) -> bytes:
    """A digest naming every segment of the log (written at the start of each new head)."""
    body = len(segment_ids).to_bytes(4, "little") + struct.pack(
        f"<{len(segment_ids)}Q", *segment_ids
    )
    content = crc32c(body).to_bytes(4, "little") + body
    return entry_header(EntryType.LOGDIGEST, len(content)) + content


def log_digest_size(count: int) -> int:
    """Bytes a digest naming ``count`` segments occupies."""
    return entry_size(DIGEST_HEADER.size + 8 * count)


def build_safe_version(safe_version: int) -> bytes:
    """A safe-version entry: versions below it may have been handed out already."""
    fixed = _U64.pack(safe_version)
    return (
        entry_header(EntryType.SAFEVERSION, SAFE_VERSION.size)
        + fixed
        + crc32c(fixed).to_bytes(4, "little")
    )


SEGMENT_HEADER_ENTRY_SIZE = entry_size(SEGMENT_HEADER.size)
SAFE_VERSION_ENTRY_SIZE = entry_size(SAFE_VERSION.size)


@attrs.frozen
class SegmentHeaderEntry:
    log_id: int
    segment_id: int
    capacity: int


@attrs.frozen
class ObjectEntry:
    table_id: int
    key: bytes
    value: bytes
    version: int
    timestamp: int


@attrs.frozen
class TombstoneEntry:
    table_id: int
    key: bytes
    segment_id: int
    object_version: int
    timestamp: int


@attrs.frozen
class LogDigestEntry:
    segment_ids: tuple[int, ...]


@attrs.frozen
class SafeVersionEntry:
    safe_version: int


LogEntry: TypeAlias = (
    SegmentHeaderEntry | ObjectEntry | TombstoneEntry | LogDigestEntry | SafeVersionEntry
)


def _crc_ok(stored: int, *parts: Buffer) -> bool:
    crc = 0
    for part in parts:
        crc = crc32c(part, crc)
    return crc == stored


def _parse_content(entry_type: int, c: memoryview) -> LogEntry:
    n = len(c)
    if entry_type == EntryType.OBJ:
        if n < OBJECT_HEADER.size:
            raise MalformedEntry("object shorter than its header")
        crc, ts, version, table_id, num_keys, key_len = OBJECT_HEADER.unpack_from(c)
        if num_keys != 1:
            raise MalformedEntry(f"object with {num_keys} keys")
        if OBJECT_HEADER.size + key_len > n:
            raise MalformedEntry("object key overruns the entry")
        if not _crc_ok(crc, c[4:]):
            raise MalformedEntry("object checksum mismatch")
        key_end = OBJECT_HEADER.size + key_len
        return ObjectEntry(
            table_id, bytes(c[OBJECT_HEADER.size : key_end]), bytes(c[key_end:]), version, ts
        )
    if entry_type == EntryType.OBJTOMB:
        if n < TOMBSTONE_HEADER.size:
            raise MalformedEntry("tombstone shorter than its header")
        table_id, seg, version, ts, crc = TOMBSTONE_HEADER.unpack_from(c)
        if n - TOMBSTONE_HEADER.size > MAX_KEY_LENGTH:
            raise MalformedEntry("tombstone key too long")
        if not _crc_ok(crc, c[: TOMBSTONE_HEADER.size - 4], c[TOMBSTONE_HEADER.size :]):
            raise MalformedEntry("tombstone checksum mismatch")
        return TombstoneEntry(table_id, bytes(c[TOMBSTONE_HEADER.size :]), seg, version, ts)
    if entry_type == EntryType.SEGHEADER:
        if n != SEGMENT_HEADER.size:
            raise MalformedEntry("segment header has the wrong size")
        log_id, seg, capacity, crc = SEGMENT_HEADER.unpack_from(c)
        if not _crc_ok(crc, c[:-4]):
            raise MalformedEntry("segment header checksum mismatch")
        return SegmentHeaderEntry(log_id, seg, capacity)
    if entry_type == EntryType.LOGDIGEST:
        if n < DIGEST_HEADER.size:
            raise MalformedEntry("log digest shorter than its header")
        crc, count = DIGEST_HEADER.unpack_from(c)
        if n != DIGEST_HEADER.size + 8 * count:
            raise MalformedEntry("log digest count does not match its length")
        if not _crc_ok(crc, c[4:]):
            raise MalformedEntry("log digest checksum mismatch")
        return LogDigestEntry(struct.unpack_from(f"<{count}Q", c, DIGEST_HEADER.size))
    if entry_type == EntryType.SAFEVERSION:
        if n != SAFE_VERSION.size:
            raise MalformedEntry("safe version has the wrong size")
        version, crc = SAFE_VERSION.unpack_from(c)
        if not _crc_ok(crc, c[:8]):
            raise MalformedEntry("safe version checksum mismatch")
        return SafeVersionEntry(version)
    raise MalformedEntry(f"unknown entry type {entry_type}")


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    if view.format == "B" and view.ndim == 1:
        return view
    try:
        return view.cast("B")
    except TypeError as exc:
        raise MalformedEntry("buffer must be a contiguous byte buffer") from exc


def parse_entry_untrusted(buf: Buffer, offset: int = 0) -> tuple[LogEntry, int]:
    """Parse the entry at ``offset`` of ``buf``; return it and the offset just past it.

    Raises only :class:`MalformedEntry` (truncation, unknown type, bad layout, bad checksum).
    """
    view = _byte_view(buf)
    end = len(view)
    if offset < 0 or offset >= end:
        raise MalformedEntry("offset outside the buffer")
    first = view[offset]
    entry_type = first & 0x3F
    nlen = (first >> 6) + 1
    if entry_type not in _KNOWN_TYPES:
        raise MalformedEntry(f"unknown entry type {entry_type}")
    start = offset + 1 + nlen
    if start > end:
        raise MalformedEntry("truncated length field")
    length = int.from_bytes(view[offset + 1 : start], "little")
    if start + length > end:
        raise MalformedEntry("entry overruns the buffer")
    return _parse_content(entry_type, view[start : start + length]), start + length


def iter_entries_untrusted(buf: Buffer, start: int = 0) -> Iterator[tuple[int, LogEntry]]:
    """Walk a segment image: yield ``(offset, entry)`` until the end or a zero (INVALID) byte.

    A replica's unused tail is zero-filled, so a zero type byte ends the walk. Raises only
    :class:`MalformedEntry`.
    """
    view = _byte_view(buf)
    offset = start
    while offset < len(view) and view[offset] != 0:
        entry, nxt = parse_entry_untrusted(view, offset)
        yield offset, entry
        offset = nxt
