"""The end-to-end section of ``rpcfast-perf cleaner``: real one-server clusters on loopback, a
tiny log. No timing assertions: the benchmark measures speed, these check what it reports."""

from __future__ import annotations

import pytest

from perf import _cleaner_server as cs
from perf._stats import Row, Value

TINY = cs.ServerScale(8, 64, 4, 0.3, 5.0, 3_000, 2.0, 600, 2.0)


def num(row: Row, key: str) -> float:
    value = row[key]
    assert isinstance(value, (int, float)), (key, value)
    return float(value)


def test_larger_logs_get_larger_seglets_to_keep_the_digest_small() -> None:
    scale = cs.ServerScale(32, 256, 8, 1.0, 1.0, 1, 1.0, 1, 1.0)
    assert cs.seglet_kb_for(scale, 32) == 8
    big = cs.seglet_kb_for(scale, 256)
    assert big > 8 and 8 * (256 * 1024 // big) <= 256 * 256
    assert cs.seglet_kb_for(scale, 1 << 20) == 256  # never past the segment


def test_ratios_compare_with_30_percent_and_with_the_idle_reference() -> None:
    def row(util: int, mode: str, rate: float, **extra: Value) -> Row:
        return {
            "section": "server",
            "object_bytes": 100,
            "utilization_target": util,
            "mode": mode,
            "objects_per_s": rate,
            **extra,
        }

    rows: list[Row] = [
        row(30, "heavy", 1000.0),
        row(90, "heavy", 400.0),
        row(30, "sequential", 100.0),
        row(90, "sequential", 80.0),
        row(90, "latency", 50.0, reference=1, median_us=20.0, p99_us=40.0),
        row(90, "latency", 50.0, reference=0, median_us=21.0, p99_us=200.0),
        {"section": "server", "mode": "heavy", "error": "boom"},
    ]  # fmt: skip
    cs.add_server_ratios(rows)
    assert rows[1]["vs_30"] == pytest.approx(0.4)
    assert rows[3]["vs_30"] == pytest.approx(0.8)
    assert rows[4]["median_ratio"] == pytest.approx(1.0)
    assert rows[5]["median_ratio"] == pytest.approx(1.05)
    assert rows[5]["p99_ratio"] == pytest.approx(5.0)
    assert "vs_30" not in rows[4] and "median_ratio" not in rows[1]


def test_server_section_measures_real_servers_with_and_without_cleaning() -> None:
    lines: list[str] = []
    rows = cs.server_section([100], [30, 90], TINY, 1, lines.append, blocks=2)
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, errors
    points = [r for r in rows if r["mode"] in ("heavy", "sequential")]
    assert {(r["utilization_target"], r["mode"]) for r in points} == {
        (30, "heavy"), (30, "sequential"), (90, "heavy"), (90, "sequential"),
    }  # fmt: skip
    for r in points:
        assert num(r, "utilization") == pytest.approx(num(r, "utilization_target") / 100, abs=0.03)
        assert num(r, "writes") > 0 and num(r, "objects_per_s") > 0
        assert r["vs_30"] is not None
    high = [r for r in points if r["utilization_target"] == 90]
    assert all(r["cleaner_ran"] for r in high)  # 90% of a turned-over log needs cleaning
    assert all(num(r, "relocated_per_new_byte") > 1 for r in high)
    sequential = [r for r in points if r["mode"] == "sequential"]
    assert all(num(r, "median_us") <= num(r, "p99_us") <= num(r, "max_us") for r in sequential)
    latency = [r for r in rows if r["mode"] == "latency"]
    assert [(r["reference"], r["slices"]) for r in latency] == [
        (1, "whole"),
        (0, "whole"),
        (0, "yield"),
    ]
    reference, *cleaning = latency
    assert not reference["cleaner_ran"]  # its log is 8x larger: the cleaner never had to run
    assert reference["median_ratio"] == pytest.approx(1.0)
    assert reference["relocated_in_window_per_new_byte"] == 0
    for r in cleaning:
        assert r["cleaner_ran"] and r["writes"] == reference["writes"]
        # The copying beside the measured writes is part of all of it (the rest ran in settles).
        assert 0 <= num(r, "relocated_in_window_per_new_byte") <= num(r, "relocated_per_new_byte")
        assert num(r, "median_ratio") > 0 and num(r, "p99_ratio") > 0
    assert any("latency" in line for line in lines)
