"""Messages of the hottest RPCs built and read in place, next to rpcfast's generic codec.

A Cap'n Proto message of one segment whose root struct holds integers, Bools and Data fields
is simple enough to lay out with one ``struct.pack`` (client) and to read with one
``struct.unpack_from`` and a slice per Data field (server): a few hundred instructions of
Python where the generic codec takes several thousand. Only that layout is read in place;
anything else (another encoder's layout, far pointers, several segments, reject rules) goes
to the generic decoder, so no valid message is refused. Layouts come from the schema, and
each struct gets its own straight-line encode and read functions, generated once (loops over
the fields would cost as much as the generic codec's work).
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable, Sequence
from typing import Any, Final

_PAD = [b"", *(bytes(8 - r) for r in range(1, 8))]


_KINDS = ("uint64", "uint32", "bool", "data")


class DirectStruct:
    """One struct's in-place layout for ``fields`` (UInt64, UInt32, Bool or Data fields of
    the schema, in any order; Data fields are laid out in pointer order after the struct, as
    the generic encoder does) and an optional Bool ``flag`` that must be false for
    :attr:`read` to take a message in place.

    ``encode(*values)`` (one per field, in order) returns the whole message, segment table
    first; integers must fit their field, Data values must be ``bytes``. ``read(body)``
    returns the values in the same order (Data as views of ``body``, Bools as bools) if the
    message has the expected layout and a false flag, else None.
    """

    encode: Callable[..., bytes]
    read: Callable[[memoryview], tuple[Any, ...] | None]

    def __init__(self, schema: Any, fields: Sequence[str], flag: str | None = None) -> None:
        node = schema.node.struct
        info = {
            f.proto.name: (str(f.proto.slot.type.which()), f.proto.slot.offset)
            for f in schema.fields_list
            if str(f.proto.which()) == "slot"
        }
        d, p = node.dataWordCount, node.pointerCount
        kinds = [info[name][0] for name in fields]
        if any(kind not in _KINDS for kind in kinds):
            raise ValueError(f"only {', '.join(_KINDS)} fields: {fields} are {kinds}")
        data_slots = [info[name][1] for name in fields if info[name][0] == "data"]
        if sorted(data_slots) != data_slots:
            raise ValueError("Data fields must be given in pointer order")
        self.shape = d | p << 16
        pack = struct.Struct(f"<II{1 + d + p}Q")  # segment table, root, the struct's words
        head = struct.Struct(f"<4I{d}Q{2 * p}I")  # table and root as u32 pairs, data, pointers
        self.min_size = head.size
        env: dict[str, Any] = {"PACK": pack.pack, "UNPACK": head.unpack_from, "PAD": _PAD}

        # encode: every word as an expression of the arguments, pointers from the lengths
        args = [f"a{k}" for k in range(len(fields))]
        lines = [f"def encode({', '.join(args)}):"]
        parts: list[list[str]] = [[] for _ in range(d + p)]
        datas = []  # (argument, pointer slot) in pointer order
        for arg, name, kind in zip(args, fields, kinds, strict=True):
            slot = info[name][1]
            if kind == "uint64":
                parts[slot].append(arg)
            elif kind == "uint32":
                parts[slot // 2].append(f"{arg} << {32 * (slot % 2)}")
            elif kind == "bool":
                parts[slot // 64].append(f"({arg} and 1) << {slot % 64}")
            else:
                datas.append((arg, slot))
        for k, (arg, _slot) in enumerate(datas):
            lines.append(f"    n{k} = len({arg})")
            lines.append(f"    w{k} = (n{k} + 7) >> 3")
        for k, (_arg, slot) in enumerate(datas):
            before = " + ".join(f"w{j}" for j in range(k)) or "0"
            parts[d + slot].append(f"(n{k} << 3 | 2) << 32 | ({p - slot - 1} + {before}) << 2 | 1")
        words = [" | ".join(f"({e})" for e in exprs) or "0" for exprs in parts]
        total = " + ".join([str(1 + d + p), *(f"w{k}" for k in range(len(datas)))])
        tail = "".join(f" + {arg} + PAD[n{k} & 7]" for k, (arg, _slot) in enumerate(datas))
        lines.append(f"    return PACK(0, {total}, {self.shape << 32}, {', '.join(words)}){tail}")

        # read: check the table, the root, the flag and every Data pointer, then take fields
        lines.append("def read(body):")
        lines.append(f"    if len(body) < {head.size}:")
        lines.append("        return None")
        lines.append("    h = UNPACK(body)")
        checks = ["h[0] != 0", "h[2] != 0", f"h[3] != {self.shape}"]
        if flag is not None:
            word, bit = divmod(info[flag][1], 64)
            checks.append(f"h[{4 + word}] >> {bit} & 1")
        lines.append(f"    if {' or '.join(checks)}:")
        lines.append("        return None")
        lines.append("    limit = 8 + 8 * h[1]")
        lines.append("    if limit > len(body):")
        lines.append("        return None")
        out = []
        for k, (name, kind) in enumerate(zip(fields, kinds, strict=True)):
            slot = info[name][1]
            if kind == "uint64":
                out.append(f"h[{4 + slot}]")
            elif kind == "uint32":
                out.append(f"h[{4 + slot // 2}] >> {32 * (slot % 2)} & 0xFFFFFFFF")
            elif kind == "bool":
                out.append(f"h[{4 + slot // 64}] >> {slot % 64} & 1 == 1")
            else:
                lo, hi = 4 + d + 2 * slot, 5 + d + 2 * slot
                lines.append(f"    lo = h[{lo}]")
                lines.append(f"    hi = h[{hi}]")
                lines.append("    if lo & 3 != 1 or hi & 7 != 2:")
                lines.append("        return None")
                # from the segment's start: root, data, pointers before it, itself, the
                # offset (a negative offset reads as a huge one: refused by the limit)
                lines.append(f"    s{k} = 8 * ({3 + d + slot} + (lo >> 2))")
                lines.append(f"    e{k} = s{k} + (hi >> 3)")
                lines.append(f"    if e{k} > limit:")
                lines.append("        return None")
                out.append(f"body[s{k}:e{k}]")
        lines.append(f"    return ({', '.join(out)},)")
        exec(compile("\n".join(lines), f"<DirectStruct {schema}>", "exec"), env)
        self.encode = env["encode"]
        self.read = env["read"]


class VersionList:
    """The results of a multi-op whose every item succeeded with a version, in place: a root
    struct with one pointer to a composite list of ``element`` structs (say ``Outcome``) in which
    only the UInt64 ``field`` is set, every other word zero (status 0, no message).

    :meth:`encode` (the master) lays the versions into one zeroed segment with a strided slice
    assignment: the generic encoder fills each element field by field. :meth:`read` (the client)
    takes the versions back out with one strided slice after checking that every other word of
    the list is zero, or returns None for any other message (an error among the outcomes,
    another encoder's layout), which then goes to the generic decoder.
    """

    def __init__(self, element: Any, field: str) -> None:
        node = element.node.struct
        data, pointers = int(node.dataWordCount), int(node.pointerCount)
        slots = {f.proto.name: f.proto.slot.offset for f in element.fields_list}
        self.words = data + pointers  # per element
        self.field = int(slots[field])  # a 64-bit slot: its word in the data section
        self._tag_high = (data | pointers << 16) << 32
        self._zeros: dict[int, bytes] = {}

    def encode(self, versions: Sequence[int]) -> bytes:
        """The message's one segment (no segment table: rpcfast frames builders' segments)."""
        n = len(versions)
        stride = self.words
        words = array("Q", bytes(8 * (3 + n * stride)))
        words[0] = _ONE_POINTER_ROOT
        words[1] = (n * stride << 3 | 7) << 32 | 1  # composite list right after the root
        words[2] = self._tag_high | n << 2  # the tag word: element count, struct size
        words[3 + self.field :: stride] = array("Q", versions)
        if sys.byteorder != "little":
            words.byteswap()
        return words.tobytes()

    def read(self, body: memoryview) -> list[int] | None:
        """The versions of a whole message (segment table first) laid out as :meth:`encode`
        does, else None."""
        size = len(body)
        if size < 32 or size % 8 or sys.byteorder != "little":
            return None
        head, segment_words, root, list_ptr, tag = _READ_HEAD(body)
        stride = self.words
        n = (segment_words - 3) // stride
        if (
            head != 0  # one segment
            or segment_words * 8 != size - 8
            or root != _ONE_POINTER_ROOT
            or list_ptr != (n * stride << 3 | 7) << 32 | 1
            or tag != self._tag_high | n << 2
            or 3 + n * stride != segment_words
        ):
            return None
        words = body[8:].cast("Q")
        zeros = self._zeros.get(n)
        if zeros is None:
            zeros = self._zeros[n] = bytes(8 * n)
        for word in range(stride):
            if word != self.field and words[3 + word :: stride].tobytes() != zeros:
                return None  # an outcome with a status, message, value or counter
        versions: list[int] = words[3 + self.field :: stride].tolist()
        return versions


_ONE_POINTER_ROOT: Final = 1 << 48  # struct pointer, offset 0, no data words, one pointer
_READ_HEAD: Final = struct.Struct("<IIQQQ").unpack_from
