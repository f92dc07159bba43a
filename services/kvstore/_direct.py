"""Messages of the hottest RPCs built and read in place, next to rpcfast's generic codec.

A Cap'n Proto message of one segment whose root struct holds UInt64s, a Bool flag and Data
fields is simple enough to lay out with one ``struct.pack`` (client) and to read with one
``struct.unpack_from`` and a slice per Data field (server): a few hundred instructions of
Python where the generic codec takes several thousand. Only that layout is read in place;
anything else (another encoder's layout, far pointers, several segments, reject rules) goes
to the generic decoder, so no valid message is refused. Layouts come from the schema, and
each struct gets its own straight-line encode and read functions, generated once (loops over
the fields would cost as much as the generic codec's work).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

_PAD = [b"", *(bytes(8 - r) for r in range(1, 8))]


class DirectStruct:
    """One struct's in-place layout: ``ints`` (UInt64 fields), ``datas`` (Data fields, laid
    out in pointer order after the struct, as the generic encoder does) and an optional Bool
    ``flag`` that must be false for :attr:`read` to take a message in place.

    ``encode(*ints, *datas)`` returns the whole message (segment table first; each int in
    ``0 <= value < 2**64``, each data a ``bytes``). ``read(body)`` returns ``(*ints, *datas)``
    (Data as views of ``body``) if the message has the expected layout and a false flag, else
    None.
    """

    encode: Callable[..., bytes]
    read: Callable[[memoryview], tuple[Any, ...] | None]

    def __init__(
        self,
        schema: Any,
        ints: Sequence[str],
        datas: Sequence[str],
        flag: str | None = None,
    ) -> None:
        node = schema.node.struct
        slots = {f.proto.name: f.proto.slot.offset for f in schema.fields_list}
        d, p = node.dataWordCount, node.pointerCount
        int_slots = [slots[name] for name in ints]
        data_slots = [slots[name] for name in datas]
        if sorted(data_slots) != data_slots:
            raise ValueError("Data fields must be given in pointer order")
        self.shape = d | p << 16
        pack = struct.Struct(f"<II{1 + d + p}Q")  # segment table, root, the struct's words
        head = struct.Struct(f"<4I{d}Q{2 * p}I")  # table and root as u32 pairs, data, pointers
        self.min_size = head.size
        env: dict[str, Any] = {"PACK": pack.pack, "UNPACK": head.unpack_from, "PAD": _PAD}

        # encode: the words in order, pointers computed from the lengths
        ints_args = [f"i{k}" for k in range(len(int_slots))]
        data_args = [f"d{k}" for k in range(len(data_slots))]
        lines = [f"def encode({', '.join(ints_args + data_args)}):"]
        for k in range(len(data_slots)):
            lines.append(f"    n{k} = len(d{k})")
            lines.append(f"    w{k} = (n{k} + 7) >> 3")
        words = ["0"] * (d + p)
        for k, slot in enumerate(int_slots):
            words[slot] = f"i{k}"
        for k, slot in enumerate(data_slots):
            before = " + ".join(f"w{j}" for j in range(k)) or "0"
            words[d + slot] = f"((n{k} << 3 | 2) << 32 | ({p - slot - 1} + {before}) << 2 | 1)"
        total = " + ".join([str(1 + d + p), *(f"w{k}" for k in range(len(data_slots)))])
        tail = "".join(f" + d{k} + PAD[n{k} & 7]" for k in range(len(data_slots)))
        lines.append(f"    return PACK(0, {total}, {self.shape << 32}, {', '.join(words)}){tail}")

        # read: check the table, the root, the flag and every Data pointer, then slice
        lines.append("def read(body):")
        lines.append(f"    if len(body) < {head.size}:")
        lines.append("        return None")
        lines.append("    h = UNPACK(body)")
        checks = ["h[0] != 0", "h[2] != 0", f"h[3] != {self.shape}"]
        if flag is not None:
            word, bit = divmod(slots[flag], 64)
            checks.append(f"h[{4 + word}] >> {bit} & 1")
        lines.append(f"    if {' or '.join(checks)}:")
        lines.append("        return None")
        lines.append("    limit = 8 + 8 * h[1]")
        lines.append("    if limit > len(body):")
        lines.append("        return None")
        out = [f"h[{4 + slot}]" for slot in int_slots]
        for k, slot in enumerate(data_slots):
            lo, hi = 4 + d + 2 * slot, 5 + d + 2 * slot
            lines.append(f"    lo = h[{lo}]")
            lines.append(f"    hi = h[{hi}]")
            lines.append("    if lo & 3 != 1 or hi & 7 != 2:")
            lines.append("        return None")
            # from the segment's start: root, data, pointers before it, itself, the offset
            # (a negative offset reads as a huge one: refused by the limit)
            lines.append(f"    s{k} = 8 * ({3 + d + slot} + (lo >> 2))")
            lines.append(f"    e{k} = s{k} + (hi >> 3)")
            lines.append(f"    if e{k} > limit:")
            lines.append("        return None")
            out.append(f"body[s{k}:e{k}]")
        lines.append(f"    return ({', '.join(out)},)")
        exec(compile("\n".join(lines), f"<DirectStruct {schema}>", "exec"), env)
        self.encode = env["encode"]
        self.read = env["read"]
