"""The Table 1 workload streams and smoke runs of ``rpcfast-perf memory`` at a tiny scale.

No timing assertions: only that the streams obey the paper's rules and that each system's run
produces a row whose numbers are consistent (objects stored = objects the stream left live).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perf import cli, memory
from perf._workloads import KEY_BYTES, WORKLOADS, Batch, SizeDist, Workload, WorkloadStream

TINY_LIVE = 256 * 1024


def _replay(stream: WorkloadStream) -> tuple[dict[int, int], int, list[int]]:
    """Apply a stream to a dict; returns live objects, the peak live bytes, and live bytes at
    the end of each batch."""
    live: dict[int, int] = {}
    live_bytes = 0
    peak = 0
    trace: list[int] = []
    for batch in stream.batches():
        for key, size in zip(batch.keys.tolist(), batch.sizes.tolist(), strict=True):
            if size:
                assert key not in live, "a key is written twice"
                live[key] = size
                live_bytes += size
            else:
                live_bytes -= live.pop(key)
            peak = max(peak, live_bytes)
        trace.append(live_bytes)
    return live, peak, trace


def test_table_1_workloads_are_all_there() -> None:
    assert list(WORKLOADS) == [f"W{i}" for i in range(1, 9)]
    assert WORKLOADS["W1"].after is None
    w3 = WORKLOADS["W3"]
    assert (w3.before, w3.delete_fraction, w3.after) == (
        SizeDist(100, 100),
        0.9,
        SizeDist(130, 130),
    )
    w8 = WORKLOADS["W8"]
    assert (w8.before, w8.delete_fraction, w8.after) == (
        SizeDist(50, 150),
        0.9,
        SizeDist(5000, 15000),
    )
    assert list(memory.WORKLOAD_NAMES) == list(WORKLOADS)
    assert memory.KEY_BYTES == KEY_BYTES


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_stream_keeps_live_data_under_the_cap(name: str) -> None:
    stream = WorkloadStream(WORKLOADS[name], TINY_LIVE, 2 * TINY_LIVE, batch_ops=500)
    live, peak, _trace = _replay(stream)
    assert peak <= TINY_LIVE
    assert sum(live.values()) == stream.live_bytes
    assert len(live) == stream.live_objects
    assert stream.allocated_bytes >= 4 * TINY_LIVE  # two phases of 2x the cap
    assert stream.live_bytes > 0.5 * TINY_LIVE


def test_mass_delete_removes_the_fraction_and_sizes_switch() -> None:
    workload = Workload("T", SizeDist(100, 100), 0.9, SizeDist(1000, 1000))
    stream = WorkloadStream(workload, 100_000, 200_000, batch_ops=10_000_000)
    batches = list(stream.batches())
    ops = Batch(
        np.concatenate([b.keys for b in batches]), np.concatenate([b.sizes for b in batches])
    )
    sizes = ops.sizes.tolist()
    first_big = sizes.index(1000)
    # The deletes right before the first 1000-byte object are the mass delete: 90% of the
    # 1000 live 100-byte objects, minus none (the cap was full before).
    run = 0
    for size in reversed(sizes[:first_big]):
        if size:
            break
        run += 1
    assert run == 900
    assert set(sizes[first_big:]) <= {0, 1000}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(min_value=KEY_BYTES, max_value=400),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=1, max_value=2**31),
)
def test_stream_is_a_pure_function_of_its_seed(low: int, span: int, seed: int) -> None:
    workload = Workload("H", SizeDist(low, low + span), 0.5, SizeDist(low + 1, low + span + 1))

    def ops() -> list[bytes]:
        stream = WorkloadStream(workload, 20_000, 30_000, seed=seed, batch_ops=300)
        return [b.to_bytes() for b in stream.batches()]

    first = ops()
    assert first == ops()
    assert all(len(b) % 12 == 0 for b in first)


def test_batch_round_trips_through_bytes_and_the_worker_decoder() -> None:
    batch = Batch(
        np.array([0, 1, 2**63 + 5], dtype=np.uint64), np.array([100, 0, 15000], dtype=np.uint32)
    )
    back = Batch.from_bytes(batch.to_bytes())
    assert back.keys.tolist() == batch.keys.tolist()
    assert back.sizes.tolist() == batch.sizes.tolist()
    assert memory._decode(batch.to_bytes()) == (batch.keys.tolist(), batch.sizes.tolist())
    with pytest.raises(ValueError):
        Batch.from_bytes(b"x" * 13)


@pytest.mark.parametrize("name", ["W1", "W8"])
def test_kvstore_is_sized_for_its_worst_phase(name: str) -> None:
    from services.kvstore import StorageConfig
    from services.kvstore.log import object_entry_size

    live = 8 << 20
    args = memory.kvstore_config(WORKLOADS[name], live, 0.75)
    config = StorageConfig(**args)
    pool = config.total_bytes - config.reserve_segments * config.segment_size
    smallest = round(WORKLOADS[name].smallest_mean)
    log_bytes = live * object_entry_size(KEY_BYTES, smallest - KEY_BYTES) / smallest
    assert log_bytes / pool == pytest.approx(0.75, abs=0.02)
    assert config.total_bytes // config.segment_size >= 200
    with pytest.raises(ValueError):
        memory.kvstore_config(WORKLOADS[name], live, 0.99)


def _tiny(systems: tuple[str, ...], **kwargs: object) -> memory.Config:
    return memory.Config(
        workloads=("W3",),
        systems=systems,
        live_bytes=TINY_LIVE,
        phase_bytes=TINY_LIVE,
        batch_ops=2000,
        timeout_s=120.0,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("system", ["kvstore", "pydict"])
def test_worker_run_reports_consistent_row(system: str) -> None:
    row = memory.run_one(system, "W3", _tiny((system,)))
    assert "error" not in row, row.get("error")
    assert row["system"] == system and row["workload"] == "W3"
    assert row["objects"] == row["live_objects"]
    live, rss, base = row["live_bytes"], row["rss_bytes"], row["baseline_rss_bytes"]
    assert isinstance(live, int) and isinstance(rss, int) and isinstance(base, int)
    assert 0 < live <= TINY_LIVE
    assert base < rss <= int(row["peak_rss_bytes"] or 0)
    assert row["utilization"] == pytest.approx(live / rss)
    assert row["utilization_net"] == pytest.approx(live / (rss - base))
    if system == "kvstore":
        assert int(row["log_live_bytes"] or 0) > live  # entry headers on top of key+value
        # Every live object has its word in some segment's entry index.
        assert int(row["index_bytes"] or 0) >= 8 * int(row["objects"] or 0)
        parts = int(row["arena_bytes"] or 0) + int(row["hash_table_bytes"] or 0)
        parts += int(row["index_bytes"] or 0)
        assert row["heap_growth_bytes"] == rss - base - parts
        # The design's floor: entries, live tombstones and a reference per object.
        floor = int(row["log_live_bytes"] or 0) + int(row["tombstone_bytes"] or 0)
        floor += 8 * int(row["objects"] or 0)
        assert row["ceiling"] == pytest.approx(live / floor)
        # The arena holds every entry and the table has a slot per object: net RSS is above it.
        assert float(row["utilization_net"] or 0) < float(row["ceiling"] or 0) < 1
    else:
        assert "ceiling" not in row


def test_hash_ref_bytes_matches_the_hash_table() -> None:
    from services.kvstore.log import _hashtable

    assert memory.HASH_REF_BYTES == _hashtable.BUCKET_BYTES // _hashtable.ENTRIES_PER_BUCKET


def test_redis_run_reports_consistent_row() -> None:
    from perf._redis import RedisUnavailable, find_redis_server

    try:
        find_redis_server(install=False)
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    row = memory.run_one("redis", "W3", _tiny(("redis",)))
    assert "error" not in row, row.get("error")
    assert row["objects"] == row["live_objects"]
    assert int(row["used_memory"] or 0) > int(row["live_bytes"] or 0)
    assert 0 < float(row["utilization"] or 0) < 1


def test_a_failing_system_becomes_an_error_row() -> None:
    row = memory.run_one("kvstore", "W3", _tiny(("kvstore",), kv_fill=0.99))
    assert "kv_fill" in str(row["error"])
    assert "rss_bytes" not in row


def test_redis_helpers_without_a_server() -> None:
    from perf._redis import free_port, proc_status_bytes

    assert 0 < free_port() < 65536
    import os

    assert proc_status_bytes(os.getpid(), "VmRSS") > 0
    with pytest.raises(KeyError):
        proc_status_bytes(os.getpid(), "NoSuchField")


def test_cli_writes_json_and_prints_a_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "memory.json"
    systems = "pydict,kvstore" + (",redis" if shutil.which("redis-server") else "")
    status = cli.main(
        [
            "memory",
            "--scale",
            "0.02",
            "--workloads",
            "W1,W7",
            "--systems",
            systems,
            "--json",
            str(out),
        ]
    )
    assert status == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"machine", "config", "results"}
    assert doc["config"]["live_bytes"] == int(memory.DEFAULT_LIVE_BYTES * 0.02)
    rows = doc["results"]
    assert {(r["workload"], r["system"]) for r in rows} == {
        (w, s) for w in ("W1", "W7") for s in systems.split(",")
    }
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["utilization"] <= r["utilization_net"]
    assert "live/rss" in capsys.readouterr().out
