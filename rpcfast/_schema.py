"""Cap'n Proto schemas as an IDL: interfaces name the methods, structs are the wire bodies.

Cap'n Proto objects stay at this codec boundary. An interface becomes an :class:`InterfaceSpec`
(service id, methods by ordinal); each method has param/result codecs. Empty structs are sent as
empty bodies and never touch capnp (the null RPC is the latency-critical path).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any

import attrs
import capnp  # type: ignore[import-untyped,unused-ignore]
from capnp.lib import capnp as _capnp_lib  # type: ignore[import-untyped,unused-ignore]

from rpcfast._types import Buffer

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


class Body:
    """A decoded message body; ``Data`` fields are handed out as zero-copy memoryviews.

    Valid while the message it was read from is alive (the caller keeps the receive buffer).
    Other fields read through to the Cap'n Proto reader. Body's own names start with an
    underscore, so they never shadow a field (Cap'n Proto field names cannot start with one).
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
        return dict(self._reader.to_dict())

    def _release(self) -> None:
        """Release the reader; the body must not be used afterwards."""
        ctx, self._ctx = self._ctx, None  # type: ignore[assignment]
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def __repr__(self) -> str:
        return f"Body({self._reader})"


EMPTY_BODY: bytes = b""
_JOIN_LIMIT = 4096
_ONE_SEGMENT = struct.Struct("<II")


@attrs.frozen
class StructCodec:
    """Encodes keyword arguments or a builder to bytes, and bytes to a :class:`Body`."""

    module: Any
    name: str
    empty: bool
    data_fields: frozenset[str]

    @classmethod
    def from_schema(cls, struct_schema: Any, name: str) -> StructCodec:
        fields = list(struct_schema.fields_list)
        data_fields = frozenset(
            f.proto.name for f in fields if str(f.proto.slot.type.which) == "data"
        )
        module = _capnp_lib._StructModule(struct_schema, name)
        return cls(module=module, name=name, empty=not fields, data_fields=data_fields)

    def encode(self, value: Any) -> bytes:
        """``value``: None, a mapping of field values, or a builder of this struct."""
        if value is None:
            if self.empty:
                return EMPTY_BODY
            value = {}
        if isinstance(value, Mapping):
            if not value and self.empty:
                return EMPTY_BODY
            value = self.module.new_message(**value)
        return b"".join(self.encode_parts(value))

    def encode_parts(self, value: Any) -> list[Buffer]:
        """Like :meth:`encode`, as a scatter list: large messages are never joined.

        pycapnp's ``to_bytes`` costs ~2.5 ms for a 1 MB message here, ``to_segments`` ~50 us; so
        we frame the segments ourselves (Cap'n Proto's stream framing: segment count - 1, each
        segment's size in words, padding to a word). Small one-segment messages are joined
        (cheaper than a scatter send)."""
        if value is None or isinstance(value, Mapping):
            if not value and self.empty:
                return []
            value = self.module.new_message(**(value or {}))
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
        """Raise ``capnp.KjException`` (caught by callers) on garbage."""
        if self.empty and len(body) == 0:
            return None
        if len(body) == 0:
            body = memoryview(self.module.new_message().to_bytes())
        ctx = self.module.from_bytes(body)
        try:
            reader = ctx.__enter__()
        except capnp.KjException as exc:
            if "unaligned" not in str(exc):
                raise
            ctx = self.module.from_bytes(bytes(body))  # bytes objects are 8-byte aligned
            reader = ctx.__enter__()
        return Body(reader, ctx, self.data_fields)


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
