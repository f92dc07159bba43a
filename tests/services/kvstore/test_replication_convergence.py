"""The replica manager's per-write work, against fake connections that the test answers.

Each RPC the manager starts is recorded with its params; the test acknowledges them one at a
time, in any order, so the steps of a durable write (R writes out at once, the sync released by
the R-th ack, a replica fed again as soon as it acks) can be checked exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import pytest

import rpcfast
from services.kvstore._replication import RandomBackupSelector, ReplicaManager

M = 0x100
BACKUPS = [(1, "fake://1"), (2, "fake://2"), (3, "fake://3"), (4, "fake://4")]


@attrs.define(eq=False)
class Call:
    backup: str
    method: str
    params: dict[str, Any]
    callback: Any
    answered: bool = False

    def ack(self, error: Exception | None = None) -> None:
        assert not self.answered
        self.answered = True
        self.callback(None, error)


class FakeConnection:
    """Records ``start`` calls; the data is copied as the encoder would (views die after)."""

    def __init__(self, address: str, calls: list[Call]) -> None:
        self.address = address
        self.calls = calls

    def start(self, _spec: Any, method: Any, params: dict[str, Any], callback: Any) -> object:
        params = dict(params)
        if "data" in params:
            params["data"] = bytes(params["data"])
        self.calls.append(Call(self.address, method.name, params, callback))
        return object()

    def cancel(self, _pending: object) -> None:
        pass


class Harness:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, replicas: int = 3) -> None:
        self.calls: list[Call] = []
        self.log: dict[int, bytearray] = {}
        monkeypatch.setattr(rpcfast, "connect", lambda address: FakeConnection(address, self.calls))
        self.mgr = ReplicaManager(
            M,
            replicas,
            read_segment=self.read_segment,
            select_backups=_FirstChoice(),
        )
        self.mgr.set_backups(BACKUPS[:replicas])
        self.synced: list[Exception | None] = []

    def read_segment(self, segment_id: int) -> Sequence[memoryview] | None:
        data = self.log.get(segment_id)
        return None if data is None else [memoryview(data)]

    def open(self, segment_id: int, data: bytes) -> None:
        self.log[segment_id] = bytearray(data)
        self.mgr.open(segment_id, data)

    def append(self, segment_id: int, data: bytes) -> None:
        buf = self.log[segment_id]
        offset = len(buf)
        buf += data
        self.mgr.append(segment_id, offset, memoryview(data))

    def sync(self) -> None:
        self.mgr.sync(self.synced.append)

    def pending(self) -> list[Call]:
        return [c for c in self.calls if not c.answered]

    def ack_all(self) -> None:
        for _ in range(100):  # (acks may start more calls: bounded)
            pending = self.pending()
            if not pending:
                return
            for call in pending:
                call.ack()
        raise AssertionError("calls kept coming")


class _FirstChoice(RandomBackupSelector):
    """Deterministic placement: the lowest candidate id."""

    def __call__(self, candidates: Sequence[int], *, primary: bool) -> int:
        return min(candidates)


def test_a_write_goes_to_every_replica_at_once_and_syncs_on_the_last_ack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch)
    h.open(1, b"header")
    opens = h.pending()
    assert [(c.backup, c.params["open"], c.params["primary"]) for c in opens] == [
        ("fake://1", True, True),
        ("fake://2", True, False),
        ("fake://3", True, False),
    ]
    h.ack_all()
    before = len(h.calls)

    h.append(1, b"x" * 100)
    writes = h.calls[before:]
    # the R RPCs are all started inside the append, before any answer
    assert sorted(c.backup for c in writes) == ["fake://1", "fake://2", "fake://3"]
    for call in writes:
        assert call.method == "writeSegment"
        assert (call.params["offset"], call.params["data"]) == (6, b"x" * 100)
        assert not call.params["open"] and not call.params["close"]
    h.sync()
    writes[0].ack()
    writes[2].ack()
    assert h.synced == []
    assert h.mgr.stats().buffered_bytes == 100  # not yet on every replica
    writes[1].ack()
    assert h.synced == [None]
    stats = h.mgr.stats()
    assert stats.buffered_bytes == 0 and stats.writes_sent == 6 and stats.writes_in_flight == 0
    assert h.pending() == []

    # a sync with nothing new is answered at once
    h.sync()
    assert h.synced == [None, None]


def test_a_replica_that_acks_while_behind_gets_the_next_bytes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = Harness(monkeypatch)
    h.open(1, b"h")
    h.ack_all()
    h.append(1, b"first")
    h.sync()
    first = h.pending()
    h.append(1, b"second")  # one RPC in flight per replica: nothing new goes out yet
    h.sync()
    assert h.pending() == first

    first[1].ack()  # behind: the bytes appended meanwhile go to it right away
    [follow] = [c for c in h.pending() if c not in first]
    assert follow.backup == first[1].backup
    assert (follow.params["offset"], follow.params["data"]) == (6, b"second")
    first[0].ack()
    first[2].ack()
    assert h.synced == [None]  # the first sync: "first" is on all three
    h.ack_all()
    assert h.synced == [None, None]
    assert h.mgr.stats().buffered_bytes == 0


def test_small_and_large_writes_carry_the_right_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    h.open(1, b"h")
    h.ack_all()
    payloads = [bytes(range(200)), bytes(i % 251 for i in range(9000)), b"z" * 4095, b"w"]
    for payload in payloads:
        start = len(h.log[1])
        before = len(h.calls)
        h.append(1, payload)
        h.ack_all()
        sent = h.calls[before:]
        assert len(sent) == 3
        assert {(c.params["offset"], c.params["data"]) for c in sent} == {(start, payload)}
    assert h.mgr.stats().buffered_bytes == 0


def test_a_new_heads_last_open_ack_lets_the_old_head_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old head's close waits for the new head's open on R backups; the first R - 1 open
    acks change nothing, the last one starts the closes."""
    h = Harness(monkeypatch)
    h.open(1, b"one")
    h.ack_all()
    h.open(2, b"two")
    h.mgr.close(1)
    h.sync()
    opens = h.pending()
    assert [c.params["segmentId"] for c in opens] == [2, 2, 2]
    opens[0].ack()
    opens[1].ack()
    assert h.pending() == [opens[2]]  # no close yet
    opens[2].ack()
    closes = h.pending()
    assert sorted((c.params["segmentId"], c.params["close"]) for c in closes) == [(1, True)] * 3
    assert h.synced == []
    h.ack_all()
    assert h.synced == [None]


def test_a_failed_write_is_replaced_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(monkeypatch)
    h.mgr.set_backups(BACKUPS)  # a fourth backup to take over
    h.open(1, b"head")
    h.ack_all()
    h.append(1, b"data")
    h.sync()
    writes = h.pending()
    writes[0].ack(rpcfast.PeerDead("gone"))
    replacement = [c for c in h.pending() if c not in writes]
    # a best-effort free of the abandoned replica and the new replica's open, fed from offset 0
    by_method = {c.method: c for c in replacement}
    assert by_method["freeSegment"].backup == "fake://1"
    new = by_method["writeSegment"]
    assert new.backup == "fake://4"
    assert new.params["open"] and new.params["primary"]
    assert (new.params["offset"], new.params["data"]) == (0, b"headdata")
    writes[1].ack()
    writes[2].ack()
    assert h.synced == []
    h.ack_all()
    assert h.synced == [None]
    assert h.mgr.stats().replacements == 1
