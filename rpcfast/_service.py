"""Service definition: a Cap'n Proto interface plus a Python class with one handler per method.

    class Echo(rpcfast.Service, interface=echo_capnp.Echo):
        @rpcfast.fast
        def ping(self, request: None) -> None: ...
        async def echo(self, request: rpcfast.Body) -> dict[str, object]:
            return {"data": request.data}

Handlers receive the decoded request (a :class:`~rpcfast.Body`, or None for an empty struct) and
return None, a mapping of result fields, or a result builder. ``async def`` handlers run in their
own task and may await (they are cancelled if the client cancels). ``@fast`` handlers are plain
``def`` functions run inline by the dispatcher: no task switch, the lowest latency, but they must
not block.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from rpcfast._schema import InterfaceSpec, interface_spec

F = TypeVar("F", bound=Callable[..., Any])


def fast(fn: F) -> F:
    """Mark a handler to run inline in the dispatcher loop; it must be a plain ``def``."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(f"@fast handler {fn.__qualname__} must be a plain def, not async def")
    fn.__rpcfast_fast__ = True  # type: ignore[attr-defined]
    return fn


def decode_with(decoder: Callable[[memoryview], Any]) -> Callable[[F], F]:
    """Give a handler ``decoder(params message)`` instead of the generic decoded body: for
    the few methods a server answers so often that the generic decoder's cost shows. The
    decoder gets the params message as a memoryview of the receive buffer (valid while the
    handler runs) and returns either a tuple (nothing to release) or what the generic
    decoder returns, to which it should fall back for layouts it does not expect. What it
    raises is answered as the handler's own exception would be (``MalformedMessage``: a
    malformed request)."""

    def mark(fn: F) -> F:
        fn.__rpcfast_decode__ = decoder  # type: ignore[attr-defined]
        return fn

    return mark


def custom_decoder(fn: Callable[..., Any]) -> Callable[[memoryview], Any] | None:
    decoder: Callable[[memoryview], Any] | None = getattr(fn, "__rpcfast_decode__", None)
    return decoder


def is_fast(fn: Callable[..., Any]) -> bool:
    return bool(getattr(fn, "__rpcfast_fast__", False))


class Service:
    """Base class of services; subclass with ``interface=<pycapnp interface>``."""

    rpcfast_spec: ClassVar[InterfaceSpec]

    def __init_subclass__(cls, interface: Any = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if interface is None:
            return  # an abstract base, or a subclass keeping its parent's interface
        spec = interface_spec(interface)
        missing = []
        for method in spec.methods:
            fn = getattr(cls, method.name, None)
            if fn is None:
                missing.append(method.name)
            elif not is_fast(fn) and not inspect.iscoroutinefunction(fn):
                raise TypeError(
                    f"{cls.__qualname__}.{method.name} must be async def, or a def marked @fast"
                )
        if missing:
            raise TypeError(f"{cls.__qualname__} does not implement {', '.join(missing)}")
        cls.rpcfast_spec = spec

    def rpcfast_handlers(self) -> list[tuple[Callable[[Any], Any], bool]]:
        """Bound handlers indexed by method ordinal, with their fast flag."""
        return [
            (getattr(self, m.name), is_fast(getattr(type(self), m.name)))
            for m in self.rpcfast_spec.methods
        ]
