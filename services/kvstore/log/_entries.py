"""Self-identifying, checksummed log entries: their encoding, builders and parsers.

Every entry is ``[type byte][length, 1-4 bytes LE][content]``. The type byte holds the entry type in
its low 6 bits and (number of length bytes - 1) in its high 2 bits, as in RAMCloud's
``Segment::EntryHeader``. Each content carries its own CRC32C, so a replica read back from a backup
during recovery can be walked with :func:`iter_entries_untrusted` without trusting a single byte.

Content layouts (little-endian):

* segment header: ``u64 log_id, u64 segment_id, u32 capacity, u32 crc`` (crc over 20 bytes)
* object: ``u32 crc, u32 timestamp, u64 version, u64 table_id, u8 num_keys(=1), u16 key_length,
  key, value`` (crc over everything after itself)
* tombstone: ``u32 crc, u32 timestamp, u64 table_id, u64 segment_id, u64 object_version, key``
  (crc over everything after itself, like an object's, so it is one pass over the bytes, but
  started from :data:`TOMBSTONE_CRC_SEED`: the type byte is outside every checksum, and an
  object whose type bit flipped must not pass as a tombstone); ``segment_id`` names the segment
  that held the dead object
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
TOMBSTONE_HEADER = struct.Struct("<IIQQQ")
DIGEST_HEADER = struct.Struct("<II")
SAFE_VERSION = struct.Struct("<QI")
_U64 = struct.Struct("<Q")

# Byte offsets of fields inside an object's content, used by the trusted fast paths.
OBJ_VERSION_OFFSET = 8
OBJ_TABLE_OFFSET = 16
OBJ_KEYLEN_OFFSET = 25
OBJ_KEY_OFFSET = OBJECT_HEADER.size
TOMB_TIMESTAMP_OFFSET = 4
TOMB_SEGMENT_OFFSET = 16
TOMB_KEY_OFFSET = TOMBSTONE_HEADER.size
TOMBSTONE_CRC_SEED = 0x746F6D62  # "tomb"

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


# Encoding in place: for each (key length, value length) an entry run's whole layout is one
# cached struct, with the constant type-and-length headers as ``s`` fields, so writing a
# tombstone plus an object is a single ``pack_into`` followed by the checksums, each one pass
# over the bytes in the buffer. Workloads use few distinct sizes; a cache is dropped when it
# grows past _MAX_LAYOUTS.
_MAX_LAYOUTS = 4096
_U32 = struct.Struct("<I")
_TOMB_FIELDS = "IIQQQ"  # crc (packed as 0), timestamp, table id, segment id, version
_OBJ_FIELDS = "IIQQBH"  # crc (packed as 0), timestamp, version, table id, key count, key length

# klen -> (struct, header): a lone tombstone.
_TOMB_LAYOUTS: dict[int, tuple[struct.Struct, bytes]] = {}
# vlen << 17 | klen -> (struct, header): a lone object.
_OBJ_LAYOUTS: dict[int, tuple[struct.Struct, bytes]] = {}
# vlen << 17 | klen -> (struct, tombstone header, object header, tombstone entry size): the
# tombstone of the replaced version followed by the new object.
_PAIR_LAYOUTS: dict[int, tuple[struct.Struct, bytes, bytes, int]] = {}


def _tomb_layout(klen: int) -> tuple[struct.Struct, bytes]:
    head = entry_header(EntryType.OBJTOMB, TOMBSTONE_HEADER.size + klen)
    if len(_TOMB_LAYOUTS) >= _MAX_LAYOUTS:
        _TOMB_LAYOUTS.clear()
    layout = (struct.Struct(f"<{len(head)}s{_TOMB_FIELDS}{klen}s"), head)
    _TOMB_LAYOUTS[klen] = layout
    return layout


def _obj_layout(klen: int, vlen: int) -> tuple[struct.Struct, bytes]:
    head = entry_header(EntryType.OBJ, OBJECT_HEADER.size + klen + vlen)
    if len(_OBJ_LAYOUTS) >= _MAX_LAYOUTS:
        _OBJ_LAYOUTS.clear()
    layout = (struct.Struct(f"<{len(head)}s{_OBJ_FIELDS}{klen}s{vlen}s"), head)
    _OBJ_LAYOUTS[vlen << 17 | klen] = layout
    return layout


def _pair_layout(klen: int, vlen: int) -> tuple[struct.Struct, bytes, bytes, int]:
    tomb_content = TOMBSTONE_HEADER.size + klen
    thead = entry_header(EntryType.OBJTOMB, tomb_content)
    ohead = entry_header(EntryType.OBJ, OBJECT_HEADER.size + klen + vlen)
    if len(_PAIR_LAYOUTS) >= _MAX_LAYOUTS:
        _PAIR_LAYOUTS.clear()
    layout = (
        struct.Struct(
            f"<{len(thead)}s{_TOMB_FIELDS}{klen}s{len(ohead)}s{_OBJ_FIELDS}{klen}s{vlen}s"
        ),
        thead,
        ohead,
        len(thead) + tomb_content,
    )
    _PAIR_LAYOUTS[vlen << 17 | klen] = layout
    return layout


def _as_bytes(data: Buffer) -> bytes | bytearray:
    # struct's "s" fields take bytes and bytearrays only.
    return data if isinstance(data, bytes | bytearray) else bytes(data)


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
) -> None:
    """Encode an object entry straight into ``buf`` at ``pos``.

    With ``dead_segment_id >= 0`` the tombstone of ``dead_version`` (whose object lived in that
    segment) is written first, directly followed by the object. The bytes are those of
    :func:`build_tombstone` and :func:`build_object`, without building them first. ``buf``
    must be a byte buffer with room for the entries at ``pos``.

    The log's request paths use the C twin of this function (``_encode.c``, the same bytes in
    a tenth of the time) where it was built; this one serves pure-Python installs.
    """
    # struct's "s" fields take bytes and bytearrays only; request fields arrive as memoryviews
    if not isinstance(key, bytes | bytearray):
        key = memoryview(key).tobytes()  # (a non-buffer raises TypeError here)
    if not isinstance(value, bytes | bytearray):
        value = memoryview(value).tobytes()
    klen = len(key)
    vlen = len(value)
    if dead_segment_id < 0:
        layout = _OBJ_LAYOUTS.get(vlen << 17 | klen)
        if layout is None:
            layout = _obj_layout(klen, vlen)
        packer, head = layout
        packer.pack_into(buf, pos, head, 0, timestamp, version, table_id, 1, klen, key, value)
        content = pos + len(head)
        end = content + OBJECT_HEADER.size + klen + vlen
    else:
        pair = _PAIR_LAYOUTS.get(vlen << 17 | klen)
        if pair is None:
            pair = _pair_layout(klen, vlen)
        packer, thead, head, tsize = pair
        packer.pack_into(
            buf,
            pos,
            thead,
            0,
            timestamp,
            table_id,
            dead_segment_id,
            dead_version,
            key,
            head,
            0,
            timestamp,
            version,
            table_id,
            1,
            klen,
            key,
            value,
        )
        content = pos + len(thead)
        end = pos + tsize
        _U32.pack_into(buf, content, crc32c(buf[content + 4 : end], TOMBSTONE_CRC_SEED))
        content = end + len(head)
        end = content + OBJECT_HEADER.size + klen + vlen
    _U32.pack_into(buf, content, crc32c(buf[content + 4 : end]))


def write_tombstone_into(
    buf: memoryview,
    pos: int,
    table_id: int,
    key: Buffer,
    segment_id: int,
    object_version: int,
    timestamp: int,
) -> None:
    """Encode a tombstone straight into ``buf`` at ``pos`` (see :func:`write_object_into`)."""
    klen = len(key)
    layout = _TOMB_LAYOUTS.get(klen)
    if layout is None:
        layout = _tomb_layout(klen)
    packer, head = layout
    try:
        packer.pack_into(buf, pos, head, 0, timestamp, table_id, segment_id, object_version, key)
    except struct.error:
        key = _as_bytes(key)
        return write_tombstone_into(buf, pos, table_id, key, segment_id, object_version, timestamp)
    content = pos + len(head)
    end = content + TOMBSTONE_HEADER.size + klen
    _U32.pack_into(buf, content, crc32c(buf[content + 4 : end], TOMBSTONE_CRC_SEED))


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
    rest = TOMBSTONE_HEADER.pack(0, timestamp, table_id, segment_id, object_version)[4:]
    crc = crc32c(key, crc32c(rest, TOMBSTONE_CRC_SEED))
    head = entry_header(EntryType.OBJTOMB, content_length) + crc.to_bytes(4, "little") + rest
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


def _crc_ok(stored: int, *parts: Buffer, seed: int = 0) -> bool:
    crc = seed
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
        crc, ts, table_id, seg, version = TOMBSTONE_HEADER.unpack_from(c)
        if n - TOMBSTONE_HEADER.size > MAX_KEY_LENGTH:
            raise MalformedEntry("tombstone key too long")
        if not _crc_ok(crc, c[4:], seed=TOMBSTONE_CRC_SEED):
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
