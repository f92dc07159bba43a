"""Service definitions are checked when the class is made, not when the first request comes."""

from __future__ import annotations

from typing import Any

import pytest

import rpcfast
from rpcfast.testing import EchoService, echo_capnp


def test_missing_method_is_rejected_at_class_creation() -> None:
    with pytest.raises(TypeError, match="does not implement"):

        class Partial(rpcfast.Service, interface=echo_capnp.Echo):
            async def ping(self, request: Any) -> None: ...


def test_sync_handler_must_be_marked_fast() -> None:
    with pytest.raises(TypeError, match="async def, or a def marked @fast"):

        class Sync(EchoService, interface=echo_capnp.Echo):
            def sleep(self, request: Any) -> None:  # type: ignore[override]
                pass


def test_fast_rejects_async_functions() -> None:
    with pytest.raises(TypeError, match="plain def"):

        @rpcfast.fast
        async def handler(self: Any, request: Any) -> None: ...


def test_handlers_are_indexed_by_ordinal() -> None:
    service = EchoService()
    names = [fn.__name__ for fn, _fast in service.rpcfast_handlers()]
    assert names == ["ping", "echo", "fill", "sleep", "fail"]
    assert [fast for _fn, fast in service.rpcfast_handlers()] == [True, True, True, False, False]


async def test_two_services_with_one_interface_cannot_share_a_server() -> None:
    with pytest.raises(ValueError, match="two services"):
        async with rpcfast.serve([EchoService(), EchoService()], ["inproc://dup"]):
            pass
