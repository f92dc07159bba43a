"""Pure-Python :class:`SockOps`: what the C extension ``rpcfast.transports._sockops`` does, with
the socket module, for installs where it was not compiled (``RPCFAST_NO_MYPYC=1``, no compiler).

Same contract: an empty socket gives None and a full one False instead of BlockingIOError, other
errors raise OSError. It only lacks the speed (and the C module's address cache: ``recvfrom``
returns a new tuple each time, equal to the last one for the same sender).
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, Final

from rpcfast._header_py import HEADER_SIZE, unpack_head
from rpcfast._types import Buffer

RESPONSE_HEAD: Final = 0xB5 | 1 << 8


class SockOps:
    """Non-blocking calls on one datagram socket (kept open by its owner)."""

    __slots__ = ("_recv", "_recvfrom", "_send", "_sendto", "errors", "fd", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.errors = 0  # send errors that send_now counted instead of raising
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

    def send_now(self, address: Any, data: Buffer, /) -> bool:
        """``sendto(data, address)``, but other send errors are counted in ``errors`` and
        reported as sent (the session core recovers from a lost datagram)."""
        try:
            return self.sendto(data, address)
        except OSError:
            self.errors += 1
            return True

    def call_whole(
        self, datagram: bytes, until: float, /
    ) -> memoryview | tuple[bytes] | bool | None:
        """Send a whole one-datagram request (the session core's ALL_DATA format), then poll
        for its response until ``until`` (``time.perf_counter``): a view of its payload,
        ``(datagram,)``
        for another datagram that came first, None for nothing in time (or a failed receive),
        False when the socket buffer is full (nothing sent)."""
        if len(datagram) < HEADER_SIZE:
            raise ValueError("call_whole: datagram shorter than a header")
        if not self.send(datagram):
            return False
        clock = time.perf_counter
        while True:
            try:
                data = self._recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                if clock() > until:
                    return None
                continue
            except OSError:
                return None
            if len(data) >= HEADER_SIZE:
                head, length, cid, seq, tail = unpack_head(data)
                if (
                    head == RESPONSE_HEAD
                    and length == len(data) - HEADER_SIZE
                    and tail == 0
                    and (cid, seq) == unpack_head(datagram)[2:4]
                ):
                    return memoryview(data)[HEADER_SIZE:]
            return (data,)

    def close(self) -> None:
        """Forget the socket before its owner closes it (the calls then raise OSError)."""
        self.fd = -1
        self._recv = self._recvfrom = _closed
        self._send = self._sendto = _closed


def _closed(*args: Any) -> Any:
    raise OSError(errno.EBADF, "SockOps closed")
