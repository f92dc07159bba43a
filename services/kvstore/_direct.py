"""Messages of the hottest RPCs built and read in place, next to rpcfast's generic codec.

A Cap'n Proto message of one segment whose root struct holds UInt64s, a Bool flag and Data
fields is simple enough to lay out with one ``struct.pack`` (client) and to read with one
``struct.unpack_from`` and a slice per Data field (server): a few hundred instructions of
Python where the generic codec takes several thousand. Only that layout is read in place;
anything else (another encoder's layout, far pointers, several segments, reject rules) goes
to the generic decoder, so no valid message is refused. Layouts come from the schema.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

_PAD = [b"", *(bytes(8 - r) for r in range(1, 8))]


class DirectStruct:
    """One struct's in-place layout: ``ints`` (UInt64 fields), ``datas`` (Data fields, laid
    out in pointer order after the struct, as the generic encoder does) and an optional Bool
    ``flag`` that must be false for :meth:`read` to take a message in place."""

    def __init__(
        self,
        schema: Any,
        ints: Sequence[str],
        datas: Sequence[str],
        flag: str | None = None,
    ) -> None:
        node = schema.node.struct
        slots = {f.proto.name: f.proto.slot.offset for f in schema.fields_list}
        self.data_words: int = node.dataWordCount
        self.pointers: int = node.pointerCount
        self.int_slots = [slots[name] for name in ints]
        self.data_slots = [slots[name] for name in datas]
        if sorted(self.data_slots) != self.data_slots:
            raise ValueError("Data fields must be given in pointer order")
        d, p = self.data_words, self.pointers
        self.shape = d | p << 16
        # encode: segment table (u32 pair), root pointer and the struct's words as u64s
        self._pack = struct.Struct(f"<II{1 + d + p}Q")
        self._root = self.shape << 32
        # read: segment table and root pointer as u32 pairs, data words, pointers as u32 pairs
        self._head = struct.Struct(f"<4I{d}Q{2 * p}I")
        self.min_size = self._head.size
        if flag is None:
            self._flag_index, self._flag_bit = -1, 0
        else:
            word, self._flag_bit = divmod(slots[flag], 64)
            self._flag_index = 4 + word

    def encode(self, ints: Sequence[int], datas: Sequence[bytes]) -> bytes:
        """The whole message (segment table first). ``ints``: 0 <= value < 2**64."""
        d, p = self.data_words, self.pointers
        words = [0] * (d + p)
        for slot, value in zip(self.int_slots, ints, strict=True):
            words[slot] = value
        after = 0  # words of lists laid out so far
        parts = []
        for slot, data in zip(self.data_slots, datas, strict=True):
            n = len(data)
            offset = p - slot - 1 + after  # from the word after the pointer to the list
            words[d + slot] = (n << 3 | 2) << 32 | offset << 2 | 1
            after += n + 7 >> 3
            parts.append(data)
            parts.append(_PAD[n & 7])
        head = self._pack.pack(0, 1 + d + p + after, self._root, *words)
        return head + b"".join(parts)

    def read(self, body: memoryview) -> tuple[Any, ...] | None:
        """``(*ints, *datas)`` (Data as views of ``body``) if the message has the expected
        layout and a false flag, else None."""
        if len(body) < self.min_size:
            return None
        head = self._head.unpack_from(body)
        if head[0] != 0 or head[2] != 0 or head[3] != self.shape:
            return None
        if self._flag_index >= 0 and head[self._flag_index] >> self._flag_bit & 1:
            return None
        limit = 8 + 8 * head[1]
        if limit > len(body):
            return None
        d = self.data_words
        out: list[Any] = [head[4 + slot] for slot in self.int_slots]
        for slot in self.data_slots:
            lo = head[4 + d + 2 * slot]
            hi = head[5 + d + 2 * slot]
            if lo & 3 != 1 or hi & 7 != 2:
                return None
            # from the segment's start: root, data, pointers before it, itself, then the offset
            start = 8 * (3 + d + slot + (lo >> 2))  # (a negative offset is huge: refused)
            end = start + (hi >> 3)
            if end > limit:
                return None
            out.append(body[start:end])
        return tuple(out)
