"""Summaries, rows, tables and the JSON file of ``perf._stats``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perf import _stats
from perf._stats import Column


def test_summary_of_odd_count_uses_middle_sample() -> None:
    s = _stats.summarize([0.003, 0.001, 0.002])
    assert s.count == 3
    assert s.median_s == 0.002
    assert s.min_s == 0.001
    assert s.max_s == 0.003
    assert s.mean_s == pytest.approx(0.002)


def test_summary_of_even_count_averages_middle_pair() -> None:
    assert _stats.summarize([4.0, 1.0, 3.0, 2.0]).median_s == 2.5


def test_p99_is_nearest_rank_sample() -> None:
    samples = [float(i) for i in range(1, 1001)]
    assert _stats.summarize(samples).p99_s == 990.0
    assert _stats.summarize(samples[:100]).p99_s == 99.0
    assert _stats.summarize([7.0]).p99_s == 7.0


def test_percentile_extremes_and_bad_input() -> None:
    ordered = [1.0, 2.0, 3.0]
    assert _stats.percentile(ordered, 0) == 1.0
    assert _stats.percentile(ordered, 100) == 3.0
    assert _stats.percentile(ordered, 50) == 2.0
    with pytest.raises(ValueError):
        _stats.percentile(ordered, 101)
    with pytest.raises(ValueError):
        _stats.percentile([], 50)


def test_summary_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        _stats.summarize([])


def test_serial_throughput_is_count_over_measured_time() -> None:
    s = _stats.summarize([0.001] * 4)
    assert s.total_s == pytest.approx(0.004)
    assert s.ops_per_s == pytest.approx(1000.0)
    assert math.isinf(_stats.summarize([0.0, 0.0]).ops_per_s)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=10.0), min_size=1, max_size=300))
def test_summary_statistics_are_ordered(samples: list[float]) -> None:
    s = _stats.summarize(samples)
    assert s.min_s <= s.median_s <= s.p99_s <= s.max_s
    assert s.min_s <= s.mean_s * (1 + 1e-12) and s.mean_s <= s.max_s * (1 + 1e-12)
    assert s.count == len(samples)


def test_latency_row_reports_microseconds() -> None:
    row = _stats.latency_row("sys", 100, [10e-6, 20e-6, 30e-6])
    assert row["op"] == "latency"
    assert row["system"] == "sys"
    assert row["payload"] == 100
    assert row["median_us"] == pytest.approx(20.0)
    assert row["min_us"] == pytest.approx(10.0)
    assert row["p99_us"] == pytest.approx(30.0)
    assert row["mean_us"] == pytest.approx(20.0)
    assert row["count"] == 3


def test_throughput_and_error_rows() -> None:
    row = _stats.throughput_row("sys", 100, 32, 12345.0)
    assert row == {
        "op": "throughput",
        "system": "sys",
        "payload": 100,
        "outstanding": 32,
        "ops_per_s": 12345.0,
    }
    err = _stats.error_row("sys", 0, ImportError("gone"), op="throughput")
    assert err == {"op": "throughput", "system": "sys", "payload": 0, "error": "ImportError: gone"}
    assert _stats.error_row("sys", 0, "plain")["error"] == "plain"


def test_table_aligns_columns_and_marks_missing_values() -> None:
    rows: list[_stats.Row] = [
        {"name": "a", "value": 1.25},
        {"name": "longer", "value": None},
        {"name": "c", "value": 100.0},
    ]
    text = _stats.format_table(rows, [Column("name", "name"), Column("value", "v", "{:.1f}")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "v"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["a", "1.2"]
    assert lines[3].split() == ["longer", "-"]
    # numbers right-aligned: every value ends in the same column
    assert len({len(line) for line in lines[2:]}) == 1
    assert lines[4].endswith("100.0")


def test_table_of_no_rows_is_header_only() -> None:
    text = _stats.format_table([], [Column("x", "header")])
    assert text.splitlines() == ["header", "------"]


def test_json_file_has_machine_config_and_results(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    rows = [_stats.latency_row("sys", 0, [1e-6]), _stats.error_row("other", 0, "boom")]
    machine = _stats.machine_info(("pytest", "surely-not-installed-dist"))
    _stats.write_json(path, rows, machine, {"iterations": 5})
    document = json.loads(path.read_text())
    assert set(document) == {"machine", "config", "results"}
    assert document["results"] == rows
    assert document["config"] == {"iterations": 5}
    assert document["machine"]["cpu_count"] >= 1
    assert document["machine"]["python"].count(".") == 2
    assert document["machine"]["version:pytest"]
    assert document["machine"]["version:surely-not-installed-dist"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
