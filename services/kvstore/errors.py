"""Status codes and the typed errors of the key-value store.

Numbering follows RAMCloud's ``Status.h`` (0-33) so traces and wire captures read the same; the two
size errors RAMCloud never enforced get codes of their own (100, 101). The RPC layer sends
``error.status`` and ``str(error)``; the client rebuilds the same exception with
:func:`error_for_status`.
"""

from __future__ import annotations

import enum

from rpcfast import ServiceError


class Status(enum.IntEnum):
    """Key-value store status codes (RAMCloud numbering)."""

    OK = 0
    UNKNOWN_TABLET = 1
    TABLE_DOESNT_EXIST = 2
    OBJECT_DOESNT_EXIST = 3
    OBJECT_EXISTS = 4
    WRONG_VERSION = 5
    NO_TABLE_SPACE = 6
    MESSAGE_TOO_SHORT = 7
    UNIMPLEMENTED_REQUEST = 8
    REQUEST_FORMAT_ERROR = 9
    RESPONSE_FORMAT_ERROR = 10
    COULDNT_CONNECT = 11
    BACKUP_BAD_SEGMENT_ID = 12
    BACKUP_OPEN_REJECTED = 13
    BACKUP_SEGMENT_OVERFLOW = 14
    BACKUP_MALFORMED_SEGMENT = 15
    SEGMENT_RECOVERY_FAILED = 16
    RETRY = 17
    SERVICE_NOT_AVAILABLE = 18
    TIMEOUT = 19
    SERVER_NOT_UP = 20
    INTERNAL_ERROR = 21
    INVALID_OBJECT = 22
    TABLET_DOESNT_EXIST = 23
    PARTITION_BEFORE_READ = 24
    WRONG_SERVER = 25
    CALLER_NOT_IN_CLUSTER = 26
    REQUEST_TOO_LARGE = 27
    UNKNOWN_INDEXLET = 28
    INDEX_DOESNT_EXIST = 29
    INVALID_PARAMETER = 30
    STALE_RPC = 31
    EXPIRED_LEASE = 32
    TX_OP_AFTER_COMMIT = 33
    KEY_TOO_LARGE = 100
    VALUE_TOO_LARGE = 101


class KvError(ServiceError):
    """Base class of every key-value store error; ``status`` is what goes on the wire.

    A subclass fixes its status; a bare ``KvError`` carries whatever status it was built with
    (used for codes that have no class of their own). Raised in an rpcfast handler it travels as
    an application error with ``code = status``; clients rebuild it with :func:`error_for_status`.
    """

    STATUS: Status = Status.INTERNAL_ERROR

    def __init__(self, message: str = "", *, status: Status | None = None) -> None:
        self.status: Status = self.STATUS if status is None else status
        super().__init__(f"{self.status.name}: {message}" if message else self.status.name)
        self.message = message
        self.code = int(self.status)


class UnknownTablet(KvError):
    """This master does not own the tablet holding the key (the client's map is stale)."""

    STATUS = Status.UNKNOWN_TABLET


class TableDoesntExist(KvError):
    """No table with that id or name exists."""

    STATUS = Status.TABLE_DOESNT_EXIST


class ObjectDoesntExist(KvError):
    """The object is absent (a read, or a reject rule ``doesnt_exist``)."""

    STATUS = Status.OBJECT_DOESNT_EXIST


class ObjectExists(KvError):
    """A reject rule ``exists`` matched."""

    STATUS = Status.OBJECT_EXISTS


class WrongVersion(KvError):
    """A version reject rule matched; ``version`` is the object's current version."""

    STATUS = Status.WRONG_VERSION

    def __init__(self, message: str = "", *, version: int = 0) -> None:
        super().__init__(message)
        self.version = version


class Retry(KvError):
    """The server cannot do it now (memory full, tablet moving); try again after a delay.

    ``min_delay``/``max_delay`` are seconds; RAMCloud's memory-full retry is 1-2 ms.
    """

    STATUS = Status.RETRY

    def __init__(
        self, message: str = "", *, min_delay: float = 0.001, max_delay: float = 0.002
    ) -> None:
        super().__init__(message)
        self.min_delay = min_delay
        self.max_delay = max_delay


class InvalidParameter(KvError):
    """An argument is out of range (for example an increment of a value that is not 8 bytes)."""

    STATUS = Status.INVALID_PARAMETER


class KeyTooLarge(KvError):
    """The key is longer than 65535 bytes."""

    STATUS = Status.KEY_TOO_LARGE


class ValueTooLarge(KvError):
    """The value is longer than 1 MiB (or than what fits in one segment)."""

    STATUS = Status.VALUE_TOO_LARGE


class InternalError(KvError):
    """A server-side invariant broke; the server should be treated as crashed."""

    STATUS = Status.INTERNAL_ERROR


_BY_STATUS: dict[Status, type[KvError]] = {
    cls.STATUS: cls
    for cls in (
        UnknownTablet,
        TableDoesntExist,
        ObjectDoesntExist,
        ObjectExists,
        WrongVersion,
        Retry,
        InvalidParameter,
        KeyTooLarge,
        ValueTooLarge,
        InternalError,
    )
}


def error_for_status(status: int, message: str = "") -> KvError:
    """Build the exception a remote ``status`` stands for, so a client can re-raise it.

    Codes without a class of their own give a plain :class:`KvError` carrying the status;
    numbers outside :class:`Status` give an :class:`InternalError` naming the number.
    """
    try:
        code = Status(status)
    except ValueError:
        return InternalError(f"unknown status {status}: {message}")
    if code is Status.OK:
        raise ValueError("status OK is not an error")
    cls = _BY_STATUS.get(code)
    if cls is None:
        return KvError(message, status=code)
    return cls(message)
