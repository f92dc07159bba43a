"""``rpcfast-perf kv``: the plan, ratios and targets on made-up rows, and one tiny real run.

No timing assertions: the smoke run checks the JSON document's shape (which rows exist, which
fields they carry), not how fast anything was.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from perf import cli, kv
from perf._stats import Row

HAVE_SERVERS = shutil.which("redis-server") is not None and shutil.which("memcached") is not None


def _config(**overrides: object) -> kv.Config:
    fields: dict[str, object] = {
        "payloads": (100, 1000),
        "replicas": (0, 1, 2, 3),
        "spin_us": (200.0,),
        "systems": kv.SYSTEMS,
        "iterations": 10,
        "seconds": 0.1,
    }
    fields.update(overrides)
    return kv.Config(**fields)  # type: ignore[arg-type]


def test_plan_covers_every_replica_count_then_fsync_at_the_largest() -> None:
    plan = kv.cluster_plan(_config(spin_us=(0.0, 2000.0)))
    assert [(s.replicas, s.durability, s.spin_us) for s in plan] == [
        (r, d, spin)
        for spin in (0.0, 2000.0)
        for r, d in [*((r, "buffered") for r in range(4)), (3, "fsync")]
    ]
    assert [s.servers for s in plan[:5]] == [1, 2, 3, 4, 4]
    assert [(s.replicas, s.durability) for s in plan if s.multi] == [
        (0, "buffered"),
        (3, "buffered"),
    ] * 2
    assert all(not s.multi for s in kv.cluster_plan(_config(replicas=(2,), fsync=False))[1:])
    assert len(kv.cluster_plan(_config(replicas=(2,), fsync=False))) == 1


def _row(system: str, op: str, payload: int, median: float, **extra: object) -> Row:
    row: Row = {"system": system, "op": op, "payload": payload, "median_us": median}
    row.update(extra)  # type: ignore[arg-type]
    return row


def test_ratios_are_against_redis_get_of_the_same_payload() -> None:
    rows: list[Row] = [
        _row("redis", "read", 100, 40.0),
        _row("redis", "read", 1000, 50.0),
        _row("kvstore", "read", 100, 10.0, replicas=0),
        _row("kvstore", "write", 1000, 100.0, replicas=3),
        _row("memcached", "write", 64, 20.0),  # no redis GET at 64 B
        _row("redis", "multi_write", 100, 900.0, batch=100, ops_per_s=1e5),
        {"system": "kvstore", "op": "read", "payload": 100, "error": "boom"},
    ]
    kv.add_ratios(rows)
    assert rows[0]["ratio_vs_redis_get"] == 1.0
    assert rows[2]["ratio_vs_redis_get"] == 0.25
    assert rows[3]["ratio_vs_redis_get"] == 2.0
    assert rows[4]["ratio_vs_redis_get"] is None
    assert "ratio_vs_redis_get" not in rows[5]
    assert "ratio_vs_redis_get" not in rows[6]


def test_targets_report_what_was_measured_met_or_not() -> None:
    buffered = {"durability": "buffered", "spin_us": 200.0}
    rows = [
        _row("redis", "read", 100, 50.0),
        _row("redis", "multi_write", 100, 1000.0, ops_per_s=100_000.0),
        _row("kvstore", "read", 100, 10.0, replicas=0, **buffered),
        _row("kvstore", "read", 100, 20.0, replicas=3, **buffered),
        _row("kvstore", "write", 100, 80.0, replicas=3, **buffered),
        _row("kvstore", "write", 100, 900.0, replicas=3, durability="fsync", spin_us=200.0),
        _row("kvstore", "multi_write", 100, 500.0, replicas=0, ops_per_s=150_000.0, **buffered),
        _row("kvstore", "multi_write", 100, 900.0, replicas=3, ops_per_s=50_000.0, **buffered),
    ]
    targets = {(t["target"], t["replicas"]): t for t in kv.target_rows(rows)}
    assert set(targets) == {
        ("read_speedup_vs_redis_get", 0),
        ("durable_write_over_read", 3),
        ("multi_write_vs_redis_pipeline", 0),
        ("multi_write_vs_redis_pipeline", 3),
    }
    assert targets["read_speedup_vs_redis_get", 0]["value"] == 5.0
    assert targets["read_speedup_vs_redis_get", 0]["met"] is True
    assert targets["durable_write_over_read", 3]["value"] == 4.0  # buffered write, not fsync
    assert targets["durable_write_over_read", 3]["met"] is False
    assert targets["multi_write_vs_redis_pipeline", 0]["met"] is True
    assert targets["multi_write_vs_redis_pipeline", 3]["value"] == 0.5
    without_redis = kv.target_rows(rows[2:])
    assert [t["target"] for t in without_redis] == ["durable_write_over_read"]
    # a write with R = 0 is not durable: without the R = 3 cluster that goal is not checked
    only_r0 = [r for r in rows if r.get("replicas") in (None, 0)]
    assert "durable_write_over_read" not in [t["target"] for t in kv.target_rows(only_r0)]


def test_a_failing_measurement_becomes_an_error_row_with_its_context() -> None:
    rec = kv.Recorder()

    def broken() -> Row:
        raise ConnectionError("server went away")

    ctx = kv._context("GET", 0, "none", None, 1)
    rec.measure("redis", "read", 100, ctx, broken)
    [row] = rec.rows
    assert row["error"] == "ConnectionError: server went away"
    assert (row["system"], row["op"], row["payload"], row["via"]) == ("redis", "read", 100, "GET")


def test_time_calls_is_bounded_by_count_and_by_time() -> None:
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1

    assert len(kv.time_calls(call, 7, 60.0)) == 7
    assert calls == 7 + 7  # warm-up of min(WARMUP, iterations), then the timed calls
    samples = kv.time_calls(lambda: time.sleep(0.002), 1_000_000, 0.02)
    assert 1 <= len(samples) < 1000


async def test_interleaved_timing_alternates_calls_round_by_round() -> None:
    order: list[str] = []

    async def first() -> None:
        order.append("first")

    async def second() -> None:
        order.append("second")

    a, b = await kv.time_interleaved_async([first, second], 5, 60.0)
    assert len(a) == len(b) == 5
    assert order == ["first", "second"] * 10  # 5 warm-up rounds, then 5 timed rounds


def test_client_spin_sets_both_spins_or_keeps_rpcfast_defaults() -> None:
    import rpcfast

    assert kv.client_dispatch_config(None) == rpcfast.DispatchConfig()
    config = kv.client_dispatch_config(150.0)
    assert (config.call_spin, config.spin_budget) == pytest.approx((150e-6, 150e-6))
    assert not config.park_when_busy
    assert kv.client_dispatch_config(None, True).park_when_busy
    assert kv.client_dispatch_config(150.0, True).park_when_busy


def test_park_when_busy_is_on_unless_turned_off() -> None:
    parser = cli.build_parser({"kv": "perf.kv"})
    assert parser.parse_args(["kv"]).park_when_busy
    assert not parser.parse_args(["kv", "--no-park-when-busy"]).park_when_busy


def test_sharing_cpus_turns_parking_off_for_servers_and_client() -> None:
    parser = cli.build_parser({"kv": "perf.kv"})
    assert not parser.parse_args(["kv"]).share_cpu
    assert parser.parse_args(["kv", "--share-cpu"]).share_cpu
    assert _config().parks_when_busy
    config = _config(share_cpu=True)
    assert config.park_when_busy and not config.parks_when_busy
    client = kv.client_dispatch_config(5000.0, config.parks_when_busy, config.share_cpu)
    assert client.share_cpu and not client.park_when_busy
    assert kv.client_dispatch_config(None, False, True).share_cpu


@pytest.mark.parametrize(
    "argv",
    [
        ["--replicas", "-1"],
        ["--replicas", "a,b"],
        ["--payloads", "0"],
        ["--systems", "kvstore,mongodb"],
        ["--spin-us", "inf"],
        ["--seconds", "0"],
        ["--client-spin-us", "-5"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser({"kv": "perf.kv"}).parse_args(["kv", *argv])


@pytest.mark.skipif(not HAVE_SERVERS, reason="redis-server or memcached missing (make deps)")
def test_smoke_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kv.json"
    argv = ["kv", "--quick", "--iterations", "20", "--seconds", "0.05", "--replicas", "0"]
    argv += ["--payloads", "100", "--json", str(out), "--dir", str(tmp_path)]
    status = cli.main(argv)
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    rows: list[Row] = document["results"]
    errors = [r for r in rows if "error" in r]
    assert errors == []
    assert status == 0
    assert "Issue targets" in printed
    assert set(document) == {"machine", "config", "results"}
    assert document["config"]["replicas"] == [0]
    assert document["config"]["client_call_spin_us"] == pytest.approx(500.0)  # rpcfast's default
    assert document["config"]["park_when_busy"] is True
    assert document["machine"]["cpu_count"] >= 1

    measured = {
        (r["system"], r["op"], r["durability"], r["replicas"]) for r in rows if r["op"] != "target"
    }
    assert measured == {
        ("redis", "read", "none", 0),
        ("redis", "write", "none", 0),
        ("redis", "write", "fsync", 0),
        ("redis", "write", "replica-ack", 1),
        ("redis", "multi_write", "none", 0),
        ("redis", "multi_read", "none", 0),
        ("memcached", "read", "none", 0),
        ("memcached", "write", "none", 0),
        ("memcached", "multi_write", "none", 0),
        ("memcached", "multi_read", "none", 0),
        ("kvstore", "read", "buffered", 0),
        ("kvstore", "write", "buffered", 0),
        ("kvstore", "read", "fsync", 0),
        ("kvstore", "write", "fsync", 0),
        ("kvstore-rpc", "read", "buffered", 0),
        ("kvstore-rpc", "read", "fsync", 0),
        ("kvstore", "multi_write", "buffered", 0),
        ("kvstore", "multi_read", "buffered", 0),
        ("kvstore-rpc", "multi_write", "buffered", 0),
        ("kvstore-rpc", "multi_read", "buffered", 0),
    }
    for row in rows:
        if row["op"] == "target":
            assert isinstance(row["value"], float)
            assert isinstance(row["met"], bool)
            continue
        assert row["payload"] == 100
        assert isinstance(row["median_us"], float) and row["median_us"] > 0
        assert isinstance(row["p99_us"], float) and row["p99_us"] >= row["median_us"]
        assert isinstance(row["count"], int) and 1 <= row["count"] <= 20
        if str(row["system"]).startswith("kvstore"):
            assert row["spin_us"] == 200.0
            assert row["servers"] == 1
        if row["op"] in ("read", "write"):
            assert isinstance(row["ratio_vs_redis_get"], float)
        else:
            assert row["batch"] == 100
            assert isinstance(row["ops_per_s"], float) and row["ops_per_s"] > 0
    targets = {r["target"] for r in rows if r["op"] == "target"}
    # (the durable write goal needs the R = 3 cluster, which this smoke run leaves out)
    assert targets == {"read_speedup_vs_redis_get", "multi_write_vs_redis_pipeline"}
