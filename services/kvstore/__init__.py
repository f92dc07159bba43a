"""A RAMCloud-style durable in-memory key-value store: client, storage engine, errors.

Run it with ``rpcfast-kv`` (services/kvstore/cli.py); use it with :class:`KvClient`.
"""

from services.kvstore._client import KvClient
from services.kvstore._objects import ObjectManager, RejectRules, StorageStats, key_hash
from services.kvstore.errors import (
    InternalError,
    InvalidParameter,
    KeyTooLarge,
    KvError,
    ObjectDoesntExist,
    ObjectExists,
    Retry,
    Status,
    TableDoesntExist,
    UnknownTablet,
    ValueTooLarge,
    WrongVersion,
    error_for_status,
)
from services.kvstore.log import NullReplicaSink, ReplicaSink, StorageConfig

__all__ = [
    "InternalError",
    "InvalidParameter",
    "KeyTooLarge",
    "KvClient",
    "KvError",
    "NullReplicaSink",
    "ObjectDoesntExist",
    "ObjectExists",
    "ObjectManager",
    "RejectRules",
    "ReplicaSink",
    "Retry",
    "Status",
    "StorageConfig",
    "StorageStats",
    "TableDoesntExist",
    "UnknownTablet",
    "ValueTooLarge",
    "WrongVersion",
    "error_for_status",
    "key_hash",
]
