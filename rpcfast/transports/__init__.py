"""Transports: ``udp://``, ``zmq://`` and ``inproc://`` endpoints behind one small interface."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from rpcfast.transports._base import RequestSink, Transport
from rpcfast.transports._inproc import InprocTransport
from rpcfast.transports._udp import UdpTransport, is_loopback, split_host_port
from rpcfast.transports._zmq import ZmqTransport

if TYPE_CHECKING:
    from rpcfast.dispatch import Dispatcher


class _Opener(Protocol):
    def __call__(self, dispatcher: Dispatcher, where: str) -> Transport: ...


SCHEMES: dict[str, _Opener] = {
    "udp": UdpTransport.open,
    "zmq": ZmqTransport.open,
    "inproc": InprocTransport.open,
}


def split_address(address: str) -> tuple[str, str]:
    """``"udp://127.0.0.1:5000"`` -> ``("udp", "127.0.0.1:5000")``."""
    scheme, sep, where = address.partition("://")
    if not sep or scheme not in SCHEMES:
        known = ", ".join(sorted(SCHEMES))
        raise ValueError(f"unknown transport in {address!r} (known: {known})")
    return scheme, where


def open_transport(dispatcher: Dispatcher, address: str) -> Transport:
    """Open a listening endpoint and add it to the dispatcher."""
    scheme, where = split_address(address)
    transport = SCHEMES[scheme](dispatcher, where)
    dispatcher.add_transport(transport)
    return transport


def client_transport(dispatcher: Dispatcher, address: str) -> tuple[Transport, str]:
    """This process's client endpoint for ``address``'s scheme (made on first use), and the peer
    part of the address.

    Client endpoints are separate from listening ones, so a server's shutdown never fails the
    process's own outgoing calls.
    """
    scheme, where = split_address(address)
    loopback = scheme != "udp" or is_loopback(split_host_port(where)[0])
    key = (scheme, loopback)
    transport = dispatcher.client_endpoints.get(key)
    if transport is None:
        if scheme == "udp":
            host = "127.0.0.1" if loopback else "0.0.0.0"
            transport = UdpTransport(dispatcher, host, 0, client_only=True)
        elif scheme == "zmq":
            transport = ZmqTransport(dispatcher, None)
        else:
            transport = InprocTransport(dispatcher, None)
        dispatcher.client_endpoints[key] = transport
        dispatcher.add_transport(transport)
    return transport, where


__all__ = [
    "SCHEMES",
    "InprocTransport",
    "RequestSink",
    "Transport",
    "UdpTransport",
    "ZmqTransport",
    "client_transport",
    "open_transport",
    "split_address",
]
