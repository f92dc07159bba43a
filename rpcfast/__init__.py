"""rpcfast: low-latency RPC for trio.

Define a service with a Cap'n Proto interface and a Python class, serve it on UDP, ZeroMQ or
in-process endpoints, and call it with ``await``. See README.md.
"""

from rpcfast import _compiled  # first: refuses to import stale compiled modules
from rpcfast._client import Connection, Stub, connect
from rpcfast._errors import (
    MalformedResponse,
    PeerDead,
    RemoteError,
    RpcError,
    RpcTimeout,
    ServiceError,
    Status,
)
from rpcfast._schema import Body, load_schema
from rpcfast._server import Deferred, Server, serve
from rpcfast._service import Service, decode_with, fast
from rpcfast._trace import TimeTrace
from rpcfast.dispatch import DispatchConfig

COMPILED: bool = _compiled.hot_path_compiled()
"""Whether the per-datagram hot path runs as mypyc-compiled C (see ``rpcfast._compiled``)."""

__all__ = [
    "COMPILED",
    "Body",
    "Connection",
    "Deferred",
    "DispatchConfig",
    "MalformedResponse",
    "PeerDead",
    "RemoteError",
    "RpcError",
    "RpcTimeout",
    "Server",
    "Service",
    "ServiceError",
    "Status",
    "Stub",
    "TimeTrace",
    "connect",
    "decode_with",
    "fast",
    "load_schema",
    "serve",
]
