"""The master service over real rpcfast endpoints, driven through KvClient."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

import rpcfast
from services.kvstore import (
    KeyTooLarge,
    ObjectDoesntExist,
    ObjectExists,
    ObjectManager,
    RejectRules,
    StorageConfig,
    TableDoesntExist,
    ValueTooLarge,
    WrongVersion,
)
from services.kvstore._client import KvClient
from services.kvstore._master import MasterService, run_cleaner

SMALL = StorageConfig(total_bytes=8 * 1024 * 1024, segment_size=256 * 1024, seglet_size=16 * 1024)


@pytest.fixture
async def kv() -> AsyncIterator[KvClient]:
    objects = ObjectManager(SMALL)
    async with rpcfast.serve([MasterService(objects)], ["udp://127.0.0.1:0"]) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_cleaner, objects)
            async with await KvClient.open(master=server.addresses[0], timeout=5) as client:
                yield client
            nursery.cancel_scope.cancel()


async def test_tables_and_object_lifecycle(kv: KvClient) -> None:
    table = await kv.create_table("t")
    assert await kv.create_table("t") == table
    assert await kv.get_table_id("t") == table
    v1 = await kv.write(table, b"k", b"hello")
    assert await kv.read(table, b"k") == (b"hello", v1)
    v2 = await kv.write(table, b"k", b"world")
    assert v2 == v1 + 1
    assert await kv.remove(table, b"k") == v2
    with pytest.raises(ObjectDoesntExist):
        await kv.read(table, b"k")
    assert await kv.increment(table, b"n", 5) == 5
    assert await kv.increment(table, b"n", -2) == 3
    await kv.drop_table("t")
    with pytest.raises(TableDoesntExist):
        await kv.get_table_id("t")


async def test_reject_rules_and_typed_errors(kv: KvClient) -> None:
    table = await kv.create_table("rules")
    v = await kv.write(table, b"k", b"a", RejectRules(doesnt_exist=False, exists=True))
    with pytest.raises(ObjectExists):
        await kv.write(table, b"k", b"b", RejectRules(exists=True))
    with pytest.raises(WrongVersion):
        await kv.write(table, b"k", b"b", RejectRules(given_version=v + 7, version_ne_given=True))
    assert await kv.write(table, b"k", b"b", RejectRules(given_version=v, version_ne_given=True))
    with pytest.raises(KeyTooLarge):
        await kv.write(table, b"x" * 65536, b"v")
    with pytest.raises(ValueTooLarge):
        await kv.write(table, b"big", b"v" * (1024 * 1024 + 1))
    with pytest.raises(TableDoesntExist):
        await kv.get_table_id("nope")


async def test_multi_operations_report_per_item(kv: KvClient) -> None:
    table = await kv.create_table("multi")
    versions = await kv.multi_write([(table, b"a", b"1"), (table, b"b", b"2")])
    assert all(isinstance(v, int) for v in versions)
    got = await kv.multi_read([(table, b"a"), (table, b"missing"), (table, b"b")])
    assert got[0] == (b"1", versions[0])
    assert isinstance(got[1], ObjectDoesntExist)
    assert got[2] == (b"2", versions[1])
    assert await kv.multi_increment([(table, b"c", 2), (table, b"c", 3)]) == [2, 5]
    removed = await kv.multi_remove([(table, b"a"), (table, b"zz")])
    assert removed[0] == versions[0] and removed[1] == 0


async def test_enumerate_sees_every_object_once(kv: KvClient) -> None:
    table = await kv.create_table("enum")
    expected = {f"key-{i}".encode(): os.urandom(i % 300) for i in range(500)}
    await kv.multi_write([(table, k, v) for k, v in expected.items()])
    seen: dict[bytes, bytes] = {}
    async for key, value, _version in kv.enumerate(table, page_bytes=4096):
        assert key not in seen
        seen[key] = value
    assert seen == expected


async def test_overwrites_past_memory_size_keep_latest_values(kv: KvClient) -> None:
    # 8 MiB of memory, ~1 MiB live, ~24 MiB written: the cleaner must run for this to pass
    table = await kv.create_table("churn")
    latest: dict[bytes, bytes] = {}
    for round_ in range(24):
        batch = [(table, f"k{i}".encode(), os.urandom(1000)) for i in range(1000)]
        for start in range(0, len(batch), 100):
            outcomes = await kv.multi_write(batch[start : start + 100])
            assert all(isinstance(v, int) for v in outcomes), outcomes
        latest.update({k: v for _t, k, v in batch})
        if round_ % 8 == 0:
            await trio.sleep(0.01)
    for key in list(latest)[::37]:
        assert (await kv.read(table, key))[0] == latest[key]


def test_standalone_master_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.kvstore._master", "udp://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()

        async def main() -> None:
            async with await KvClient.open(master=address) as kv:
                table = await kv.create_table("p")
                await kv.write(table, b"k", b"v" * 1000)
                assert (await kv.read(table, b"k"))[0] == b"v" * 1000

        trio.run(main)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_an_idle_cleaner_checks_ever_less_often_until_the_log_changes() -> None:
    class FakeCleaner:
        def __init__(self) -> None:
            self.checks = 0
            self.log_state = 0
            self.work = 0

        def wants_to_run(self) -> bool:
            self.checks += 1
            return self.work > 0

        def step(self, seconds: float, now: float, interrupt: object = None) -> None:
            assert interrupt is None  # whole slices by default
            self.work -= 1

        def activity(self) -> tuple[int, int, int]:
            return (self.log_state, 0, 0)

    cleaner = FakeCleaner()
    objects: Any = SimpleNamespace(cleaner=cleaner, _clock=time.perf_counter)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_cleaner, objects)
            await trio.sleep(10)
            # 5 ms doubling up to 100 ms: about 100 checks in 10 s, not 2000
            assert 50 < cleaner.checks < 150
            checks = cleaner.checks
            cleaner.log_state = 1  # the log changed (say, a seglet was allocated)
            await trio.sleep(0.1)
            cleaner.work = 3
            await trio.sleep(0.1)
            assert cleaner.work == 0  # noticed within the idle check's longest pause
            assert cleaner.checks - checks >= 5  # and looking every 5 ms again after a change
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_interruptible_cleaner_asks_the_dispatcher_whether_input_waits() -> None:
    seen: list[Any] = []

    class FakeCleaner:
        def wants_to_run(self) -> bool:
            return not seen

        def step(self, seconds: float, now: float, interrupt: Any = None) -> None:
            seen.append(interrupt)

        def activity(self) -> tuple[int, int, int]:
            return (0, 0, 0)

    objects: Any = SimpleNamespace(cleaner=FakeCleaner(), _clock=time.perf_counter)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(run_cleaner, objects, interruptible=True))
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert len(seen) == 1 and callable(seen[0])
    assert seen[0]() is False  # nothing is listening in this run: no input can be waiting
