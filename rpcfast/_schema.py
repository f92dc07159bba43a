"""Cap'n Proto schemas as an IDL: interfaces name the methods, structs are the wire bodies.

Cap'n Proto objects stay at this codec boundary. An interface becomes an :class:`InterfaceSpec`
(service id, methods by ordinal); each method has param/result codecs. Empty structs are sent as
empty bodies and never touch capnp (the null RPC is the latency-critical path). Bodies are
encoded and decoded by the pure-Python codec of :mod:`rpcfast._capnp_fast` where it can (pycapnp
costs ~2-4 us per message even for one field), and by pycapnp otherwise.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import attrs
import capnp  # type: ignore[import-untyped,unused-ignore]
from capnp.lib import capnp as _capnp_lib  # type: ignore[import-untyped,unused-ignore]

from rpcfast._capnp_fast import Body as Body  # re-exported: the public name of decoded bodies
from rpcfast._capnp_fast import NeedsFallback, StructType, Unsupported, compile_struct
from rpcfast._types import Buffer
from rpcfast._wire import MalformedMessage

_SCHEMA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "schemas")
_loaded: dict[str, Any] = {}


def schema_dir() -> str:
    """The repository's ``schemas/`` directory."""
    return _SCHEMA_DIR


def load_schema(path: str) -> Any:
    """Load (once) a ``.capnp`` file; a bare file name is looked up in ``schemas/``."""
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(_SCHEMA_DIR, path)
    path = os.path.abspath(path)
    module = _loaded.get(path)
    if module is None:
        module = capnp.load(path, imports=[_SCHEMA_DIR])
        _loaded[path] = module
    return module


class CapnpBody(Body):
    """A body read through pycapnp: for structs or messages the fast codec does not read.

    Valid while the message it was read from is alive (the caller keeps the receive buffer).
    Top-level ``Data`` fields are zero-copy memoryviews; other fields read through to the Cap'n
    Proto reader (so nested Data is bytes, and errors may surface as ``capnp.KjException``
    when a field is read).
    """

    __slots__ = ("_ctx", "_data_fields", "_reader")

    def __init__(self, reader: Any, ctx: AbstractContextManager[Any], data_fields: frozenset[str]):
        self._reader = reader
        self._ctx = ctx
        self._data_fields = data_fields

    def __getattr__(self, name: str) -> Any:
        if name in self._data_fields:
            return self._reader.get_data_as_view(name)
        return getattr(self._reader, name)

    def _to_dict(self) -> dict[str, Any]:
        try:
            return dict(self._reader.to_dict())
        except (capnp.KjException, UnicodeDecodeError) as exc:
            raise MalformedMessage(str(exc)) from exc

    def _release(self) -> None:
        """Release the reader; the body must not be used afterwards."""
        ctx, self._ctx = self._ctx, None  # type: ignore[assignment]
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def __repr__(self) -> str:
        return f"CapnpBody({self._reader})"


EMPTY_BODY: bytes = b""
_JOIN_LIMIT = 4096
_ONE_SEGMENT = struct.Struct("<II")
_FAST = os.environ.get("RPCFAST_CAPNP", "fast") != "pycapnp"


@attrs.frozen
class StructCodec:
    """Encodes field mappings (or bodies, or builders) to bytes, and bytes to a :class:`Body`.

    The fast codec (:mod:`rpcfast._capnp_fast`) does the work when it supports the struct, the
    value and the message; pycapnp does the rest. ``RPCFAST_CAPNP=pycapnp`` in the environment
    turns the fast codec off (for A/B measurements)."""

    module: Any
    name: str
    empty: bool
    data_fields: frozenset[str]
    fast: StructType | None = None

    @classmethod
    def from_schema(cls, struct_schema: Any, name: str, *, fast: bool = _FAST) -> StructCodec:
        fields = list(struct_schema.fields_list)
        data_fields = frozenset(
            f.proto.name
            for f in fields
            if str(f.proto.which()) == "slot" and str(f.proto.slot.type.which()) == "data"
        )
        module = _capnp_lib._StructModule(struct_schema, name)
        return cls(
            module=module,
            name=name,
            empty=not fields,
            data_fields=data_fields,
            fast=compile_struct(struct_schema) if fast else None,
        )

    def encode(self, value: Any) -> bytes:
        """``value``: None, a mapping of field values, a body or a builder of this struct."""
        if value is None:
            if self.empty:
                return EMPTY_BODY
            value = {}
        elif self.empty and isinstance(value, Mapping) and not value:
            return EMPTY_BODY
        parts = self.encode_parts(value)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def encode_parts(self, value: Any) -> list[Buffer]:
        """Like :meth:`encode`, as a scatter list: large messages are never joined.

        The fast codec sends Data of 4 KiB or more as its own buffer. For pycapnp, whose
        ``to_bytes`` costs ~2.5 ms for a 1 MB message here and ``to_segments`` ~50 us, we frame
        the segments ourselves (Cap'n Proto's stream framing: segment count - 1, each segment's
        size in words, padding to a word). Small one-segment messages are joined (cheaper than a
        scatter send).

        A value with an ``rpcfast_message()`` method (a hand-written result, say) returns the
        whole message itself, framing included, as a scatter list."""
        fast = self.fast
        cls = value.__class__
        if cls is not dict and value is not None:
            message = getattr(value, "rpcfast_message", None)
            if message is not None:
                parts: list[Buffer] = message()
                return parts
        if value is None or cls is dict or isinstance(value, Mapping):
            if not value and self.empty:
                return []
            if fast is not None:
                try:
                    return fast.encode(value or {})
                except Unsupported:
                    pass  # pycapnp takes it, or raises its own error for it
            value = self.module.new_message(**(value or {}))
        elif fast is not None and cls is fast.cls:
            try:
                return fast.encode(value)
            except Unsupported:
                value = self.module.new_message(**value._to_dict())
        segments = value.to_segments()
        if len(segments) == 1:
            segment = segments[0]
            table = _ONE_SEGMENT.pack(0, len(segment) >> 3)
            if len(segment) <= _JOIN_LIMIT:
                return [table + segment]
            return [table, segment]
        return self._frame(segments)

    @staticmethod
    def _frame(segments: list[Any]) -> list[Any]:
        count = len(segments)
        sizes = [len(s) >> 3 for s in segments]
        if count % 2 == 0:  # count-1 plus count sizes is odd: pad the table to a whole word
            sizes.append(0)
        return [struct.pack(f"<{len(sizes) + 1}I", count - 1, *sizes), *segments]

    def decode(self, body: memoryview) -> Body | None:
        """Raise :class:`MalformedMessage` (caught by callers) on garbage."""
        if self.empty and len(body) == 0:
            return None
        fast = self.fast
        if fast is not None:
            try:
                return fast.decode(body)
            except NeedsFallback:
                pass  # valid but unusual (several segments, far pointers): pycapnp reads it
        return self.decode_capnp(body)

    def decode_capnp(self, body: memoryview) -> CapnpBody:
        """Read with pycapnp. Its reader is lazy: the message's pointers are checked here, Text
        when it is read (``capnp.KjException`` or ``UnicodeDecodeError`` then)."""
        if len(body) == 0:
            body = memoryview(self.module.new_message().to_bytes())
        try:
            ctx = self.module.from_bytes(body)
            try:
                reader = ctx.__enter__()
            except capnp.KjException as exc:
                if "unaligned" not in str(exc):
                    raise
                ctx = self.module.from_bytes(bytes(body))  # bytes objects are 8-byte aligned
                reader = ctx.__enter__()
            try:
                reader.total_size  # noqa: B018 (walks every pointer: bad ones raise here)
            except BaseException:
                ctx.__exit__(None, None, None)
                raise
        except (capnp.KjException, ValueError) as exc:  # ValueError: not whole words
            raise MalformedMessage(str(exc)) from exc
        return CapnpBody(reader, ctx, self.data_fields)


@attrs.frozen
class CustomCodec(StructCodec):
    """A struct codec with a hand-written encoder and/or decoder for one hot method, on the
    client (see ``Connection.stub(codecs=...)``): the encoder takes whatever the caller passes
    as params and returns the message's scatter list (segment table first, as
    :meth:`StructCodec.encode_parts` does); the decoder takes the result message and returns
    what the call returns. What they leave out is the generic codec's."""

    custom_encode: Callable[[Any], list[Buffer]] | None = None
    custom_decode: Callable[[memoryview], Any] | None = None

    @classmethod
    def over(
        cls,
        base: StructCodec,
        *,
        encode: Callable[[Any], list[Buffer]] | None = None,
        decode: Callable[[memoryview], Any] | None = None,
    ) -> CustomCodec:
        return cls(
            module=base.module,
            name=base.name,
            empty=base.empty,
            data_fields=base.data_fields,
            fast=base.fast,
            custom_encode=encode,
            custom_decode=decode,
        )

    def encode_parts(self, value: Any) -> list[Buffer]:
        encode = self.custom_encode
        if encode is None:
            return super().encode_parts(value)
        return encode(value)

    def decode(self, body: memoryview) -> Any:
        decode = self.custom_decode
        if decode is None:
            return super().decode(body)
        return decode(body)


@attrs.frozen
class MethodSpec:
    name: str
    ordinal: int
    params: StructCodec
    results: StructCodec


@attrs.frozen
class InterfaceSpec:
    """A Cap'n Proto interface seen as an RPC service: id, name and methods by ordinal."""

    service_id: int
    name: str
    methods: tuple[MethodSpec, ...]
    by_name: Mapping[str, MethodSpec]

    @classmethod
    def from_interface(cls, interface: Any) -> InterfaceSpec:
        schema = getattr(interface, "schema", interface)
        node = schema.node
        name = node.displayName.split(":")[-1]
        methods = []
        for ordinal, method_name in enumerate(schema.method_names):
            method = schema.methods[method_name]
            methods.append(
                MethodSpec(
                    name=method_name,
                    ordinal=ordinal,
                    params=StructCodec.from_schema(
                        method.param_type, f"{name}.{method_name}$Params"
                    ),
                    results=StructCodec.from_schema(
                        method.result_type, f"{name}.{method_name}$Results"
                    ),
                )
            )
        return cls(
            service_id=node.id & 0xFFFFFFFF,
            name=name,
            methods=tuple(methods),
            by_name={m.name: m for m in methods},
        )


_specs: dict[int, InterfaceSpec] = {}


def interface_spec(interface: Any) -> InterfaceSpec:
    """The (cached) spec of a pycapnp interface object."""
    schema = getattr(interface, "schema", interface)
    key = schema.node.id
    spec = _specs.get(key)
    if spec is None:
        spec = InterfaceSpec.from_interface(schema)
        _specs[key] = spec
    return spec
