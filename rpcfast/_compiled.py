"""Which modules mypyc compiles (the per-datagram hot path), and a guard against stale builds.

``setup.py`` compiles :data:`HOT_PATH` into C extension modules unless ``RPCFAST_NO_MYPYC=1``
or no C compiler is found; then the package is pure Python, and behaves the same. Only sync
modules are compiled: code that trio runs as coroutines stays interpreted.

An in-place build (``make venv``: an editable install) leaves ``*.so`` files next to the sources,
and Python imports an extension module in preference to its ``.py``: after an edit, the old
compiled code would run and the edit would silently do nothing. :func:`check_fresh` turns that
into an ImportError at ``import rpcfast`` (this module is the package's first import).
``setup.py`` reads :data:`HOT_PATH`, :data:`ENGINE_PATH`, :data:`GROUP` and the C sources from
this file without running it.
"""

from __future__ import annotations

import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Final

HOT_PATH: Final = (
    "rpcfast/_session.py",
    "rpcfast/_pending.py",
    "rpcfast/transports/_udp.py",
    "rpcfast/dispatch/_poller.py",
    "rpcfast/_router.py",
    "rpcfast/_fastcall.py",
)
"""rpcfast's sources compiled with mypyc, relative to the project root."""

ENGINE_PATH: Final = (
    "services/kvstore/log/_entries.py",
    "services/kvstore/log/_segments.py",
    "services/kvstore/log/_hashtable.py",
    "services/kvstore/log/_log.py",
    "services/kvstore/log/_cleaner.py",
    "services/kvstore/_objects.py",
)
"""The kvstore storage engine's sources compiled in the same group: every read and write runs
through them. (The cleaner's batches stay interpreted: they spend their time in numpy.)"""

ENGINE_C_SOURCES: Final = ("services/kvstore/log/_encode.c", "services/kvstore/log/_relocate.c")
"""The engine's hand-written C: entry encoders (pure-Python twins in ``_entries.py``) and
compaction's inner loop (its twin: the cleaner's numpy path)."""

C_SOURCES: Final = ("rpcfast/transports/_sockops.c", "rpcfast/_header.c")
"""Hand-written C extension modules, built beside the compiled hot path (and only with it: a pure
Python build uses their equivalents ``rpcfast/transports/_sockops_py.py`` and
``rpcfast/_header_py.py``)."""

GROUP: Final = "rpcfast._hotpath"
"""mypyc's name for the shared library of the group (``rpcfast/_hotpath__mypyc*.so``)."""

ROOT: Final = Path(__file__).resolve().parent.parent


def module_name(source: str) -> str:
    """``"rpcfast/transports/_udp.py"`` -> ``"rpcfast.transports._udp"`` (``.c`` alike)."""
    return source.removesuffix(".py").removesuffix(".c").replace("/", ".")


def extension_of(source: Path) -> Path | None:
    """The compiled module that Python imports instead of ``source``, if one is there."""
    for suffix in EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def stale_extensions(root: Path = ROOT) -> list[tuple[Path, Path]]:
    """(source, extension) pairs whose source was modified after the extension was built."""
    stale = []
    for relative in (*HOT_PATH, *ENGINE_PATH, *C_SOURCES, *ENGINE_C_SOURCES):
        source = root / relative
        extension = extension_of(source)
        if extension is not None and source.stat().st_mtime > extension.stat().st_mtime:
            stale.append((source, extension))
    return stale


def check_fresh(root: Path = ROOT) -> None:
    """Raise ImportError if a compiled module in a source tree is older than its source.

    Only source trees (a ``pyproject.toml`` beside the package) are checked: an installed
    copy is never edited, and installers do not keep file times in build order.
    """
    if not (root / "pyproject.toml").exists():
        return
    stale = stale_extensions(root)
    if stale:
        names = ", ".join(str(source.relative_to(root)) for source, _ in stale)
        raise ImportError(
            f"{names} changed after its compiled extension module was built, and Python would "
            f"import the old compiled code instead: rebuild with `make venv` (an editable "
            f"install), or delete the *.so files under {root / 'rpcfast'} and "
            f"{root / 'services'} to run pure Python"
        )


def hot_path_compiled() -> bool:
    """Whether every hot-path module in this process was imported from a compiled extension."""
    for relative in HOT_PATH:
        module = sys.modules.get(module_name(relative))
        if module is None or str(module.__file__).endswith(".py"):
            return False
    return all(module_name(relative) in sys.modules for relative in C_SOURCES)


check_fresh()
