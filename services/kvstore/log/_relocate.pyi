"""Segment compaction's inner loop in C (``_relocate.c``); the cleaner's numpy path is its twin."""

from typing import Any

def compact_range(
    arena: memoryview,
    seglet_size: int,
    bases: Any,
    nbases: int,
    src_first: Any,
    dst_first: Any,
    dst_length: Any,
    dst_limit: Any,
    dst_bits: Any,
    ntargets: int,
    src: Any,
    off: Any,
    size: Any,
    flags: Any,
    aux: Any,
    ref: Any,
    main: Any,
    ovf: Any,
    present: Any,
    words: Any,
    acct: Any,
    first: int,
    limit: int,
    room: int,
    max_batch: int,
    cost_entry: int,
    /,
) -> tuple[int, int, int, int, int, int]: ...
def live_slots(
    flags: Any,
    aux: Any,
    ref: Any,
    ids: Any,
    main: Any,
    ovf: Any,
    present: Any,
    out: Any,
    /,
) -> int: ...
def entry_stamps(
    arena: memoryview, seglet_size: int, bases: Any, off: Any, out: Any, /
) -> None: ...
def place_entries(
    arena: memoryview,
    seglet_size: int,
    bases: Any,
    src_first: Any,
    dst_first: int,
    start: int,
    dst_bits: int,
    ids: Any,
    slots: Any,
    src: Any,
    off: Any,
    size: Any,
    flags: Any,
    aux: Any,
    main: Any,
    ovf: Any,
    words: Any,
    acct: Any,
    /,
) -> int: ...
