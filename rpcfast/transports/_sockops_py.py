"""Pure-Python :class:`SockOps`: what the C extension ``rpcfast.transports._sockops`` does, with
the socket module, for installs where it was not compiled (``RPCFAST_NO_MYPYC=1``, no compiler).

Same contract: an empty socket gives None and a full one False instead of BlockingIOError, other
errors raise OSError. It only lacks the speed (and the C module's address cache: ``recvfrom``
returns a new tuple each time, equal to the last one for the same sender).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from rpcfast._types import Buffer


class SockOps:
    """Non-blocking calls on one datagram socket (kept open by its owner)."""

    __slots__ = ("_recv", "_recvfrom", "_send", "_sendto", "fd", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._recv = sock.recv
        self._recvfrom = sock.recvfrom
        self._send = sock.send
        self._sendto = sock.sendto

    def recv(self, size: int, /) -> bytes | None:
        try:
            return self._recv(size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def recvfrom(self, size: int, /) -> tuple[bytes, Any] | None:
        try:
            return self._recvfrom(size, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None

    def send(self, data: Buffer, /) -> bool:
        try:
            self._send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def sendto(self, data: Buffer, address: Any, /) -> bool:
        try:
            self._sendto(data, socket.MSG_DONTWAIT, address)
        except (BlockingIOError, InterruptedError):
            return False
        return True

    def close(self) -> None:
        """Forget the socket before its owner closes it (the calls then raise OSError)."""
        self.fd = -1
        self._recv = self._recvfrom = _closed
        self._send = self._sendto = _closed


def _closed(*args: Any) -> Any:
    raise OSError(errno.EBADF, "SockOps closed")
