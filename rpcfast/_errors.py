"""The error vocabulary of rpcfast.

A small, exact set: a call either failed remotely (the server answered with a non-OK status),
timed out (the caller's deadline passed), the peer went silent (the transport gave up), or its
response could not be read.
OS errors are translated once, at the transport boundary.
"""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Framework status codes carried in every response header."""

    OK = 0
    UNKNOWN_SERVICE = 1
    UNKNOWN_METHOD = 2
    MALFORMED_REQUEST = 3
    INTERNAL_ERROR = 4
    APPLICATION_ERROR = 5
    CANCELLED = 6
    SHUTTING_DOWN = 7


class RpcError(Exception):
    """Base class of every error rpcfast raises for a call."""


class RemoteError(RpcError):
    """The server answered with a non-OK status.

    ``status`` is the framework status; for ``APPLICATION_ERROR`` the service's own code is in
    ``code`` (raised on the server as a :class:`ServiceError`).
    """

    def __init__(self, status: Status, message: str, code: int = 0) -> None:
        super().__init__(f"{status.name}: {message}" if not code else f"{code}: {message}")
        self.status = status
        self.message = message
        self.code = code


class RpcTimeout(RpcError):
    """The caller's deadline passed before the response arrived; the server was told to stop."""


class PeerDead(RpcError):
    """The transport heard nothing from the peer for its abort interval (or could not reach it)."""


class MalformedResponse(RpcError):
    """The server's response could not be read: shorter than its header, or results that the
    method's codec rejects (a server speaking another schema, or a broken one)."""


class ServiceError(Exception):
    """Raise from a handler to answer with ``APPLICATION_ERROR`` and a service-defined ``code``.

    Services subclass it and set ``code``; the client side sees :class:`RemoteError` with that code,
    which a typed client (for example the kvstore client) maps back to its own exceptions.
    """

    code: int = 1

    def __init__(self, message: str = "", code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
