"""Hand-written codecs for hot methods: ``Connection.stub(codecs=...)`` on the client,
``rpcfast.decode_with`` on a handler; everything else keeps the generic codec."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import trio

import rpcfast
from rpcfast._schema import interface_spec
from rpcfast.testing import EchoService, echo_capnp

ECHO = interface_spec(echo_capnp.Echo).by_name["echo"]
_LEN = struct.Struct("<I")


def _encode(data: bytes) -> list[Any]:
    """The echo params through the generic encoder, with a marker the decoder checks."""
    return ECHO.params.encode_parts({"data": b"custom:" + data})


def _decode_results(body: memoryview) -> tuple[bytes, str]:
    reply = ECHO.results.decode(body)
    assert reply is not None
    return bytes(reply.data), "custom"


def _decode_params(body: memoryview) -> Any:
    request = ECHO.params.decode(body)
    assert request is not None
    data = bytes(request.data)
    request._release()
    if data == b"garbage":
        raise rpcfast.ServiceError("no garbage", code=42)
    return (data.upper(),)  # a tuple: nothing to release


class LoudEcho(EchoService):
    @rpcfast.fast
    @rpcfast.decode_with(_decode_params)
    def echo(self, request: Any) -> Any:
        assert type(request) is tuple
        return {"data": request[0]}


async def test_custom_codecs_on_both_ends() -> None:
    async with rpcfast.serve([LoudEcho()], ["udp://127.0.0.1:0"]) as server:
        async with rpcfast.connect(server.addresses[0], timeout=5) as conn:
            custom = conn.stub(echo_capnp.Echo, codecs={"echo": (_encode, _decode_results)})
            assert await custom.echo(b"abc") == (b"CUSTOM:ABC", "custom")
            assert await custom.ping() is None  # other methods keep the generic codecs
            generic = conn.stub(echo_capnp.Echo)  # and so do other stubs
            reply = await generic.echo(data=b"abc")
            assert reply is not None and bytes(reply.data) == b"ABC"
            with pytest.raises(rpcfast.RemoteError) as caught:
                await generic.echo(data=b"garbage")  # a decoder's error reaches the caller
            assert caught.value.status is rpcfast.Status.APPLICATION_ERROR
            assert caught.value.code == 42
            # the callback-style call takes the custom decoder too (and releases no tuple)
            done = trio.Event()
            got: list[Any] = []

            def callback(result: Any, error: Exception | None) -> None:
                got.append((result, error))
                done.set()

            spec = interface_spec(echo_capnp.Echo)
            conn.start(spec, custom._spec.by_name["echo"], b"x", callback)
            with trio.fail_after(5):
                await done.wait()
            assert got == [((b"CUSTOM:X", "custom"), None)]


def test_codecs_for_an_unknown_method_are_refused() -> None:
    async def main() -> None:
        conn = rpcfast.connect("udp://127.0.0.1:9", timeout=1)
        with pytest.raises(AttributeError):
            conn.stub(echo_capnp.Echo, codecs={"nope": (None, None)})

    trio.run(main)


def test_a_result_that_frames_its_own_message_is_sent_as_it_is() -> None:
    framed = ECHO.results.encode_parts({"data": b"abc"})

    class Framed:
        def rpcfast_message(self) -> list[Any]:
            return framed

    assert ECHO.results.encode_parts(Framed()) is framed
    body = ECHO.results.decode(memoryview(b"".join(bytes(p) for p in framed)))
    assert body is not None and bytes(body.data) == b"abc"
