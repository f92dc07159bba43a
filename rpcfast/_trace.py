"""Time trace: a cheap per-RPC record of where a round trip's time goes.

A traced call records six CLOCK_MONOTONIC stamps (``perf_counter_ns``, shared by all processes on
one host): client send, server receive, handler start, handler end, reply ready, client receive.
The server's four stamps ride back in the response header. On one host the one-way legs are exact;
across hosts only the server's own intervals are meaningful.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

LEGS = (
    ("client -> server", 0, 1),
    ("server queue", 1, 2),
    ("handler", 2, 3),
    ("encode reply", 3, 4),
    ("server -> client", 4, 5),
    ("total", 0, 5),
)


class TimeTrace:
    """A bounded ring of stamp tuples."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.records: deque[tuple[int, int, int, int, int, int]] = deque(maxlen=capacity)

    def add(self, stamps: tuple[int, int, int, int, int, int]) -> None:
        self.records.append(stamps)

    def clear(self) -> None:
        self.records.clear()

    def breakdown(self) -> list[tuple[str, float, float]]:
        """(leg, median us, p99 us) for every leg over the recorded calls."""
        return breakdown(self.records)

    def format(self) -> str:
        rows = self.breakdown()
        lines = [f"{'leg':<18} {'median us':>10} {'p99 us':>10}   ({len(self.records)} calls)"]
        lines += [f"{name:<18} {med:>10.2f} {p99:>10.2f}" for name, med, p99 in rows]
        return "\n".join(lines)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def breakdown(records: Iterable[tuple[int, ...]]) -> list[tuple[str, float, float]]:
    recs = list(records)
    if not recs:
        return []
    out = []
    for name, a, b in LEGS:
        values = [(r[b] - r[a]) / 1000.0 for r in recs]
        out.append((name, statistics.median(values), _p99(values)))
    return out
