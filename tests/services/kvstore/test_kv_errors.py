"""Status codes and the error hierarchy the RPC layer sends and re-raises."""

from __future__ import annotations

import pytest

from services.kvstore import (
    InternalError,
    KvError,
    ObjectDoesntExist,
    Retry,
    Status,
    UnknownTablet,
    ValueTooLarge,
    WrongVersion,
    error_for_status,
)


def test_status_numbers_follow_ramcloud() -> None:
    assert (Status.OK, Status.UNKNOWN_TABLET, Status.OBJECT_DOESNT_EXIST) == (0, 1, 3)
    assert (Status.WRONG_VERSION, Status.RETRY, Status.INTERNAL_ERROR) == (5, 17, 21)
    assert (Status.REQUEST_TOO_LARGE, Status.INVALID_PARAMETER) == (27, 30)
    assert (Status.KEY_TOO_LARGE, Status.VALUE_TOO_LARGE) == (100, 101)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (Status.UNKNOWN_TABLET, UnknownTablet),
        (Status.OBJECT_DOESNT_EXIST, ObjectDoesntExist),
        (Status.WRONG_VERSION, WrongVersion),
        (Status.RETRY, Retry),
        (Status.VALUE_TOO_LARGE, ValueTooLarge),
        (Status.INTERNAL_ERROR, InternalError),
    ],
)
def test_error_for_status_rebuilds_the_class(status: Status, cls: type[KvError]) -> None:
    err = error_for_status(int(status), "boom")
    assert type(err) is cls
    assert err.status is status
    assert "boom" in str(err)


def test_codes_without_a_class_keep_their_status() -> None:
    err = error_for_status(Status.TIMEOUT, "slow")
    assert type(err) is KvError and err.status is Status.TIMEOUT


def test_unknown_numbers_become_internal_errors_and_ok_is_not_an_error() -> None:
    assert isinstance(error_for_status(999), InternalError)
    with pytest.raises(ValueError):
        error_for_status(0)


def test_errors_carry_their_details() -> None:
    assert WrongVersion("x", version=7).version == 7
    r = Retry("full", min_delay=0.5, max_delay=1.0)
    assert (r.min_delay, r.max_delay, r.status) == (0.5, 1.0, Status.RETRY)
    assert (Retry().min_delay, Retry().max_delay) == (0.001, 0.002)
