"""``rpcfast-perf floor``: the C process chain builds, runs bounded, and reports sane rows.

No timing assertions: only that every row is a real measurement (a count of round trips and
ordered quantiles), that ``x_read`` is relative to the best R = 0 median, and that bad
arguments fail loudly in the program and in the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from perf import cli, floor

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)


def test_the_chain_measures_every_replica_count_and_mode() -> None:
    rows = floor.measure([1, 2], ["block", "yield"], iterations=300, seconds=2.0)
    assert [(r["replicas"], r["mode"]) for r in rows] == [
        (r, m) for r in (0, 1, 2) for m in ("block", "yield")
    ]
    for r in rows:
        assert "error" not in r, r
        assert 0 < int(r["count"] or 0) <= 300
        assert 0 < float(r["median_us"] or 0) <= float(r["p99_us"] or 0)
    best = min(float(r["median_us"] or 0) for r in rows if r["replicas"] == 0)
    for r in rows:
        assert r["x_read"] == pytest.approx(float(r["median_us"] or 0) / best)


def test_the_program_rejects_bad_arguments(tmp_path: Path) -> None:
    exe = floor.build(tmp_path)
    for argv in (["9", "block", "10", "1"], ["1", "nap", "10", "1"], ["1", "block", "0", "1"]):
        with pytest.raises(floor.FloorError):
            floor.run_chain(exe, int(argv[0]), argv[1], int(argv[2]), float(argv[3]))


def test_a_failed_measurement_is_an_error_row_and_not_a_ratio() -> None:
    rows = [
        {"system": "c-udp-chain", "replicas": 0, "mode": "yield", "median_us": 10.0},
        {"system": "c-udp-chain", "replicas": 0, "mode": "block", "median_us": 50.0},
        {"system": "c-udp-chain", "replicas": 3, "mode": "spin", "error": "cut"},
        {"system": "c-udp-chain", "replicas": 3, "mode": "yield", "median_us": 40.0},
    ]
    floor.add_ratios(rows)  # type: ignore[arg-type]
    assert [r.get("x_read") for r in rows] == [1.0, 5.0, None, 4.0]


@pytest.mark.parametrize("argv", [["--modes", "nap"], ["--replicas", "9"], ["--seconds", "0"]])
def test_the_cli_rejects_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser({"floor": "perf.floor"}).parse_args(["floor", *argv])


def test_the_cli_prints_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "floor.json"
    argv = ["floor", "--replicas", "1", "--modes", "block", "--iterations", "200"]
    assert cli.main([*argv, "--seconds", "2", "--json", str(out)]) == 0
    assert "x read" in capsys.readouterr().out
    document = json.loads(out.read_text())
    assert [(r["replicas"], r["mode"]) for r in document["results"]] == [(0, "block"), (1, "block")]
    assert document["config"]["iterations"] == 200
