"""A pure-Python Cap'n Proto codec for message bodies, compiled once per struct schema.

pycapnp costs ~4 us to read and ~2 us to build even a one-field message; most of that is crossing
into C++ and wrapping readers. Here each struct schema (from pycapnp's schema objects: section
sizes, slot offsets, types, defaults) is compiled into generated Python functions built on
precomputed ``struct.Struct`` layouts: one unpack (or pack) per struct for its data and pointer
sections, and for the root also the framing, when the sections have the sizes we expect.

Wire format: the standard Cap'n Proto encoding in one segment, with stream framing (segment
count - 1, segment size in words). Values are XORed with their schema defaults.

What is not handled here is handed back to pycapnp by the caller (:mod:`rpcfast._schema`):
- a schema that is not supported (:func:`compile_struct` returns None): unions, groups,
  AnyPointer, interfaces, lists of lists, pointer fields with explicit defaults;
- a value the encoder does not take exactly (:class:`Unsupported`): anything but the plain
  Python types below, so pycapnp's coercions and errors stay what they were;
- a message that is valid but unusual (:class:`NeedsFallback`): several segments, far pointers,
  lists encoded with another element size than the schema's (schema upgrades).

Decoding parses untrusted bytes: every offset is bounds-checked against the segment, nesting is
limited to :data:`MAX_DEPTH`, and the words visited are limited to the segment's size plus
:data:`TRAVERSAL_SLACK` (a pointer may alias another's target, and empty elements are free on the
wire), so a message cannot make us loop or allocate much more than its size. Garbage raises
:class:`rpcfast._wire.MalformedMessage` and nothing else.
"""

from __future__ import annotations

import keyword
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rpcfast._types import Buffer
from rpcfast._wire import MalformedMessage

MAX_DEPTH = 64
"""Nesting limit for structs and lists of structs (Cap'n Proto's default)."""

TRAVERSAL_SLACK = 65536
"""Words a message may visit beyond its own size: charged for empty list elements and aliases."""

BIG_DATA = 4096
"""Immutable Data values (bytes, views of bytes) at least this long are sent as their own
scatter buffers instead of copied into the segment."""

_MAX_LIST = (1 << 29) - 1

_HEADER = struct.Struct("<II")
_PTR = struct.Struct("<iI")  # a pointer word: signed low half (offset << 2 | kind), high half
_ROOT = struct.Struct("<IIiI")  # segment table of one segment, then the root pointer
_EMPTY = memoryview(b"")
_PAD = [b"", *(bytes(8 - r) for r in range(1, 8))]  # _PAD[n & 7]: zeros up to a word
_TEXT_TAIL = [bytes(1 + (-(r + 1) & 7)) for r in range(8)]  # NUL, then zeros up to a word


class Unsupported(Exception):
    """The fast encoder does not take this value; the caller encodes it with pycapnp."""


class NeedsFallback(Exception):
    """A valid message the fast decoder does not read (rare); the caller decodes it with pycapnp."""


class Body:
    """A decoded message body: one attribute per field.

    Data fields are zero-copy memoryviews of the receive buffer, valid while it is; Text is str,
    structs are bodies, lists are lists. Body's own names start with an underscore, so they never
    shadow a field (Cap'n Proto field names cannot start with one). Treat bodies as read-only: a
    null struct pointer reads as a default body shared by every message.
    """

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _default: Body | None = None  # the shared body null pointers to this struct read as

    def __getattr__(self, name: str) -> Any:
        """Fields are set per struct (slots); this only types them for the checker."""
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def _to_dict(self) -> dict[str, Any]:
        """Every field as plain values (Data as bytes), except structs behind null pointers
        (as pycapnp's ``to_dict()``: a struct may contain itself)."""
        out = {}
        for name in self._fields:
            value = getattr(self, name)
            if isinstance(value, Body):
                if type(value)._default is value:
                    continue
                out[name] = value._to_dict()
            else:
                out[name] = _plain(value)
        return out

    def _release(self) -> None:
        """Nothing to release: kept for callers written against the pycapnp-backed body."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._to_dict()})"


def _plain(value: Any) -> Any:
    if isinstance(value, Body):
        return value._to_dict()
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# -- schema analysis ----------------------------------------------------------------------------

_INTS = {
    "int8": ("b", 1),
    "int16": ("h", 2),
    "int32": ("i", 4),
    "int64": ("q", 8),
    "uint8": ("B", 1),
    "uint16": ("H", 2),
    "uint32": ("I", 4),
    "uint64": ("Q", 8),
    "enum": ("H", 2),
}
_FLOATS = {"float32": ("f", 4, "I"), "float64": ("d", 8, "Q")}
_ELEMENT_SIZE = {1: 2, 2: 3, 4: 4, 8: 5}  # bytes per element -> list element-size tag


class _Field:
    """One slot of a supported struct, in terms the code generator needs."""

    def __init__(self, name: str, kind: str, offset: int, default: Any, schema: Any) -> None:
        self.name = name
        self.kind = kind  # a pycapnp type name: "uint32", "data", "struct", "list", ...
        self.offset = offset
        self.default = default
        self.schema = schema  # struct schema, enum names, or the list's element description


class _Element:
    """The element type of a supported list."""

    def __init__(self, kind: str, schema: Any) -> None:
        self.kind = kind
        self.schema = schema  # struct schema or enum names


def _struct_key(schema: Any) -> int:
    return int(schema.node.id)


def _enum_names(schema: Any) -> tuple[str, ...]:
    enumerants = schema.node.enum.enumerants
    return tuple(str(e.name) for e in enumerants)


def _element(type_proto: Any, list_schema: Any) -> _Element | None:
    kind = str(type_proto.which())
    if kind in _INTS or kind in _FLOATS or kind in ("bool", "void", "data", "text"):
        if kind == "enum":
            return _Element(kind, _enum_names(list_schema.elementType))
        return _Element(kind, None)
    if kind == "struct":
        return _Element(kind, list_schema.elementType)
    return None  # lists of lists, AnyPointer, interfaces


def _fields_of(schema: Any) -> list[_Field] | None:
    """The fields of a struct, or None when the struct itself is not supported."""
    node = schema.node
    if node.struct.discriminantCount or node.struct.isGroup:
        return None
    fields = []
    for name, field in schema.fields.items():
        proto = field.proto
        if str(proto.which()) != "slot" or not name.isidentifier() or keyword.iskeyword(name):
            return None
        slot = proto.slot
        kind = str(slot.type.which())
        default_value = slot.defaultValue
        info: Any = None
        if kind in _INTS or kind in _FLOATS or kind == "bool":
            default = getattr(default_value, kind)
            if kind == "enum":
                default = int(default)
            if kind == "enum":
                info = _enum_names(field.schema)
            fields.append(_Field(name, kind, int(slot.offset), default, info))
        elif kind == "void":
            fields.append(_Field(name, kind, 0, None, None))
        elif kind in ("data", "text", "struct", "list"):
            if slot.hadExplicitDefault:
                return None
            if kind == "struct":
                info = field.schema
            elif kind == "list":
                info = _element(slot.type.list.elementType, field.schema)
                if info is None:
                    return None
            fields.append(_Field(name, kind, int(slot.offset), None, info))
        else:
            return None
    return fields


def _reachable(schema: Any) -> dict[int, tuple[Any, list[_Field]]] | None:
    """Every struct reachable from ``schema`` with its fields, or None if one is unsupported."""
    found: dict[int, tuple[Any, list[_Field]]] = {}
    todo = [schema]
    while todo:
        current = todo.pop()
        key = _struct_key(current)
        if key in found:
            continue
        fields = _fields_of(current)
        if fields is None:
            return None
        found[key] = (current, fields)
        for f in fields:
            if f.kind == "struct":
                todo.append(f.schema)
            elif f.kind == "list" and f.schema.kind == "struct":
                todo.append(f.schema.schema)
    return found


# -- runtime helpers the generated code calls ---------------------------------------------------
# Naming: ``buf`` the message, ``lo``/``hi`` the segment's byte bounds in it, ``w0``/``w1`` the
# two halves of a pointer word found at ``pos``, ``bud`` the traversal budget (a one-item list),
# ``dep`` the nesting depth. Writers return the pointer word's halves for the caller to pack.


def _bad_pointer(w0: int, w1: int, what: str) -> Any:
    if w0 & 3 == 2:
        raise NeedsFallback("far pointer")
    raise MalformedMessage(f"pointer {w0 & 0xFFFFFFFF:#x}:{w1:#x} where {what} was expected")


def _charge(bud: list[int], words: int) -> None:
    bud[0] -= words
    if bud[0] < 0:
        raise MalformedMessage("message visits too many words (aliased or empty-element lists)")


def _list_start(pos: int, w0: int, lo: int, hi: int, size: int) -> int:
    """Where the list pointer at ``pos`` points, after checking ``size`` bytes fit the segment."""
    start = pos + 8 + ((w0 >> 2) << 3)
    if start < lo or start + size > hi:
        raise MalformedMessage("list pointer out of bounds")
    return start


_BITS = (0, 1, 8, 16, 32, 64, 64)


def _read_primitive_list(
    buf: Any,
    pos: int,
    w0: int,
    w1: int,
    lo: int,
    hi: int,
    bud: list[int],
    tag: int,
    code: str,
    names: tuple[str, ...] | None,
) -> list[Any]:
    if w0 == 0 and w1 == 0:
        return []
    if w0 & 3 != 1:
        return _bad_pointer(w0, w1, "a list")  # type: ignore[no-any-return]
    if w1 & 7 != tag:
        raise NeedsFallback("list of another element size")
    count = w1 >> 3
    size = (count * _BITS[tag] + 7) >> 3
    start = _list_start(pos, w0, lo, hi, size)
    _charge(bud, count if tag == 0 else size >> 3)
    if tag == 0:
        return [None] * count
    if tag == 1:
        bits = int.from_bytes(buf[start : start + size], "little")
        return [(bits >> i) & 1 == 1 for i in range(count)]
    values = list(struct.unpack_from(f"<{count}{code}", buf, start))
    if names is not None:
        n = len(names)
        return [names[v] if v < n else v for v in values]
    return values


def _read_pointer_list(
    buf: Any, pos: int, w0: int, w1: int, lo: int, hi: int, bud: list[int], text: bool
) -> list[Any]:
    if w0 == 0 and w1 == 0:
        return []
    if w0 & 3 != 1:
        return _bad_pointer(w0, w1, "a list")  # type: ignore[no-any-return]
    if w1 & 7 != 6:
        raise NeedsFallback("list of another element size")
    count = w1 >> 3
    start = _list_start(pos, w0, lo, hi, count << 3)
    _charge(bud, count)
    out: list[Any] = []
    append = out.append
    for q in range(start, start + (count << 3), 8):
        e0, e1 = _PTR.unpack_from(buf, q)
        if e0 & 3 == 1 and e1 & 7 == 2:
            t = q + 8 + ((e0 >> 2) << 3)
            e = t + (e1 >> 3)
            if t < lo or e > hi:
                raise MalformedMessage("list element out of bounds")
            _charge(bud, (e - t) >> 3)
            if text:
                if e == t or buf[e - 1] != 0:
                    raise MalformedMessage("text is not NUL-terminated")
                append(str(buf[t : e - 1], "utf-8"))
            else:
                append(buf[t:e])
        elif e0 == 0 and e1 == 0:
            append("" if text else _EMPTY)
        else:
            _bad_pointer(e0, e1, "text" if text else "data")
    return out


def _read_struct(
    buf: Any,
    pos: int,
    w0: int,
    w1: int,
    lo: int,
    hi: int,
    bud: list[int],
    dep: int,
    read: Callable[..., Body],
    default: Body,
) -> Body:
    if w0 & 3:
        return _bad_pointer(w0, w1, "a struct")  # type: ignore[no-any-return]
    if w0 == 0 and w1 == 0:
        return default
    start = pos + 8 + ((w0 >> 2) << 3)
    data_bytes = (w1 & 0xFFFF) << 3
    count = w1 >> 16
    end = start + data_bytes + (count << 3)
    if start < lo or end > hi:
        raise MalformedMessage("struct pointer out of bounds")
    if dep >= MAX_DEPTH:
        raise MalformedMessage("structs nested too deeply")
    _charge(bud, ((end - start) >> 3) + 1)
    return read(buf, start, data_bytes, count, lo, hi, bud, dep + 1)


def _read_struct_list(
    buf: Any,
    pos: int,
    w0: int,
    w1: int,
    lo: int,
    hi: int,
    bud: list[int],
    dep: int,
    read: Callable[..., Body],
) -> list[Body]:
    if w0 == 0 and w1 == 0:
        return []
    if w0 & 3 != 1:
        return _bad_pointer(w0, w1, "a list")  # type: ignore[no-any-return]
    if w1 & 7 != 7:
        raise NeedsFallback("struct list of primitive elements")
    words = w1 >> 3
    start = _list_start(pos, w0, lo, hi, 8 + (words << 3))
    t0, t1 = _PTR.unpack_from(buf, start)
    count = t0 >> 2
    if t0 & 3 or count < 0:
        raise MalformedMessage("bad tag of a struct list")
    data_bytes = (t1 & 0xFFFF) << 3
    pointers = t1 >> 16
    size = data_bytes + (pointers << 3)
    if count * size > words << 3:
        raise MalformedMessage("struct list longer than its words")
    if dep >= MAX_DEPTH:
        raise MalformedMessage("structs nested too deeply")
    _charge(bud, words + count)
    first = start + 8
    dep += 1
    if size:
        return [
            read(buf, q, data_bytes, pointers, lo, hi, bud, dep)
            for q in range(first, first + count * size, size)
        ]
    return [read(buf, first, 0, 0, lo, hi, bud, dep) for _ in range(count)]


def _view(body: Buffer) -> memoryview:
    return memoryview(body).cast("B")


def _decode_slow(body: memoryview, read: Callable[..., Body]) -> Body:
    """Any root pointer: the generated decoders' path when the root is not laid out as ours."""
    n = len(body)
    if n < 16:
        if n == 0:  # an empty body: the default struct
            return read(b"", 0, 0, 0, 0, 0, [TRAVERSAL_SLACK], 0)
        raise MalformedMessage(f"message of {n} bytes is shorter than its framing")
    segments, words, w0, w1 = _ROOT.unpack_from(body, 0)
    if segments:
        raise NeedsFallback("several segments")
    end = 8 + (words << 3)
    if end > n or end < 16:
        raise MalformedMessage(f"segment of {words} words in a message of {n} bytes")
    if w0 & 3:
        return _bad_pointer(w0, w1, "the root struct")  # type: ignore[no-any-return]
    start = 16 + ((w0 >> 2) << 3)
    data_bytes = (w1 & 0xFFFF) << 3
    pointers = w1 >> 16
    if start < 8 or start + data_bytes + (pointers << 3) > end:
        raise MalformedMessage("root struct out of bounds")
    return read(body, start, data_bytes, pointers, 8, end, [words + TRAVERSAL_SLACK], 0)


def _as_fields(value: Any, cls: type[Body]) -> Any:
    """A value for a struct: a mapping, or a body of that struct (re-encoded field by field)."""
    if isinstance(value, Mapping):
        return value
    if type(value) is cls:
        fields = {name: getattr(value, name) for name in cls._fields}
        # a struct read from a null pointer stays null
        return {k: v for k, v in fields.items() if not (isinstance(v, Body) and v is v._default)}
    raise Unsupported(f"{type(value).__name__} for a {cls.__name__} struct")


def _write_data(out: bytearray, slot: int, value: Any, bigs: list[Any]) -> tuple[int, int]:
    cls = value.__class__
    if cls is memoryview:
        if value.itemsize != 1 or value.ndim != 1:
            value = value.cast("B")  # raises for non-contiguous views: pycapnp then decides
        n = len(value)
    elif cls is bytes or cls is bytearray:
        n = len(value)
    else:
        raise Unsupported(f"{cls.__name__} for Data")
    if n > _MAX_LIST:
        raise Unsupported("Data over 512 MiB")
    if n >= BIG_DATA and (cls is bytes or (cls is memoryview and type(value.obj) is bytes)):
        # immutable: sent as it is. A view of a bytearray is copied (below): its owner may
        # change or resize it while the message waits for retransmission.
        bigs.append((slot, value, n))
        return 0, 0  # patched once the segment's small content is laid out
    t = len(out)
    out += value
    out += _PAD[n & 7]
    return ((t - slot - 8) >> 1) | 1, (n << 3) | 2


def _write_text(out: bytearray, slot: int, value: Any) -> tuple[int, int]:
    if value.__class__ is not str:
        raise Unsupported(f"{type(value).__name__} for Text")
    b = value.encode()
    n = len(b) + 1
    if n > _MAX_LIST:
        raise Unsupported("Text over 512 MiB")
    t = len(out)
    out += b
    out += _TEXT_TAIL[(n - 1) & 7]
    return ((t - slot - 8) >> 1) | 1, (n << 3) | 2


def _sequence(value: Any) -> Sequence[Any]:
    if value.__class__ is list or value.__class__ is tuple:
        return value
    raise Unsupported(f"{type(value).__name__} for a list")


def _write_primitive_list(
    out: bytearray, slot: int, value: Any, tag: int, code: str, names: dict[str, int] | None
) -> tuple[int, int]:
    items = _sequence(value)
    count = len(items)
    if count > _MAX_LIST:
        raise Unsupported("list too long")
    t = len(out)
    if tag == 1:
        bits = 0
        for i, v in enumerate(items):
            if v.__class__ is not bool:
                raise Unsupported("non-bool in a List(Bool)")
            bits |= v << i
        size = (count + 7) >> 3
        out += bits.to_bytes(size, "little")
    elif tag:
        if names is not None:
            items = [names[v] if v.__class__ is str else v for v in items]
        packed = struct.pack(f"<{count}{code}", *items)
        size = len(packed)
        out += packed
    else:
        size = 0
    out += _PAD[size & 7]
    return ((t - slot - 8) >> 1) | 1, (count << 3) | tag


def _write_pointer_list(
    out: bytearray, slot: int, value: Any, bigs: list[Any], text: bool
) -> tuple[int, int]:
    items = _sequence(value)
    count = len(items)
    if count > _MAX_LIST:
        raise Unsupported("list too long")
    t = len(out)
    out += bytes(count << 3)
    for i, item in enumerate(items):
        if item is not None:
            q = t + (i << 3)
            w0, w1 = _write_text(out, q, item) if text else _write_data(out, q, item, bigs)
            _PTR.pack_into(out, q, w0, w1)
    return ((t - slot - 8) >> 1) | 1, (count << 3) | 6


def _place_bigs(out: bytearray, bigs: list[Any]) -> list[Buffer]:
    """Lay the big Data values after the small content, as their own scatter buffers."""
    end = len(out)
    parts: list[Buffer] = [out]
    for slot, data, n in bigs:
        _PTR.pack_into(out, slot, ((end - slot - 8) >> 1) | 1, (n << 3) | 2)
        parts.append(data)
        if n & 7:
            parts.append(_PAD[n & 7])
        end += n + (-n & 7)
    words = (end - 8) >> 3
    if words >= 1 << 32:
        raise Unsupported("message over 32 GiB")
    _HEADER.pack_into(out, 0, 0, words)
    return parts


_AS_INT = {"f": "I", "d": "Q"}


def _f2i(code: str) -> Callable[[float], int]:
    pack = struct.Struct("<" + code).pack
    unpack = struct.Struct("<" + _AS_INT[code]).unpack

    def convert(value: float) -> int:
        return int(unpack(pack(value))[0])

    return convert


def _i2f(code: str) -> Callable[[int], float]:
    pack = struct.Struct("<" + _AS_INT[code]).pack
    unpack = struct.Struct("<" + code).unpack

    def convert(value: int) -> float:
        return float(unpack(pack(value))[0])

    return convert


# -- code generation ----------------------------------------------------------------------------

_DECODE_ERRORS = (struct.error, UnicodeDecodeError, IndexError)
_ENCODE_ERRORS = (struct.error, TypeError, ValueError, KeyError, OverflowError, BufferError)

_namespace: dict[str, Any] = {
    name: value
    for name, value in globals().items()
    if name.startswith("_") and not name.startswith("__") and name != "_namespace"
}
_namespace.update(
    _new=object.__new__,
    BIG_DATA=BIG_DATA,
    MAX_DEPTH=MAX_DEPTH,
    TRAVERSAL_SLACK=TRAVERSAL_SLACK,
    MalformedMessage=MalformedMessage,
    Unsupported=Unsupported,
    _f2i_f=_f2i("f"),
    _f2i_d=_f2i("d"),
    _i2f_f=_i2f("f"),
    _i2f_d=_i2f("d"),
)


class StructType:
    """A compiled struct: its body class, generated functions and section sizes.

    ``decode(body)`` reads a framed message (raising :class:`MalformedMessage` or
    :class:`NeedsFallback`); ``encode(value)`` returns its scatter list (raising
    :class:`Unsupported`)."""

    def __init__(self, key: int, name: str, data_words: int, pointers: int) -> None:
        self.key = key
        self.name = name
        self.data_words = data_words
        self.pointers = pointers
        self.cls: type[Body] = Body
        self.decode: Callable[[Buffer], Body] = _unset
        self.encode: Callable[[Any], list[Buffer]] = _unset
        self.read: Callable[..., Body] = _unset
        self.default: Body | None = None


def _unset(*args: Any) -> Any:
    raise AssertionError("struct used before it was compiled")


_compiled: dict[int, StructType] = {}


def _data_layout(fields: list[_Field]) -> tuple[str, list[tuple[str, Any]], int]:
    """The data section as struct format codes (no byte-order prefix), the unpacked items (a
    field, or a list of the bools sharing a byte), and the number of bytes they cover."""
    items: list[tuple[int, int, str, Any]] = []  # byte offset, size, code, what
    bool_bytes: dict[int, list[_Field]] = {}
    for f in fields:
        if f.kind in _INTS:
            code, size = _INTS[f.kind]
            items.append((f.offset * size, size, code, f))
        elif f.kind in _FLOATS:
            code, size, as_int = _FLOATS[f.kind]
            items.append((f.offset * size, size, as_int if f.default else code, f))
        elif f.kind == "bool":
            bool_bytes.setdefault(f.offset >> 3, []).append(f)
    for index, members in bool_bytes.items():
        items.append((index, 1, "B", members))
    items.sort(key=lambda item: item[0])
    fmt = ""
    pos = 0
    layout = []
    for offset, size, code, what in items:
        if offset > pos:
            fmt += f"{offset - pos}x"
        fmt += code
        pos = offset + size
        layout.append((code, what))
    return fmt, layout, pos


class _Source:
    """The generated functions of one struct."""

    def __init__(self, st: StructType, fields: list[_Field]) -> None:
        self.st = st
        self.k = f"{st.key:x}"
        self.fields = fields
        fmt, self.layout, self.need = _data_layout(fields)
        self.db = st.data_words * 8
        self.pc = st.pointers
        self.dvars = [f"d{i}" for i in range(len(self.layout))]
        self.pointer_fields = [f for f in fields if f.kind in ("data", "text", "struct", "list")]
        used = {f.offset for f in self.pointer_fields}
        self.pvars = [
            name
            for i in range(self.pc)
            for name in ((f"l{i}", f"h{i}") if i in used else ("_", "_"))
        ]
        self.pvalues = [
            name
            for i in range(self.pc)
            for name in ((f"l{i}", f"h{i}") if i in used else ("0", "0"))
        ]
        self.section = st.data_words | st.pointers << 16
        self.needs_budget = any(f.kind in ("struct", "list") for f in fields)
        ns, k = _namespace, self.k
        full = fmt + (f"{self.db - self.need}x" if self.db > self.need else "") + "iI" * self.pc
        ns[f"_D_{k}"] = struct.Struct("<" + fmt)
        ns[f"_DZ_{k}"] = bytes(self.need)
        ns[f"_DD_{k}"] = struct.Struct("<" + fmt).unpack(bytes(self.need))
        ns[f"_P_{k}"] = struct.Struct("<" + "iI" * self.pc)
        ns[f"_PZ_{k}"] = bytes(self.pc * 8)
        ns[f"_A_{k}"] = struct.Struct("<" + full)
        ns[f"_T_{k}"] = struct.Struct("<IIiI" + full)
        ns[f"_K_{k}"] = frozenset(f.name for f in fields)
        ns[f"_C_{k}"] = st.cls
        ns[f"_Z_{k}"] = bytes(self.db + self.pc * 8)
        ns[f"_PRE_{k}"] = bytes(16 + self.db + self.pc * 8)

    @staticmethod
    def _tuple(names: list[str]) -> str:
        return ", ".join(names) + ","

    # decoding: expects buf, p (pointer section), lo, hi, bud, dep and the d/l/h variables
    def reads(self, root: bool) -> list[str]:
        k = self.k
        lines = [f"o = _new(_C_{k})"]
        for f in self.fields:
            if f.kind == "void":
                lines.append(f"o.{f.name} = None")
        for var, (_code, what) in zip(self.dvars, self.layout, strict=True):
            if isinstance(what, list):
                for f in what:
                    lines.append(
                        f"o.{f.name} = {var} >> {f.offset & 7} & 1 == {int(not f.default)}"
                    )
                continue
            f, name = what, what.name
            xor = f" ^ {f.default}" if f.default else ""
            if f.kind in _FLOATS:
                code = _FLOATS[f.kind][0]
                if f.default:
                    xor = f" ^ {_f2i(code)(f.default)}"
                    lines.append(f"o.{name} = _i2f_{code}({var}{xor})")
                else:
                    lines.append(f"o.{name} = {var}")
            elif f.kind == "enum":
                _namespace[f"_EN_{k}_{name}"] = f.schema
                lines += [
                    f"x = {var}{xor}",
                    f"o.{name} = _EN_{k}_{name}[x] if x < {len(f.schema)} else x",
                ]
            else:
                lines.append(f"o.{name} = {var}{xor}")
        for f in self.pointer_fields:
            i, name = f.offset, f.name
            w0, w1, at = f"l{i}", f"h{i}", f"(p + {8 * i})" if i else "p"
            if f.kind in ("data", "text"):
                text = f.kind == "text"
                lines += [
                    f"if {w0} & 3 == 1 and {w1} & 7 == 2:",
                    f"    t = {at} + 8 + ({w0} >> 2 << 3)",
                    f"    e = t + ({w1} >> 3)",
                    "    if t < lo or e > hi:",
                    f"        raise MalformedMessage('{f.kind} field {name} out of bounds')",
                ]
                if not root:  # structs in lists may alias one big target: count its words
                    lines += ["    if e - t > 64:", "        _charge(bud, (e - t) >> 3)"]
                if text:
                    lines += [
                        "    if e == t or buf[e - 1] != 0:",
                        f"        raise MalformedMessage('text field {name} not NUL-terminated')",
                        f"    o.{name} = str(buf[t:e - 1], 'utf-8')",
                    ]
                else:
                    lines.append(f"    o.{name} = buf[t:e]")
                lines += [
                    f"elif {w0} == 0 and {w1} == 0:",
                    f"    o.{name} = {'str()' if text else '_EMPTY'}",
                    "else:",
                    f"    _bad_pointer({w0}, {w1}, {f.kind!r})",
                ]
                continue
            args = f"buf, {at}, {w0}, {w1}, lo, hi, bud"
            if f.kind == "struct":
                sk = f"{_struct_key(f.schema):x}"
                lines += [
                    f"if {w0} == 0 and {w1} == 0:",
                    f"    o.{name} = _DEF_{sk}",
                    "else:",
                    f"    o.{name} = _read_struct({args}, dep, _read_{sk}, _DEF_{sk})",
                ]
                continue
            el = f.schema
            if el.kind == "struct":
                sk = f"{_struct_key(el.schema):x}"
                lines.append(f"o.{name} = _read_struct_list({args}, dep, _read_{sk})")
            elif el.kind in ("data", "text"):
                lines.append(f"o.{name} = _read_pointer_list({args}, {el.kind == 'text'})")
            else:
                tag, code = _list_tag(el)
                names = "None"
                if el.kind == "enum":
                    names = f"_EN_{k}_{name}"
                    _namespace[names] = el.schema
                lines.append(f"o.{name} = _read_primitive_list({args}, {tag}, {code!r}, {names})")
        return lines

    def reader(self) -> str:
        """``_read_K(buf, s, db, pc, lo, hi, bud, dep)``: a struct at ``s`` with ``db`` data
        bytes and ``pc`` pointers (checked to fit the segment by the caller)."""
        k, dv, pv = self.k, self.dvars, self.pvars
        lines = [f"def _read_{k}(buf, s, db, pc, lo, hi, bud, dep):", "    p = s + db"]
        body = []
        if dv or pv:
            body += [
                f"if db == {self.db} and pc >= {self.pc}:",
                f"    {self._tuple(dv + pv)} = _A_{k}.unpack_from(buf, s)",
                "else:",
            ]
            if dv:
                body += [
                    f"    if db >= {self.need}:",
                    f"        {self._tuple(dv)} = _D_{k}.unpack_from(buf, s)",
                    "    elif db:",
                    f"        {self._tuple(dv)} = _D_{k}.unpack("
                    f"bytes(buf[s:s + db]) + _DZ_{k}[db:])",
                    "    else:",
                    f"        {self._tuple(dv)} = _DD_{k}",
                ]
            if pv:
                body += [
                    f"    if pc >= {self.pc}:",
                    f"        {self._tuple(pv)} = _P_{k}.unpack_from(buf, p)",
                    "    else:",
                    f"        {self._tuple(pv)} = _P_{k}.unpack("
                    f"bytes(buf[p:p + (pc << 3)]) + _PZ_{k}[pc << 3:])",
                ]
        body += [*self.reads(root=False), "return o"]
        return "\n".join(lines + ["    " + line for line in body])

    def decoder(self) -> str:
        """``_decode_K(body)``: a whole message; one unpack when the root is laid out as ours
        (offset 0, this schema's section sizes), else :func:`_decode_slow`."""
        k, fixed = self.k, 16 + self.db + 8 * self.pc
        body = [
            "try:",
            "    if body.__class__ is not memoryview or body.itemsize != 1:",
            "        body = _view(body)",
            "    n = len(body)",
            f"    if n >= {fixed}:",
            f"        {self._tuple(['g', 'w', 'r0', 'r1', *self.dvars, *self.pvars])} = "
            f"_T_{k}.unpack_from(body, 0)",
            "        hi = 8 + (w << 3)",
            f"        if g == 0 and r0 == 0 and r1 == {self.section} and {fixed} <= hi <= n:",
            f"            buf, lo, p, dep = body, 8, {16 + self.db}, 0",
        ]
        if self.needs_budget:
            body.append("            bud = [w + TRAVERSAL_SLACK]")
        body += ["            " + line for line in self.reads(root=True)]
        body += [
            "            return o",
            f"    return _decode_slow(body, _read_{k})",
            "except _DECODE_ERRORS as exc:",
            "    raise MalformedMessage(f'{type(exc).__name__}: {exc}') from exc",
        ]
        return "\n".join([f"def _decode_{k}(body):"] + ["    " + line for line in body])

    # encoding: expects v, get, out, s, bigs, dep; leaves the d/l/h variables to pack
    def fills(self) -> list[str]:
        k, st = self.k, self.st
        lines = [
            "get = v.get",
            f"if not _K_{k}.issuperset(v):",
            f"    raise Unsupported('no such field in {st.name}: ' + repr(set(v) - _K_{k}))",
        ]
        for var, (_code, what) in zip(self.dvars, self.layout, strict=True):
            if isinstance(what, list):
                bits = []
                for f in what:
                    b = f"b_{f.name}"
                    lines += [
                        f"x = get({f.name!r})",
                        "if x is None:",
                        f"    {b} = 0",
                        "elif x.__class__ is bool:",
                        f"    {b} = {'not x' if f.default else 'x'}",
                        "else:",
                        f"    raise Unsupported(type(x).__name__ + ' for Bool field {f.name}')",
                    ]
                    bits.append(f"{b} << {f.offset & 7}")
                lines.append(f"{var} = {' | '.join(bits)}")
                continue
            f, name = what, what.name
            lines.append(f"x = get({name!r})")
            if f.kind in _FLOATS:
                code = _FLOATS[f.kind][0]
                if f.default:
                    bits_default = _f2i(code)(f.default)
                    lines.append(f"{var} = 0 if x is None else _f2i_{code}(x) ^ {bits_default}")
                else:
                    lines.append(f"{var} = 0.0 if x is None else x")
                continue
            xor = f" ^ {f.default}" if f.default else ""
            if f.kind == "enum":
                _namespace[f"_EV_{k}_{name}"] = {n: i for i, n in enumerate(f.schema)}
                lines.append(f"if x.__class__ is str: x = _EV_{k}_{name}[x]")
            lines.append(f"{var} = 0 if x is None else x{xor}")
        for f in self.pointer_fields:
            i, name = f.offset, f.name
            w0, w1 = f"l{i}", f"h{i}"
            slot = self.db + 8 * i  # from s
            at = f"s + {slot}"
            lines += [f"x = get({name!r})", "if x is None:", f"    {w0} = {w1} = 0"]
            if f.kind == "data":
                lines += [
                    # small bytes, or a plain view of bytes (a request's Data echoed back),
                    # copied in place: _write_data handles the rest
                    "elif (x.__class__ is bytes or (x.__class__ is memoryview and"
                    " x.itemsize == 1 and x.ndim == 1 and x.c_contiguous))"
                    " and len(x) < BIG_DATA:",
                    "    n = len(x)",
                    "    t = len(out)",
                    "    out += x",
                    "    out += _PAD[n & 7]",
                    f"    {w0} = (t - s - {slot + 8}) >> 1 | 1",
                    f"    {w1} = n << 3 | 2",
                    "else:",
                    f"    {w0}, {w1} = _write_data(out, {at}, x, bigs)",
                ]
            elif f.kind == "text":
                lines += ["else:", f"    {w0}, {w1} = _write_text(out, {at}, x)"]
            elif f.kind == "struct":
                sub = _compiled[_struct_key(f.schema)]
                sk = f"{sub.key:x}"
                lines += [
                    "else:",
                    "    if x.__class__ is not dict:",
                    f"        x = _as_fields(x, _C_{sk})",
                    "    if dep >= MAX_DEPTH:",
                    "        raise Unsupported('structs nested too deeply')",
                    "    t = len(out)",
                    f"    out += _Z_{sk}",
                    f"    {w0} = (t - s - {slot + 8}) >> 1",
                    f"    {w1} = {sub.data_words | sub.pointers << 16}",
                    f"    _fill_{sk}(x, out, t, bigs, dep + 1)",
                ]
            else:
                el = f.schema
                if el.kind == "struct":
                    sub = _compiled[_struct_key(el.schema)]
                    sk = f"{sub.key:x}"
                    call = f"_write_list_{sk}(out, {at}, x, bigs, dep)"
                elif el.kind in ("data", "text"):
                    call = f"_write_pointer_list(out, {at}, x, bigs, {el.kind == 'text'})"
                else:
                    tag, code = _list_tag(el)
                    values = "None"
                    if el.kind == "enum":
                        values = f"_EV_{k}_{name}"
                        _namespace[values] = {n: i for i, n in enumerate(el.schema)}
                    call = f"_write_primitive_list(out, {at}, x, {tag}, {code!r}, {values})"
                lines += ["else:", f"    {w0}, {w1} = {call}"]
        return lines

    def filler(self) -> str:
        """``_fill_K(v, out, s, bigs, dep)``: ``v``'s fields into the zeroed block at ``s``,
        its pointers' targets appended to ``out``."""
        k = self.k
        body = self.fills()
        values = self.dvars + self.pvalues
        if values:
            body.append(f"_A_{k}.pack_into(out, s, {', '.join(values)})")
        return "\n".join([f"def _fill_{k}(v, out, s, bigs, dep):"] + ["    " + b for b in body])

    def list_writer(self) -> str:
        """``_write_list_K(out, slot, items, bigs, dep)``: a list of these structs appended to
        ``out`` (tag word, then the elements, then their pointers' targets); returns the list
        pointer's halves. The element filler is inlined: one call per list, not per element."""
        k, words = self.k, self.db // 8 + self.pc
        values = self.dvars + self.pvalues
        body = [
            "if items.__class__ is not list and items.__class__ is not tuple:",
            "    raise Unsupported(type(items).__name__ + ' for a list')",
            "count = len(items)",
            f"if count * {words} > _MAX_LIST or count > _MAX_LIST:",
            "    raise Unsupported('list too long')",
            "if dep >= MAX_DEPTH:",
            "    raise Unsupported('structs nested too deeply')",
            "t0 = len(out)",
            f"out += bytes(8 + count * {words * 8})",
            f"_PTR.pack_into(out, t0, count << 2, {self.section})",
            "s = t0 + 8",
            "dep += 1",
            "for v in items:",
            "    if v.__class__ is not dict:",
            f"        v = _as_fields(v, _C_{k})",
            *("    " + line for line in self.fills()),
        ]
        if values:
            body.append(f"    _A_{k}.pack_into(out, s, {', '.join(values)})")
        body += [
            f"    s += {words * 8}",
            f"return ((t0 - slot - 8) >> 1) | 1, (count * {words}) << 3 | 7",
        ]
        header = f"def _write_list_{k}(out, slot, items, bigs, dep):"
        return "\n".join([header] + ["    " + b for b in body])

    def encoder(self) -> str:
        """``_encode_K(v)``: the framed message as a scatter list."""
        k = self.k
        values = ", ".join(["0", "(len(out) - 8) >> 3", "0", str(self.section)])
        values += "".join(", " + v for v in self.dvars + self.pvalues)
        body = [
            "try:",
            "    if v.__class__ is not dict:",
            f"        v = _as_fields(v, _C_{k})",
            f"    out = bytearray(_PRE_{k})",
            "    bigs = []",
            "    s, dep = 16, 0",
            *("    " + line for line in self.fills()),
            f"    _T_{k}.pack_into(out, 0, {values})",
            "except _ENCODE_ERRORS as exc:",
            "    raise Unsupported(f'{type(exc).__name__}: {exc}') from exc",
            "if bigs:",
            "    return _place_bigs(out, bigs)",
            "return [out]",
        ]
        return "\n".join([f"def _encode_{k}(v):"] + ["    " + b for b in body])


def _list_tag(el: _Element) -> tuple[int, str]:
    """The element-size tag and struct code of a list of primitives."""
    if el.kind == "void":
        return 0, ""
    if el.kind == "bool":
        return 1, ""
    if el.kind in _INTS:
        code, size = _INTS[el.kind]
    else:
        code, size, _ = _FLOATS[el.kind]
    return _ELEMENT_SIZE[size], code


def compile_struct(schema: Any) -> StructType | None:
    """The compiled codec of a pycapnp struct schema (cached), or None when not supported."""
    key = _struct_key(schema)
    known = _compiled.get(key)
    if known is not None:
        return known
    structs = _reachable(schema)
    if structs is None:
        return None
    fresh: list[tuple[StructType, list[_Field]]] = []
    for skey, (sschema, fields) in structs.items():
        if skey in _compiled:
            continue
        node = sschema.node
        display = str(node.displayName).split(":")[-1]
        st = StructType(
            skey, display, int(node.struct.dataWordCount), int(node.struct.pointerCount)
        )
        names = tuple(f.name for f in fields)
        cls_name = display.replace(".", "_").replace("$", "_")
        st.cls = type(cls_name, (Body,), {"__slots__": names, "_fields": names})
        _compiled[skey] = st
        fresh.append((st, fields))
    for st, fields in fresh:
        src = _Source(st, fields)
        parts = [src.reader(), src.decoder(), src.filler(), src.list_writer(), src.encoder()]
        text = "\n\n".join(parts) + "\n"
        exec(compile(text, f"<capnp_fast {st.name}>", "exec"), _namespace)
        k = src.k
        st.read = _namespace[f"_read_{k}"]
        st.decode = _namespace[f"_decode_{k}"]
        st.encode = _namespace[f"_encode_{k}"]
        st.default = st.cls._default = object.__new__(st.cls)  # filled in below
        _namespace[f"_DEF_{k}"] = st.default
    # defaults may refer to each other (a struct may contain itself): fill them in last
    for st, _fields in fresh:
        filled = st.read(b"", 0, 0, 0, 0, 0, [TRAVERSAL_SLACK], 0)
        for field_name in st.cls._fields:
            setattr(st.default, field_name, getattr(filled, field_name))
    return _compiled[key]
