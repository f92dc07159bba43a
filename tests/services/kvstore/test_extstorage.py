"""External storage of the coordinator: the embedded log file and ZooKeeper (a real server)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kazoo.client import KazooClient

from services.kvstore._extstorage import (
    MAGIC,
    EmbeddedStorage,
    LeadershipLost,
    StorageError,
    ZooKeeperStorage,
    encode_entry,
    scan_log,
)

RECORDS = [{"kind": "enlist", "n": i, "text": "x" * i} for i in range(5)]


def _opened(path: Path) -> EmbeddedStorage:
    storage = EmbeddedStorage(path)
    assert storage.acquire(1.0)
    return storage


# -- embedded ------------------------------------------------------------------------------------


def test_records_survive_reopen(tmp_path: Path) -> None:
    storage = _opened(tmp_path)
    loaded = storage.load()
    assert loaded.snapshot is None and loaded.records == []
    for record in RECORDS:
        storage.append(record)
    storage.close()

    again = _opened(tmp_path)
    assert again.load().records == RECORDS
    again.close()


def test_every_truncation_point_yields_the_complete_prefix() -> None:
    entries = [encode_entry(2, r) for r in RECORDS]
    data = MAGIC + b"".join(entries)
    ends = [len(MAGIC) + sum(len(e) for e in entries[: i + 1]) for i in range(len(entries))]
    for cut in range(len(data) + 1):
        loaded, good_end = scan_log(data[:cut])
        complete = sum(1 for end in ends if end <= cut)
        assert loaded.records == RECORDS[:complete]
        if complete:
            assert good_end == ends[complete - 1]
        else:
            assert good_end == (len(MAGIC) if cut >= len(MAGIC) else 0)


def test_torn_tail_is_cut_so_later_appends_follow_good_records(tmp_path: Path) -> None:
    storage = _opened(tmp_path)
    storage.load()
    storage.append(RECORDS[0])
    storage.append(RECORDS[1])
    storage.close()
    with open(storage.path, "ab") as f:
        f.write(encode_entry(2, RECORDS[2])[:-3])  # the write in flight at a crash

    storage = _opened(tmp_path)
    assert storage.load().records == RECORDS[:2]
    storage.append(RECORDS[3])
    storage.close()
    storage = _opened(tmp_path)
    assert storage.load().records == [RECORDS[0], RECORDS[1], RECORDS[3]]
    storage.close()


def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    entry = encode_entry(2, RECORDS[1])
    forged = entry[:8] + bytes(len(entry) - 8)  # length and checksum reached disk, data did not
    loaded, good_end = scan_log(MAGIC + encode_entry(2, RECORDS[0]) + forged + bytes(100))
    assert loaded.records == [RECORDS[0]]
    assert good_end == len(MAGIC) + len(encode_entry(2, RECORDS[0]))


def test_corruption_before_the_tail_refuses_to_load(tmp_path: Path) -> None:
    first = bytearray(encode_entry(2, RECORDS[3]))
    first[12] ^= 0x01
    with pytest.raises(StorageError, match="corrupt"):
        scan_log(MAGIC + bytes(first) + encode_entry(2, RECORDS[4]))
    (tmp_path / "coordinator.log").write_bytes(b"not a coordinator log at all")
    storage = _opened(tmp_path)
    with pytest.raises(StorageError, match="magic"):
        storage.load()
    storage.close()


def test_compaction_replaces_the_history_with_a_snapshot(tmp_path: Path) -> None:
    storage = _opened(tmp_path)
    storage.load()
    for record in RECORDS:
        storage.append(record)
    size_before = os.path.getsize(storage.path)
    storage.compact({"state": "small"})
    storage.append(RECORDS[0])
    storage.close()
    assert os.path.getsize(storage.path) < size_before

    storage = _opened(tmp_path)
    loaded = storage.load()
    assert loaded.snapshot == {"state": "small"}
    assert loaded.records == [RECORDS[0]]
    storage.close()


def test_second_storage_on_a_directory_waits_for_the_first(tmp_path: Path) -> None:
    first = _opened(tmp_path)
    second = EmbeddedStorage(tmp_path)
    assert not second.acquire(0.1)
    with pytest.raises(LeadershipLost):
        second.load()
    first.advertise("udp://127.0.0.1:4000")
    first.close()
    assert second.acquire(1.0) and second.is_leader
    assert second.leader_address() == "udp://127.0.0.1:4000"
    second.close()
    assert not second.is_leader


# -- ZooKeeper -----------------------------------------------------------------------------------


def _expire(hosts: str, storage: ZooKeeperStorage) -> None:
    """Expire ``storage``'s session the way a crash would: another client takes it over, then
    closes it."""
    assert storage.client_id is not None
    thief = KazooClient(hosts=hosts, client_id=storage.client_id)
    thief.start(timeout=10)
    thief.stop()
    thief.close()


def test_zookeeper_round_trip(zookeeper: str, zk_root: str) -> None:
    storage = ZooKeeperStorage(zookeeper, zk_root, session_timeout=5.0)
    assert storage.acquire(5.0)
    assert storage.load().records == []
    for record in RECORDS[:3]:
        storage.append(record)
    assert storage.load().records == RECORDS[:3]
    storage.compact({"applied": 3})
    storage.append(RECORDS[3])
    storage.close()

    again = ZooKeeperStorage(zookeeper, zk_root, session_timeout=5.0)
    try:
        assert again.acquire(5.0)
        loaded = again.load()
        assert loaded.snapshot == {"applied": 3}
        assert loaded.records == [RECORDS[3]]
    finally:
        again.close()


def test_zookeeper_standby_takes_over_when_the_leader_session_dies(
    zookeeper: str, zk_root: str
) -> None:
    leader = ZooKeeperStorage(zookeeper, zk_root, session_timeout=5.0)
    standby = ZooKeeperStorage(zookeeper, zk_root, session_timeout=5.0)
    try:
        assert leader.acquire(5.0)
        leader.load()
        leader.append(RECORDS[0])
        leader.advertise("udp://127.0.0.1:4101")
        assert not standby.acquire(0.2)
        assert standby.leader_address() == "udp://127.0.0.1:4101"

        _expire(zookeeper, leader)
        assert standby.acquire(10.0)
        assert standby.load().records == [RECORDS[0]]
        standby.append(RECORDS[1])

        # the deposed leader can no longer write, whatever it believes
        with pytest.raises(StorageError):
            leader.append(RECORDS[2])
        deadline = time.monotonic() + 10
        while leader.is_leader and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not leader.is_leader
        assert standby.load().records == RECORDS[:2]
    finally:
        leader.close()
        standby.close()
