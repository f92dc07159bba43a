"""The polling dispatcher: one loop per process that drives every transport."""

from rpcfast.dispatch._dispatcher import DispatchConfig, Dispatcher, DispatchStats, current

__all__ = ["DispatchConfig", "DispatchStats", "Dispatcher", "current"]
