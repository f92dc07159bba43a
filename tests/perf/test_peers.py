"""Smoke tests of the peer systems: servers start and stop cleanly, clients echo exact bytes.

No timing assertions: latencies are measured by ``rpcfast-perf rpc``, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perf import _peers, cli
from perf._peers import PEER_SYSTEMS

SMALL_MESSAGES = [b"", b"x", b"hello, peer", _peers.make_payload(1000)]


@pytest.mark.parametrize("system", PEER_SYSTEMS)
def test_peer_echoes_exact_bytes(system: str) -> None:
    assert _peers.echo_peer(system, SMALL_MESSAGES) == SMALL_MESSAGES


@pytest.mark.parametrize("system", PEER_SYSTEMS)
def test_peer_measurement_returns_one_positive_sample_per_round_trip(system: str) -> None:
    samples = _peers.measure_peer(system, 100, iterations=5, seconds=30.0)
    assert len(samples) == 5
    assert all(s > 0 for s in samples)


@pytest.mark.parametrize("system", PEER_SYSTEMS)
def test_server_reports_port_and_stops_cleanly(system: str) -> None:
    server = _peers.start_server(system)
    try:
        assert 0 < server.port < 65536
        assert server.process.poll() is None
    finally:
        status = server.stop()
    assert status == 0
    assert server.process.poll() == 0


def test_server_exits_by_itself_when_its_lifetime_is_spent() -> None:
    server = _peers.start_server("raw-udp-poll", lifetime_s=0.5)
    try:
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_server_that_never_reports_ready_is_an_error() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "print('something else')"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        with pytest.raises(_peers.PeerError, match="readiness line"):
            _peers._read_ready_port(proc, deadline=time.monotonic() + 30)
    finally:
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()


def test_udp_baseline_carries_one_datagram_only() -> None:
    assert _peers.supports("raw-udp-poll", _peers.UDP_MAX_PAYLOAD)
    assert not _peers.supports("raw-udp-poll", _peers.UDP_MAX_PAYLOAD + 1)
    assert all(_peers.supports(s, 1 << 20) for s in PEER_SYSTEMS if s != "raw-udp-poll")
    with pytest.raises(ValueError):
        _peers.measure_peer("raw-udp-poll", 65536, iterations=1, seconds=1.0)
    with pytest.raises(ValueError):
        _peers.supports("no-such-peer", 0)


def test_payload_is_deterministic_and_not_constant() -> None:
    data = _peers.make_payload(1000)
    assert len(data) == 1000
    assert data == _peers.make_payload(1000)
    assert len(set(data)) > 1
    assert _peers.make_payload(0) == b""


def test_rpc_command_runs_baseline_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    status = cli.main(
        [
            "rpc",
            "--systems",
            "raw-udp-poll",
            "--payloads",
            "0,100,65536",
            "--iterations",
            "5",
            "--seconds",
            "10",
            "--json",
            str(out),
        ]
    )
    assert status == 0
    document = json.loads(out.read_text())
    rows = document["results"]
    assert document["machine"]["cpu_count"] >= 1
    # 65536 bytes does not fit one datagram, so the baseline has no row for it.
    assert [(r["system"], r["payload"]) for r in rows] == [
        ("raw-udp-poll", 0),
        ("raw-udp-poll", 100),
    ]
    assert all(r["count"] == 5 and r["ratio"] == 1.0 for r in rows)
