"""Sample summaries, result rows, text tables and the JSON file shared by the perf subcommands.

Benchmarks keep every sample (seconds per operation) and summarise once here, so all systems
are reduced by the same arithmetic: exact order statistics, no histogram bucketing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from attrs import frozen

Value = str | int | float | None
Row = dict[str, Value]

_US_PER_S = 1e6


@frozen
class Summary:
    """Order statistics of one measurement, in seconds."""

    count: int
    median_s: float
    p99_s: float
    mean_s: float
    min_s: float
    max_s: float
    total_s: float

    @property
    def ops_per_s(self) -> float:
        """Serial throughput: operations per second of measured time (one outstanding)."""
        return self.count / self.total_s if self.total_s > 0 else math.inf


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of already sorted samples.

    Nearest rank always returns an observed sample, so p99 of a small run is a real round
    trip and not an interpolation between two.
    """
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    rank = max(1, math.ceil(q / 100 * len(sorted_samples)))
    return sorted_samples[rank - 1]


def quantiles_us(samples: Sequence[float]) -> dict[str, float | int]:
    """Count, median, p90, p99, p99.9, max and mean of times in seconds, as ``*_us`` fields
    (just ``count`` 0 when there are none): the latency columns of a benchmark row."""
    ordered = sorted(samples)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "median_us": statistics.median(ordered) * 1e6,
        "p90_us": percentile(ordered, 90) * 1e6,
        "p99_us": percentile(ordered, 99) * 1e6,
        "p999_us": percentile(ordered, 99.9) * 1e6,
        "max_us": ordered[-1] * 1e6,
        "mean_us": math.fsum(ordered) / len(ordered) * 1e6,
    }


def summarize(samples: Sequence[float]) -> Summary:
    """Summarise per-operation times in seconds; raises ``ValueError`` when there are none."""
    if not samples:
        raise ValueError("no samples to summarise")
    ordered = sorted(samples)
    total = math.fsum(ordered)
    return Summary(
        count=len(ordered),
        median_s=statistics.median(ordered),
        p99_s=percentile(ordered, 99),
        mean_s=total / len(ordered),
        min_s=ordered[0],
        max_s=ordered[-1],
        total_s=total,
    )


def latency_row(system: str, payload: int, samples: Sequence[float]) -> Row:
    """Result row for a round-trip latency measurement (times reported in microseconds)."""
    s = summarize(samples)
    return {
        "op": "latency",
        "system": system,
        "payload": payload,
        "median_us": s.median_s * _US_PER_S,
        "p99_us": s.p99_s * _US_PER_S,
        "mean_us": s.mean_s * _US_PER_S,
        "min_us": s.min_s * _US_PER_S,
        "count": s.count,
    }


def throughput_row(system: str, payload: int, outstanding: int, ops_per_s: float) -> Row:
    """Result row for a throughput measurement with ``outstanding`` requests in flight."""
    return {
        "op": "throughput",
        "system": system,
        "payload": payload,
        "outstanding": outstanding,
        "ops_per_s": ops_per_s,
    }


def error_row(system: str, payload: int, error: BaseException | str, op: str = "latency") -> Row:
    """Row that records a failed measurement so one broken system does not abort a run."""
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return {"op": op, "system": system, "payload": payload, "error": message}


@frozen
class Column:
    """One table column: the row key, its header, and how to format a present value."""

    key: str
    header: str
    fmt: str = "{}"


def _cell(row: Mapping[str, Value], column: Column) -> str:
    value = row.get(column.key)
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return column.fmt.format(value)


def format_table(rows: Sequence[Mapping[str, Value]], columns: Sequence[Column]) -> str:
    """Plain-text table; numbers right-aligned, text left-aligned, missing values as ``-``."""
    cells = [[_cell(row, c) for c in columns] for row in rows]
    numeric = [all(isinstance(row.get(c.key), int | float | None) for row in rows) for c in columns]
    widths = [
        max([len(c.header), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)
    ]

    def render(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    lines = [render([c.header for c in columns]), render(["-" * w for w in widths])]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_info(distributions: Sequence[str] = ()) -> dict[str, Value]:
    """What a reader needs to judge the numbers: CPUs, Python, OS and library versions."""
    info: dict[str, Value] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        info["cpu_affinity"] = None
    for dist in distributions:
        info[f"version:{dist}"] = _version(dist)
    return info


def write_json(
    path: str | os.PathLike[str],
    results: Sequence[Mapping[str, Value]],
    machine: Mapping[str, Value],
    config: Mapping[str, object] | None = None,
) -> None:
    """Write ``{"machine": ..., "config": ..., "results": [...]}`` atomically (temp + rename)."""
    document: dict[str, object] = {"machine": dict(machine)}
    if config is not None:
        document["config"] = dict(config)
    document["results"] = [dict(row) for row in results]
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    tmp.replace(target)
