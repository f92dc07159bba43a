"""Log-structured memory: entries, segments and seglets, the log, the hash table, the cleaner."""

from services.kvstore.log._cleaner import (
    CleanerHandlers,
    CleanerStats,
    CleanerTask,
    LogCleaner,
    choose_task,
    cleaning_score,
    compaction_score,
)
from services.kvstore.log._entries import (
    EntryType,
    LogDigestEntry,
    LogEntry,
    MalformedEntry,
    ObjectEntry,
    SafeVersionEntry,
    SegmentHeaderEntry,
    TombstoneEntry,
    iter_entries_untrusted,
    object_entry_size,
    parse_entry_untrusted,
    tombstone_entry_size,
)
from services.kvstore.log._hashtable import HashTable
from services.kvstore.log._log import (
    Log,
    LogFull,
    NullReplicaSink,
    ReplicaSink,
    StorageConfig,
)
from services.kvstore.log._segments import Pool, SegletAllocator, Segment, SegmentState

__all__ = [
    "CleanerHandlers",
    "CleanerStats",
    "CleanerTask",
    "EntryType",
    "HashTable",
    "Log",
    "LogCleaner",
    "LogDigestEntry",
    "LogEntry",
    "LogFull",
    "MalformedEntry",
    "NullReplicaSink",
    "ObjectEntry",
    "Pool",
    "ReplicaSink",
    "SafeVersionEntry",
    "SegletAllocator",
    "Segment",
    "SegmentHeaderEntry",
    "SegmentState",
    "StorageConfig",
    "TombstoneEntry",
    "choose_task",
    "cleaning_score",
    "compaction_score",
    "iter_entries_untrusted",
    "object_entry_size",
    "parse_entry_untrusted",
    "tombstone_entry_size",
]
