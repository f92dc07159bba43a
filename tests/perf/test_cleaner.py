"""Key popularity, the counting replica sink, the write loops and smoke runs of
``rpcfast-perf cleaner`` on a tiny log. No timing assertions: the benchmark measures speed."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perf import cleaner, cli
from perf._stats import Row
from perf._workloads import KeyChooser, zipf_theta

TINY = cleaner.Scale(2 << 20, 32 << 10, 2 << 10, 0.3, 0.2, 1.0, 1.0, 600, 0.5, 20)


def test_zipfian_sends_90_percent_of_draws_to_15_percent_of_keys() -> None:
    n = 2000
    chooser = KeyChooser(n, "zipfian", seed=3)
    counts = Counter(chooser.draw(40_000))
    hottest = sum(c for _k, c in counts.most_common(int(0.15 * n)))
    assert 0.86 < hottest / 40_000 < 0.94
    assert all(0 <= k < n for k in counts)


def test_uniform_keys_cover_the_range_evenly() -> None:
    counts = Counter(KeyChooser(10, "uniform", seed=1).draw(20_000))
    assert set(counts) == set(range(10))
    assert max(counts.values()) < 1.2 * min(counts.values())
    with pytest.raises(ValueError):
        KeyChooser(10, "pareto")


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=20, max_value=5000), st.floats(min_value=0.3, max_value=0.95))
def test_zipf_theta_hits_the_requested_share(n: int, share: float) -> None:
    theta = zipf_theta(n, 0.15, share)
    weights = [i**-theta for i in range(1, n + 1)]
    hot = -(-15 * n // 100)
    got = sum(weights[:hot]) / sum(weights)
    assert got == pytest.approx(share, abs=0.01) or (hot / n >= share and theta < 1e-6)


def test_sink_counts_head_bytes_until_the_cleaner_writes_survivors() -> None:
    from services.kvstore import ObjectManager, StorageConfig

    n = cleaner.objects_for(60, 100, TINY.memory_bytes)
    sink = cleaner.CountingSink()
    config = StorageConfig(
        total_bytes=TINY.memory_bytes,
        segment_size=TINY.segment_size,
        seglet_size=TINY.seglet_size,
        compaction_enabled=False,  # only combined cleaning: survivors go to the sink
    )
    om = ObjectManager(config, replica_sink=sink)
    sink.attach(om)
    om.add_tablet(1)
    writer = cleaner.Writer(om, 100, 0.001)
    writer.fill(n, time.perf_counter() + 60)
    assert sink.survivor_bytes == 0
    assert sink.head_bytes >= n * cleaner.object_entry_bytes(100)
    keys = cleaner.key_stream(n, "uniform", 1)
    for _ in range(40):  # bounded: overwrite until a combined cleaning has written survivors
        writer.closed_loop(keys, n // 4, 5.0)
        if om.stats().cleaner.survivor_segments:
            break
    stats = om.stats().cleaner
    assert stats.survivor_segments > 0
    # survivors are exactly the relocated entries plus each survivor segment's own metadata
    # (header, digest); how much cleaning the bounded loop did depends on the machine
    assert stats.bytes_relocated <= sink.survivor_bytes
    assert sink.survivor_bytes <= stats.bytes_relocated + stats.survivor_segments * 4096
    assert om.stats().objects == n


def test_closed_loop_records_one_sample_per_write() -> None:
    n = cleaner.objects_for(50, 1000, TINY.memory_bytes)
    om = cleaner.make_store(TINY, n)
    writer = cleaner.Writer(om, 1000, 0.0005)
    filled = writer.fill(n, time.perf_counter() + 60)
    assert filled.writes == n and not filled.truncated
    calls: list[int] = []
    win = writer.closed_loop(
        cleaner.key_stream(n, "zipfian", 2), 300, 30.0, record=True, between=lambda: calls.append(1)
    )
    assert win.writes == 300 == len(win.write_samples) == len(win.loop_samples) == len(calls)
    assert all(0 < w <= loop for w, loop in zip(win.write_samples, win.loop_samples, strict=True))
    assert om.stats().objects == n


def test_open_loop_serves_every_arrival_once() -> None:
    om, n = cleaner.prepared_store(TINY, 40, False, 1)
    writer = cleaner.Writer(om, cleaner.LATENCY_SIZE, 0.0005)
    served: list[int] = []
    win = writer.open_loop(
        cleaner.key_stream(n, "uniform", 5), 20_000.0, 200, 30.0, between=lambda: served.append(1)
    )
    assert win.writes == 200 == len(win.write_samples) == len(served)
    assert all(s > 0 for s in win.write_samples)


def test_sweep_point_row_has_sane_values() -> None:
    row = cleaner.sweep_point(100, "uniform", 50, TINY, 0.0005, 1)
    assert "error" not in row, row.get("error")
    assert row["utilization"] == pytest.approx(0.5, abs=0.02)
    assert float(row["objects_per_s"] or 0) > 0
    assert float(row["mb_per_s"] or 0) > 0
    assert float(row["relocated_per_new_byte"] or 0) >= 0
    assert 0 <= float(row["cleaner_time_fraction"] or 0) < 1
    assert row["truncated"] in (0, 1)
    for use in (row["compacted_use"], row["cleaned_use"]):  # None: no pass of that kind
        assert use is None or 0 < float(use) < 1
    assert row["compacted_use"] is not None or row["cleaned_use"] is not None


def test_relative_throughput_and_latency_ratios() -> None:
    rows: list[Row] = [
        {"section": "sweep", "object_bytes": 100, "distribution": "uniform",
         "utilization_target": 30, "objects_per_s": 200.0},
        {"section": "sweep", "object_bytes": 100, "distribution": "uniform",
         "utilization_target": 90, "objects_per_s": 150.0},
        {"section": "latency", "mode": "closed", "cleaner": "off", "median_us": 10.0,
         "p99_us": 20.0},
        {"section": "latency", "mode": "closed", "cleaner": "on", "median_us": 12.0,
         "p99_us": 80.0},
        {"section": "design", "part": "prototype", "mode": "closed", "median_us": 11.0,
         "p99_us": 30.0},
    ]  # fmt: skip
    cleaner.add_relative_throughput(rows)
    cleaner.add_latency_ratios(rows)
    assert rows[1]["vs_30"] == pytest.approx(0.75)
    assert rows[3]["median_ratio"] == pytest.approx(1.2)
    assert rows[3]["p99_ratio"] == pytest.approx(4.0)
    assert rows[4]["median_ratio"] == pytest.approx(1.1)


def test_breakdown_times_the_compaction_kernel_and_puts_it_back() -> None:
    from services.kvstore.log import _cleaner

    kernel = _cleaner._relocate  # type: ignore[attr-defined]
    row = cleaner.breakdown(1000, 80, TINY, cleaner.DEFAULT_BUDGET_S, 1)
    assert _cleaner._relocate is kernel  # type: ignore[attr-defined]
    assert int(row["relocations"] or 0) > 0 and int(row["writes"] or 0) > 0
    total = float(row["cleaner_us_per_reloc"] or 0)
    parts = float(row["kernel_us_per_reloc"] or 0) + float(row["rest_us_per_reloc"] or 0)
    assert total > 0 and parts == pytest.approx(total, rel=1e-6)
    if kernel is not None:
        assert int(row["batches"] or 0) > 0 and float(row["kernel_us_per_reloc"] or 0) > 0


@pytest.mark.parametrize("mode", ["pipe", "shm"])
def test_ipc_batches_arrive_whole(mode: str) -> None:
    row = cleaner.ipc_cost(mode, 64, 10)
    assert row["records_decoded"] == 64 * 3 * 10
    assert float(row["owner_us_per_batch"] or 0) > 0
    assert float(row["round_trip_us"] or 0) > 0


def test_prototype_applies_relocations_sent_by_the_other_process() -> None:
    parts: Row = {
        "relocations_per_write": 8.0,  # above the backlog: the writer must wait
        "cleaner_us_per_reloc": 2.0,
    }
    curves = cleaner.Curves()
    rows = cleaner.prototype(TINY, parts, 50, 2000.0, 1, curves)
    assert [r["mode"] for r in rows] == ["closed", "open"]
    for r in rows:
        assert int(r["relocations_applied"] or 0) > 0
        assert int(r["count"] or 0) > 0
    assert set(curves.samples) == {
        "closed: separate process (prototype)",
        "open: separate process (prototype)",
    }


def test_cli_sweep_writes_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cleaner.json"
    argv = ["cleaner", "--quick", "--sections", "sweep", "--sizes", "100", "--utilizations"]
    argv += ["30,50", "--distributions", "uniform", "--json", str(out)]
    assert cli.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["quick"] is True
    rows = doc["results"]
    assert [r["utilization_target"] for r in rows] == [30, 50]
    assert all("error" not in r and r["section"] == "sweep" for r in rows)
    assert rows[0]["vs_30"] == pytest.approx(1.0)
    assert (tmp_path / "cleaner-throughput.png").stat().st_size > 0
    assert (tmp_path / "cleaner-cost.png").stat().st_size > 0
    assert "writes/s" in capsys.readouterr().out


def test_render_lists_errors_without_failing() -> None:
    text = cleaner.render(
        [{"section": "sweep", "object_bytes": 100, "utilization_target": 90, "error": "Stuck"}]
    )
    assert "sweep 100 90: Stuck" in text
