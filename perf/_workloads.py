"""Workload generators shared by the ``memory`` and ``cleaner`` benchmarks.

The FAST'14 paper's Table 1 workloads (W1-W8) are three phases: allocate objects of one size
distribution while deleting random objects to keep live data under a cap, delete a fraction of
the objects, then allocate objects of another distribution under the same cap. A stream of
write/delete operations is generated here once, deterministically from a seed, so every system
replays exactly the same operations; it is cut into :class:`Batch` es that cross a pipe as flat
arrays (12 bytes an operation), which keeps the generator's bookkeeping out of the measured
process.

"Object size" is key plus value: every key is :data:`KEY_BYTES` bytes (a big-endian counter), so
an object of 100 B carries a 92-byte value. Live bytes are those key and value bytes, the same
for every system; what a system spends on top of them is its overhead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from attrs import frozen

KEY_BYTES = 8
_KEY_DTYPE = np.dtype("<u8")
_SIZE_DTYPE = np.dtype("<u4")


def encode_key(key_id: int) -> bytes:
    """The key of object ``key_id``: 8 bytes, big-endian (so keys sort like their ids)."""
    return key_id.to_bytes(KEY_BYTES, "big")


@frozen
class SizeDist:
    """Object sizes (key + value bytes), uniform over ``[low, high]``; fixed when equal."""

    low: int
    high: int

    def __attrs_post_init__(self) -> None:
        if not KEY_BYTES <= self.low <= self.high:
            raise ValueError(f"object sizes must satisfy {KEY_BYTES} <= low <= high")

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: np.random.Generator, count: int) -> list[int]:
        if self.low == self.high:
            return [self.low] * count
        values: list[int] = rng.integers(self.low, self.high + 1, size=count).tolist()
        return values

    def describe(self) -> str:
        if self.low == self.high:
            return f"fixed {self.low} B"
        return f"uniform {self.low}-{self.high} B"


@frozen
class Workload:
    """One row of Table 1. ``delete_fraction`` and ``after`` are None for a single-phase one."""

    name: str
    before: SizeDist
    delete_fraction: float | None = None
    after: SizeDist | None = None

    def describe(self) -> str:
        if self.after is None or self.delete_fraction is None:
            return self.before.describe()
        return (
            f"{self.before.describe()}, delete {self.delete_fraction:.0%}, "
            f"then {self.after.describe()}"
        )

    @property
    def smallest_mean(self) -> float:
        """Mean size of the phase with the smallest objects (it needs the most objects)."""
        means = [self.before.mean] + ([self.after.mean] if self.after is not None else [])
        return min(means)


WORKLOADS: dict[str, Workload] = {
    "W1": Workload("W1", SizeDist(100, 100)),
    "W2": Workload("W2", SizeDist(100, 100), 0.0, SizeDist(130, 130)),
    "W3": Workload("W3", SizeDist(100, 100), 0.9, SizeDist(130, 130)),
    "W4": Workload("W4", SizeDist(100, 150), 0.0, SizeDist(200, 250)),
    "W5": Workload("W5", SizeDist(100, 150), 0.9, SizeDist(200, 250)),
    "W6": Workload("W6", SizeDist(100, 200), 0.5, SizeDist(1000, 2000)),
    "W7": Workload("W7", SizeDist(1000, 2000), 0.9, SizeDist(1500, 2500)),
    "W8": Workload("W8", SizeDist(50, 150), 0.9, SizeDist(5000, 15000)),
}
"""Table 1 of the paper: before-distribution, fraction deleted, after-distribution."""


@frozen
class Batch:
    """Operations in order: write ``keys[i]`` with an object of ``sizes[i]`` bytes, or delete
    it when ``sizes[i]`` is 0."""

    keys: npt.NDArray[np.uint64]
    sizes: npt.NDArray[np.uint32]

    def __len__(self) -> int:
        return len(self.keys)

    def to_bytes(self) -> bytes:
        return self.keys.astype(_KEY_DTYPE).tobytes() + self.sizes.astype(_SIZE_DTYPE).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Batch:
        per_op = _KEY_DTYPE.itemsize + _SIZE_DTYPE.itemsize
        if len(data) % per_op:
            raise ValueError(f"batch of {len(data)} bytes is not a whole number of operations")
        count = len(data) // per_op
        split = count * _KEY_DTYPE.itemsize
        keys = np.frombuffer(data, dtype=_KEY_DTYPE, count=count)
        sizes = np.frombuffer(data, dtype=_SIZE_DTYPE, count=count, offset=split)
        return cls(keys.astype(np.uint64), sizes.astype(np.uint32))


class WorkloadStream:
    """The operations of one workload under a live-data cap, cut into batches.

    Each allocation phase writes ``phase_bytes`` of new objects (a single-phase workload writes
    twice that, so every workload allocates the same total); before each write, random live
    objects are deleted until the new one fits under ``live_cap``. The counters describe the
    state after the operations yielded so far.
    """

    def __init__(
        self,
        workload: Workload,
        live_cap: int,
        phase_bytes: int,
        *,
        seed: int = 1,
        batch_ops: int = 8192,
    ) -> None:
        if live_cap <= 0 or phase_bytes <= 0 or batch_ops <= 0:
            raise ValueError("live_cap, phase_bytes and batch_ops must be positive")
        self.workload = workload
        self.live_cap = live_cap
        self.phase_bytes = phase_bytes
        self.batch_ops = batch_ops
        self._rng = np.random.default_rng(seed)
        self._pick = random.Random(seed)
        self._keys: list[int] = []
        self._sizes: list[int] = []
        self._next_key = 0
        self._out_keys: list[int] = []
        self._out_sizes: list[int] = []
        self.live_bytes = 0
        self.allocated_bytes = 0
        self.writes = 0
        self.deletes = 0
        self.max_live_objects = 0

    @property
    def live_objects(self) -> int:
        return len(self._keys)

    def batches(self) -> Iterator[Batch]:
        """Every operation of the workload, in order; a generator can be consumed only once."""
        w = self.workload
        if w.after is None or w.delete_fraction is None:
            yield from self._allocate(w.before, 2 * self.phase_bytes)
        else:
            yield from self._allocate(w.before, self.phase_bytes)
            yield from self._delete_fraction(w.delete_fraction)
            yield from self._allocate(w.after, self.phase_bytes)
        if self._out_keys:
            yield self._flush()

    def _flush(self) -> Batch:
        batch = Batch(
            np.array(self._out_keys, dtype=np.uint64), np.array(self._out_sizes, dtype=np.uint32)
        )
        self._out_keys = []
        self._out_sizes = []
        return batch

    def _delete_at(self, index: int) -> None:
        keys = self._keys
        sizes = self._sizes
        self._out_keys.append(keys[index])
        self._out_sizes.append(0)
        self.live_bytes -= sizes[index]
        keys[index] = keys[-1]
        sizes[index] = sizes[-1]
        keys.pop()
        sizes.pop()
        self.deletes += 1

    def _allocate(self, dist: SizeDist, phase_bytes: int) -> Iterator[Batch]:
        start = self.allocated_bytes
        chunk = 4096
        while self.allocated_bytes - start < phase_bytes:
            for size in dist.sample(self._rng, chunk):
                while self.live_bytes + size > self.live_cap and self._keys:
                    self._delete_at(int(self._pick.random() * len(self._keys)))
                key = self._next_key
                self._next_key += 1
                self._keys.append(key)
                self._sizes.append(size)
                self._out_keys.append(key)
                self._out_sizes.append(size)
                self.live_bytes += size
                self.allocated_bytes += size
                self.writes += 1
                if len(self._keys) > self.max_live_objects:
                    self.max_live_objects = len(self._keys)
                if len(self._out_keys) >= self.batch_ops:
                    yield self._flush()
                if self.allocated_bytes - start >= phase_bytes:
                    break

    def _delete_fraction(self, fraction: float) -> Iterator[Batch]:
        count = round(fraction * len(self._keys))
        for _ in range(count):
            self._delete_at(int(self._pick.random() * len(self._keys)))
            if len(self._out_keys) >= self.batch_ops:
                yield self._flush()


def zipf_theta(n: int, hot_fraction: float = 0.15, hot_share: float = 0.90) -> float:
    """The Zipf exponent for which the hottest ``hot_fraction`` of ``n`` keys take
    ``hot_share`` of the accesses (the paper: 90% of writes to 15% of the objects)."""
    if n < 2:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    hot = max(1, math.ceil(hot_fraction * n))

    def share(theta: float) -> float:
        weights = ranks**-theta
        return float(weights[:hot].sum() / weights.sum())

    low, high = 0.0, 4.0
    for _ in range(50):
        mid = (low + high) / 2
        if share(mid) < hot_share:
            low = mid
        else:
            high = mid
    return (low + high) / 2


class KeyChooser:
    """Draws key ids in ``[0, n)``: uniform, or Zipfian with the hot keys scattered at random
    (so popularity is unrelated to the order in which keys were first written)."""

    def __init__(self, n: int, distribution: str, *, seed: int = 1) -> None:
        if n < 1:
            raise ValueError("need at least one key")
        if distribution not in ("uniform", "zipfian"):
            raise ValueError(f"unknown key distribution {distribution!r}")
        self.n = n
        self.distribution = distribution
        self._rng = np.random.default_rng(seed)
        self.theta = 0.0
        self._cdf: npt.NDArray[np.float64] | None = None
        self._perm: npt.NDArray[np.int64] | None = None
        if distribution == "zipfian":
            self.theta = zipf_theta(n)
            cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -self.theta)
            self._cdf = cdf / cdf[-1]
            self._perm = self._rng.permutation(n)

    def draw(self, count: int) -> list[int]:
        if self._cdf is None or self._perm is None:
            keys: list[int] = self._rng.integers(0, self.n, size=count).tolist()
            return keys
        ranks = np.searchsorted(self._cdf, self._rng.random(count), side="right")
        zipf: list[int] = self._perm[np.minimum(ranks, self.n - 1)].tolist()
        return zipf
