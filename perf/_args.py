"""Argument types shared by the ``rpcfast-perf`` subcommands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence


def int_list(text: str, minimum: int = 0) -> tuple[int, ...]:
    """``"0,100,1000"`` -> ``(0, 100, 1000)``; every value at least ``minimum``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"need one or more integers >= {minimum}: {text}")
    return values


def positive_int_list(text: str) -> tuple[int, ...]:
    return int_list(text, minimum=1)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (every measurement is bounded in time)."""
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def subset_of(known: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated subset of ``known``, returned in ``known``'s order."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        if not names or any(n not in known for n in names):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(known)}: {text}"
            )
        return tuple(n for n in known if n in names)

    return parse
