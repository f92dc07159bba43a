"""rpcfast's public test kit: the echo service and helpers to run it in a subprocess.

The echo service (``schemas/echo.capnp``) is what tests, ``make run`` and ``perf/`` exercise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import trio

from rpcfast._errors import ServiceError
from rpcfast._schema import Body, load_schema
from rpcfast._service import Service, fast

echo_capnp: Any = load_schema("echo.capnp")


class EchoService(Service, interface=echo_capnp.Echo):
    """Echo, ping, fill, sleep and fail: enough to test every path of the framework."""

    def __init__(self) -> None:
        self.pings = 0

    @fast
    def ping(self, request: None) -> None:
        self.pings += 1

    @fast
    def echo(self, request: Body) -> dict[str, Any]:
        return {"data": request.data}

    @fast
    def fill(self, request: Body) -> dict[str, Any]:
        return {"data": bytes(request.size)}

    async def sleep(self, request: Body) -> None:
        await trio.sleep(request.seconds)

    async def fail(self, request: Body) -> None:
        raise ServiceError(request.message, code=request.code)


def spawn_echo_server(
    addresses: Sequence[str], *, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``python -m rpcfast.testing`` serving the echo service; return it and its addresses.

    The child prints its bound addresses on one line, then serves until stdin closes or it dies.
    """
    env = dict(os.environ, **(extra_env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpcfast.testing", *addresses],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("echo server exited before reporting its addresses")
    return proc, line.split()


def stop_echo_server(proc: subprocess.Popen[str]) -> None:
    """Kill a :func:`spawn_echo_server` child (if it still runs), reap it, close its pipes."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


async def _serve_main(addresses: Sequence[str]) -> None:
    from rpcfast._server import serve

    async with serve([EchoService()], addresses) as server:
        print(" ".join(server.addresses), flush=True)
        # serve until our parent closes stdin (or kills us)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


if __name__ == "__main__":
    trio.run(_serve_main, sys.argv[1:] or ["udp://127.0.0.1:0"])
