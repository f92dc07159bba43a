"""Shared type aliases (Python 3.11 has no ``collections.abc.Buffer``)."""

from typing import TypeAlias

Buffer: TypeAlias = bytes | bytearray | memoryview
