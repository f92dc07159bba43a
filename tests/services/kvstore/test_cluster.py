"""A real local cluster: coordinator and storage servers as processes, on UDP loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from services.kvstore import ObjectDoesntExist, TableDoesntExist
from services.kvstore._client import KvClient
from services.kvstore.cli import LocalCluster, build_parser, gather_status, main, run_workload


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(
        str(tmp_path / "kv"),
        servers=4,
        replicas=2,
        memory_mb=32,
        durability="buffered",
        segment_kb=1024,
    )
    c.start(progress=lambda _msg: None)
    try:
        yield c
    finally:
        c.stop()


def test_tables_span_servers_and_data_round_trips(cluster: LocalCluster) -> None:
    async def body() -> None:
        async with await KvClient.open(coordinator=cluster.coordinator, timeout=10) as kv:
            table = await kv.create_table("spread", server_span=4)
            values = {f"k{i}".encode(): os.urandom(200) for i in range(400)}
            await kv.multi_write([(table, k, v) for k, v in values.items()])
            for key in list(values)[::13]:
                assert (await kv.read(table, key))[0] == values[key]
            seen = {k: v async for k, v, _ver in kv.enumerate(table)}
            assert seen == values
            status = await gather_status(cluster.coordinator)
            owners = {t["server"] for t in status["tablets"] if t["table"] == table}
            assert len(owners) == 4
            await kv.drop_table("spread")
            with pytest.raises(TableDoesntExist):
                await kv.get_table_id("spread")

    trio.run(body)


def test_the_mixed_workload_reports_both_operations_and_no_errors(
    cluster: LocalCluster,
) -> None:
    report = trio.run(run_workload, cluster.coordinator, 0.5)
    lines = report.strip().splitlines()
    assert lines[0].startswith("workload: ") and "ops/s" in lines[0]
    ops = int(lines[0].split()[1])
    counts = {line.split()[0]: int(line.split()[1]) for line in lines[1:3]}
    assert set(counts) == {"read", "write"} and sum(counts.values()) == ops > 0
    assert lines[3].strip() == "errors 0, client retries 0"


def test_killed_backup_loses_no_acknowledged_write(cluster: LocalCluster) -> None:
    async def body() -> None:
        async with await KvClient.open(coordinator=cluster.coordinator, timeout=10) as kv:
            table = await kv.create_table("durable")
            status = await gather_status(cluster.coordinator)
            master = next(t["server"] for t in status["tablets"] if t["table"] == table)
            acked: dict[bytes, bytes] = {}
            for i in range(150):
                key, value = f"a{i}".encode(), os.urandom(100)
                await kv.write(table, key, value)
                acked[key] = value
                if i == 50:  # kill one server that is not the master: a backup of its segments
                    victim = next(n for n, s in enumerate(status["servers"]) if s["id"] != master)
                    proc = cluster.procs[1 + victim]
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
            for key, value in acked.items():
                assert (await kv.read(table, key))[0] == value
            status = await gather_status(cluster.coordinator)
            master_stats = next(s for s in status["servers"] if s["id"] == master)["stats"]
            assert master_stats["replication"]["replacements"] >= 1

    trio.run(body)


def test_cli_put_get_rm_and_status_json(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    coord = ["--coordinator", cluster.coordinator]
    assert main(["put", *coord, "cli", "hello", "world"]) == 0
    assert "version" in capsys.readouterr().out
    assert main(["get", *coord, "cli", "hello"]) == 0
    assert capsys.readouterr().out.strip() == "world"
    assert main(["rm", *coord, "cli", "hello"]) == 0
    capsys.readouterr()
    assert main(["get", *coord, "cli", "hello"]) == 1
    assert main(["status", *coord, "--json"]) == 0
    out = capsys.readouterr().out
    assert '"servers"' in out and '"tablets"' in out
    status = json.loads(out)
    for server in status["servers"]:
        assert server["stats"]["dispatch"]["polls"] > 0
        assert "busy_parks" in server["stats"]["dispatch"]

    async def gone() -> None:
        async with await KvClient.open(coordinator=cluster.coordinator) as kv:
            with pytest.raises(ObjectDoesntExist):
                await kv.read(await kv.get_table_id("cli"), b"hello")

    trio.run(gone)


def test_servers_park_when_busy_unless_told_not_to() -> None:
    parser = build_parser()
    args = parser.parse_args(["server", "--coordinator", "udp://127.0.0.1:1"])
    assert args.park_when_busy and args.busy_spin_us == 50
    args = parser.parse_args(["cluster", "--no-park-when-busy", "--busy-spin-us", "80"])
    assert not args.park_when_busy and args.busy_spin_us == 80


def test_a_sharing_cluster_serves_durable_writes(tmp_path: Path) -> None:
    """``--share-cpu`` reaches every server's dispatcher (status says so) and a replicated
    cluster spinning that way serves writes and reads."""
    args = build_parser().parse_args(["cluster", "--share-cpu"])
    assert args.share_cpu
    assert not build_parser().parse_args(["server", "--coordinator", "x"]).share_cpu
    c = LocalCluster(
        str(tmp_path / "kv"),
        servers=2,
        replicas=1,
        memory_mb=32,
        durability="buffered",
        segment_kb=1024,
        spin_us=5000,
        park_when_busy=False,
        share_cpu=True,
    )
    c.start(progress=lambda _msg: None)
    try:

        async def body() -> None:
            async with await KvClient.open(coordinator=c.coordinator, timeout=10) as kv:
                table = await kv.create_table("shared")
                for i in range(50):
                    await kv.write(table, b"k%d" % i, b"v%d" % i)
                for i in range(50):
                    assert (await kv.read(table, b"k%d" % i))[0] == b"v%d" % i
            status = await gather_status(c.coordinator)
            policies = [s["stats"]["dispatch"]["policy"] for s in status["servers"]]
            assert len(policies) == 2
            assert all(p["share_cpu"] and not p["park_when_busy"] for p in policies)
            assert all(p["spin_us"] == pytest.approx(5000) for p in policies)

        trio.run(body)
    finally:
        c.stop()


def test_storage_flags_reach_the_engine_and_bad_sizes_fail_before_serving(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from services.kvstore._server import ServerConfig

    parser = build_parser()
    args = parser.parse_args(["server", "--coordinator", "udp://127.0.0.1:1"])
    assert (args.seglet_kb, args.cleaner_reserve, args.write_limit) == (64, None, 0.95)
    assert not args.prefault and not args.cleaner_interruptible
    storage = ["--seglet-kb", "8", "--cleaner-reserve", "2", "--write-limit", "0.98"]
    args = parser.parse_args(["cluster", *storage, "--prefault", "--cleaner-interruptible"])
    assert (args.seglet_kb, args.cleaner_reserve, args.write_limit) == (8, 2, 0.98)
    assert args.prefault and args.cleaner_interruptible
    config = ServerConfig(
        "udp://127.0.0.1:1",
        memory_bytes=32 << 20,
        segment_size=256 << 10,
        seglet_size=8 << 10,
        cleaner_reserve_segments=2,
        write_limit=0.98,
    ).storage_config()
    assert (config.seglet_size, config.cleaner_segments, config.write_limit) == (8 << 10, 2, 0.98)
    # a seglet that does not divide the segment: a clear error, no server, no traceback
    assert main(["server", "--coordinator", "udp://127.0.0.1:1", "--seglet-kb", "3"]) == 2
    assert "segment_size must be a multiple of seglet_size" in capsys.readouterr().err
    assert main(["server", "--coordinator", "udp://127.0.0.1:1", "--cleaner-reserve", "0"]) == 2
    assert "cleaner_reserve_segments must be at least 1" in capsys.readouterr().err
    assert main(["server", "--coordinator", "udp://127.0.0.1:1", "--write-limit", "1.5"]) == 2
    assert "write_limit" in capsys.readouterr().err


def test_restarted_coordinator_resumes_tables(tmp_path: Path) -> None:
    c = LocalCluster(
        str(tmp_path / "kv"),
        servers=1,
        replicas=0,
        memory_mb=32,
        durability="buffered",
        segment_kb=1024,
    )
    c.start(progress=lambda _msg: None)
    try:

        async def create() -> int:
            async with await KvClient.open(coordinator=c.coordinator) as kv:
                table = await kv.create_table("kept")
                await kv.write(table, b"k", b"v")
                return table

        table = trio.run(create)
        coordinator = c.procs[0]
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        _proc, address = c._spawn(
            [
                "coordinator",
                "--listen",
                c.coordinator,
                "--dir",
                os.path.join(c.directory, "coordinator"),
            ]
        )

        async def check() -> None:
            async with await KvClient.open(coordinator=address, timeout=10) as kv:
                assert await kv.get_table_id("kept") == table
                assert (await kv.read(table, b"k"))[0] == b"v"

        trio.run(check)
    finally:
        c.stop()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    if not path.exists():
        pytest.skip("no /proc/PID/task/PID/children here")
    return [int(p) for p in path.read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its parent has not reaped it yet)


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_cluster_command_leaves_no_server_behind(tmp_path: Path, how: int) -> None:
    """SIGTERM stops `rpcfast-kv cluster` as Ctrl-C does; even SIGKILL takes its children along
    (their parent-death signal), so no server is left running on its ports."""
    argv = ["cluster", "--servers", "2", "--replicas", "1", "--dir", str(tmp_path / "kv")]
    with subprocess.Popen(
        [sys.executable, "-m", "services.kvstore.cli", *argv], stdout=subprocess.PIPE, text=True
    ) as proc:
        children: list[int] = []
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("cluster is up"):
                    break
            children = _children(proc.pid)
            assert len(children) == 3 and all(_alive(p) for p in children)
            proc.send_signal(how)
            assert proc.wait(timeout=20) == (0 if how == signal.SIGTERM else -signal.SIGKILL)
            assert _wait_gone(children, 15.0) == []
        finally:
            proc.kill()
            for pid in children:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
